// How the simulated device moves bytes: word by word with relaxed atomic accesses, like a DMA
// engine whose 8-byte accesses are single-copy atomic. A CPU thread that races with the device
// on the same words through the CPU-access API's atomics (which also use atomic words) then
// has no C++ data race; the result is whatever order the hardware would produce.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gpusvm/mm/types.h"

namespace gpusvm::dmirror {

inline uint64_t* page_words(std::byte* page) { return reinterpret_cast<uint64_t*>(page); }

// Copies one page (frames are page aligned, so every word is naturally aligned).
inline void dev_copy_page(std::byte* dst, std::byte* src) {
  uint64_t* d = page_words(dst);
  uint64_t* s = page_words(src);
  for (size_t i = 0; i < mm::kPageSize / sizeof(uint64_t); i++) {
    // relaxed: device accesses order nothing; the mirror protocol orders them with the CPU.
    std::atomic_ref<uint64_t>(d[i]).store(std::atomic_ref<uint64_t>(s[i]).load(std::memory_order_relaxed),
                                          std::memory_order_relaxed);
  }
}

// Between a page and the caller's (private, non-shared) bounce buffer.
inline void dev_read_page(void* out, std::byte* page) {
  uint64_t* s = page_words(page);
  auto* o = static_cast<std::byte*>(out);
  for (size_t i = 0; i < mm::kPageSize / sizeof(uint64_t); i++) {
    const uint64_t v = std::atomic_ref<uint64_t>(s[i]).load(std::memory_order_relaxed);  // see above
    std::memcpy(o + i * sizeof(uint64_t), &v, sizeof(v));
  }
}

inline void dev_write_page(std::byte* page, const void* in) {
  uint64_t* d = page_words(page);
  const auto* p = static_cast<const std::byte*>(in);
  for (size_t i = 0; i < mm::kPageSize / sizeof(uint64_t); i++) {
    uint64_t v;
    std::memcpy(&v, p + i * sizeof(uint64_t), sizeof(v));
    std::atomic_ref<uint64_t>(d[i]).store(v, std::memory_order_relaxed);  // see above
  }
}

inline void dev_clear_page(std::byte* page) {
  uint64_t* d = page_words(page);
  for (size_t i = 0; i < mm::kPageSize / sizeof(uint64_t); i++) {
    std::atomic_ref<uint64_t>(d[i]).store(0, std::memory_order_relaxed);  // see above
  }
}

}  // namespace gpusvm::dmirror
