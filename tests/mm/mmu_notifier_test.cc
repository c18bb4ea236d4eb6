// MMU notifiers, driven by hand through MmuNotifierSubscriptions so each interleaving is
// chosen by the test: sequence values, set_seq from the callback, read_begin blocking and
// not blocking, insert and remove while invalidations are active (linked at once or
// deferred), callbacks in flight, owners/events/flags, non-blockable refusals, plain
// notifiers and release, hang diagnostics, and a seeded stress of the mirror protocol.
// tests/mm/notifier_protocol_test.cc has the shorter stories; these pin down the corners.
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;

constexpr Va kA = 0x100000;             // notifier windows used below
constexpr Va kB = 0x200000;
constexpr auto kBound = 10s;            // every wait in this file is bounded by this
constexpr auto kStillBlocked = 50ms;    // how long "does not return" is watched

template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = kBound) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A one-shot gate with bounded waits, for holding a callback inside a chosen point.
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> g(m_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> g(m_);
    return cv_.wait_for(g, kBound, [&] { return open_; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool open_ = false;
};

// An interval mirror that records every call and follows the protocol (driver lock,
// set_seq). Optionally blocks inside the callback on a gate, refuses non-blockable ranges,
// or "forgets" set_seq (a broken driver, to show what moves the sequence).
class Recorder : public MmuIntervalNotifierOps {
 public:
  struct Call {
    MmuNotifierRange range;
    uint64_t cur_seq;
  };
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& r, uint64_t cur_seq) override {
    if (refuse_nonblocking && !r.blockable()) {
      refusals++;
      return false;
    }
    {
      std::lock_guard<std::mutex> g(driver_lock);
      if (set_seq) n->set_seq(cur_seq);
      calls.push_back({r, cur_seq});
    }
    in_callback = true;
    entered++;
    if (gate && !gate->wait()) gate_timeouts++;
    in_callback = false;
    return true;
  }
  size_t count() {
    std::lock_guard<std::mutex> g(driver_lock);
    return calls.size();
  }
  Call last() {
    std::lock_guard<std::mutex> g(driver_lock);
    return calls.back();
  }

  std::mutex driver_lock;
  std::vector<Call> calls;  // under driver_lock
  bool set_seq = true;
  bool refuse_nonblocking = false;
  Gate* gate = nullptr;
  std::atomic<bool> in_callback{false};
  std::atomic<int> entered{0};
  std::atomic<int> refusals{0};
  std::atomic<int> gate_timeouts{0};
};

// A plain notifier that logs its callbacks ("S", "E", "R") and can refuse or block.
class PlainRecorder : public MmuNotifier {
 public:
  int invalidate_range_start(const MmuNotifierRange& r) override {
    log_call("S", r);
    if (gate && !gate->wait()) gate_timeouts++;
    start_returned = true;
    return refuse_nonblocking && !r.blockable() ? -EAGAIN : 0;
  }
  void invalidate_range_end(const MmuNotifierRange& r) override { log_call("E", r); }
  void release(AddressSpace* mm) override {
    std::lock_guard<std::mutex> g(m);
    log += "R";
    released_mm = mm;
    start_returned_before_release = start_returned.load();
  }
  std::string calls() {
    std::lock_guard<std::mutex> g(m);
    return log;
  }
  MmuNotifierRange last_range() {
    std::lock_guard<std::mutex> g(m);
    return last;
  }

  std::mutex m;
  std::string log;               // under m
  MmuNotifierRange last;         // under m
  AddressSpace* released_mm = nullptr;        // under m
  bool start_returned_before_release = false;  // under m
  bool refuse_nonblocking = false;
  Gate* gate = nullptr;
  std::atomic<bool> start_returned{false};
  std::atomic<int> gate_timeouts{0};

 private:
  void log_call(const char* what, const MmuNotifierRange& r) {
    std::lock_guard<std::mutex> g(m);
    log += what;
    last = r;
  }
};

class MmuNotifierTest : public MmTest {
 protected:
  MmuNotifierRange range(Va start, Va end, MmuNotifyEvent e = MmuNotifyEvent::kClear,
                         const void* owner = nullptr, unsigned flags = kMmuNotifierRangeBlockable) {
    return MmuNotifierRange{as.get(), start, end, e, flags, owner};
  }
  MmuNotifierSubscriptions& subs() { return as->notifier_subscriptions(); }
  // One complete invalidation.
  void invalidate(Va start, Va end, MmuNotifyEvent e = MmuNotifyEvent::kClear) {
    const MmuNotifierRange r = range(start, end, e);
    ASSERT_EQ(subs().invalidate_range_start(r), 0);
    subs().invalidate_range_end(r);
  }
};

bool same_range(const MmuNotifierRange& a, const MmuNotifierRange& b) {
  return a.mm == b.mm && a.start == b.start && a.end == b.end && a.event == b.event &&
         a.flags == b.flags && a.owner == b.owner;
}

TEST_F(MmuNotifierTest, EventNamesAreTheKernelNames) {
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kUnmap), "UNMAP");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kClear), "CLEAR");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kProtectionVma), "PROTECTION_VMA");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kProtectionPage), "PROTECTION_PAGE");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kSoftDirty), "SOFT_DIRTY");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kRelease), "RELEASE");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kMigrate), "MIGRATE");
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kExclusive), "EXCLUSIVE");
  EXPECT_STREQ(mmu_notify_event_name(static_cast<MmuNotifyEvent>(99)), "?");
}

