// MMU notifiers: the interval-notifier sequence protocol, deferred insert/remove, owners,
// non-blockable refusals and plain notifiers. Invalidations are driven by hand through
// MmuNotifierSubscriptions so each interleaving is deterministic.
#include <atomic>
#include <thread>

#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;

// Waits up to `limit` for pred; the bounded wait every test here uses.
template <typename Pred>
bool eventually(Pred pred, std::chrono::milliseconds limit = 5000ms) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

class NotifierTest : public MmTest {
 protected:
  MmuNotifierRange range(Va start, Va end, MmuNotifyEvent e = MmuNotifyEvent::kClear,
                         const void* owner = nullptr, unsigned flags = kMmuNotifierRangeBlockable) {
    return MmuNotifierRange{as.get(), start, end, e, flags, owner};
  }
  MmuNotifierSubscriptions& subs() { return as->notifier_subscriptions(); }
};

TEST_F(NotifierTest, RetryOnlyAfterAnOverlappingInvalidation) {
  TestMirror m;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), 0x100000, 16 * kPageSize, &m), 0);
  uint64_t seq = n.read_begin();
  EXPECT_FALSE(n.read_retry(seq));
  // Not overlapping (ends exactly where the notifier starts): nothing happens.
  ASSERT_EQ(subs().invalidate_range_start(range(0x80000, 0x100000)), 0);
  subs().invalidate_range_end(range(0x80000, 0x100000));
  EXPECT_FALSE(n.read_retry(seq));
  EXPECT_EQ(m.invalidations, 0);
  // Overlapping one page: the callback bumps the sequence; the mirror must retry.
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000 + 15 * kPageSize, 0x200000)), 0);
  EXPECT_TRUE(subs().invalidation_in_progress());
  subs().invalidate_range_end(range(0x100000 + 15 * kPageSize, 0x200000));
  EXPECT_TRUE(n.read_retry(seq));
  EXPECT_EQ(m.invalidations, 1);
  // A fresh read_begin is stable again.
  seq = n.read_begin();
  EXPECT_FALSE(n.read_retry(seq));
  n.remove();
  EXPECT_FALSE(n.inserted());
}

TEST_F(NotifierTest, ReadBeginWaitsForTheInvalidationToEnd) {
  TestMirror m;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), 0x100000, kPmdSize, &m), 0);
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000)), 0);
  std::atomic<bool> returned{false};
  uint64_t seq = 0;
  std::thread reader([&] {
    seq = n.read_begin();
    returned = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(returned.load()) << "read_begin returned during an invalidation of its range";
  subs().invalidate_range_end(range(0x100000, 0x101000));
  ASSERT_TRUE(eventually([&] { return returned.load(); }));
  reader.join();
  EXPECT_FALSE(n.read_retry(seq));
  n.remove();
}

TEST_F(NotifierTest, InsertDuringInvalidationIsDeferred) {
  TestMirror first, late;
  MmuIntervalNotifier a, b;
  ASSERT_EQ(a.insert(as.get(), 0x100000, kPmdSize, &first), 0);
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x300000)), 0);
  ASSERT_EQ(b.insert(as.get(), 0x100000, kPmdSize, &late), 0);
  EXPECT_EQ(subs().interval_count(), 2u);
  // b missed the start of this invalidation: its readers must wait it out.
  std::atomic<bool> returned{false};
  std::thread reader([&] {
    (void)b.read_begin();
    returned = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(returned.load());
  subs().invalidate_range_end(range(0x100000, 0x300000));
  ASSERT_TRUE(eventually([&] { return returned.load(); }));
  reader.join();
  EXPECT_EQ(late.invalidations, 0);
  // From now on b is in the tree and sees invalidations.
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000)), 0);
  subs().invalidate_range_end(range(0x100000, 0x101000));
  EXPECT_EQ(late.invalidations, 1);
  EXPECT_EQ(first.invalidations, 2);
  a.remove();
  b.remove();
  EXPECT_EQ(subs().interval_count(), 0u);
}

TEST_F(NotifierTest, RemoveWaitsForARunningInvalidation) {
  TestMirror m;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), 0x100000, kPmdSize, &m), 0);
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000)), 0);
  std::atomic<bool> removed{false};
  std::thread remover([&] {
    n.remove();
    removed = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(removed.load()) << "remove() returned while its callback could still run";
  subs().invalidate_range_end(range(0x100000, 0x101000));
  ASSERT_TRUE(eventually([&] { return removed.load(); }));
  remover.join();
  EXPECT_EQ(subs().interval_count(), 0u);
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000)), 0);
  subs().invalidate_range_end(range(0x100000, 0x101000));
  EXPECT_EQ(m.invalidations, 1);  // no callback after remove
}

// The owner tag lets a driver recognise its own MIGRATE invalidation (seed 001) while the
// sequence still moves for it like for everyone else.
class OwnerAwareMirror : public MmuIntervalNotifierOps {
 public:
  explicit OwnerAwareMirror(const void* self) : self_(self) {}
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& r, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock);
    n->set_seq(cur_seq);
    if (r.event == MmuNotifyEvent::kMigrate && r.owner == self_) {
      skipped++;
    } else {
      zapped++;
    }
    return true;
  }
  std::mutex lock;
  int skipped = 0, zapped = 0;

 private:
  const void* self_;
};

