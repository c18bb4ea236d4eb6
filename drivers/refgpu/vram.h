// VramArena: the reference GPU's device memory on the host backend, a block of host bytes.
//
// Offsets are what the buddy allocator hands out and what GPU page-table entries with a VRAM
// target hold. The arena is 2 MiB aligned, so a 2 MiB block of it can back a 2 MiB GPU leaf
// and the copy engine's word copies are naturally aligned.
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

namespace gpusvm::refgpu {

inline constexpr uint64_t kSZ4K = 4096;
inline constexpr uint64_t kSZ64K = 64 * 1024;
inline constexpr uint64_t kSZ2M = 2 * 1024 * 1024;

class VramArena {
 public:
  // `size`: a non-zero multiple of 2 MiB. -EINVAL otherwise, -ENOMEM when the host refuses.
  static Result<std::unique_ptr<VramArena>> create(uint64_t size);
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
  VramArena(std::byte* base, uint64_t size) : base_(base), size_(size) {}
  std::byte* const base_;
  const uint64_t size_;
};

}  // namespace gpusvm::refgpu
