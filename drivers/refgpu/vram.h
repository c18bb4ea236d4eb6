// VramArena: one VRAM region's device memory as the driver sees it: the CPU mapping of a
// backend's VramMemory (backend.h: a 2 MiB aligned host block on the host backend, mapped
// DEVICE_LOCAL VkDeviceMemory on the Vulkan backend).
//
// Offsets are what the buddy allocator hands out and what GPU page-table entries with a VRAM
// target hold. The mapping is at least 4 KiB aligned (2 MiB on the host backend), so the copy
// engine's page copies and the engines' word accesses are naturally aligned.
//
// Thread safety: the arena is const after create(); the bytes are accessed by engines (through
// the GPU MMU, with atomic word accesses where the ISA asks) and by the copy engine; who may
// touch which bytes when is the contract of the allocator's owner (a migration owns its
// destination blocks until it publishes them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "gpusvm/base/result.h"
#include "drivers/refgpu/backend.h"

namespace gpusvm::refgpu {

inline constexpr uint64_t kSZ4K = 4096;
inline constexpr uint64_t kSZ64K = 64 * 1024;
inline constexpr uint64_t kSZ2M = 2 * 1024 * 1024;

class VramArena {
 public:
  // `size`: a non-zero multiple of 2 MiB. -EINVAL otherwise, -ENOMEM when the host refuses.
  // On the host backend.
  static Result<std::unique_ptr<VramArena>> create(uint64_t size);
  // On `backend`: its errors (Backend::alloc_vram).
  static Result<std::unique_ptr<VramArena>> create(Backend& backend, uint64_t size);
  ~VramArena();
  VramArena(const VramArena&) = delete;
  VramArena& operator=(const VramArena&) = delete;

  uint64_t size() const { return size_; }
  // Host bytes at `offset`; the caller has checked offset < size().
  std::byte* data(uint64_t offset) const { return base_ + offset; }
  bool contains(uint64_t offset, uint64_t len) const {
    return offset <= size_ && len <= size_ - offset;
  }

 private:
  explicit VramArena(std::unique_ptr<VramMemory> mem)
      : mem_(std::move(mem)), base_(mem_->data()), size_(mem_->size()) {}
  const std::unique_ptr<VramMemory> mem_;
  std::byte* const base_;
  const uint64_t size_;
};

}  // namespace gpusvm::refgpu
