// Mutex, SpinLock and RwLock: mutual exclusion under contention, try_lock, held tracking,
// RwLock sharing, writer preference and downgrade. The misuse that must panic (order
// violations, recursion, hang timeout, failed assertions) is in lockdep_test.cc.
#include "gpusvm/base/lock.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tests/base/test_util.h"

namespace gpusvm {
namespace {

using namespace std::chrono_literals;
using testing_util::wait_until;

// Tries the lock and, if that worked, releases it again: "could this thread take it now?".
// No static analysis: callers use it on locks they may already hold.
template <typename Lock>
bool try_lock_and_release(Lock& l) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  if (!l.try_lock()) return false;
  l.unlock();
  return true;
}

bool try_lock_shared_and_release(RwLock& l) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  if (!l.try_lock_shared()) return false;
  l.unlock_shared();
  return true;
}

// Asks another thread whether it could take the lock now (this thread may hold it).
template <typename Fn>
bool from_other_thread(Fn fn) {
  bool result = false;
  std::thread t([&] { result = fn(); });
  t.join();
  return result;
}

// ---- Mutual exclusion under contention, for the three lock types ----

// Each critical section bumps a plain (non-atomic) counter and checks that it is alone in
// there; TSan additionally checks that the lock orders the counter's accesses.
struct Contention {
  int64_t counter = 0;              // guarded by the lock under test
  std::atomic<int> inside{0};       // atomic: how many threads are in the critical section
  std::atomic<int> max_inside{0};   // atomic: the most ever seen at once

  void critical_section() {
    const int now = inside.fetch_add(1, std::memory_order_relaxed) + 1;
    int prev = max_inside.load(std::memory_order_relaxed);
    while (now > prev && !max_inside.compare_exchange_weak(prev, now)) {
    }
    counter++;
    if ((counter & 63) == 0) std::this_thread::yield();  // widen the window now and then
    inside.fetch_sub(1, std::memory_order_relaxed);
  }
};

template <typename Lock>
void run_contention(Lock& l, Contention& c, int threads, int iters) {
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) {
    ts.emplace_back([&] {
      for (int i = 0; i < iters; i++) {
        l.lock();
        l.assert_held();
        c.critical_section();
        l.unlock();
      }
    });
  }
  for (auto& t : ts) t.join();
}

TEST(Mutex, MutualExclusionUnderContention) {
  constexpr LockClass kClass{"test_mutex", 10};
  Mutex mu(&kClass);
  Contention c;
  run_contention(mu, c, 4, 10000);
  EXPECT_EQ(c.counter, 4 * 10000);
  EXPECT_EQ(c.max_inside.load(), 1);
  EXPECT_FALSE(mu.held_by_me());
}

TEST(SpinLock, MutualExclusionUnderContention) {
  constexpr LockClass kClass{"test_spin", 10};
  SpinLock sl(&kClass);
  Contention c;
  run_contention(sl, c, 4, 5000);
  EXPECT_EQ(c.counter, 4 * 5000);
  EXPECT_EQ(c.max_inside.load(), 1);
}

TEST(RwLock, WritersExcludeEachOtherUnderContention) {
  RwLock rw;
  Contention c;
  run_contention(rw, c, 4, 5000);
  EXPECT_EQ(c.counter, 4 * 5000);
  EXPECT_EQ(c.max_inside.load(), 1);
}

