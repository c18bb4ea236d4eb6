// StatCounter and ScopedStatTimer.
#include "gpusvm/base/stats.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

namespace gpusvm {
namespace {

TEST(StatCounter, AddsGetsAndResets) {
  StatCounter c;
  EXPECT_EQ(c.get(), 0u);
  c.add();
  c.add();
  EXPECT_EQ(c.get(), 2u);
  c.add(40);
  EXPECT_EQ(c.get(), 42u);
  c.reset();
  EXPECT_EQ(c.get(), 0u);
  c.add(UINT64_C(1) << 40);
  EXPECT_EQ(c.get(), UINT64_C(1) << 40);
}

TEST(StatCounter, ConcurrentAddsAreNotLost) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  StatCounter events;
  StatCounter bytes;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; i++) {
        events.add();
        bytes.add(static_cast<uint64_t>(t + 1));
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(events.get(), uint64_t{kThreads} * kPerThread);
  // sum over t of (t + 1) * kPerThread = (1 + 2 + 3 + 4) * kPerThread
  EXPECT_EQ(bytes.get(), uint64_t{10} * kPerThread);
}

TEST(ScopedStatTimer, AddsAtLeastTheTimeItLived) {
  using namespace std::chrono_literals;
  StatCounter ns;
  {
    ScopedStatTimer t(&ns);
    std::this_thread::sleep_for(20ms);
  }
  const uint64_t first = ns.get();
  // steady_clock never goes back and sleep_for sleeps at least that long: a lower bound only
  // (absolute times are never asserted from above).
  EXPECT_GE(first, 20'000'000u);
  {
    ScopedStatTimer t(&ns);
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_GE(ns.get(), first + 5'000'000u);
}

TEST(ScopedStatTimer, OnlyAddsWhenItEnds) {
  StatCounter ns;
  ns.add(7);
  {
    ScopedStatTimer t(&ns);
    EXPECT_EQ(ns.get(), 7u) << "the timer must not add before its scope ends";
  }
  EXPECT_GE(ns.get(), 7u);
}

}  // namespace
}  // namespace gpusvm
