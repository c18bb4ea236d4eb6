// Helpers shared by the gpusvm/base tests.
#pragma once

#include <chrono>
#include <thread>

namespace gpusvm::testing_util {

// Polls pred() every millisecond until it holds or `timeout` passes; returns its last value.
// Every wait in these tests is bounded, so a lost wakeup fails the test instead of hanging.
template <typename Pred>
bool wait_until(Pred pred, std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

}  // namespace gpusvm::testing_util
