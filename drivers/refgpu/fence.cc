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
  return true;
}

int Fence::wait(std::chrono::nanoseconds timeout) {
  if (!wq_.wait_for([this] { return signaled(); }, timeout)) return -ETIME;
  return status();
}

}  // namespace gpusvm::refgpu
