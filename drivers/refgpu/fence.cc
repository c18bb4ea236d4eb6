#include "drivers/refgpu/fence.h"

#include <cerrno>

namespace gpusvm::refgpu {

bool Fence::signal(int status) {
  int expected = kPending;
  // release: pairs with the acquire loads in status() and wait().
  if (!status_.compare_exchange_strong(expected, status > 0 ? 0 : status, std::memory_order_release,
                                       std::memory_order_relaxed))
    return false;
  wq_.wake_all();
  std::vector<std::function<void(int)>> cbs;
  {
    SpinLockGuard g(&cb_lock_);
    cb_done_ = true;
    cbs.swap(cbs_);
  }
  const int st = this->status();
  for (auto& fn : cbs) fn(st);
  return true;
}

bool Fence::add_callback(std::function<void(int)> fn) {
  SpinLockGuard g(&cb_lock_);
  if (cb_done_) return false;
  cbs_.push_back(std::move(fn));
  return true;
}

int Fence::wait(std::chrono::nanoseconds timeout) {
  if (!wq_.wait_for([this] { return signaled(); }, timeout)) return -ETIME;
  return status();
}

}  // namespace gpusvm::refgpu
