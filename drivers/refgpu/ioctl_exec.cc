// DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE / EXEC_QUEUE_DESTROY / EXEC (xe_exec_queue.c, xe_exec.c)
// and the sync entries they share with vm_bind (xe_sync.c).
#include <cerrno>
#include <chrono>

#include "drivers/refgpu/ioctl.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/mm/cpu_access.h"

namespace gpusvm::refgpu {

int parse_syncs(RefgpuFile& file, uint64_t uptr, uint32_t count, bool lr, std::vector<SyncEntry>* out) {
  if (count > kMaxSyncs) return -EINVAL;
  std::vector<drm_refgpu_sync> raw(count);
  if (count && copy_from_user(raw.data(), uptr, count * sizeof(drm_refgpu_sync))) return -EFAULT;
  out->clear();
  for (const drm_refgpu_sync& s : raw) {
    if (s.extensions || !all_zero(s.reserved)) return -EINVAL;
    if (s.flags & ~REFGPU_SYNC_FLAG_SIGNAL) return -EINVAL;
    SyncEntry e;
    e.type = s.type;
    e.signal = s.flags & REFGPU_SYNC_FLAG_SIGNAL;
    switch (s.type) {
      case REFGPU_SYNC_TYPE_SYNCOBJ:
        // The union's upper half and the timeline value are unused: must be zero.
        if ((s.addr >> 32) || s.timeline_value) return -EINVAL;
        e.syncobj = file.find_syncobj(s.handle);
        if (!e.syncobj) return -ENOENT;
        if (e.signal && lr) return -EOPNOTSUPP;  // LR jobs signal no dma-fence
        break;
      case REFGPU_SYNC_TYPE_USER_FENCE:
        if (!e.signal) return -EINVAL;  // a user fence is only written, never waited on here
        if (s.addr % 8 || s.addr < kUserMinAddr) return -EINVAL;
        e.addr = s.addr;
        e.value = s.timeline_value;
        break;
      default:
        return -EINVAL;
    }
    out->push_back(std::move(e));
  }
  return 0;
}

void attach_out_syncs(RefgpuFile& file, const std::vector<SyncEntry>& syncs, const std::shared_ptr<Fence>& fence) {
  for (const SyncEntry& e : syncs) {
    if (!e.signal) continue;
    if (e.type == REFGPU_SYNC_TYPE_SYNCOBJ) {
      file.syncobj_replace_fence(*e.syncobj, fence);
      continue;
    }
    // xe_sync_ufence: the driver writes the value into the submitter's memory when the job
    // ends (whatever its status: the waiter learns failures through the queue's ban), then
    // wakes the waiters. The device outlives every fence signal (engines signal all fences
    // before they go), so a raw pointer is safe; the mm reference keeps the AddressSpace.
    RefgpuDevice* dev = &file.dev();
    std::shared_ptr<mm::AddressSpace> mm = file.mm_ref();
    auto write = [dev, mm, addr = e.addr, value = e.value](int) {
      // A process that exited or unmapped the fence: the write is lost, as a put_user to a
      // dead mm is (-EFAULT is not anyone's error to report). An atomic exchange, not a plain
      // store: the waiter's atomic read (ioctl_sync.cc) must synchronize with it, so every
      // write the job (and the jobs it depended on) made is visible once the wait returns.
      (void)mm::cpu::atomic_exchange(*mm, addr, value);
      dev->wake_ufence_waiters();
    };
    if (!fence->add_callback(write)) write(fence->status());
  }
}

// In-fences: the fences of the in-syncobjs. A syncobj without a fence is -EINVAL
// (drm_syncobj's answer without WAIT_FOR_SUBMIT). Nobody waits here: they become the
// operation's scheduler dependencies (drm_sched_job_add_syncobj_dependency).
int collect_in_fences(RefgpuFile& f, const std::vector<SyncEntry>& syncs, std::vector<std::shared_ptr<Fence>>* out) {
  out->clear();
  for (const SyncEntry& e : syncs) {
    if (e.signal || e.type != REFGPU_SYNC_TYPE_SYNCOBJ) continue;
    std::shared_ptr<Fence> fence = f.syncobj_fence(*e.syncobj);
    if (!fence) return -EINVAL;
    out->push_back(std::move(fence));
  }
  return 0;
}

int ioctl_exec_queue_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec_queue_create* a) {
  (void)caller;
  if (a->extensions || a->flags || !all_zero(a->reserved)) return -EINVAL;
  if (a->width != 1 || a->num_placements != 1) return -EINVAL;
  drm_refgpu_engine_class_instance inst;
  if (copy_from_user(&inst, a->instances, sizeof(inst))) return -EFAULT;
  if (inst.engine_class != REFGPU_ENGINE_CLASS_COMPUTE || inst.gt_id || inst.pad ||
      inst.engine_instance >= f.dev().num_engines())
    return -EINVAL;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  if (!vm) return -ENOENT;
  const uint32_t id = f.reserve_exec_queue_id();
  if (!id) return -ENOSPC;
  auto q = std::make_shared<FileExecQueue>();
  q->id = id;
  q->vm = vm;
  q->engine = f.dev().engine(inst.engine_instance);
  Result<std::shared_ptr<ExecQueue>> eq = q->engine->create_queue(id, vm->vm->mmu());
  if (!eq) return eq.error();
  q->q = std::move(*eq);
  f.insert_exec_queue(q);
  a->exec_queue_id = id;
  return 0;
}

