#include "drivers/refgpu/vram.h"

#include <cerrno>

namespace gpusvm::refgpu {

Result<std::unique_ptr<VramArena>> VramArena::create(uint64_t size) { return create(*host_backend(), size); }

Result<std::unique_ptr<VramArena>> VramArena::create(Backend& backend, uint64_t size) {
  if (size == 0 || size % kSZ2M != 0) return Err{-EINVAL};
  auto m = backend.alloc_vram(size);
  if (!m) return Err{m.error()};
  return std::unique_ptr<VramArena>(new VramArena(std::move(*m)));
}

VramArena::~VramArena() = default;

}  // namespace gpusvm::refgpu
