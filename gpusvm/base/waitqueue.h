// WaitQueue: sleep until a condition holds, with a bounded wait.
//
// Protocol (the kernel's wait_event / wake_up): the waker first makes the condition true
// (under its own lock or with a release store), then calls wake_all(). The waiter's predicate
// is evaluated under the queue's internal mutex, and wake_all() takes that mutex, so a wakeup
// between "predicate false" and "sleep" cannot be lost.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace gpusvm {

class WaitQueue {
 public:
  // Sleeps until pred() returns true or `timeout` passes. Returns true when pred() held.
  // May sleep: the caller must not hold a spin lock.
  template <typename Pred>
  bool wait_for(Pred pred, std::chrono::nanoseconds timeout) {
    std::unique_lock<std::mutex> g(m_);
    return cv_.wait_for(g, timeout, pred);
  }

  void wake_all() {
    { std::lock_guard<std::mutex> g(m_); }
    cv_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
};

}  // namespace gpusvm
