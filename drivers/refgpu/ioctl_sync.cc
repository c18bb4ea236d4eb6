// DRM_IOCTL_REFGPU_WAIT_USER_FENCE (xe_wait_user_fence.c) and the syncobj requests
// (drm_syncobj.c's create / destroy / wait, the driver's own).
#include <algorithm>
#include <cerrno>
#include <chrono>

#include "drivers/refgpu/ioctl.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/mm/cpu_access.h"

namespace gpusvm::refgpu {

namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

bool ufence_compare(uint64_t v, uint64_t value, uint64_t mask, uint16_t op) {
  v &= mask;
  value &= mask;
  switch (op) {
    case REFGPU_UFENCE_WAIT_OP_EQ: return v == value;
    case REFGPU_UFENCE_WAIT_OP_NEQ: return v != value;
    case REFGPU_UFENCE_WAIT_OP_GT: return v > value;
    case REFGPU_UFENCE_WAIT_OP_GTE: return v >= value;
    case REFGPU_UFENCE_WAIT_OP_LT: return v < value;
    default: return v <= value;  // LTE (op validated)
  }
}

// Waiters re-read memory at least this often: a CPU store to the fence wakes nobody.
constexpr std::chrono::milliseconds kPollSlice{1};

}  // namespace

int ioctl_wait_user_fence(RefgpuFile& f, devfs::Process& caller, drm_refgpu_wait_user_fence* a) {
  if (a->extensions || a->pad || a->pad2 || !all_zero(a->reserved)) return -EINVAL;
  if (a->op > REFGPU_UFENCE_WAIT_OP_LTE || (a->flags & ~REFGPU_UFENCE_WAIT_FLAG_ABSTIME)) return -EINVAL;
  if (a->addr % 8 || !a->mask) return -EINVAL;
  std::shared_ptr<FileExecQueue> q;
  if (a->exec_queue_id) {
    q = f.find_exec_queue(a->exec_queue_id);
    if (!q) return -ENOENT;
  }
  const bool abstime = a->flags & REFGPU_UFENCE_WAIT_FLAG_ABSTIME;
  const int64_t start = now_ns();
  // A negative relative timeout waits "forever": bounded by hang_timeout() (a wait that
  // never ends is a bug of the test, reported as -ETIME).
  const int64_t bound = start + std::chrono::duration_cast<std::chrono::nanoseconds>(hang_timeout()).count();
  int64_t deadline = abstime ? a->timeout : (a->timeout < 0 ? bound : start + std::min<int64_t>(a->timeout, bound - start));
  deadline = std::min(deadline, bound);
  int rc;
  for (;;) {
    // Read before the fence: a wake-up after this (the fence written since) makes the sleep
    // below return at once instead of after a whole slice (a lost wake-up otherwise).
    const uint64_t seen = f.dev().ufence_seq();
    // The CPU's view of the fence, through the caller's page tables (faults it in). An
    // atomic read (a fetch-add of 0, as a locked instruction would do it) rather than a
    // plain load: it must synchronize with the engine's FENCE_WRITE release store, so that
    // once the wait returns, every write the job made before it is visible to the caller.
    // The fence must therefore be writable memory, as Xe requires (the device writes it).
    Result<uint64_t> v = mm::cpu::atomic_fetch_add(caller.mm(), a->addr, 0);
    if (!v) {
      rc = -EFAULT;
      break;
    }
    if (ufence_compare(*v, a->value, a->mask, a->op)) {
      rc = 0;
      break;
    }
    if (q && q->error.load()) {
      rc = -EIO;
      break;
    }
    if (f.dev().removed()) {
      rc = -ENODEV;
      break;
    }
    const int64_t now = now_ns();
    if (now >= deadline) {
      rc = -ETIME;
      break;
    }
    const auto slice = std::min<int64_t>(deadline - now, std::chrono::nanoseconds(kPollSlice).count());
    // Woken by FENCE_WRITEs and driver user-fence writes; the predicate is re-checked above.
    f.dev().wait_ufence_change(seen, std::chrono::nanoseconds(slice));
  }
  // Relative timeouts are updated with the time left, so a restarted call waits only the
  // rest (xe_wait_user_fence_ioctl); 0 once expired.
  if (!abstime && a->timeout >= 0) a->timeout = std::max<int64_t>(0, a->timeout - (now_ns() - start));
  return rc;
}

int ioctl_syncobj_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_create* a) {
  (void)caller;
  if ((a->flags & ~REFGPU_SYNCOBJ_CREATE_SIGNALED) || !all_zero(a->reserved)) return -EINVAL;
  auto s = std::make_shared<Syncobj>();
  if (a->flags & REFGPU_SYNCOBJ_CREATE_SIGNALED) {
    s->fence = std::make_shared<Fence>();
    s->fence->signal(0);  // drm_syncobj_assign_null_handle: a signaled stub fence
  }
  const uint32_t id = f.add_syncobj(std::move(s));
  if (!id) return -ENOSPC;
  a->handle = id;
  return 0;
}

int ioctl_syncobj_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_destroy* a) {
  (void)caller;
  if (a->pad || !all_zero(a->reserved)) return -EINVAL;
  return f.remove_syncobj(a->handle) ? 0 : -ENOENT;
}

int ioctl_syncobj_wait(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_wait* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->reserved)) return -EINVAL;
  if (a->flags & ~REFGPU_SYNCOBJ_WAIT_FLAG_WAIT_ALL) return -EINVAL;
  if (a->count_handles == 0 || a->count_handles > kMaxSyncobjWait) return -EINVAL;
  uint32_t handles[kMaxSyncobjWait];
  if (copy_from_user(handles, a->handles, a->count_handles * sizeof(uint32_t))) return -EFAULT;
  std::vector<std::shared_ptr<Fence>> fences;
  for (uint32_t i = 0; i < a->count_handles; i++) {
    std::shared_ptr<Syncobj> s = f.find_syncobj(handles[i]);
    if (!s) return -ENOENT;
    std::shared_ptr<Fence> fence = f.syncobj_fence(*s);
    if (!fence) return -EINVAL;  // no fence yet (drm_syncobj_array_wait without WAIT_FOR_SUBMIT)
    fences.push_back(std::move(fence));
  }
  const bool all = a->flags & REFGPU_SYNCOBJ_WAIT_FLAG_WAIT_ALL;
  const int64_t bound = now_ns() + std::chrono::duration_cast<std::chrono::nanoseconds>(hang_timeout()).count();
  const int64_t deadline = std::min<int64_t>(a->timeout_nsec, bound);
  for (;;) {
    int first = -1;
    size_t done = 0;
    for (size_t i = 0; i < fences.size(); i++) {
      if (!fences[i]->signaled()) continue;
      done++;
      if (first < 0) first = static_cast<int>(i);
    }
    if (all ? done == fences.size() : done > 0) {
      a->first_signaled = static_cast<uint32_t>(first);
      a->error = 0;
      for (const auto& fence : fences)
        if (fence->signaled() && fence->status() < 0) {
          a->error = fence->status();
          break;
        }
      return 0;
    }
    const int64_t now = now_ns();
    if (now >= deadline) return -ETIME;
    // Sleep on the first pending fence for at most a slice, then look at all again.
    for (const auto& fence : fences)
      if (!fence->signaled()) {
        (void)fence->wait(std::chrono::nanoseconds(std::min<int64_t>(deadline - now, 1000000)));
        break;
      }
  }
}

}  // namespace gpusvm::refgpu