TEST_F(MmuNotifierTest, InsertValidatesAndLeavesNothingBehindOnError) {
  Recorder m;
  MmuIntervalNotifier n;
  EXPECT_EQ(n.insert(nullptr, kA, kPageSize, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), kA, kPageSize, nullptr), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), kA, 0, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), ~0ULL - kPageSize + 1, 2 * kPageSize, &m), -EINVAL);  // wraps
  EXPECT_EQ(n.insert(as.get(), kTaskSize - kPageSize, 2 * kPageSize, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), 0, ~0ULL, &m), -EINVAL);
  EXPECT_FALSE(n.inserted());
  EXPECT_EQ(n.mm(), nullptr);
  EXPECT_EQ(subs().interval_count(), 0u);
  // The last user page is a valid window, and so is one starting at 0.
  ASSERT_EQ(n.insert(as.get(), kTaskSize - kPageSize, kPageSize, &m), 0);
  EXPECT_TRUE(n.inserted());
  EXPECT_EQ(n.mm(), as.get());
  EXPECT_EQ(n.start(), kTaskSize - kPageSize);
  EXPECT_EQ(n.end(), kTaskSize);
  EXPECT_EQ(n.insert(as.get(), kA, kPageSize, &m), -EINVAL);  // already inserted
  EXPECT_EQ(n.start(), kTaskSize - kPageSize);                // unchanged by the refusal
  EXPECT_EQ(subs().interval_count(), 1u);
  n.remove();
  EXPECT_FALSE(n.inserted());
  n.remove();  // a second remove is a no-op
  ASSERT_EQ(n.insert(as.get(), 0, kPageSize, &m), 0);  // reinsertion after remove
  EXPECT_EQ(subs().interval_count(), 1u);
  n.remove();
  EXPECT_EQ(subs().interval_count(), 0u);
  EXPECT_EQ(m.count(), 0u);
}

// The sequence values a mirror sees: read_begin is stable while nothing touches the window,
// the callback gets one odd cur_seq per invalidation (the same for every notifier it
// reaches), and read_begin afterwards returns exactly that value.
TEST_F(MmuNotifierTest, SequenceValuesFollowTheProtocol) {
  Recorder ma, mb;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), kA, 16 * kPageSize, &ma), 0);
  ASSERT_EQ(b.insert(as.get(), kA + 8 * kPageSize, 16 * kPageSize, &mb), 0);
  const uint64_t a0 = a.read_begin();
  EXPECT_EQ(a0 % 2, 1u);
  EXPECT_EQ(a.read_begin(), a0);

  // Touching the window boundaries from outside reaches nobody.
  invalidate(0, kA);
  invalidate(kA + 24 * kPageSize, kB);
  EXPECT_FALSE(a.read_retry(a0));
  EXPECT_EQ(ma.count() + mb.count(), 0u);
  EXPECT_EQ(subs().interval_callbacks.get(), 0u);

  // One byte inside a only.
  invalidate(kA + 8 * kPageSize - 1, kA + 8 * kPageSize);
  ASSERT_EQ(ma.count(), 1u);
  EXPECT_EQ(mb.count(), 0u);
  const uint64_t s1 = ma.last().cur_seq;
  EXPECT_EQ(s1 % 2, 1u);
  EXPECT_NE(s1, a0);
  EXPECT_TRUE(a.read_retry(a0));
  EXPECT_EQ(a.read_begin(), s1);

  // The overlap of both: one invalidation, one cur_seq for both, newer than the last.
  const uint64_t b0 = b.read_begin();
  invalidate(kA + 10 * kPageSize, kA + 11 * kPageSize);
  ASSERT_EQ(ma.count(), 2u);
  ASSERT_EQ(mb.count(), 1u);
  const uint64_t s2 = ma.last().cur_seq;
  EXPECT_EQ(mb.last().cur_seq, s2);
  EXPECT_GT(s2, s1);
  EXPECT_TRUE(b.read_retry(b0));
  EXPECT_EQ(a.read_begin(), s2);
  EXPECT_EQ(b.read_begin(), s2);
  EXPECT_EQ(subs().interval_callbacks.get(), 3u);
  EXPECT_EQ(subs().invalidations.get(), 4u);
  a.remove();
  b.remove();
}

// set_seq in the callback is what makes read_retry fail, and it does so as soon as
// invalidate_range_start returns, before any page-table entry changes. A driver that skips
// set_seq breaks the protocol: its mirror would commit stale data.
TEST_F(MmuNotifierTest, SetSeqFromTheCallbackIsWhatMovesTheSequence) {
  Recorder good, forgetful;
  forgetful.set_seq = false;
  MmuIntervalNotifier g, f;
  ASSERT_EQ(g.insert(as.get(), kA, kPmdSize, &good), 0);
  ASSERT_EQ(f.insert(as.get(), kA, kPmdSize, &forgetful), 0);
  const uint64_t gs = g.read_begin();
  const uint64_t fs = f.read_begin();
  const MmuNotifierRange r = range(kA, kA + kPageSize);
  ASSERT_EQ(subs().invalidate_range_start(r), 0);
  // 1. Between start and end (the page tables would change now): g must retry already.
  EXPECT_TRUE(g.read_retry(gs));
  EXPECT_TRUE(g.check_retry(gs));
  EXPECT_FALSE(f.read_retry(fs)) << "nothing but set_seq moves a notifier's sequence";
  EXPECT_TRUE(subs().invalidation_in_progress());
  subs().invalidate_range_end(r);
  EXPECT_FALSE(subs().invalidation_in_progress());
  EXPECT_TRUE(g.read_retry(gs));
  EXPECT_EQ(good.count(), 1u);
  EXPECT_EQ(forgetful.count(), 1u);
  g.remove();
  f.remove();
}