// Writers keep two fields equal; readers must never see them differ.
TEST(RwLock, ReadersNeverSeeAHalfDoneWrite) {
  struct Pair {
    RwLock lock;
    int64_t a GPUSVM_GUARDED_BY(lock) = 0;
    int64_t b GPUSVM_GUARDED_BY(lock) = 0;
  } p;
  constexpr int kWriters = 2, kReaders = 2, kIters = 3000;
  std::atomic<int> torn{0};
  std::atomic<int64_t> reads{0};
  std::vector<std::thread> ts;
  for (int w = 0; w < kWriters; w++) {
    ts.emplace_back([&] {
      for (int i = 0; i < kIters; i++) {
        WriteLock g(&p.lock);
        p.a++;
        std::this_thread::yield();
        p.b++;
      }
    });
  }
  for (int r = 0; r < kReaders; r++) {
    ts.emplace_back([&] {
      for (int i = 0; i < kIters; i++) {
        ReadLock g(&p.lock);
        if (p.a != p.b) torn.fetch_add(1, std::memory_order_relaxed);
        reads.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(reads.load(), kReaders * kIters);
  ReadLock g(&p.lock);
  EXPECT_EQ(p.a, kWriters * kIters);
  EXPECT_EQ(p.b, kWriters * kIters);
}

// Static analysis and RAII together: a guarded field, touched only through MutexLock.
TEST(MutexLock, GuardsAnAnnotatedField) {
  struct Counter {
    Mutex mu;
    int64_t value GPUSVM_GUARDED_BY(mu) = 0;
  } c;
  std::vector<std::thread> ts;
  for (int t = 0; t < 3; t++) {
    ts.emplace_back([&] {
      for (int i = 0; i < 2000; i++) {
        MutexLock g(&c.mu);
        c.value += 2;
      }
    });
  }
  for (auto& t : ts) t.join();
  MutexLock g(&c.mu);
  EXPECT_TRUE(c.mu.held_by_me());
  EXPECT_EQ(c.value, 3 * 2000 * 2);
}

TEST(SpinLockGuard, HoldsForItsScope) {
  SpinLock sl;
  {
    SpinLockGuard g(&sl);
    EXPECT_TRUE(sl.held_by_me());
    EXPECT_FALSE(from_other_thread([&] { return try_lock_and_release(sl); }));
  }
  EXPECT_FALSE(sl.held_by_me());
  EXPECT_TRUE(from_other_thread([&] { return try_lock_and_release(sl); }));
}

// ---- Blocking acquisition waits for the holder ----

template <typename Lock>
void expect_lock_waits_for_holder(Lock& l) {
  std::atomic<bool> holding{false};
  std::atomic<bool> released{false};
  std::atomic<bool> acquired{false};
  std::thread holder([&] {
    l.lock();
    holding.store(true);
    // Hold until the waiter has had time to block (the waiter cannot signal that it sleeps).
    std::this_thread::sleep_for(50ms);
    EXPECT_FALSE(acquired.load()) << "the waiter got the lock while it was held";
    released.store(true);
    l.unlock();
  });
  ASSERT_TRUE(wait_until([&] { return holding.load(); }));
  l.lock();
  acquired.store(true);
  EXPECT_TRUE(released.load()) << "acquired before the holder released";
  l.unlock();
  holder.join();
}

TEST(Mutex, LockWaitsForTheHolder) {
  Mutex mu;
  expect_lock_waits_for_holder(mu);
}

TEST(SpinLock, LockWaitsForTheHolder) {
  SpinLock sl;
  expect_lock_waits_for_holder(sl);
}

TEST(RwLock, LockWaitsForTheWriter) {
  RwLock rw;
  expect_lock_waits_for_holder(rw);
}

// ---- try_lock ----

template <typename Lock>
void expect_try_lock_semantics(Lock& l) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  // Free: the try succeeds and the lock is recorded as held by this thread.
  ASSERT_TRUE(l.try_lock());
  EXPECT_TRUE(l.held_by_me());
  EXPECT_EQ(lockdep::held_count(), 1);
  // Held by this thread: a second try fails (it does not deadlock and does not panic).
  EXPECT_FALSE(l.try_lock());
  EXPECT_EQ(lockdep::held_count(), 1);
  // Held: another thread's try fails and leaves it not holding anything.
  EXPECT_FALSE(from_other_thread([&] {
    const bool got = try_lock_and_release(l);
    EXPECT_FALSE(l.held_by_me());
    EXPECT_EQ(lockdep::held_count(), 0);
    return got;
  }));
  l.unlock();
  EXPECT_FALSE(l.held_by_me());
  EXPECT_EQ(lockdep::held_count(), 0);
  // Released: another thread's try succeeds.
  EXPECT_TRUE(from_other_thread([&] { return try_lock_and_release(l); }));
}

TEST(Mutex, TryLock) {
  constexpr LockClass kClass{"test_mutex", 10};
  Mutex mu(&kClass);
  expect_try_lock_semantics(mu);
}

TEST(SpinLock, TryLock) {
  SpinLock sl;
  expect_try_lock_semantics(sl);
}

TEST(RwLock, TryLockWrite) {
  RwLock rw;
  expect_try_lock_semantics(rw);
}

TEST(RwLock, TryLockSharedFailsOnlyAgainstAWriter) {
  RwLock rw;
  {
    WriteLock w(&rw);
    EXPECT_FALSE(from_other_thread([&] { return try_lock_shared_and_release(rw); }));
  }
  {
    ReadLock r(&rw);
    EXPECT_TRUE(from_other_thread([&] { return try_lock_shared_and_release(rw); }));
    EXPECT_FALSE(from_other_thread([&] { return try_lock_and_release(rw); }));
  }
  EXPECT_TRUE(from_other_thread([&] { return try_lock_and_release(rw); }));
}

// Regression: try_lock ran the lock-order check and panicked on the kernel's legal
// "trylock against the order, back off if busy" pattern (migrate_vma_collect_pmd trylocks the
// folio under the PTE lock although the folio lock ranks above it). A try cannot deadlock.
TEST(Lockdep, TryLockAgainstTheOrderIsAllowed) {
  constexpr LockClass kOuter{"test_outer", 10};
  constexpr LockClass kInner{"test_inner", 20};
  Mutex outer(&kOuter);
  SpinLock inner(&kInner);
  RwLock outer_rw(&kOuter);
  SpinLockGuard g(&inner);
  if (outer.try_lock()) {
    EXPECT_TRUE(outer.held_by_me());
    EXPECT_EQ(lockdep::held_count(), 2);
    outer.unlock();
  } else {
    ADD_FAILURE() << "try_lock of a free mutex failed";
  }
  EXPECT_TRUE(try_lock_and_release(outer_rw));
  EXPECT_TRUE(try_lock_shared_and_release(outer_rw));
  EXPECT_EQ(lockdep::held_count(), 1);
}

// ---- Held tracking ----

TEST(Lockdep, TracksHeldLocksPerThread) {
  constexpr LockClass kA{"test_a", 10};
  constexpr LockClass kB{"test_b", 20};
  Mutex a(&kA);
  RwLock b(&kB);
  EXPECT_EQ(lockdep::held_count(), 0);
  EXPECT_EQ(lockdep::held_locks_string(), "(none)");
  {
    MutexLock ga(&a);
    ReadLock gb(&b);
    EXPECT_EQ(lockdep::held_count(), 2);
    const std::string s = lockdep::held_locks_string();
    EXPECT_NE(s.find("test_a@"), std::string::npos) << s;
    EXPECT_NE(s.find("(rank 10)"), std::string::npos) << s;
    EXPECT_NE(s.find("test_b@"), std::string::npos) << s;
    EXPECT_NE(s.find("(rank 20)[read]"), std::string::npos) << s;
    a.assert_held();
    b.assert_held();
    LockMode mode;
    ASSERT_TRUE(lockdep::held(&b, &mode));
    EXPECT_EQ(mode, LockMode::kShared);
    ASSERT_TRUE(lockdep::held(&a, &mode));
    EXPECT_EQ(mode, LockMode::kExclusive);
    // Another thread holds nothing and may assert so.
    std::thread t([&] {
      EXPECT_EQ(lockdep::held_count(), 0);
      EXPECT_FALSE(a.held_by_me());
      EXPECT_FALSE(b.held_by_me());
      a.assert_not_held();
      b.assert_not_held();
      lockdep::assert_none_held("other thread");
    });
    t.join();
  }
  EXPECT_EQ(lockdep::held_count(), 0);
  a.assert_not_held();
  b.assert_not_held();
  lockdep::assert_none_held("after scope");
}

TEST(Lockdep, ReleaseOutOfAcquisitionOrderKeepsTheRest) {
  Mutex a, b, c;
  a.lock();
  b.lock();
  c.lock();
  b.unlock();  // not the most recent one
  EXPECT_EQ(lockdep::held_count(), 2);
  EXPECT_TRUE(a.held_by_me());
  EXPECT_FALSE(b.held_by_me());
  EXPECT_TRUE(c.held_by_me());
  c.unlock();
  a.unlock();
  EXPECT_EQ(lockdep::held_count(), 0);
}

TEST(Lockdep, InOrderAndNestedAcquisitionsAreAllowed) {
  constexpr LockClass kOuter{"test_outer", 10};
  constexpr LockClass kInner{"test_inner", 20};
  constexpr LockClass kPair{"test_pair", 30};
  RwLock outer(&kOuter);
  Mutex inner(&kInner);
  SpinLock src(&kPair), dst(&kPair);
  Mutex unranked;
  ReadLock g1(&outer);
  MutexLock g2(&inner);
  SpinLockGuard g3(&src, 0);  // same rank: subclass 0 then 1, as fork/mremap take src/dst
  SpinLockGuard g4(&dst, 1);
  MutexLock g5(&unranked);  // rank 0: not ordered
  EXPECT_EQ(lockdep::held_count(), 5);
}

TEST(Lockdep, MaxHeldRankIsTheHighestRankHeld) {
  constexpr LockClass kLow{"test_low", 10};
  constexpr LockClass kHigh{"test_high", 40};
  Mutex low(&kLow);
  SpinLock high(&kHigh);
  Mutex unranked;
  EXPECT_EQ(lockdep::max_held_rank(), 0u);
  {
    MutexLock g0(&unranked);
    EXPECT_EQ(lockdep::max_held_rank(), 0u) << "unranked locks have rank 0";
    MutexLock g1(&low);
    EXPECT_EQ(lockdep::max_held_rank(), 10u);
    {
      SpinLockGuard g2(&high);
      EXPECT_EQ(lockdep::max_held_rank(), 40u);
      EXPECT_EQ(from_other_thread([] { return lockdep::max_held_rank(); }), 0u);
    }
    EXPECT_EQ(lockdep::max_held_rank(), 10u);
  }
  EXPECT_EQ(lockdep::max_held_rank(), 0u);
}

// Two write locks of one class in a fixed order (parent then child address space in fork).
TEST(Lockdep, RwLockNestedWriteLocksOfOneClass) {
  constexpr LockClass kMm{"test_mm", 100};
  RwLock parent(&kMm), child(&kMm);
  parent.lock_nested(0);
  child.lock_nested(1);
  EXPECT_TRUE(parent.write_held_by_me());
  EXPECT_TRUE(child.write_held_by_me());
  EXPECT_EQ(lockdep::held_count(), 2);
  EXPECT_EQ(lockdep::max_held_rank(), 100u);
  child.unlock();
  parent.unlock();
  EXPECT_EQ(lockdep::held_count(), 0);
}

// A bit lock defined elsewhere (the folio lock) reports to lockdep by hand.
TEST(Lockdep, ExternalLocksUseTheLockdepApi) {
  constexpr LockClass kBit{"test_bitlock", 10};
  std::atomic<uint64_t> word{0};
  lockdep::check_order(&word, &kBit);
  lockdep::acquire(&word, &kBit, LockMode::kExclusive);
  EXPECT_TRUE(lockdep::held(&word));
  EXPECT_EQ(lockdep::held_count(), 1);
  lockdep::release(&word);
  EXPECT_FALSE(lockdep::held(&word));
}

// ---- RwLock specifics ----

TEST(RwLock, WriteHeldByMeOnlyInWriteMode) {
  RwLock rw;
  EXPECT_FALSE(rw.write_held_by_me());
  {
    WriteLock w(&rw);
    EXPECT_TRUE(rw.write_held_by_me());
    EXPECT_TRUE(rw.held_by_me());
    rw.assert_write_held();
    rw.assert_held();
    EXPECT_FALSE(from_other_thread([&] { return rw.write_held_by_me(); }));
  }
  {
    ReadLock r(&rw);
    EXPECT_FALSE(rw.write_held_by_me());
    EXPECT_TRUE(rw.held_by_me());
    rw.assert_held();
  }
  EXPECT_FALSE(rw.held_by_me());
}

TEST(RwLock, ReadersShare) {
  RwLock rw;
  std::atomic<int> readers_in{0};
  std::atomic<bool> leave{false};
  constexpr int kReaders = 3;
  std::vector<std::thread> ts;
  for (int i = 0; i < kReaders; i++) {
    ts.emplace_back([&] {
      ReadLock r(&rw);
      readers_in.fetch_add(1);
      EXPECT_TRUE(wait_until([&] { return leave.load(); }));
    });
  }
  // All readers get in together: none of them waits for another to leave.
  EXPECT_TRUE(wait_until([&] { return readers_in.load() == kReaders; }));
  EXPECT_EQ(readers_in.load(), kReaders);
  EXPECT_FALSE(try_lock_and_release(rw)) << "a writer got in past active readers";
  leave.store(true);
  for (auto& t : ts) t.join();
  EXPECT_TRUE(try_lock_and_release(rw));
}

// Writer preference (like an rwsem): once a writer waits, new readers queue behind it, so a
// stream of readers cannot starve writers.
//  1. reader R1 holds the lock;
//  2. writer W blocks in lock();
//  3. new read tries fail while W waits; reader R2 blocks in lock_shared();
//  4. R1 leaves: W gets the lock before R2.
TEST(RwLock, WaitingWriterGoesBeforeNewReaders) {
  RwLock rw;
  std::mutex order_mu;
  std::vector<std::string> order;  // under order_mu
  auto record = [&](const char* who) {
    std::lock_guard<std::mutex> g(order_mu);
    order.push_back(who);
  };

  rw.lock_shared();  // step 1 (this thread is R1)
  std::thread writer([&] {  // step 2
    WriteLock w(&rw);
    record("W");
  });
  // Step 3: a writer is queued once a fresh reader is refused (nothing else refuses readers
  // while only readers hold the lock).
  EXPECT_TRUE(wait_until(
      [&] { return !from_other_thread([&] { return try_lock_shared_and_release(rw); }); }))
      << "the waiting writer never blocked new readers";
  std::thread reader2([&] {
    ReadLock r(&rw);
    record("R2");
  });
  // Give R2 time to reach lock_shared() and block; the order asserted below holds whatever
  // the timing, the sleep only makes the test able to catch a reader that barges in.
  std::this_thread::sleep_for(50ms);
  {
    std::lock_guard<std::mutex> g(order_mu);
    EXPECT_TRUE(order.empty()) << "someone got in while R1 held the lock: " << order[0];
  }
  rw.unlock_shared();  // step 4
  writer.join();
  reader2.join();
  std::lock_guard<std::mutex> g(order_mu);
  EXPECT_EQ(order, std::vector<std::string>({"W", "R2"}));
}

// downgrade(): a write hold becomes a read hold without a window where another writer could
// get in; readers may join afterwards, writers still wait.
TEST(RwLock, DowngradeTurnsTheWriteHoldIntoARead) {
  struct {
    RwLock lock;
    int value GPUSVM_GUARDED_BY(lock) = 0;
  } s;
  s.lock.lock();
  s.value = 42;
  s.lock.downgrade();
  EXPECT_TRUE(s.lock.held_by_me());
  EXPECT_FALSE(s.lock.write_held_by_me());
  LockMode mode = LockMode::kExclusive;  // overwritten by held()
  EXPECT_TRUE(lockdep::held(&s.lock, &mode));
  EXPECT_EQ(mode, LockMode::kShared);
  EXPECT_EQ(lockdep::held_count(), 1);
  EXPECT_EQ(s.value, 42);
  // Readers share with us now; writers do not.
  int seen = 0;
  std::thread reader([&] {
    ReadLock r(&s.lock);
    seen = s.value;
  });
  reader.join();
  EXPECT_EQ(seen, 42);
  EXPECT_FALSE(from_other_thread([&] { return try_lock_and_release(s.lock); }));
  s.lock.unlock_shared();
  EXPECT_EQ(lockdep::held_count(), 0);
  EXPECT_TRUE(from_other_thread([&] { return try_lock_and_release(s.lock); }));
}

TEST(RwLock, DowngradeLetsWaitingReadersIn) {
  RwLock rw;
  std::atomic<bool> reader_in{false};
  rw.lock();
  std::thread reader([&] {
    ReadLock r(&rw);
    reader_in.store(true);
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(reader_in.load());
  rw.downgrade();
  // The blocked reader is woken while we still hold the lock for reading.
  EXPECT_TRUE(wait_until([&] { return reader_in.load(); }));
  EXPECT_TRUE(rw.held_by_me());
  rw.unlock_shared();
  reader.join();
}

// ---- hang_timeout ----

TEST(HangTimeout, DefaultIsSixtySecondsAndCanBeChanged) {
  EXPECT_EQ(hang_timeout(), std::chrono::milliseconds(60'000));
  set_hang_timeout(1234ms);
  EXPECT_EQ(hang_timeout(), 1234ms);
  set_hang_timeout(60'000ms);
  EXPECT_EQ(hang_timeout(), 60'000ms);
}

TEST(CurrentTid, DiffersBetweenThreadsAndIsStable) {
  const pid_t me = current_tid();
  EXPECT_GT(me, 0);
  EXPECT_EQ(current_tid(), me);
  pid_t other = 0;
  std::thread t([&] { other = current_tid(); });
  t.join();
  EXPECT_GT(other, 0);
  EXPECT_NE(other, me);
}

}  // namespace
}  // namespace gpusvm
