#include "drivers/refgpu/vram.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace gpusvm::refgpu {

Result<std::unique_ptr<VramArena>> VramArena::create(uint64_t size) {
  if (size == 0 || size % kSZ2M != 0) return Err{-EINVAL};
  void* p = std::aligned_alloc(kSZ2M, size);
  if (!p) return Err{-ENOMEM};
  // Fresh device memory reads as zero (and the host pages are touched now, not in a timed copy).
  std::memset(p, 0, size);
  return std::unique_ptr<VramArena>(new VramArena(static_cast<std::byte*>(p), size));
}

VramArena::~VramArena() { std::free(base_); }

}  // namespace gpusvm::refgpu