// read_begin waits for every active invalidation that reached the notifier, not just the
// first one to end; one that reached other notifiers only does not block it.
TEST_F(MmuNotifierTest, ReadBeginWaitsOutOverlappingInvalidationsOnly) {
  Recorder ma, mb;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), kA, kPageSize, &ma), 0);
  ASSERT_EQ(b.insert(as.get(), kB, kPageSize, &mb), 0);
  const uint64_t b0 = b.read_begin();
  const MmuNotifierRange r1 = range(kA, kA + kPageSize);
  const MmuNotifierRange r2 = range(0, kB);  // also covers a, not b
  ASSERT_EQ(subs().invalidate_range_start(r1), 0);
  ASSERT_EQ(subs().invalidate_range_start(r2), 0);
  // b was not reached: its read_begin returns at once with its old sequence.
  EXPECT_EQ(b.read_begin(), b0);
  std::atomic<bool> returned{false};
  uint64_t seen = 0;
  std::thread reader([&] {
    seen = a.read_begin();
    returned = true;
  });
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(returned.load());
  subs().invalidate_range_end(r1);
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(returned.load()) << "read_begin returned while r2 still changes a's pages";
  subs().invalidate_range_end(r2);
  ASSERT_TRUE(eventually([&] { return returned.load(); }));
  reader.join();
  EXPECT_EQ(seen, ma.last().cur_seq);
  EXPECT_FALSE(a.read_retry(seen));
  EXPECT_EQ(ma.count(), 2u);
  EXPECT_EQ(mb.count(), 0u);
  a.remove();
  b.remove();
}

// Linux's subtle case: an invalidation has started but has not called this notifier yet.
// read_begin does not wait for it; the later set_seq makes read_retry fail instead.
//   1. invalidation I starts, reaches notifier a (lower start) and blocks in a's callback
//   2. b.read_begin() returns at once: b has not been called
//   3. a's callback finishes; I calls b's callback (set_seq); read_retry(b's seq) is true
TEST_F(MmuNotifierTest, ReadBeginDoesNotWaitForAnInvalidationThatHasNotReachedIt) {
  Gate gate;
  Recorder ma, mb;
  ma.gate = &gate;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), kA, kPmdSize, &ma), 0);
  ASSERT_EQ(b.insert(as.get(), kA + kPageSize, kPmdSize, &mb), 0);
  const MmuNotifierRange r = range(kA, kA + 2 * kPageSize);
  std::atomic<bool> started{false};
  std::thread invalidator([&] {
    EXPECT_EQ(subs().invalidate_range_start(r), 0);
    started = true;
  });
  ASSERT_TRUE(eventually([&] { return ma.entered.load() == 1; }));
  std::atomic<bool> got{false};
  uint64_t bseq = 0;
  std::thread reader([&] {
    bseq = b.read_begin();
    got = true;
  });
  ASSERT_TRUE(eventually([&] { return got.load(); })) << "read_begin waited for an invalidation "
                                                         "that had not reached its notifier";
  reader.join();
  EXPECT_FALSE(b.read_retry(bseq));
  EXPECT_EQ(mb.count(), 0u);
  gate.open();
  ASSERT_TRUE(eventually([&] { return started.load(); }));
  invalidator.join();
  EXPECT_EQ(mb.count(), 1u);
  EXPECT_TRUE(b.read_retry(bseq));
  subs().invalidate_range_end(r);
  EXPECT_EQ(b.read_begin(), mb.last().cur_seq);
  EXPECT_EQ(ma.gate_timeouts.load(), 0);
  a.remove();
  b.remove();
}

// Inserted while an invalidation that reaches no notifier is active (sequence even): no
// walker is on the tree, so the notifier is linked at once (as mmu_interval_notifier_insert
// does) and a second invalidation started meanwhile calls it. Its read_begin still waits
// for all of them: it missed the first one's start.
TEST_F(MmuNotifierTest, InsertDuringAnInvalidationThatWalksNothingLinksAtOnce) {
  Recorder m;
  MmuIntervalNotifier n;
  const MmuNotifierRange quiet = range(kB, kB + kPageSize);  // no notifier there
  ASSERT_EQ(subs().invalidate_range_start(quiet), 0);
  ASSERT_EQ(n.insert(as.get(), kA, kPageSize, &m), 0);
  EXPECT_EQ(subs().interval_count(), 1u);
  std::atomic<bool> returned{false};
  std::thread reader([&] {
    (void)n.read_begin();
    returned = true;
  });
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(returned.load()) << "read_begin returned while an invalidation it missed runs";
  const MmuNotifierRange r = range(kA, kA + kPageSize, MmuNotifyEvent::kUnmap);
  ASSERT_EQ(subs().invalidate_range_start(r), 0);
  EXPECT_EQ(m.count(), 1u) << "a notifier linked while the tree was not walked sees the next one";
  EXPECT_EQ(m.last().range.event, MmuNotifyEvent::kUnmap);
  subs().invalidate_range_end(r);
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(returned.load()) << "read_begin returned while the invalidation it missed runs";
  subs().invalidate_range_end(quiet);
  ASSERT_TRUE(eventually([&] { return returned.load(); }));
  reader.join();
  n.remove();
}

// Inserted while an invalidation walks the tree (sequence odd): deferred. Neither the
// running invalidation nor one started before the last ends calls it; afterwards it is
// linked and called like any other.
TEST_F(MmuNotifierTest, InsertDuringAWalkIsDeferredUntilTheLastInvalidationEnds) {
  Recorder first, late;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), kA, kPmdSize, &first), 0);
  const MmuNotifierRange r1 = range(kA, kA + kPageSize);
  ASSERT_EQ(subs().invalidate_range_start(r1), 0);
  ASSERT_EQ(b.insert(as.get(), kA, kPmdSize, &late), 0);
  EXPECT_TRUE(b.inserted());
  EXPECT_EQ(subs().interval_count(), 2u);
  // b's readers wait: b missed the start of r1, which may be changing its pages.
  std::atomic<bool> returned{false};
  uint64_t bs = 0;
  std::thread reader([&] {
    bs = b.read_begin();
    returned = true;
  });
  const MmuNotifierRange r2 = range(kA, kA + kPmdSize);
  ASSERT_EQ(subs().invalidate_range_start(r2), 0);
  EXPECT_EQ(first.count(), 2u);
  EXPECT_EQ(late.count(), 0u);
  subs().invalidate_range_end(r1);
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(returned.load()) << "read_begin of a deferred notifier returned too early";
  subs().invalidate_range_end(r2);
  ASSERT_TRUE(eventually([&] { return returned.load(); }));
  reader.join();
  EXPECT_EQ(late.count(), 0u);
  EXPECT_FALSE(b.read_retry(bs));
  invalidate(kA, kA + kPageSize);
  EXPECT_EQ(late.count(), 1u);
  EXPECT_TRUE(b.read_retry(bs));
  a.remove();
  b.remove();
  EXPECT_EQ(subs().interval_count(), 0u);
}

