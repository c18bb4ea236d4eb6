#include "drivers/refgpu/gpu_mmu.h"

#include <cerrno>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::refgpu {

// Between reading a leaf from the page table and caching it in the TLB: the window in which a
// zap + invalidation must not slip (the fill is under the table lock, so the zap waits).
GPUSVM_SCHED_POINT(g_sp_walked, "refgpu.mmu.walked");

const char* access_name(Access a) {
  switch (a) {
    case Access::kRead: return "read";
    case Access::kWrite: return "write";
    case Access::kAtomic: return "atomic";
  }
  return "?";
}

std::byte* HostMemoryResolver::resolve(Target target, uint64_t addr, uint64_t len) {
  if (target == Target::kVram) {
    if (!vram_ || !vram_->contains(addr, len)) return nullptr;
    return vram_->data(addr);
  }
  if (!mem_) return nullptr;
  const uint64_t ram_bytes = mem_->ram_pages() * mm::kPageSize;
  if (addr >= ram_bytes || len > ram_bytes - addr) return nullptr;
  return mem_->ram_data(addr >> mm::kPageShift) + (addr & (mm::kPageSize - 1));
}

int GpuMmu::translate(uint64_t va, Access access, Translation* out, FaultType* fault) {
  tlb_->access_lock().assert_held();
  std::optional<GpuLeaf> leaf = tlb_->lookup(va);
  if (!leaf) {
    ReadLock g(&pt_->lock());
    leaf = pt_->lookup_locked(va);
    g_sp_walked.reach();
    if (leaf) tlb_->fill(*pt_, *leaf);
  }
  if (!leaf) {
    *fault = FaultType::kNotPresent;
    return -EFAULT;
  }
  if ((access == Access::kWrite && !(leaf->perms & kPermWrite)) ||
      (access == Access::kAtomic && !(leaf->perms & kPermAtomic))) {
    *fault = FaultType::kPermission;
    return -EFAULT;
  }
  const uint64_t off = va - leaf->va;
  std::byte* host = mem_->resolve(leaf->target, leaf->addr + off, leaf->size - off);
  if (!host) return -EIO;
  out->host = host;
  out->len = leaf->size - off;
  return 0;
}

}  // namespace gpusvm::refgpu
