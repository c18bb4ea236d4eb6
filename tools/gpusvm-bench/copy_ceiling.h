// The raw copy ceiling of a refgpu backend, the baseline of the refgpu cases run with
// --backend vulkan (issue 14: "one large vkCmdCopyBuffer for Vulkan"; the host backend's is
// memcpy, which those cases measure themselves).
//
// What it measures: one copy request through a copy backend of its own on the same device
// (Backend::make_copy: on Vulkan the same VkDevice and queue as the device's copy engine),
// with one region per contiguous run of system frames: `bytes` of order-9 folios taken from
// a fresh PhysMem are contiguous, so that is one region, one vkCmdCopyBuffer, one submit and
// one timeline wait, each way. No validation, no page lists, no migration around it: what
// the link moves when it is given the whole buffer at once. regions() says how many there
// were (more than one only when the frames were fragmented).
//
// Errors: throws Failure (bench.h) naming the call and the errno, or the first wrong byte.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "drivers/refgpu/backend.h"
#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vram.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::bench {

class CopyCeiling {
 public:
  // `bytes`: a multiple of 2 MiB, taken from `mem` (system) and from `backend` (VRAM).
  CopyCeiling(mm::PhysMem& mem, refgpu::Backend& backend, uint64_t bytes);
  ~CopyCeiling();
  CopyCeiling(const CopyCeiling&) = delete;
  CopyCeiling& operator=(const CopyCeiling&) = delete;

  // Fills the source with a pattern of `salt` (untimed), copies it in one request (timed,
  // returned in ns), and compares every byte of the destination (untimed).
  uint64_t to_vram_ns(uint64_t salt);
  uint64_t to_sys_ns(uint64_t salt);
  size_t regions() const { return sys_runs_.size(); }
  uint64_t bytes() const { return bytes_; }

 private:
  struct Run {
    std::byte* sys;  // contiguous system bytes
    uint64_t vram_off;
    uint64_t bytes;
  };
  uint64_t copy(bool to_vram, uint64_t salt);

  mm::PhysMem& mem_;
  const uint64_t bytes_;
  std::vector<mm::Folio*> folios_;
  std::vector<Run> sys_runs_;
  std::unique_ptr<refgpu::VramArena> vram_;
  std::unique_ptr<refgpu::CopyBackend> copy_;
};

}  // namespace gpusvm::bench
