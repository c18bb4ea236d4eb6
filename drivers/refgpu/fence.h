// Fence: the completion of one job (a dma_fence in spirit): pending, then signaled once with
// 0 or a negative errno (an error fence). Waiters sleep on a wait queue with a deadline.
//
// Thread safety: every call may race with every other. signal() publishes the status with a
// release store that pairs with the acquire load of status()/wait(), so a waiter that sees
// the fence signaled also sees every write the job made.
#pragma once

#include <atomic>
#include <chrono>

#include "gpusvm/base/waitqueue.h"

namespace gpusvm::refgpu {

class Fence {
 public:
  static constexpr int kPending = 1;

  // First signal wins; later ones are ignored (a job completes once). Returns whether this
  // call signaled it.
  bool signal(int status);
  bool signaled() const { return status_.load(std::memory_order_acquire) != kPending; }
  // kPending, 0 or a negative errno.
  int status() const { return status_.load(std::memory_order_acquire); }
  // Waits until signaled or `timeout` passes: the fence status, or -ETIME. May sleep.
  int wait(std::chrono::nanoseconds timeout);

 private:
  std::atomic<int> status_{kPending};
  WaitQueue wq_;
};

}  // namespace gpusvm::refgpu
