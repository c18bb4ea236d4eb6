// VramRegion: one VRAM memory region of the device - its arena and its buddy allocator - as
// the query ioctl reports it (instance, total size, bytes in use). Region instance 0 is system
// memory and has no VramRegion; VRAM regions are instances 1...
//
// Thread safety: const after create() except the allocator, which has its own lock.
#pragma once

#include <cstdint>
#include <memory>

#include "gpusvm/base/result.h"
#include "drivers/refgpu/buddy.h"
#include "drivers/refgpu/vram.h"

namespace gpusvm::refgpu {

class VramRegion {
 public:
  // instance >= 1; size a non-zero multiple of 2 MiB. -EINVAL, or -ENOMEM from the arena.
  // On the host backend.
  static Result<std::unique_ptr<VramRegion>> create(uint16_t instance, uint64_t size);
  // On `backend` (its allocation errors: Backend::alloc_vram).
  static Result<std::unique_ptr<VramRegion>> create(Backend& backend, uint16_t instance, uint64_t size);

  uint16_t instance() const { return instance_; }
  uint64_t total_size() const { return arena_->size(); }
  uint64_t used() const { return buddy_.used_bytes(); }
  VramArena& arena() { return *arena_; }
  Buddy& buddy() { return buddy_; }

 private:
  VramRegion(uint16_t instance, std::unique_ptr<VramArena> arena)
      : instance_(instance), arena_(std::move(arena)), buddy_(arena_->size()) {}
  const uint16_t instance_;
  const std::unique_ptr<VramArena> arena_;
  Buddy buddy_;
};

}  // namespace gpusvm::refgpu
