// Vm::prepare_exec and the LR rebind on fault: BO bindings of a VM without fault mode bound
// again after a move zapped them (see vm.h). Xe in shape: xe_exec.c validates the VM's
// evicted BOs and rebinds their VMAs before it queues a job (xe_vm_validate_rebind); an LR
// VM's preempt fences suspend its queues and xe_vm.c's rebind worker rebinds, then resumes.
#include <cerrno>

#include "drivers/refgpu/vm.h"

namespace gpusvm::refgpu {

namespace {

// Rebinding passes of one prepare_exec: a pass can find a binding zapped again by an explicit
// move racing it (the LRU cannot: the VM's BOs are busy); more than this many is a livelock.
constexpr int kRebindPasses = 4;

// Xe's xe_bo_validate with the BO's placements: back into VRAM when VRAM is allowed and the
// BO is not CPU-mapped (a CPU-mapped BO stays in system memory, bo.h); when VRAM stays full,
// a BO that may live in system memory stays there (TTM's fallback to the next placement).
int validate_bo(Bo* bo) {
  if (!(bo->placement() & kBoPlacementVram) || bo->backing() == BoBacking::kVram) return 0;
  const bool system_ok = bo->placement() & kBoPlacementSystem;
  if (system_ok && bo->cpu_mapped()) return 0;
  const int rc = bo->move_to_vram();
  if (rc == 0) return 0;
  if (system_ok && (rc == -ENOSPC || rc == -ENOMEM)) return 0;
  return rc;
}

}  // namespace

int Vm::rebind_locked(BoBinding* b) {
  int rc = validate_bo(b->bo());
  if (rc == 0) rc = b->bind();
  if (rc != 0) {
    b->invalidate();  // a partial bind maps nothing
    stats_.bo_rebind_errors.add();
    return rc;
  }
  stats_.bo_rebinds.add();
  return 0;
}

int Vm::prepare_exec(BoBusyHold* hold) {
  if (dying()) return -ENODEV;
  if (fault_mode()) return 0;
  MutexLock g(&lock_);
  BoBusyHold busy;
  for (auto& [s, v] : vmas_) {
    if (v.binding) busy.add(v.binding->bo_ref());
  }
  std::vector<BoBinding*> rebound;
  auto roll_back = [&](int rc) {
    for (BoBinding* b : rebound) b->invalidate();
    return rc;
  };
  for (int pass = 0; pass < kRebindPasses; pass++) {
    bool all_valid = true;
    for (auto& [s, v] : vmas_) {
      if (!v.binding || !v.binding->needs_rebind()) continue;
      if (int rc = rebind_locked(v.binding.get())) return roll_back(rc);
      rebound.push_back(v.binding.get());
    }
    for (auto& [s, v] : vmas_) {
      if (v.binding && v.binding->needs_rebind()) all_valid = false;
    }
    if (all_valid) {
      if (!(flags() & REFGPU_VM_CREATE_FLAG_LR_MODE)) *hold = std::move(busy);
      return 0;
    }
  }
  return roll_back(-EAGAIN);
}

int Vm::handle_fault_no_mirror(const GpuFault& fault) {
  if (!(flags() & REFGPU_VM_CREATE_FLAG_LR_MODE)) return -EFAULT;
  MutexLock g(&lock_);
  const GpuVma* v = vma_at_locked(fault.address);
  if (!v || v->kind != GpuVma::Kind::kBo || !v->binding->needs_rebind()) return -EFAULT;
  if (fault.access != Access::kRead && (v->flags & REFGPU_VM_BIND_FLAG_READONLY)) return -EFAULT;
  return rebind_locked(v->binding.get());
}

}  // namespace gpusvm::refgpu
