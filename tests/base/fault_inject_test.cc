// Fault-injection points: arming by name, nth/times, seeded probability, disarm, ScopedArm.
#include "gpusvm/base/fault_inject.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace gpusvm {
namespace {

// Points owned by this test binary, declared the way product code declares them.
GPUSVM_FAULT_POINT(g_alpha, "test.base.alpha");
GPUSVM_FAULT_POINT(g_beta, "test.base.beta");
// Never armed by any test (hits() counts since the last arm, so a point other tests arm keeps
// their counts after disarm).
GPUSVM_FAULT_POINT(g_never_armed, "test.base.never_armed");
// Two sites sharing one name.
GPUSVM_FAULT_POINT(g_twin_a, "test.base.twin");
GPUSVM_FAULT_POINT(g_twin_b, "test.base.twin");

constexpr const char* kAlpha = "test.base.alpha";
constexpr const char* kBeta = "test.base.beta";

class FaultInject : public testing::Test {
 protected:
  void TearDown() override { fault_inject::disarm_all(); }
};

// Hits `p` n times and returns which hits failed (1-based hit numbers).
std::vector<int> failing_hits(FaultPoint& p, int n) {
  std::vector<int> failed;
  for (int hit = 1; hit <= n; hit++) {
    if (p.should_fail()) failed.push_back(hit);
  }
  return failed;
}

std::vector<bool> pattern(FaultPoint& p, int n) {
  std::vector<bool> v;
  for (int i = 0; i < n; i++) v.push_back(p.should_fail());
  return v;
}

TEST_F(FaultInject, PointsAreRegisteredSortedAndUnique) {
  const std::vector<std::string> names = fault_inject::points();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(std::adjacent_find(names.begin(), names.end()), names.end());
  EXPECT_EQ(std::count(names.begin(), names.end(), kAlpha), 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), kBeta), 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), "test.base.twin"), 1);
  EXPECT_STREQ(g_alpha.name(), kAlpha);
}

TEST_F(FaultInject, NeverArmedPointNeverFailsAndCountsNothing) {
  EXPECT_TRUE(failing_hits(g_never_armed, 100).empty());
  EXPECT_EQ(fault_inject::hits("test.base.never_armed"), 0u);
  EXPECT_EQ(fault_inject::failures("test.base.never_armed"), 0u);
}

TEST_F(FaultInject, NthFailsExactlyThatHit) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 3, .times = 1}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 10), std::vector<int>({3}));
  EXPECT_EQ(fault_inject::hits(kAlpha), 10u);
  EXPECT_EQ(fault_inject::failures(kAlpha), 1u);
}

TEST_F(FaultInject, DefaultSpecFailsTheFirstHitOnly) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 5), std::vector<int>({1}));
}

TEST_F(FaultInject, TimesFailsThatManyHitsInARow) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 2, .times = 3}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 8), std::vector<int>({2, 3, 4}));
  EXPECT_EQ(fault_inject::hits(kAlpha), 8u);
  EXPECT_EQ(fault_inject::failures(kAlpha), 3u);
}

TEST_F(FaultInject, TimesZeroFailsEveryHitFromNthOn) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 4, .times = 0}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 7), std::vector<int>({4, 5, 6, 7}));
  EXPECT_EQ(failing_hits(g_alpha, 50).size(), 50u) << "times=0 never stops failing";
  EXPECT_EQ(fault_inject::failures(kAlpha), 54u);
}

TEST_F(FaultInject, HugeNthAndTimesDoNotOverflow) {
  const uint64_t max = std::numeric_limits<uint64_t>::max();
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = max, .times = 1}), 0);
  EXPECT_TRUE(failing_hits(g_alpha, 20).empty());
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 2, .times = max}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 4), std::vector<int>({2, 3, 4}));
}

TEST_F(FaultInject, ArmingOnePointLeavesOthersAlone) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 1, .times = 0}), 0);
  EXPECT_TRUE(failing_hits(g_beta, 10).empty());
  EXPECT_EQ(fault_inject::hits(kBeta), 0u);
  EXPECT_EQ(failing_hits(g_alpha, 2), std::vector<int>({1, 2}));
}