TEST_F(NotifierTest, OwnerAndEventReachTheCallback) {
  int me = 0, other = 0;
  OwnerAwareMirror m(&me);
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), 0x100000, kPmdSize, &m), 0);
  uint64_t seq = n.read_begin();
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000, MmuNotifyEvent::kMigrate, &me)), 0);
  subs().invalidate_range_end(range(0x100000, 0x101000, MmuNotifyEvent::kMigrate, &me));
  EXPECT_EQ(m.skipped, 1);
  EXPECT_TRUE(n.read_retry(seq));  // skipping the work does not skip the protocol
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000, MmuNotifyEvent::kMigrate, &other)), 0);
  subs().invalidate_range_end(range(0x100000, 0x101000, MmuNotifyEvent::kMigrate, &other));
  EXPECT_EQ(m.zapped, 1);
  EXPECT_STREQ(mmu_notify_event_name(MmuNotifyEvent::kMigrate), "MIGRATE");
  n.remove();
}

class RefusingMirror : public MmuIntervalNotifierOps {
 public:
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& r, uint64_t cur_seq) override {
    if (!r.blockable()) return false;  // would have to sleep
    n->set_seq(cur_seq);
    return true;
  }
};

class CountingNotifier : public MmuNotifier {
 public:
  int invalidate_range_start(const MmuNotifierRange& r) override {
    starts++;
    last_event = r.event;
    return 0;
  }
  void invalidate_range_end(const MmuNotifierRange&) override { ends++; }
  void release(AddressSpace*) override { releases++; }
  int starts = 0, ends = 0, releases = 0;
  MmuNotifyEvent last_event = MmuNotifyEvent::kClear;
};

TEST_F(NotifierTest, NonBlockableRefusalIsEagainAndUndone) {
  RefusingMirror m;
  CountingNotifier plain;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), 0x100000, kPmdSize, &m), 0);
  ASSERT_EQ(subs().register_notifier(&plain), 0);
  const MmuNotifierRange r = range(0x100000, 0x101000, MmuNotifyEvent::kClear, nullptr, 0);
  EXPECT_EQ(subs().invalidate_range_start(r), -EAGAIN);
  EXPECT_FALSE(subs().invalidation_in_progress());  // no _end needed after a refusal
  EXPECT_EQ(plain.starts, 0);
  const uint64_t seq = n.read_begin();  // does not block: nothing is running
  EXPECT_FALSE(n.read_retry(seq));
  subs().unregister_notifier(&plain);
  n.remove();
}

TEST_F(NotifierTest, PlainNotifiersSeeRangesAndRelease) {
  CountingNotifier plain;
  ASSERT_EQ(subs().register_notifier(&plain), 0);
  EXPECT_EQ(subs().register_notifier(&plain), -EINVAL);
  EXPECT_EQ(subs().register_notifier(nullptr), -EINVAL);
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  ASSERT_EQ(as->mprotect(va, kPageSize, PROT_READ), 0);
  EXPECT_EQ(plain.last_event, MmuNotifyEvent::kProtectionVma);
  EXPECT_EQ(plain.starts, plain.ends);
  EXPECT_GE(plain.starts, 1);
  as->exit();
  EXPECT_EQ(plain.releases, 1);
  EXPECT_EQ(subs().register_notifier(&plain), -EINVAL);  // exiting: no new notifiers
  TestMirror m;
  MmuIntervalNotifier n;
  EXPECT_EQ(n.insert(as.get(), 0x100000, kPageSize, &m), -EINVAL);
  const int starts = plain.starts;
  ASSERT_EQ(subs().invalidate_range_start(range(0x100000, 0x101000)), 0);
  subs().invalidate_range_end(range(0x100000, 0x101000));
  EXPECT_EQ(plain.starts, starts);  // released notifiers are gone
}

// Notifiers inserted and removed from several threads while invalidations run: the tree
// stays consistent and every read_begin returns.
TEST_F(NotifierTest, InsertRemoveRaceInvalidations) {
  std::atomic<bool> stop{false};
  std::thread invalidator([&] {
    while (!stop.load()) {
      const MmuNotifierRange r = range(0x100000, 0x100000 + kPmdSize);
      if (subs().invalidate_range_start(r) == 0) subs().invalidate_range_end(r);
    }
  });
  std::vector<std::thread> users;
  std::atomic<int> errors{0};
  for (int t = 0; t < 3; t++) {
    users.emplace_back([&, t] {
      for (int i = 0; i < 200; i++) {
        TestMirror m;
        MmuIntervalNotifier n;
        if (n.insert(as.get(), 0x100000 + t * kPageSize, kPageSize, &m) != 0) errors++;
        (void)n.read_begin();
        n.remove();
      }
    });
  }
  for (auto& u : users) u.join();
  stop = true;
  invalidator.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(subs().interval_count(), 0u);
  EXPECT_FALSE(subs().invalidation_in_progress());
}

}  // namespace
}  // namespace gpusvm::mm::testing