// Removing a notifier whose insert is still deferred does not wait: no walker saw it.
TEST_F(MmuNotifierTest, RemovingADeferredInsertDoesNotWait) {
  Recorder first, late;
  MmuIntervalNotifier a;
  ASSERT_EQ(a.insert(as.get(), kA, kPmdSize, &first), 0);
  const MmuNotifierRange r = range(kA, kA + kPageSize);
  ASSERT_EQ(subs().invalidate_range_start(r), 0);
  auto b = std::make_unique<MmuIntervalNotifier>();
  ASSERT_EQ(b->insert(as.get(), kA, kPmdSize, &late), 0);
  EXPECT_EQ(subs().interval_count(), 2u);
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    b->remove();
    removed = true;
  });
  ASSERT_TRUE(eventually([&] { return removed.load(); }));
  remover.join();
  EXPECT_FALSE(b->inserted());
  EXPECT_EQ(subs().interval_count(), 1u);
  b.reset();  // freed while the invalidation still runs: nothing may touch it any more
  subs().invalidate_range_end(r);
  invalidate(kA, kA + kPageSize);
  EXPECT_EQ(late.count(), 0u);
  EXPECT_EQ(first.count(), 2u);
  a.remove();
}

// remove() while its callback runs: it returns only after the callback and the invalidation
// ended, and no callback runs afterwards. Removing during an invalidation that walks
// nothing does not wait.
TEST_F(MmuNotifierTest, RemoveWaitsForTheCallbackInFlight) {
  Gate gate;
  Recorder m;
  m.gate = &gate;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPmdSize, &m), 0);
  const MmuNotifierRange r = range(kA, kA + kPageSize);
  std::thread invalidator([&] { EXPECT_EQ(subs().invalidate_range_start(r), 0); });
  ASSERT_TRUE(eventually([&] { return m.in_callback.load(); }));
  std::atomic<bool> removed{false};
  std::atomic<bool> callback_ran_at_return{true};
  std::thread remover([&] {
    n.remove();
    callback_ran_at_return = m.in_callback.load();
    removed = true;
  });
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(removed.load()) << "remove() returned while its callback was running";
  gate.open();
  invalidator.join();
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(removed.load()) << "remove() returned before the invalidation ended";
  EXPECT_EQ(subs().interval_count(), 0u);  // counted as removed already
  subs().invalidate_range_end(r);
  ASSERT_TRUE(eventually([&] { return removed.load(); }));
  remover.join();
  EXPECT_FALSE(callback_ran_at_return.load());
  EXPECT_FALSE(n.inserted());
  m.gate = nullptr;
  invalidate(kA, kA + kPmdSize);
  EXPECT_EQ(m.count(), 1u);

  // An active invalidation elsewhere does not delay remove().
  ASSERT_EQ(n.insert(as.get(), kA, kPageSize, &m), 0);
  const MmuNotifierRange elsewhere = range(kB, kB + kPageSize);
  ASSERT_EQ(subs().invalidate_range_start(elsewhere), 0);
  std::atomic<bool> quick{false};
  std::thread q([&] {
    n.remove();
    quick = true;
  });
  ASSERT_TRUE(eventually([&] { return quick.load(); }));
  q.join();
  subs().invalidate_range_end(elsewhere);
  EXPECT_EQ(m.count(), 1u);
}

// Threads insert and remove notifiers while invalidations run on the same window: every
// callback happens while the notifier is inserted (from the start of insert to the return
// of remove), and the tree ends empty.
TEST_F(MmuNotifierTest, RemoveRacingInvalidationsNeverSeesALateCallback) {
  struct Watched : public MmuIntervalNotifierOps {
    bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange&, uint64_t cur_seq) override {
      if (!live.load(std::memory_order_acquire)) late++;
      n->set_seq(cur_seq);
      calls++;
      return true;
    }
    std::atomic<bool> live{false};
    std::atomic<int> late{0};
    std::atomic<int> calls{0};
  };
  std::atomic<bool> stop{false};
  std::atomic<int> rounds{0};
  std::vector<std::thread> invalidators;
  for (int t = 0; t < 2; t++) {
    invalidators.emplace_back([&, t] {
      while (!stop.load()) {
        const MmuNotifierRange r = range(kA + t * kPageSize, kA + kPmdSize);
        ASSERT_EQ(subs().invalidate_range_start(r), 0);
        std::this_thread::yield();
        subs().invalidate_range_end(r);
        rounds++;
        // Leave gaps: read_begin waits until no invalidation of its window is active, and
        // back-to-back overlapping brackets could starve it (as in Linux).
        std::this_thread::sleep_for(20us);
      }
    });
  }
  ASSERT_TRUE(eventually([&] { return rounds.load() >= 10; }));
  Watched w[2];
  std::vector<std::thread> users;
  for (int t = 0; t < 2; t++) {
    users.emplace_back([&, t] {
      for (int i = 0; i < 300; i++) {
        MmuIntervalNotifier n;
        w[t].live.store(true, std::memory_order_release);
        ASSERT_EQ(n.insert(as.get(), kA + t * kPageSize, 4 * kPageSize, &w[t]), 0);
        (void)n.read_begin();
        std::this_thread::sleep_for(50us);  // stay inserted while invalidations run
        n.remove();
        w[t].live.store(false, std::memory_order_release);
      }
    });
  }
  for (auto& u : users) u.join();
  stop = true;
  for (auto& i : invalidators) i.join();
  EXPECT_EQ(w[0].late.load() + w[1].late.load(), 0);
  EXPECT_GT(w[0].calls.load() + w[1].calls.load(), 0) << "the race was not exercised";
  EXPECT_EQ(subs().interval_count(), 0u);
  EXPECT_FALSE(subs().invalidation_in_progress());
  std::printf("invalidations %d, callbacks %d + %d\n", rounds.load(), w[0].calls.load(),
              w[1].calls.load());
}

