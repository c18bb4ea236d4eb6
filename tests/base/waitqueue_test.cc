// WaitQueue::wait_for: woken waiters see the condition; a wait with no wakeup times out.
#include "gpusvm/base/waitqueue.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace gpusvm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

TEST(WaitQueue, ReturnsAtOnceWhenTheConditionAlreadyHolds) {
  WaitQueue wq;
  int evaluations = 0;
  const auto start = Clock::now();
  EXPECT_TRUE(wq.wait_for(
      [&] {
        evaluations++;
        return true;
      },
      10s));
  EXPECT_EQ(evaluations, 1);
  EXPECT_LT(Clock::now() - start, 5s);
}

TEST(WaitQueue, WakeAllWakesAWaiterOnceTheConditionHolds) {
  WaitQueue wq;
  std::atomic<bool> done{false};
  std::thread waker([&] {
    std::this_thread::sleep_for(20ms);
    // Protocol: make the condition true first, then wake.
    done.store(true, std::memory_order_release);
    wq.wake_all();
  });
  const auto start = Clock::now();
  // Bounded: a lost wakeup fails after 10 s instead of hanging.
  const bool got = wq.wait_for([&] { return done.load(std::memory_order_acquire); }, 10s);
  const auto waited = Clock::now() - start;
  waker.join();
  EXPECT_TRUE(got);
  EXPECT_LT(waited, 10s) << "the waiter ran into its timeout: wakeup lost";
}

TEST(WaitQueue, TimesOutWhenNobodyMakesTheConditionTrue) {
  WaitQueue wq;
  const auto start = Clock::now();
  EXPECT_FALSE(wq.wait_for([] { return false; }, 100ms));
  EXPECT_GE(Clock::now() - start, 100ms);
}

TEST(WaitQueue, WakeupWithoutTheConditionKeepsWaiting) {
  WaitQueue wq;
  std::atomic<int> wakeups{0};
  std::atomic<bool> stop{false};
  std::thread waker([&] {
    // Spurious wake_all()s: the condition stays false, so the waiter must time out.
    while (!stop.load(std::memory_order_acquire)) {
      wakeups.fetch_add(1, std::memory_order_relaxed);
      wq.wake_all();
      std::this_thread::sleep_for(5ms);
    }
  });
  const auto start = Clock::now();
  const bool got = wq.wait_for([] { return false; }, 100ms);
  const auto waited = Clock::now() - start;
  stop.store(true, std::memory_order_release);
  waker.join();
  EXPECT_FALSE(got);
  EXPECT_GE(waited, 100ms);
  EXPECT_GT(wakeups.load(), 0);
}

TEST(WaitQueue, WakeAllWakesEveryWaiter) {
  constexpr int kWaiters = 3;
  WaitQueue wq;
  std::atomic<bool> go{false};
  std::atomic<int> sleeping{0};
  std::atomic<int> woken{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < kWaiters; i++) {
    waiters.emplace_back([&] {
      const bool got = wq.wait_for(
          [&] {
            sleeping.fetch_add(1, std::memory_order_relaxed);
            return go.load(std::memory_order_acquire);
          },
          10s);
      if (got) woken.fetch_add(1, std::memory_order_relaxed);
    });
  }
  // Let every waiter evaluate its predicate at least once (bounded), then release them all.
  const auto deadline = Clock::now() + 10s;
  while (sleeping.load(std::memory_order_relaxed) < kWaiters && Clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
  }
  go.store(true, std::memory_order_release);
  wq.wake_all();
  for (auto& t : waiters) t.join();
  EXPECT_EQ(woken.load(), kWaiters);
}

}  // namespace
}  // namespace gpusvm