TEST_F(FaultInject, RearmResetsTheCounters) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 1, .times = 2}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 5), std::vector<int>({1, 2}));
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 2, .times = 1}), 0);
  EXPECT_EQ(fault_inject::hits(kAlpha), 0u);
  EXPECT_EQ(fault_inject::failures(kAlpha), 0u);
  EXPECT_EQ(failing_hits(g_alpha, 5), std::vector<int>({2}));
}

TEST_F(FaultInject, DisarmStopsFailuresAndCounting) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 1, .times = 0}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 3).size(), 3u);
  fault_inject::disarm(kAlpha);
  EXPECT_TRUE(failing_hits(g_alpha, 10).empty());
  // Counters are "since last armed" and stop moving when disarmed.
  EXPECT_EQ(fault_inject::hits(kAlpha), 3u);
  EXPECT_EQ(fault_inject::failures(kAlpha), 3u);
}

TEST_F(FaultInject, DisarmAllDisarmsEveryPoint) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 1, .times = 0}), 0);
  ASSERT_EQ(fault_inject::arm(kBeta, {.nth = 1, .times = 0}), 0);
  fault_inject::disarm_all();
  EXPECT_TRUE(failing_hits(g_alpha, 5).empty());
  EXPECT_TRUE(failing_hits(g_beta, 5).empty());
}

TEST_F(FaultInject, ProbabilityIsDeterministicPerSeed) {
  constexpr int kHits = 2000;
  ASSERT_EQ(fault_inject::arm(kAlpha, {.probability = 0.25, .seed = 1234}), 0);
  const std::vector<bool> first = pattern(g_alpha, kHits);
  const uint64_t first_failures = fault_inject::failures(kAlpha);
  EXPECT_EQ(fault_inject::hits(kAlpha), uint64_t{kHits});
  EXPECT_EQ(first_failures,
            static_cast<uint64_t>(std::count(first.begin(), first.end(), true)));
  // Roughly a quarter: 2000 draws at p = 0.25 have a standard deviation of ~19.
  EXPECT_GT(first_failures, 400u);
  EXPECT_LT(first_failures, 600u);

  // Same seed: the same hits fail (a run is replayable).
  ASSERT_EQ(fault_inject::arm(kAlpha, {.probability = 0.25, .seed = 1234}), 0);
  EXPECT_EQ(pattern(g_alpha, kHits), first);
  EXPECT_EQ(fault_inject::failures(kAlpha), first_failures);

  // Another seed: another pattern.
  ASSERT_EQ(fault_inject::arm(kAlpha, {.probability = 0.25, .seed = 4321}), 0);
  EXPECT_NE(pattern(g_alpha, kHits), first);
}

TEST_F(FaultInject, ProbabilityOneFailsEveryHit) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.probability = 1.0, .seed = 9}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 100).size(), 100u);
  EXPECT_EQ(fault_inject::failures(kAlpha), 100u);
}

TEST_F(FaultInject, ProbabilityIgnoresNth) {
  // nth = 0 is only invalid without a probability.
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 0, .times = 1, .probability = 1.0}), 0);
  EXPECT_EQ(failing_hits(g_alpha, 10).size(), 10u);
}

// Regression: a probability too small to scale to a nonzero threshold used to fall back to
// the nth mode and fail the first hit.
TEST_F(FaultInject, TinyProbabilityDoesNotTurnIntoFailTheFirstHit) {
  ASSERT_EQ(fault_inject::arm(kAlpha, {.probability = 1e-30, .seed = 1}), 0);
  EXPECT_TRUE(failing_hits(g_alpha, 1000).empty());
  EXPECT_EQ(fault_inject::hits(kAlpha), 1000u);
}

TEST_F(FaultInject, UnknownNameIsENOENT) {
  EXPECT_EQ(fault_inject::arm("test.base.no_such_point", {}), -ENOENT);
  EXPECT_EQ(fault_inject::hits("test.base.no_such_point"), 0u);
  EXPECT_EQ(fault_inject::failures("test.base.no_such_point"), 0u);
  fault_inject::disarm("test.base.no_such_point");  // harmless
}