// Every field of the range reaches interval and plain callbacks unchanged, for every event.
TEST_F(MmuNotifierTest, OwnerEventAndFlagsReachEveryCallback) {
  Recorder m;
  PlainRecorder p;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPmdSize, &m), 0);
  ASSERT_EQ(subs().register_notifier(&p), 0);
  int device = 0;
  const MmuNotifyEvent events[] = {
      MmuNotifyEvent::kUnmap,       MmuNotifyEvent::kClear,          MmuNotifyEvent::kProtectionVma,
      MmuNotifyEvent::kProtectionPage, MmuNotifyEvent::kSoftDirty, MmuNotifyEvent::kMigrate,
      MmuNotifyEvent::kExclusive};
  size_t i = 0;
  for (MmuNotifyEvent e : events) {
    const void* owner = (i % 2) ? &device : nullptr;
    const MmuNotifierRange r = range(kA + i * kPageSize, kA + (i + 2) * kPageSize, e, owner);
    ASSERT_EQ(subs().invalidate_range_start(r), 0);
    EXPECT_TRUE(same_range(p.last_range(), r)) << mmu_notify_event_name(e);
    subs().invalidate_range_end(r);
    ASSERT_EQ(m.count(), i + 1);
    EXPECT_TRUE(same_range(m.last().range, r)) << mmu_notify_event_name(e);
    EXPECT_EQ(m.last().range.owner, owner);
    EXPECT_TRUE(same_range(p.last_range(), r)) << mmu_notify_event_name(e);
    i++;
  }
  EXPECT_EQ(p.calls(), "SESESESESESESE");
  subs().unregister_notifier(&p);
  n.remove();
}

// A plain notifier refuses a non-blockable range: -EAGAIN, the ones that accepted get their
// end, the refuser does not, interval notifiers already called have moved their sequence,
// and the invalidation is fully undone (no _end call needed, read_begin does not block).
TEST_F(MmuNotifierTest, NonBlockablePlainRefusalBacksOutTheOthers) {
  Recorder m;
  PlainRecorder before, refuser, after;
  refuser.refuse_nonblocking = true;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPmdSize, &m), 0);
  ASSERT_EQ(subs().register_notifier(&before), 0);
  ASSERT_EQ(subs().register_notifier(&refuser), 0);
  ASSERT_EQ(subs().register_notifier(&after), 0);
  const uint64_t s0 = n.read_begin();
  const MmuNotifierRange r = range(kA, kA + kPageSize, MmuNotifyEvent::kUnmap, nullptr, 0);
  EXPECT_EQ(subs().invalidate_range_start(r), -EAGAIN);
  EXPECT_EQ(before.calls(), "SE");
  EXPECT_EQ(refuser.calls(), "S");
  EXPECT_EQ(after.calls(), "SE") << "Linux starts every plain notifier even after a refusal";
  EXPECT_EQ(m.count(), 1u);
  EXPECT_TRUE(n.read_retry(s0));
  EXPECT_FALSE(subs().invalidation_in_progress());
  std::atomic<bool> got{false};
  std::thread reader([&] {
    (void)n.read_begin();
    got = true;
  });
  ASSERT_TRUE(eventually([&] { return got.load(); }));
  reader.join();
  // The same range, blockable: nobody may refuse, everything pairs up.
  invalidate(kA, kA + kPageSize, MmuNotifyEvent::kUnmap);
  EXPECT_EQ(before.calls(), "SESE");
  EXPECT_EQ(refuser.calls(), "SSE");
  EXPECT_EQ(after.calls(), "SESE");
  subs().unregister_notifier(&before);
  subs().unregister_notifier(&refuser);
  subs().unregister_notifier(&after);
  n.remove();
}

// An interval notifier refuses: the walk stops there (later notifiers are not called) and no
// plain notifier is started, as in Linux; the sequence goes back to even.
TEST_F(MmuNotifierTest, NonBlockableIntervalRefusalStopsTheWalk) {
  Recorder refuser, later;
  refuser.refuse_nonblocking = true;
  PlainRecorder p;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), kA, kPmdSize, &refuser), 0);
  ASSERT_EQ(b.insert(as.get(), kA + kPageSize, kPmdSize, &later), 0);
  ASSERT_EQ(subs().register_notifier(&p), 0);
  const uint64_t bs = b.read_begin();
  EXPECT_EQ(subs().invalidate_range_start(range(kA, kB, MmuNotifyEvent::kClear, nullptr, 0)),
            -EAGAIN);
  EXPECT_EQ(refuser.refusals.load(), 1);
  EXPECT_EQ(later.count(), 0u);
  EXPECT_FALSE(b.read_retry(bs));
  EXPECT_EQ(p.calls(), "");
  EXPECT_FALSE(subs().invalidation_in_progress());
  // Non-blockable ranges nobody refuses work like any other.
  // Past a's end, inside b's window.
  const MmuNotifierRange ok =
      range(kA + kPmdSize, kA + kPmdSize + kPageSize, MmuNotifyEvent::kClear, nullptr, 0);
  ASSERT_EQ(subs().invalidate_range_start(ok), 0);
  subs().invalidate_range_end(ok);
  EXPECT_EQ(later.count(), 1u);
  EXPECT_EQ(p.calls(), "SE");
  subs().unregister_notifier(&p);
  a.remove();
  b.remove();
}

