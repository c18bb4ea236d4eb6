// The run-time lock checks that must stop the program: lock-order violations, recursive
// acquisition, failed lock assertions, misuse of unlock/downgrade, and the hang timeout that
// turns a deadlock into a diagnostic instead of a hung CI job.
//
// Death tests use the "threadsafe" style (the child re-executes the binary), since several of
// them start threads.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "gpusvm/base/lock.h"
#include "tests/base/test_util.h"

// The statements below misuse locks on purpose; clang's static analysis would reject them.
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wthread-safety-analysis"
#pragma clang diagnostic ignored "-Wthread-safety-beta"
#endif

namespace gpusvm {
namespace {

using namespace std::chrono_literals;
using testing_util::wait_until;

constexpr LockClass kOuter{"test_outer", 10};
constexpr LockClass kInner{"test_inner", 20};
constexpr LockClass kPair{"test_pair", 30};

class LockdepDeathTest : public testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

// ---- Lock order ----

TEST_F(LockdepDeathTest, InversionPanicsEvenWhenTheLockIsFree) {
  Mutex outer(&kOuter);
  Mutex inner(&kInner);
  EXPECT_DEATH(
      {
        inner.lock();
        outer.lock();
      },
      "lock order violation: acquiring test_outer@.*\\(rank 10\\) subclass 0 while holding "
      "test_inner@.*\\(rank 20\\)");
}

TEST_F(LockdepDeathTest, InversionAcrossLockTypesPanics) {
  RwLock outer(&kOuter);
  SpinLock inner(&kInner);
  EXPECT_DEATH(
      {
        inner.lock();
        outer.lock_shared();
      },
      "lock order violation: acquiring test_outer");
  EXPECT_DEATH(
      {
        inner.lock();
        outer.lock();
      },
      "lock order violation: acquiring test_outer");
}

TEST_F(LockdepDeathTest, SameRankNeedsAscendingSubclass) {
  SpinLock a(&kPair), b(&kPair);
  // Subclass 0 then 1 is the legal nesting (see lock_test.cc); these are not.
  EXPECT_DEATH(
      {
        b.lock_nested(1);
        a.lock_nested(0);
      },
      "lock order violation: acquiring test_pair@.* subclass 0 while holding test_pair@.* "
      "subclass 1");
  EXPECT_DEATH(
      {
        a.lock();
        b.lock();
      },
      "lock order violation: acquiring test_pair");
  Mutex m1(&kPair), m2(&kPair);
  EXPECT_DEATH(
      {
        m1.lock_nested(0);
        m2.lock_nested(0);
      },
      "lock order violation: acquiring test_pair");
}

TEST_F(LockdepDeathTest, RwLockNestedInTheWrongOrderPanics) {
  RwLock parent(&kPair), child(&kPair);
  EXPECT_DEATH(
      {
        child.lock_nested(1);
        parent.lock_nested(0);
      },
      "lock order violation: acquiring test_pair@.* subclass 0 while holding test_pair@.* "
      "subclass 1");
}

TEST_F(LockdepDeathTest, UnrankedLocksAreNotOrderedButStillTracked) {
  Mutex ranked(&kInner);
  Mutex unranked;
  // Not a violation: rank 0 is outside the order. Then die on purpose, to prove the child got
  // past both acquisitions.
  EXPECT_DEATH(
      {
        ranked.lock();
        unranked.lock();
        if (unranked.held_by_me() && ranked.held_by_me()) panic("reached the end");
      },
      "gpusvm panic: reached the end\n  thread [0-9]+ holds: test_inner@.*, \\?@");
}

// ---- Recursion ----

TEST_F(LockdepDeathTest, RecursiveMutexPanics) {
  Mutex mu(&kOuter);
  EXPECT_DEATH(
      {
        mu.lock();
        mu.lock();
      },
      "recursive acquisition of test_outer");
  Mutex unranked;
  EXPECT_DEATH(
      {
        unranked.lock();
        unranked.lock();
      },
      "recursive acquisition");
}

TEST_F(LockdepDeathTest, RecursiveSpinLockPanics) {
  SpinLock sl(&kInner);
  EXPECT_DEATH(
      {
        sl.lock();
        sl.lock();
      },
      "recursive acquisition of test_inner");
}

TEST_F(LockdepDeathTest, RecursiveRwLockPanicsInEveryMode) {
  RwLock rw(&kOuter);
  // Read after read can deadlock too: with writer preference, a writer queued between the two
  // reads blocks the second one forever.
  EXPECT_DEATH(
      {
        rw.lock_shared();
        rw.lock_shared();
      },
      "recursive acquisition of test_outer");
  EXPECT_DEATH(
      {
        rw.lock();
        rw.lock_shared();
      },
      "recursive acquisition of test_outer");
  EXPECT_DEATH(
      {
        rw.lock_shared();
        rw.lock();
      },
      "recursive acquisition of test_outer");
}

// ---- Assertions ----

TEST_F(LockdepDeathTest, AssertHeldPanicsWhenNotHeld) {
  Mutex mu(&kOuter);
  SpinLock sl(&kInner);
  RwLock rw(&kPair);
  EXPECT_DEATH(mu.assert_held(), "mutex test_outer not held");
  EXPECT_DEATH(sl.assert_held(), "spinlock test_inner not held");
  EXPECT_DEATH(rw.assert_held(), "rwlock test_pair not held");
  EXPECT_DEATH(rw.assert_write_held(), "rwlock test_pair not write-held");
}

TEST_F(LockdepDeathTest, AssertWriteHeldPanicsUnderAReadHold) {
  RwLock rw(&kPair);
  EXPECT_DEATH(
      {
        rw.lock_shared();
        rw.assert_held();  // fine
        rw.assert_write_held();
      },
      "rwlock test_pair not write-held");
}

TEST_F(LockdepDeathTest, AssertNotHeldPanicsWhenHeld) {
  Mutex mu(&kOuter);
  SpinLock sl(&kInner);
  RwLock rw(&kPair);
  EXPECT_DEATH(
      {
        mu.lock();
        mu.assert_not_held();
      },
      "mutex test_outer held");
  EXPECT_DEATH(
      {
        sl.lock();
        sl.assert_not_held();
      },
      "spinlock test_inner held");
  EXPECT_DEATH(
      {
        rw.lock_shared();
        rw.assert_not_held();
      },
      "rwlock test_pair held");
}

// Held means held by this thread: another thread's hold does not satisfy assert_held().
TEST_F(LockdepDeathTest, AssertHeldIsPerThread) {
  Mutex mu(&kOuter);
  EXPECT_DEATH(
      {
        std::atomic<bool> holding{false};
        std::atomic<bool> done{false};
        std::thread holder([&] {
          MutexLock g(&mu);
          holding.store(true);
          wait_until([&] { return done.load(); }, 5s);
        });
        wait_until([&] { return holding.load(); }, 5s);
        mu.assert_not_held();  // fine: not ours
        mu.assert_held();
        done.store(true);
        holder.join();
      },
      "mutex test_outer not held");
}

TEST_F(LockdepDeathTest, AssertNoneHeldNamesTheCaller) {
  SpinLock sl(&kInner);
  EXPECT_DEATH(
      {
        sl.lock();
        lockdep::assert_none_held("migrate_to_ram");
      },
      "migrate_to_ram: must be called with no lock held\n  thread [0-9]+ holds: test_inner@");
}

// ---- Misuse ----

TEST_F(LockdepDeathTest, UnlockWithoutHoldingPanics) {
  Mutex mu(&kOuter);
  SpinLock sl;
  RwLock rw;
  EXPECT_DEATH(mu.unlock(), "releasing a lock this thread does not hold");
  EXPECT_DEATH(sl.unlock(), "releasing a lock this thread does not hold");
  EXPECT_DEATH(rw.unlock(), "releasing a lock this thread does not hold");
  EXPECT_DEATH(rw.unlock_shared(), "releasing a lock this thread does not hold");
}

TEST_F(LockdepDeathTest, DowngradeWithoutTheWriteLockPanics) {
  RwLock rw(&kOuter);
  EXPECT_DEATH(rw.downgrade(), "rwlock test_outer: downgrade without the write lock");
  EXPECT_DEATH(
      {
        rw.lock_shared();
        rw.downgrade();
      },
      "rwlock test_outer: downgrade without the write lock");
}

// ---- Hang timeout: a deadlock becomes a panic naming the lock and its holder ----

// Runs `waiter` on this thread while another thread holds the lock through hold()/release().
// The holder gives up after 5 s, so a lock that never times out ends the statement without a
// death (a test failure) instead of hanging.
template <typename Hold, typename Release, typename Waiter>
void wait_on_held_lock(Hold hold, Release release, Waiter waiter) {
  set_hang_timeout(200ms);
  std::atomic<bool> holding{false};
  std::thread holder([&] {
    hold();
    holding.store(true);
    std::this_thread::sleep_for(5s);
    release();
  });
  wait_until([&] { return holding.load(); }, 5s);
  waiter();
  holder.join();
}

TEST_F(LockdepDeathTest, MutexHangTimeoutPanics) {
  Mutex mu(&kOuter);
  EXPECT_DEATH(wait_on_held_lock([&] { mu.lock(); }, [&] { mu.unlock(); },
                                 [&] {
                                   mu.lock();
                                   mu.unlock();
                                 }),
               "mutex test_outer not acquired within hang timeout; held by tid [1-9][0-9]*");
}

TEST_F(LockdepDeathTest, SpinLockHangTimeoutPanics) {
  SpinLock sl(&kInner);
  EXPECT_DEATH(wait_on_held_lock([&] { sl.lock(); }, [&] { sl.unlock(); },
                                 [&] {
                                   sl.lock();
                                   sl.unlock();
                                 }),
               "spinlock test_inner not acquired within hang timeout; held by tid [1-9][0-9]*");
}

TEST_F(LockdepDeathTest, RwLockWriterHangTimeoutPanics) {
  RwLock rw(&kPair);
  EXPECT_DEATH(wait_on_held_lock([&] { rw.lock_shared(); }, [&] { rw.unlock_shared(); },
                                 [&] {
                                   rw.lock();
                                   rw.unlock();
                                 }),
               "rwlock test_pair: write lock not acquired within hang timeout");
}

TEST_F(LockdepDeathTest, RwLockReaderHangTimeoutPanics) {
  RwLock rw(&kPair);
  EXPECT_DEATH(wait_on_held_lock([&] { rw.lock(); }, [&] { rw.unlock(); },
                                 [&] {
                                   rw.lock_shared();
                                   rw.unlock_shared();
                                 }),
               "rwlock test_pair: read lock not acquired within hang timeout; writer tid "
               "[1-9][0-9]*");
}

// The classic ABBA deadlock between unranked locks (which lockdep-lite cannot order): both
// threads block, and the first to reach the timeout panics with the lock it holds.
//  1. T1 takes A, T2 takes B;
//  2. T1 waits for B, T2 waits for A;
//  3. after hang_timeout() one of them panics.
TEST_F(LockdepDeathTest, AbbaDeadlockPanicsInsteadOfHanging) {
  Mutex a, b;
  EXPECT_DEATH(
      {
        set_hang_timeout(200ms);
        std::atomic<int> first_taken{0};
        auto side = [&](Mutex& first, Mutex& second) {
          first.lock();
          first_taken.fetch_add(1);
          wait_until([&] { return first_taken.load() == 2; }, 5s);
          second.lock();  // deadlock
          second.unlock();
          first.unlock();
        };
        std::thread t2([&] { side(b, a); });
        side(a, b);
        t2.join();
      },
      "mutex mutex not acquired within hang timeout; held by tid [1-9][0-9]*\n  thread "
      "[0-9]+ holds: \\?@");
}

}  // namespace
}  // namespace gpusvm
