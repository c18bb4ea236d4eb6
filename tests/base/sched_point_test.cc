// Schedule points: arming by name, stopping exactly the asked-for hit, thread filters,
// release on destruction, the stopped-too-long panic.
#include "gpusvm/base/sched_point.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <thread>

#include "gpusvm/base/lock.h"

namespace gpusvm {
namespace {

GPUSVM_SCHED_POINT(g_window, "test.sched.window");
GPUSVM_SCHED_POINT(g_twin_a, "test.sched.twin");
GPUSVM_SCHED_POINT(g_twin_b, "test.sched.twin");

using namespace std::chrono_literals;

TEST(SchedPoint, UnarmedPointNeverStops) {
  for (int i = 0; i < 1000; i++) g_window.reach();
  SUCCEED();
}

TEST(SchedPoint, PointsListsEveryNameOnce) {
  std::vector<std::string> names = sched_point::points();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(std::count(names.begin(), names.end(), "test.sched.window"), 1);
  EXPECT_EQ(std::count(names.begin(), names.end(), "test.sched.twin"), 1);
}

TEST(SchedPoint, UnknownNameAndDoubleArmAreRefused) {
  sched_point::Pause unknown("test.sched.no_such_point");
  EXPECT_EQ(unknown.status(), -ENOENT);
  sched_point::Pause first("test.sched.window");
  EXPECT_EQ(first.status(), 0);
  sched_point::Pause second("test.sched.window");
  EXPECT_EQ(second.status(), -EBUSY);
}

// 1. the worker reaches the point and stops;  2. the test sees it stopped and changes `value`;
// 3. the test releases;  4. the worker reads the changed value after the point.
TEST(SchedPoint, StopsTheWorkerUntilReleased) {
  std::atomic<int> value{0};
  std::atomic<int> seen{-1};
  sched_point::Pause pause("test.sched.window");
  ASSERT_EQ(pause.status(), 0);
  std::thread worker([&] {
    g_window.reach();
    seen = value.load();
  });
  ASSERT_TRUE(pause.wait_reached(5s));
  EXPECT_EQ(seen.load(), -1);  // still stopped
  value = 42;
  pause.release();
  worker.join();
  EXPECT_EQ(seen.load(), 42);
  EXPECT_EQ(pause.hits(), 1u);
  EXPECT_EQ(pause.stopped(), 1u);
}

TEST(SchedPoint, StopsOnlyTheNthHitAndCountsTheRest) {
  sched_point::Pause pause("test.sched.window", {.nth = 3});
  std::atomic<int> passed{0};
  std::thread worker([&] {
    for (int i = 0; i < 5; i++) {
      g_window.reach();
      passed++;
    }
  });
  ASSERT_TRUE(pause.wait_reached(5s));
  EXPECT_EQ(passed.load(), 2);
  pause.release();
  worker.join();
  EXPECT_EQ(pause.hits(), 5u);
  EXPECT_EQ(pause.stopped(), 1u);
}

TEST(SchedPoint, ThreadFilterLetsOtherThreadsPass) {
  sched_point::Pause pause("test.sched.window", {.thread = "victim"});
  g_window.reach();  // the test thread is not "victim": passes
  std::thread victim([&] {
    sched_point::set_thread_name("victim");
    g_window.reach();
    sched_point::set_thread_name("");
  });
  ASSERT_TRUE(pause.wait_reached(5s));
  g_window.reach();  // still passes while the victim is stopped
  pause.release();
  victim.join();
  EXPECT_EQ(pause.hits(), 1u);  // only the victim's hit counts
}

TEST(SchedPoint, CountOnlyModeNeverStops) {
  sched_point::Pause pause("test.sched.window", {.stop = false});
  for (int i = 0; i < 7; i++) g_window.reach();
  EXPECT_EQ(pause.hits(), 7u);
  EXPECT_EQ(pause.stopped(), 0u);
  EXPECT_FALSE(pause.wait_reached(10ms));
}

// A hit under a SpinLock neither stops nor counts; the next hit outside it stops.
TEST(SchedPoint, NeverStopsAThreadHoldingASpinLock) {
  sched_point::Pause pause("test.sched.window");
  SpinLock spin;
  std::atomic<bool> past_spin{false};
  std::thread worker([&] {
    spin.lock();
    g_window.reach();  // would stop every waiter on `spin` with it: passes
    spin.unlock();
    past_spin = true;
    g_window.reach();  // stops
  });
  ASSERT_TRUE(pause.wait_reached(5s));
  EXPECT_TRUE(past_spin.load());
  EXPECT_EQ(pause.hits(), 1u);
  pause.release();
  worker.join();
}

TEST(SchedPoint, TwinPointsShareOnePause) {
  sched_point::Pause pause("test.sched.twin", {.nth = 2});
  std::thread worker([&] {
    g_twin_a.reach();  // hit 1
    g_twin_b.reach();  // hit 2: stops
  });
  ASSERT_TRUE(pause.wait_reached(5s));
  pause.release();
  worker.join();
  EXPECT_EQ(pause.hits(), 2u);
}

TEST(SchedPoint, DestructorReleasesAStoppedThread) {
  std::thread worker;
  {
    sched_point::Pause pause("test.sched.window");
    worker = std::thread([] { g_window.reach(); });
    ASSERT_TRUE(pause.wait_reached(5s));
  }  // no release(): the destructor does it
  worker.join();
  sched_point::Pause again("test.sched.window");  // disarmed: can be armed again
  EXPECT_EQ(again.status(), 0);
}

TEST(SchedPointDeathTest, AThreadNeverReleasedPanicsNamingThePoint) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        set_hang_timeout(50ms);
        sched_point::Pause pause("test.sched.window");
        g_window.reach();  // stops this very thread; nobody releases it
      },
      "sched point test.sched.window");
}

}  // namespace
}  // namespace gpusvm