TEST_F(MmuNotifierTest, PlainNotifiersPairStartAndEndUntilUnregistered) {
  PlainRecorder p, q;
  ASSERT_EQ(subs().register_notifier(&p), 0);
  EXPECT_EQ(subs().register_notifier(&p), -EINVAL);
  EXPECT_EQ(subs().register_notifier(nullptr), -EINVAL);
  const MmuNotifierRange r = range(kA, kA + kPageSize, MmuNotifyEvent::kSoftDirty);
  ASSERT_EQ(subs().invalidate_range_start(r), 0);
  EXPECT_EQ(p.calls(), "S");  // start is delivered before the caller changes anything
  subs().invalidate_range_end(r);
  EXPECT_EQ(p.calls(), "SE");
  ASSERT_EQ(subs().register_notifier(&q), 0);
  invalidate(0, kTaskSize);
  EXPECT_EQ(p.calls(), "SESE");
  EXPECT_EQ(q.calls(), "SE");
  subs().unregister_notifier(&p);
  subs().unregister_notifier(&p);  // not registered any more: no-op
  invalidate(kA, kB);
  EXPECT_EQ(p.calls(), "SESE");
  EXPECT_EQ(q.calls(), "SESE");
  ASSERT_EQ(subs().register_notifier(&p), 0);  // registration after unregister
  invalidate(kA, kB);
  EXPECT_EQ(p.calls(), "SESESE");
  subs().unregister_notifier(&p);
  subs().unregister_notifier(&q);
  EXPECT_EQ(p.calls().find('R'), std::string::npos);  // unregister does not call release
}

// unregister while the notifier's start callback runs: it returns only after the callback
// did, and the end of that invalidation is no longer delivered.
TEST_F(MmuNotifierTest, UnregisterWaitsForARunningCallback) {
  Gate gate;
  PlainRecorder p;
  p.gate = &gate;
  ASSERT_EQ(subs().register_notifier(&p), 0);
  const MmuNotifierRange r = range(kA, kA + kPageSize);
  std::thread invalidator([&] { EXPECT_EQ(subs().invalidate_range_start(r), 0); });
  ASSERT_TRUE(eventually([&] { return p.calls() == "S"; }));
  std::atomic<bool> done{false};
  std::atomic<bool> start_returned_at_done{false};
  std::thread unregisterer([&] {
    subs().unregister_notifier(&p);
    start_returned_at_done = p.start_returned.load();
    done = true;
  });
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(done.load()) << "unregister returned while a callback was running";
  gate.open();
  ASSERT_TRUE(eventually([&] { return done.load(); }));
  unregisterer.join();
  invalidator.join();
  EXPECT_TRUE(start_returned_at_done.load());
  subs().invalidate_range_end(r);
  EXPECT_EQ(p.calls(), "S");
  EXPECT_EQ(p.gate_timeouts.load(), 0);
}

// Exit: interval notifiers get one blockable RELEASE of the whole user range, plain ones
// release(mm) once and nothing after; later inserts and registrations are refused. Interval
// notifiers still see invalidations afterwards (Linux's exit_mmap unmaps after release).
TEST_F(MmuNotifierTest, ReleaseRunsOnceThenSilencesPlainNotifiers) {
  Recorder m;
  PlainRecorder p;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPmdSize, &m), 0);
  ASSERT_EQ(subs().register_notifier(&p), 0);
  const uint64_t s0 = n.read_begin();
  subs().release();
  ASSERT_EQ(m.count(), 1u);
  const MmuNotifierRange rel = m.last().range;
  EXPECT_EQ(rel.event, MmuNotifyEvent::kRelease);
  EXPECT_EQ(rel.mm, as.get());
  EXPECT_EQ(rel.start, 0u);
  EXPECT_EQ(rel.end, kTaskSize);
  EXPECT_TRUE(rel.blockable());
  EXPECT_EQ(rel.owner, nullptr);
  EXPECT_TRUE(n.read_retry(s0));
  EXPECT_EQ(p.calls(), "R");
  {
    std::lock_guard<std::mutex> g(p.m);
    EXPECT_EQ(p.released_mm, as.get());
  }
  EXPECT_FALSE(subs().invalidation_in_progress());

  subs().release();  // idempotent
  as->exit();        // exit's own release() is a no-op now; its teardown unmaps nothing
  EXPECT_EQ(p.calls(), "R");
  EXPECT_EQ(m.count(), 1u);

  invalidate(kA, kA + kPageSize, MmuNotifyEvent::kUnmap);
  EXPECT_EQ(p.calls(), "R") << "a plain callback ran after release()";
  EXPECT_EQ(m.count(), 2u);
  EXPECT_EQ(subs().register_notifier(&p), -EINVAL);
  subs().unregister_notifier(&p);  // no-op after release
  MmuIntervalNotifier late;
  EXPECT_EQ(late.insert(as.get(), kA, kPageSize, &m), -EINVAL);
  EXPECT_FALSE(late.inserted());
  n.remove();
  EXPECT_EQ(subs().interval_count(), 0u);
}

// release() while an invalidation is inside a plain callback: the notifier's release()
// runs only after that callback returned (it is the last callback it sees).
TEST_F(MmuNotifierTest, ReleaseWaitsForPlainCallbacksInFlight) {
  Gate gate;
  PlainRecorder p;
  p.gate = &gate;
  ASSERT_EQ(subs().register_notifier(&p), 0);
  const MmuNotifierRange r = range(kA, kA + kPageSize);
  std::thread invalidator([&] { EXPECT_EQ(subs().invalidate_range_start(r), 0); });
  ASSERT_TRUE(eventually([&] { return p.calls() == "S"; }));
  std::atomic<bool> done{false};
  std::thread releaser([&] {
    subs().release();
    done = true;
  });
  std::this_thread::sleep_for(kStillBlocked);
  EXPECT_FALSE(done.load());
  EXPECT_EQ(p.calls(), "S") << "release() ran during an invalidation callback";
  gate.open();
  ASSERT_TRUE(eventually([&] { return done.load(); }));
  releaser.join();
  invalidator.join();
  subs().invalidate_range_end(r);
  EXPECT_EQ(p.calls(), "SR");
  std::lock_guard<std::mutex> g(p.m);
  EXPECT_TRUE(p.start_returned_before_release);
}

