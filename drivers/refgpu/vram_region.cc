#include "drivers/refgpu/vram_region.h"

#include <cerrno>

namespace gpusvm::refgpu {

Result<std::unique_ptr<VramRegion>> VramRegion::create(uint16_t instance, uint64_t size) {
  return create(*host_backend(), instance, size);
}

Result<std::unique_ptr<VramRegion>> VramRegion::create(Backend& backend, uint16_t instance, uint64_t size) {
  if (instance == 0) return Err{-EINVAL};  // instance 0 is system memory
  auto arena = VramArena::create(backend, size);
  if (!arena.ok()) return Err{arena.error()};
  return std::unique_ptr<VramRegion>(new VramRegion(instance, std::move(*arena)));
}

}  // namespace gpusvm::refgpu