int ioctl_exec_queue_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec_queue_destroy* a) {
  (void)caller;
  if (a->pad || !all_zero(a->reserved)) return -EINVAL;
  std::shared_ptr<FileExecQueue> q = f.remove_exec_queue(a->exec_queue_id);
  if (!q) return -ENOENT;
  // Queued jobs end -ECANCELED, the running one stops; -ENOENT when the engine has already
  // dropped the queue (device removal killed it): nothing runs either way.
  (void)q->engine->destroy_queue(q->q);
  q->vm->queues.fetch_sub(1);
  return 0;
}

int ioctl_exec(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->pad) || !all_zero(a->reserved)) return -EINVAL;
  if (a->num_batch_buffer != 1) return -EINVAL;
  if (a->address % 8 || a->address >= f.dev().va_limit()) return -EINVAL;
  if (a->num_syncs > kMaxSyncs) return -EINVAL;
  std::shared_ptr<FileExecQueue> q = f.find_exec_queue(a->exec_queue_id);
  if (!q) return -ENOENT;
  std::vector<SyncEntry> syncs;
  if (int rc = parse_syncs(f, a->syncs, a->num_syncs, q->vm->lr_mode(), &syncs)) return rc;
  std::vector<std::shared_ptr<Fence>> deps;
  if (int rc = collect_in_fences(f, syncs, &deps)) return rc;
  // A VM without fault mode binds its evicted BOs again before the job is queued (xe_exec's
  // validate + rebind); the hold keeps them from the LRU until the job ends.
  auto hold = std::make_shared<BoBusyHold>();
  if (int rc = q->vm->vm->prepare_exec(hold.get())) return rc;
  // The job runs once its in-fences signaled (engine.h); the ioctl does not wait.
  Result<std::shared_ptr<Fence>> job = q->q->submit(a->address, std::move(deps), std::move(hold));
  if (!job) return job.error();
  // Ban bookkeeping for wait_user_fence's -EIO: the first failed job's errno.
  std::weak_ptr<FileExecQueue> wq = q;
  auto ban = [wq](int status) {
    if (status >= 0) return;
    if (auto sq = wq.lock()) {
      int none = 0;
      sq->error.compare_exchange_strong(none, status);
    }
  };
  if (!(*job)->add_callback(ban)) ban((*job)->status());
  attach_out_syncs(f, syncs, *job);
  return 0;
}

}  // namespace gpusvm::refgpu
