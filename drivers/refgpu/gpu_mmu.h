// GpuMmu: how an engine reaches memory: {vm, address, access} -> host bytes, or a fault.
//
// A translation looks in the VM's TLB first, walks the GpuPageTable on a miss (filling the
// TLB under the table's shared lock) and checks the leaf's permissions: a missing leaf is a
// NOT_PRESENT fault, a write to a leaf without write permission or an atomic access to one
// without atomic permission a PERMISSION fault. The leaf's target is then resolved to host
// bytes by a MemoryResolver (system memory by DMA address, VRAM by offset).
//
// Contract: the caller holds the TLB's access lock shared from translate() to the end of the
// access it makes through the result (see tlb.h), and never across a fault's service.
#pragma once

#include <cstddef>
#include <cstdint>

#include "drivers/refgpu/gpu_page_table.h"
#include "drivers/refgpu/tlb.h"
#include "drivers/refgpu/vram.h"

namespace gpusvm::mm {
class PhysMem;
}

namespace gpusvm::refgpu {

enum class Access : uint8_t { kRead, kWrite, kAtomic };
enum class FaultType : uint8_t { kNotPresent, kPermission };

const char* access_name(Access a);

// Host bytes for a leaf's target: nullptr when [addr, addr + len) is not backed (a bad DMA
// address or VRAM offset: a driver bug, reported to the job as -EIO).
class MemoryResolver {
 public:
  virtual ~MemoryResolver() = default;
  virtual std::byte* resolve(Target target, uint64_t addr, uint64_t len) = 0;
};

// The host backend: DMA address = physical address (pfn << 12) of PhysMem RAM, VRAM offsets
// in a VramArena (either may be null when absent).
class HostMemoryResolver : public MemoryResolver {
 public:
  HostMemoryResolver(mm::PhysMem* mem, VramArena* vram) : mem_(mem), vram_(vram) {}
  std::byte* resolve(Target target, uint64_t addr, uint64_t len) override;

 private:
  mm::PhysMem* const mem_;
  VramArena* const vram_;
};

struct Translation {
  std::byte* host = nullptr;  // bytes at the translated address
  uint64_t len = 0;           // bytes valid from there to the end of the leaf
};

class GpuMmu {
 public:
  GpuMmu(uint32_t vm_id, GpuPageTable* pt, Tlb* tlb, MemoryResolver* mem)
      : vm_id_(vm_id), pt_(pt), tlb_(tlb), mem_(mem) {}

  // 0 and *out; -EFAULT with *fault set (a GPU fault to raise); -EIO for an unbacked target.
  // Context: the TLB access lock held shared (asserted).
  [[nodiscard]] int translate(uint64_t va, Access access, Translation* out, FaultType* fault);

  uint32_t vm_id() const { return vm_id_; }
  Tlb& tlb() { return *tlb_; }
  GpuPageTable& page_table() { return *pt_; }

 private:
  const uint32_t vm_id_;
  GpuPageTable* const pt_;
  Tlb* const tlb_;
  MemoryResolver* const mem_;
};

}  // namespace gpusvm::refgpu