TEST_F(FaultInject, BadSpecIsEINVALAndLeavesThePointAsItWas) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(fault_inject::arm(kAlpha, {.probability = -0.1}), -EINVAL);
  EXPECT_EQ(fault_inject::arm(kAlpha, {.probability = 1.5}), -EINVAL);
  EXPECT_EQ(fault_inject::arm(kAlpha, {.probability = nan}), -EINVAL);
  EXPECT_EQ(fault_inject::arm(kAlpha, {.nth = 0}), -EINVAL);
  EXPECT_TRUE(failing_hits(g_alpha, 10).empty()) << "a rejected spec must not arm the point";

  // A rejected re-arm keeps the previous spec and its counters.
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 2, .times = 1}), 0);
  EXPECT_TRUE(failing_hits(g_alpha, 1).empty());
  EXPECT_EQ(fault_inject::arm(kAlpha, {.nth = 0}), -EINVAL);
  EXPECT_TRUE(g_alpha.should_fail()) << "hit 2 of the previous spec";
  EXPECT_EQ(fault_inject::hits(kAlpha), 2u);
}

TEST_F(FaultInject, ScopedArmArmsForItsScope) {
  {
    fault_inject::ScopedArm arm(kAlpha, {.nth = 1, .times = 0});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(failing_hits(g_alpha, 3), std::vector<int>({1, 2, 3}));
  }
  EXPECT_TRUE(failing_hits(g_alpha, 3).empty());
  EXPECT_EQ(fault_inject::hits(kAlpha), 3u);
}

TEST_F(FaultInject, ScopedArmReportsErrors) {
  fault_inject::ScopedArm unknown("test.base.no_such_point", {});
  EXPECT_EQ(unknown.status(), -ENOENT);
  fault_inject::ScopedArm bad(kAlpha, {.probability = 2.0});
  EXPECT_EQ(bad.status(), -EINVAL);
  EXPECT_FALSE(g_alpha.should_fail());
}

TEST_F(FaultInject, SharedNameArmsEverySite) {
  ASSERT_EQ(fault_inject::arm("test.base.twin", {.nth = 2, .times = 1}), 0);
  // Each site counts its own hits.
  EXPECT_EQ(failing_hits(g_twin_a, 3), std::vector<int>({2}));
  EXPECT_EQ(failing_hits(g_twin_b, 4), std::vector<int>({2}));
  EXPECT_EQ(fault_inject::hits("test.base.twin"), 7u);
  EXPECT_EQ(fault_inject::failures("test.base.twin"), 2u);
  fault_inject::disarm("test.base.twin");
  EXPECT_FALSE(g_twin_a.should_fail());
  EXPECT_FALSE(g_twin_b.should_fail());
}

TEST_F(FaultInject, PointWithAutomaticStorageUnregistersOnDestruction) {
  {
    FaultPoint local("test.base.local");
    ASSERT_EQ(fault_inject::arm("test.base.local", {.nth = 1}), 0);
    EXPECT_TRUE(local.should_fail());
    const auto names = fault_inject::points();
    EXPECT_NE(std::find(names.begin(), names.end(), "test.base.local"), names.end());
  }
  const auto names = fault_inject::points();
  EXPECT_EQ(std::find(names.begin(), names.end(), "test.base.local"), names.end());
  EXPECT_EQ(fault_inject::arm("test.base.local", {}), -ENOENT);
}

TEST_F(FaultInject, ConcurrentHitsFailExactlyTheArmedCount) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 5000;
  ASSERT_EQ(fault_inject::arm(kAlpha, {.nth = 100, .times = 50}), 0);
  std::atomic<int> failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&] {
      int mine = 0;
      for (int i = 0; i < kPerThread; i++) mine += g_alpha.should_fail() ? 1 : 0;
      failed.fetch_add(mine, std::memory_order_relaxed);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 50);
  EXPECT_EQ(fault_inject::hits(kAlpha), uint64_t{kThreads} * kPerThread);
  EXPECT_EQ(fault_inject::failures(kAlpha), 50u);
}

}  // namespace
}  // namespace gpusvm
