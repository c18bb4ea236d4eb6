// DRM_IOCTL_REFGPU_VM_BIND (xe_vm_bind_ioctl with vm_bind_ioctl_check_args): the op array in
// the caller's memory, every field checked before Vm::bind runs, syncs around it. A MAP of a
// BO (obj != 0) looks the handle up (-ENOENT) and checks [obj_offset, obj_offset + range)
// lies in the BO and that a VM-private BO is bound in its own VM (-EINVAL, as
// xe_vm_bind_ioctl_validate_bo); the op then holds its own reference, so a GEM_CLOSE right
// after leaves the binding intact.
#include <algorithm>
#include <cerrno>
#include <vector>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

namespace {

constexpr uint32_t kMaxBinds = 1024;
constexpr uint32_t kBindFlags = REFGPU_VM_BIND_FLAG_READONLY | REFGPU_VM_BIND_FLAG_IMMEDIATE |
                                REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR | REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET |
                                REFGPU_VM_BIND_FLAG_EVICT;

// One op's fields (vm_bind_ioctl_check_args' per-op checks). -EINVAL for a malformed op.
int check_op(const drm_refgpu_vm_bind_op& o, uint64_t va_limit) {
  if (o.extensions || o.pad || o.pad2 || !all_zero(o.reserved)) return -EINVAL;
  if (o.op > REFGPU_VM_BIND_OP_PREFETCH || (o.flags & ~kBindFlags)) return -EINVAL;
  const bool mirror = o.flags & REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR;
  if (o.addr % 4096 || o.range % 4096 || o.range == 0) return -EINVAL;
  if (o.addr + o.range < o.addr || o.addr + o.range > va_limit) return -EINVAL;
  if (o.op != REFGPU_VM_BIND_OP_PREFETCH && o.prefetch_mem_region_instance) return -EINVAL;
  switch (o.op) {
    case REFGPU_VM_BIND_OP_MAP:
      if (o.flags & REFGPU_VM_BIND_FLAG_EVICT) return -EINVAL;
      if ((o.flags & REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET) && !mirror) return -EINVAL;
      if (mirror) {
        if (o.obj || o.obj_offset || (o.flags & REFGPU_VM_BIND_FLAG_READONLY)) return -EINVAL;
        return 0;
      }
      if (!o.obj) return -EINVAL;  // a MAP is of a BO or of the CPU address space
      if (o.obj_offset % 4096) return -EINVAL;
      return 0;
    case REFGPU_VM_BIND_OP_UNMAP:
      if (o.obj || o.obj_offset) return -EINVAL;
      if (o.flags & ~REFGPU_VM_BIND_FLAG_EVICT) return -EINVAL;
      return 0;
    default:  // PREFETCH
      if (o.obj || o.obj_offset) return -EINVAL;
      if (o.flags) return -EINVAL;
      return 0;
  }
}

}  // namespace

int ioctl_vm_bind(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_bind* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->reserved)) return -EINVAL;
  if (a->num_binds == 0 || a->num_binds > kMaxBinds || a->num_syncs > kMaxSyncs) return -EINVAL;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  if (!vm) return -ENOENT;
  if (a->exec_queue_id) {
    std::shared_ptr<FileExecQueue> q = f.find_exec_queue(a->exec_queue_id);
    if (!q) return -ENOENT;
    if (q->vm != vm) return -EINVAL;  // a bind queue must be of this VM
  }
  std::vector<drm_refgpu_vm_bind_op> raw(a->num_binds);
  if (a->num_binds == 1) {
    raw[0] = a->bind;
  } else if (copy_from_user(raw.data(), a->vector_of_binds, raw.size() * sizeof(raw[0]))) {
    return -EFAULT;
  }
  std::vector<BindOp> ops;
  ops.reserve(raw.size());
  for (const drm_refgpu_vm_bind_op& o : raw) {
    if (int rc = check_op(o, f.dev().va_limit())) return rc;
    BoRef bo;
    if (o.obj) {
      std::shared_ptr<FileBo> fb = f.find_bo(o.obj);
      if (!fb) return -ENOENT;
      if (fb->vm_id && fb->vm_id != vm->id) return -EINVAL;
      const uint64_t size = fb->bo->size();
      if (o.obj_offset >= size || o.range > size - o.obj_offset) return -EINVAL;
      bo = fb->bo;
    }
    ops.push_back(BindOp{.op = o.op, .flags = o.flags, .addr = o.addr, .range = o.range,
                         .prefetch_region = o.prefetch_mem_region_instance, .bo = std::move(bo),
                         .bo_offset = o.obj_offset});
  }
  std::vector<SyncEntry> syncs;
  if (int rc = parse_syncs(f, a->syncs, a->num_syncs, vm->lr_mode(), &syncs)) return rc;
  std::vector<std::shared_ptr<Fence>> deps;
  if (int rc = collect_in_fences(f, syncs, &deps)) return rc;
  const bool ready = std::all_of(deps.begin(), deps.end(), [](const auto& d) { return d->signaled(); });
  if (!ready || !vm->bind_queue->idle()) {
    // Deferred (an in-fence pending, or an earlier deferred bind of this VM not done: binds
    // of a VM stay in order): the ops run on the bind engine once the in-fences signaled;
    // the ioctl returns now. Their result - Vm::bind's errno, or an in-fence's error, in
    // which case nothing is applied - is the out-fences' status.
    Result<std::shared_ptr<Fence>> job =
        vm->bind_queue->submit_work([vm, ops = std::move(ops)] { return vm->vm->bind(ops); }, std::move(deps));
    if (!job) return job.error();
    attach_out_syncs(f, syncs, *job);
    return 0;
  }
  // Every in-fence signaled: the bind runs now. An in-fence error skips it (nothing applied)
  // and goes to the out-fences, as for the deferred one; the ioctl itself succeeded.
  auto done = std::make_shared<Fence>();
  for (const auto& d : deps) {
    if (d->status() < 0) {
      done->signal(d->status());
      attach_out_syncs(f, syncs, done);
      return 0;
    }
  }
  // Vm::bind validates the ops against the VMA tree before it applies any (-EINVAL:
  // overlap, a mirror in a VM without fault mode).
  const int rc = vm->vm->bind(ops);
  if (rc) return rc;
  done->signal(0);
  attach_out_syncs(f, syncs, done);
  return 0;
}

}  // namespace gpusvm::refgpu
