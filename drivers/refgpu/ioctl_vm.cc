// DRM_IOCTL_REFGPU_VM_CREATE / VM_DESTROY (xe_vm_create_ioctl, xe_vm_destroy_ioctl).
#include <cerrno>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

namespace {
constexpr uint32_t kVmCreateFlags =
    REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE | REFGPU_VM_CREATE_FLAG_NO_VM_OVERCOMMIT;
}  // namespace

int ioctl_vm_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_create* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->reserved)) return -EINVAL;
  if (a->flags & ~kVmCreateFlags) return -EINVAL;
  // Replayable faults need a long-running VM (no dma-fences that a fault could stall).
  if ((a->flags & REFGPU_VM_CREATE_FLAG_FAULT_MODE) && !(a->flags & REFGPU_VM_CREATE_FLAG_LR_MODE))
    return -EINVAL;
  const uint32_t id = f.reserve_vm_id();
  if (!id) return -ENOSPC;
  RefgpuDevice& dev = f.dev();
  auto fvm = std::make_shared<FileVm>(&dev, id, dev.alloc_asid(), f.mm_ref());
  VmConfig cfg;
  cfg.id = fvm->asid;
  cfg.flags = a->flags;
  cfg.as = fvm->mm.get();
  cfg.mem = dev.resolver();
  cfg.device = &dev.dma_device();
  cfg.vram = dev.vram_pagemaps();
  cfg.smem_atomics = dev.config().smem_atomics;
  // A devmem_fd naming a device is resolved by the madvise ioctl in the caller's fd table
  // (ioctl_madvise.cc): no resolver here, as no device has a link to another yet.
  Result<std::unique_ptr<Vm>> vm = Vm::create(std::move(cfg));
  if (!vm) return vm.error();
  fvm->vm = std::move(*vm);
  Result<std::shared_ptr<ExecQueue>> bq = dev.bind_engine()->create_queue(id, fvm->vm->mmu());
  if (!bq) return bq.error();
  fvm->bind_queue = std::move(*bq);
  // The table refers to the Vm through fvm (aliasing): whoever finds it keeps fvm alive.
  dev.register_vm(fvm->asid, std::shared_ptr<Vm>(fvm, fvm->vm.get()));
  f.insert_vm(std::move(fvm));
  a->vm_id = id;
  return 0;
}

int ioctl_vm_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_destroy* a) {
  (void)caller;
  if (a->pad || !all_zero(a->reserved)) return -EINVAL;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  if (int rc = f.remove_vm(a->vm_id)) return rc;
  // Binds still waiting on in-fences are cancelled (-ECANCELED on their out-fences).
  if (vm && vm->bind_queue) (void)f.dev().bind_engine()->destroy_queue(vm->bind_queue);
  return 0;
}

}  // namespace gpusvm::refgpu