// Exit with VMAs: the interval notifier sees RELEASE, then the teardown's UNMAP of each VMA;
// a notifier that outlives its address space is detached and its remove() is a no-op.
TEST_F(MmuNotifierTest, NotifierOutlivingItsAddressSpaceIsDetached) {
  const Va va = map_anon(*as, 4 * kPageSize);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, 4 * kPageSize, 7);
  Recorder m;
  PlainRecorder p;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 4 * kPageSize, &m), 0);
  ASSERT_EQ(subs().register_notifier(&p), 0);
  as.reset();
  EXPECT_FALSE(n.inserted());
  ASSERT_GE(m.count(), 2u);
  {
    std::lock_guard<std::mutex> g(m.driver_lock);
    EXPECT_EQ(m.calls[0].range.event, MmuNotifyEvent::kRelease);
    EXPECT_EQ(m.calls[1].range.event, MmuNotifyEvent::kUnmap);
    EXPECT_LE(m.calls[1].range.start, va);
    EXPECT_GE(m.calls[1].range.end, va + 4 * kPageSize);
  }
  EXPECT_EQ(p.calls(), "R");
  n.remove();
  EXPECT_FALSE(n.inserted());
  as = make_as(mem.get());  // the fixture's TearDown expects one
}

// ---- Hang diagnostics: every wait is bounded and names what it waited for ----

class MmuNotifierDeathTest : public MmuNotifierTest {
 protected:
  void SetUp() override {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    MmuNotifierTest::SetUp();
  }
};

TEST_F(MmuNotifierDeathTest, ReadBeginPanicsNamingRangeAndSequences) {
  Recorder m;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPmdSize, &m), 0);
  EXPECT_DEATH(
      {
        set_hang_timeout(100ms);
        const MmuNotifierRange r = range(kA, kA + kPageSize);
        (void)subs().invalidate_range_start(r);  // never ended
        (void)n.read_begin();
      },
      "mmu_interval_read_begin on notifier .0x100000, 0x300000.: the invalidation with "
      "sequence 3 did not end within 100 ms .subscriptions sequence 3, notifier sequence 3, "
      "1 invalidations active");
  n.remove();
}

TEST_F(MmuNotifierDeathTest, RemovePanicsNamingRangeAndSequences) {
  Recorder m;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPageSize, &m), 0);
  EXPECT_DEATH(
      {
        set_hang_timeout(100ms);
        (void)subs().invalidate_range_start(range(0, kTaskSize));
        n.remove();
      },
      "mmu_interval_notifier_remove on notifier .0x100000, 0x101000.: the invalidation with "
      "sequence 3 did not end");
  n.remove();
}

TEST_F(MmuNotifierDeathTest, RefusingABlockableRangeIsABug) {
  struct Refuses : public MmuIntervalNotifierOps {
    bool invalidate(MmuIntervalNotifier*, const MmuNotifierRange&, uint64_t) override {
      return false;
    }
  } refuses;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kA, kPageSize, &refuses), 0);
  EXPECT_DEATH((void)subs().invalidate_range_start(range(kA, kB)),
               "interval notifier .0x100000, 0x101000. refused the invalidation CLEAR "
               ".0x100000, 0x200000. .blockable.");
  n.remove();
}

TEST_F(MmuNotifierDeathTest, EndWithoutStartIsABug) {
  EXPECT_DEATH(subs().invalidate_range_end(range(kA, kB)),
               "invalidate_range_end without a matching invalidate_range_start");
}

// ---- Stress: the mirror protocol against concurrent page-table changes ----

