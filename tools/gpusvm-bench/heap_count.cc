// Global operator new / delete that count live bytes (heap_count.h).
#include "tools/gpusvm-bench/heap_count.h"

#include <malloc.h>

#include <atomic>
#include <cstdlib>
#include <new>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define GPUSVM_BENCH_NO_HEAP_COUNT 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GPUSVM_BENCH_NO_HEAP_COUNT 1
#endif

namespace gpusvm::bench {
namespace {
std::atomic<int64_t> g_live{0};
}  // namespace

#ifdef GPUSVM_BENCH_NO_HEAP_COUNT
bool heap_counting() { return false; }
#else
bool heap_counting() { return true; }
#endif
int64_t live_heap_bytes() { return g_live.load(std::memory_order_relaxed); }

}  // namespace gpusvm::bench

#ifndef GPUSVM_BENCH_NO_HEAP_COUNT
// The plain forms only: libstdc++'s array, nothrow and sized forms call these; the aligned
// forms stay libstdc++'s (aligned_alloc / free) and are not counted, consistently on both
// sides.
void* operator new(std::size_t n) {
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  gpusvm::bench::g_live.fetch_add(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
  return p;
}
void operator delete(void* p) noexcept {
  if (!p) return;
  gpusvm::bench::g_live.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }
#endif
