// Fence: the completion of one job (a dma_fence in spirit): pending, then signaled once with
// 0 or a negative errno (an error fence). Waiters sleep on a wait queue with a deadline.
//
// Callbacks (dma_fence_add_callback): run once, in the thread that signals, after the status
// is published and with no lock of the fence held. Signallers (engines, their stop()) hold no
// gpusvm lock when they signal, so a callback may sleep and take the mmap lock (a user-fence
// write through the CPU-access API does).
//
// Thread safety: every call may race with every other. signal() publishes the status with a
// release store that pairs with the acquire load of status()/wait(), so a waiter that sees
// the fence signaled also sees every write the job made.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/waitqueue.h"

namespace gpusvm::refgpu {

class Fence {
 public:
  static constexpr int kPending = 1;

  // First signal wins; later ones are ignored (a job completes once). Returns whether this
  // call signaled it.
  bool signal(int status) GPUSVM_EXCLUDES(cb_lock_);
  // Adds fn(status) to run at signal. Returns false, without adding it, when the fence has
  // already signaled (the caller runs it itself, as with dma_fence_add_callback's -ENOENT).
  // May allocate.
  bool add_callback(std::function<void(int)> fn) GPUSVM_EXCLUDES(cb_lock_);
  bool signaled() const { return status_.load(std::memory_order_acquire) != kPending; }
  // kPending, 0 or a negative errno.
  int status() const { return status_.load(std::memory_order_acquire); }
  // Waits until signaled or `timeout` passes: the fence status, or -ETIME. May sleep.
  int wait(std::chrono::nanoseconds timeout);

 private:
  std::atomic<int> status_{kPending};
  WaitQueue wq_;
  SpinLock cb_lock_{&kFenceCbLockClass};
  bool cb_done_ GPUSVM_GUARDED_BY(cb_lock_) = false;  // signal() took the list
  std::vector<std::function<void(int)>> cbs_ GPUSVM_GUARDED_BY(cb_lock_);
};

}  // namespace gpusvm::refgpu