uint64_t test_seed() {
  const char* env = std::getenv("GPUSVM_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 0) : std::random_device{}();
  std::printf("seed=%llu (GPUSVM_SEED to replay)\n", static_cast<unsigned long long>(seed));
  return seed;
}

#if defined(GPUSVM_TSAN)
constexpr int kStressScale = 4;  // TSan runs ~10x slower
#else
constexpr int kStressScale = 1;
#endif

// A shared "CPU page table" of kPages entries and device mirrors of windows of it. Each
// mirror thread faults random sub-ranges with the driver protocol (read_begin, snapshot,
// driver lock, read_retry, commit), and now and then removes and re-inserts its notifier;
// invalidator threads change random ranges of entries inside invalidate_range_start/end.
// At every commit, under the driver lock, the snapshot must equal the page table (a stale
// snapshot is the bug the protocol exists to prevent); at the end every device entry is
// either zapped or current; no callback ever reaches a removed notifier.
TEST_F(MmuNotifierTest, StressMirrorsNeverCommitAStaleSnapshot) {
  constexpr int kPages = 64;
  constexpr Va kBase = 0x40000000;
  constexpr int kMirrors = 4;
  constexpr int kInvalidators = 2;
  const int faults_per_mirror = 1500 / kStressScale;
  const int invalidations_per_thread = 2500 / kStressScale;
  const uint64_t seed = test_seed();

  std::vector<std::atomic<uint64_t>> pte(kPages);
  auto encode = [](int page, uint64_t gen) { return (gen << 8) | static_cast<uint64_t>(page + 1); };
  for (int i = 0; i < kPages; i++) pte[i].store(encode(i, 0));
  std::atomic<uint64_t> next_gen{1};

  struct Mirror : public MmuIntervalNotifierOps {
    int first = 0, last = 0;  // window [first, last) in pages; const while threads run
    std::mutex driver_lock;
    std::vector<uint64_t> dev;  // under driver_lock
    std::atomic<bool> live{false};
    std::atomic<int> late{0}, zaps{0};
    bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& r, uint64_t cur_seq) override {
      if (!live.load(std::memory_order_acquire)) late++;
      std::lock_guard<std::mutex> g(driver_lock);
      n->set_seq(cur_seq);
      for (int i = first; i < last; i++) {
        const Va va = kBase + static_cast<Va>(i) * kPageSize;
        if (va >= r.start && va < r.end) dev[i - first] = 0;
      }
      zaps++;
      return true;
    }
  };
  const int windows[kMirrors][2] = {{0, 32}, {16, 48}, {32, 64}, {0, 64}};
  Mirror mirrors[kMirrors];
  for (int k = 0; k < kMirrors; k++) {
    mirrors[k].first = windows[k][0];
    mirrors[k].last = windows[k][1];
    mirrors[k].dev.assign(windows[k][1] - windows[k][0], 0);
  }

  // Kept inserted until every thread stopped, so the final state can be checked against the
  // last page-table values.
  MmuIntervalNotifier notifiers[kMirrors];
  std::atomic<int> stale{0}, exhausted{0}, commits{0}, retries{0}, insert_errors{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < kMirrors; k++) {
    threads.emplace_back([&, k] {
      Mirror& m = mirrors[k];
      std::mt19937_64 rng(seed * 31 + k);
      const Va wstart = kBase + static_cast<Va>(m.first) * kPageSize;
      const uint64_t wlen = static_cast<uint64_t>(m.last - m.first) * kPageSize;
      MmuIntervalNotifier& n = notifiers[k];
      m.live.store(true, std::memory_order_release);
      if (n.insert(as.get(), wstart, wlen, &m) != 0) insert_errors++;
      std::vector<uint64_t> snap;
      for (int f = 0; f < faults_per_mirror; f++) {
        if (f % 100 == 99) {
          // Re-create the notifier (exercises deferred remove/insert). The device stops
          // tracking the window, so it drops its copy once no callback can run any more.
          n.remove();
          m.live.store(false, std::memory_order_release);
          {
            std::lock_guard<std::mutex> g(m.driver_lock);
            std::fill(m.dev.begin(), m.dev.end(), 0);
          }
          m.live.store(true, std::memory_order_release);
          if (n.insert(as.get(), wstart, wlen, &m) != 0) insert_errors++;
        }
        const int a = m.first + static_cast<int>(rng() % (m.last - m.first));
        const int b = a + 1 + static_cast<int>(rng() % std::min(8, m.last - a));
        bool committed = false;
        for (int attempt = 0; attempt < 100000 && !committed; attempt++) {
          const uint64_t seq = n.read_begin();
          snap.clear();
          for (int i = a; i < b; i++) {  // hmm_range_fault's read of the CPU page table
            snap.push_back(pte[i].load(std::memory_order_acquire));
            if (rng() % 4 == 0) std::this_thread::yield();
          }
          std::lock_guard<std::mutex> g(m.driver_lock);
          if (n.read_retry(seq)) {
            retries++;
            continue;
          }
          for (int i = a; i < b; i++) {
            if (snap[i - a] != pte[i].load(std::memory_order_acquire)) stale++;
            m.dev[i - m.first] = snap[i - a];
          }
          commits++;
          committed = true;
        }
        if (!committed) exhausted++;
      }
    });
  }
  for (int t = 0; t < kInvalidators; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 31 + 1000 + t);
      const MmuNotifyEvent events[] = {MmuNotifyEvent::kUnmap, MmuNotifyEvent::kClear,
                                       MmuNotifyEvent::kProtectionVma, MmuNotifyEvent::kMigrate};
      for (int i = 0; i < invalidations_per_thread; i++) {
        const int a = static_cast<int>(rng() % kPages);
        const int b = a + 1 + static_cast<int>(rng() % std::min(16, kPages - a));
        const MmuNotifierRange r{as.get(), kBase + static_cast<Va>(a) * kPageSize,
                                 kBase + static_cast<Va>(b) * kPageSize, events[rng() % 4],
                                 kMmuNotifierRangeBlockable, nullptr};
        if (subs().invalidate_range_start(r) != 0) {
          stale += 1000;  // a blockable range cannot be refused
          continue;
        }
        for (int p = a; p < b; p++) {
          pte[p].store(encode(p, next_gen.fetch_add(1)), std::memory_order_release);
          if (rng() % 8 == 0) std::this_thread::yield();
        }
        subs().invalidate_range_end(r);
        if (i % 4 == 0) std::this_thread::sleep_for(20us);  // gaps, so read_begin cannot starve
      }
    });
  }
  for (auto& t : threads) t.join();

  EXPECT_EQ(stale.load(), 0) << "a mirror committed a stale snapshot (seed " << seed << ")";
  EXPECT_EQ(exhausted.load(), 0);
  EXPECT_EQ(insert_errors.load(), 0);
  EXPECT_EQ(commits.load(), kMirrors * faults_per_mirror);
  for (int k = 0; k < kMirrors; k++) {
    Mirror& m = mirrors[k];
    EXPECT_EQ(m.late.load(), 0) << "mirror " << k << " called after remove()";
    std::lock_guard<std::mutex> g(m.driver_lock);
    for (int i = m.first; i < m.last; i++) {
      const uint64_t d = m.dev[i - m.first];
      EXPECT_TRUE(d == 0 || d == pte[i].load()) << "mirror " << k << " page " << i;
    }
  }
  for (MmuIntervalNotifier& n : notifiers) n.remove();
  EXPECT_EQ(subs().invalidations.get(), static_cast<uint64_t>(kInvalidators) * invalidations_per_thread);
  EXPECT_FALSE(subs().invalidation_in_progress());
  EXPECT_EQ(subs().interval_count(), 0u);
  std::printf("commits %d, retries %d, callbacks %llu\n", commits.load(), retries.load(),
              static_cast<unsigned long long>(subs().interval_callbacks.get()));
}

}  // namespace
}  // namespace gpusvm::mm::testing
