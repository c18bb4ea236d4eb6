// MMU notifiers: the contracts of Linux's mm/mmu_notifier.c, implemented for gpusvm.
//
// Design notes
//  - Sequence protocol. The subscriptions' sequence is even while idle and odd while an
//    invalidation that reaches a notifier is active; a notifier's sequence is the
//    subscriptions' sequence of the last invalidation that called it (set_seq), so
//        notifier seq == subscriptions seq  <=>  an invalidation that reached it is running.
//    read_begin() sleeps on exactly that; read_retry() is "the notifier's sequence moved".
//    The end of the last active invalidation makes the sequence even (seq + 1), so a value
//    never comes back and a waiter cannot miss its end.
//
//        mirror                              invalidator
//        seq = read_begin()   (returns at once: not invalidating)
//                                            inv_start: subscriptions seq 4 -> 5
//        hmm_range_fault reads old entries   invalidate(): driver lock, set_seq(5), unlock
//                                            page table changes; inv_end: 5 -> 6
//        driver lock; read_retry(seq): 5 != seq -> retry; nothing stale is committed
//
//    If the mirror calls read_begin() after set_seq(5) but before inv_end, it sees 5 == 5 and
//    sleeps until 6, so its retry reads the new entries instead of spinning.
//  - Deferred tree updates (mn_itree_inv_end). Walkers read the tree without the lock while
//    the sequence is odd, so insert/remove queue their change on an intrusive list; the end
//    of the last active invalidation applies it in the critical section that makes the
//    sequence even. remove() then sleeps until the sequence moves past the value it saw, so
//    no walker can still be inside its callback.
//  - Plain notifiers: an immutable list published through a shared_ptr (header, Locking).
//  - Non-goals: Linux's lockdep annotations of the invalidation "lock" and its has_itree fast
//    path. The lock-order checker covers the locks the callbacks take.
#include "gpusvm/mm/mmu_notifier.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <string>

#include "gpusvm/mm/address_space.h"

namespace gpusvm::mm {
namespace {

std::string describe_interval(Va start, Va end) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "[0x%" PRIx64 ", 0x%" PRIx64 ")", start, end);
  return buf;
}

std::string describe_invalidation(const MmuNotifierRange& r) {
  return std::string(mmu_notify_event_name(r.event)) + " " + describe_interval(r.start, r.end) +
         (r.blockable() ? " (blockable)" : " (non-blockable)");
}

}  // namespace

const char* mmu_notify_event_name(MmuNotifyEvent e) {
  switch (e) {
    case MmuNotifyEvent::kUnmap: return "UNMAP";
    case MmuNotifyEvent::kClear: return "CLEAR";
    case MmuNotifyEvent::kProtectionVma: return "PROTECTION_VMA";
    case MmuNotifyEvent::kProtectionPage: return "PROTECTION_PAGE";
    case MmuNotifyEvent::kSoftDirty: return "SOFT_DIRTY";
    case MmuNotifyEvent::kRelease: return "RELEASE";
    case MmuNotifyEvent::kMigrate: return "MIGRATE";
    case MmuNotifyEvent::kExclusive: return "EXCLUSIVE";
  }
  return "?";
}

// A published plain-notifier list. Immutable once published; readers hold a reference only
// while they run its callbacks.
struct MmuNotifierSubscriptions::PlainList {
  explicit PlainList(WaitQueue* queue) : wq(queue) {}
  ~PlainList() {
    // The last holder runs this after the shared_ptr's acq_rel decrement, so everything every
    // reader did with the list happens before it. acquire: pairs with synchronize_plain's
    // release store of the flag pointer.
    if (std::atomic<bool>* flag = retired.load(std::memory_order_acquire)) {
      flag->store(true, std::memory_order_release);  // pairs with synchronize_plain's acquire
      wq->wake_all();
    }
  }
  PlainList(const PlainList&) = delete;
  PlainList& operator=(const PlainList&) = delete;

  std::vector<MmuNotifier*> notifiers;
  WaitQueue* const wq;
  // Set by synchronize_plain() once the list is unpublished: the flag to raise when the last
  // reference goes. Written while the writer still holds a reference.
  mutable std::atomic<std::atomic<bool>*> retired{nullptr};
};

// ---- MmuIntervalNotifier ----

MmuIntervalNotifier::~MmuIntervalNotifier() { remove(); }

int MmuIntervalNotifier::insert(AddressSpace* mm, Va start, uint64_t length,
                                MmuIntervalNotifierOps* ops) {
  if (!mm || !ops || subs_ || length == 0 || length > kTaskSize || start > kTaskSize - length) {
    return -EINVAL;
  }
  // Allocate the tree node now: nothing allocates under the subscriptions lock.
  MmuNotifierItree staging;
  staging.emplace(start, this);
  MmuNotifierItree::node_type node = staging.extract(staging.begin());
  // Not yet visible to any walker: the subscriptions publish the notifier under their lock.
  mm_ = mm;
  ops_ = ops;
  start_ = start;
  end_ = start + length;
  MmuNotifierSubscriptions* subs = &mm->notifier_subscriptions();
  const int rc = subs->insert(this, std::move(node));
  if (rc != 0) {
    mm_ = nullptr;
    ops_ = nullptr;
    start_ = end_ = 0;
    return rc;
  }
  subs_ = subs;
  return 0;
}

void MmuIntervalNotifier::remove() {
  if (subs_) subs_->remove(this);
}

uint64_t MmuIntervalNotifier::read_begin() {
  if (!subs_) {
    panic("mmu_interval_read_begin on notifier " + describe_interval(start_, end_) +
          " that is not inserted (never inserted, removed, or its address space is gone)");
  }
  return subs_->read_begin(this);
}

bool MmuIntervalNotifier::read_retry(uint64_t seq) const {
  // acquire: pairs with set_seq's release, so a mirror that sees the new sequence under the
  // driver lock also sees what the invalidator did before set_seq.
  return invalidate_seq_.load(std::memory_order_acquire) != seq;
}

void MmuIntervalNotifier::set_seq(uint64_t cur_seq) {
  invalidate_seq_.store(cur_seq, std::memory_order_release);  // pairs with read_retry
}

// ---- MmuNotifierSubscriptions: interval notifiers ----

MmuNotifierSubscriptions::~MmuNotifierSubscriptions() {
  SpinLockGuard g(&lock_);
  if (active_invalidate_ranges_ != 0) {
    panic("address space destroyed with " + std::to_string(active_invalidate_ranges_) +
          " MMU invalidations active (sequence " +
          std::to_string(invalidate_seq_.load(std::memory_order_relaxed)) + ")");
  }
  // Nothing is deferred once no invalidation is active. Linux pins the mm for each inserted
  // notifier; here a notifier may outlive its address space, so detach it: its remove()
  // becomes a no-op and read_begin() panics instead of touching freed memory.
  for (auto& [start, sub] : itree_) sub->subs_ = nullptr;
}

int MmuNotifierSubscriptions::insert(MmuIntervalNotifier* sub, MmuNotifierItree::node_type node) {
  SpinLockGuard g(&lock_);
  if (released_) return -EINVAL;  // exit released the notifiers: nothing will be reported
  // relaxed: invalidate_seq_ is written only under lock_, which this thread holds.
  const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
  if (active_invalidate_ranges_ > 0) {
    // The notifier missed the start of the active invalidations, so its readers must wait
    // them out: the sequence goes (or stays) odd and the notifier gets that value, which
    // read_begin() reads as "an invalidation of mine is running".
    if (seq & 1) {
      // Walkers may be on the tree: link it when the last invalidation ends.
      sub->node_ = std::move(node);
      sub->deferred_ = MmuIntervalNotifier::Deferred::kInsert;
      sub->deferred_next_ = deferred_;
      deferred_ = sub;
    } else {
      // Even: none of the active invalidations walks (a walker makes it odd first).
      sub->it_ = itree_.insert(std::move(node));
      invalidate_seq_.store(seq | 1, std::memory_order_release);
    }
    sub->invalidate_seq_.store(seq | 1, std::memory_order_release);
  } else {
    // Idle: any value but the current even sequence lets read_begin() return at once. Odd
    // like every notifier sequence, and far from where the sequence will wrap.
    sub->invalidate_seq_.store(seq - 1, std::memory_order_release);
    sub->it_ = itree_.insert(std::move(node));
  }
  return 0;
}

void MmuNotifierSubscriptions::remove(MmuIntervalNotifier* sub) {
  MmuNotifierItree::node_type node;  // freed after the lock is dropped
  uint64_t wait_seq = 0;
  {
    SpinLockGuard g(&lock_);
    const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);  // lock_ held
    if (sub->deferred_ == MmuIntervalNotifier::Deferred::kInsert) {
      // Never linked: no walker can have seen it.
      MmuIntervalNotifier** p = &deferred_;
      while (*p != sub) p = &(*p)->deferred_next_;
      *p = sub->deferred_next_;
      sub->deferred_next_ = nullptr;
      sub->deferred_ = MmuIntervalNotifier::Deferred::kNone;
      node = std::move(sub->node_);
    } else if (seq & 1) {
      // A walker may be inside its invalidate() right now: unlink it when the invalidations
      // end, and wait for that.
      sub->deferred_ = MmuIntervalNotifier::Deferred::kRemove;
      sub->deferred_next_ = deferred_;
      deferred_ = sub;
      wait_seq = seq;
    } else {
      node = itree_.extract(sub->it_);
    }
  }
  if (wait_seq) {
    wait_seq_changed(wait_seq, sub, "mmu_interval_notifier_remove");
    SpinLockGuard g(&lock_);
    node = std::move(sub->node_);  // unlinked by apply_deferred_locked()
  }
  sub->subs_ = nullptr;
}

uint64_t MmuNotifierSubscriptions::read_begin(MmuIntervalNotifier* sub) {
  uint64_t seq;
  bool invalidating;
  {
    SpinLockGuard g(&lock_);
    seq = sub->invalidate_seq_.load(std::memory_order_acquire);  // pairs with set_seq
    invalidating = seq == invalidate_seq_.load(std::memory_order_relaxed);  // lock_ held
  }
  // Equal only while an invalidation that called this notifier (or that was active when it
  // was inserted) runs. An invalidation that started but has not reached this notifier yet
  // is not waited for: its set_seq() will make read_retry() fail.
  if (invalidating) wait_seq_changed(seq, sub, "mmu_interval_read_begin");
  return seq;
}

void MmuNotifierSubscriptions::wait_seq_changed(uint64_t seq, const MmuIntervalNotifier* sub,
                                                const char* what) {
  // acquire: pairs with itree_inv_end's release store, so what the invalidation (and the
  // deferred tree update) did happens before the waiter goes on.
  if (wq_.wait_for([&] { return invalidate_seq_.load(std::memory_order_acquire) != seq; },
                   hang_timeout())) {
    return;
  }
  uint64_t now;
  long active;
  {
    SpinLockGuard g(&lock_);
    now = invalidate_seq_.load(std::memory_order_relaxed);
    active = active_invalidate_ranges_;
  }
  panic(std::string(what) + " on notifier " + describe_interval(sub->start_, sub->end_) +
        ": the invalidation with sequence " + std::to_string(seq) + " did not end within " +
        std::to_string(hang_timeout().count()) + " ms (subscriptions sequence " +
        std::to_string(now) + ", notifier sequence " +
        std::to_string(sub->invalidate_seq_.load(std::memory_order_relaxed)) + ", " +
        std::to_string(active) +
        " invalidations active: an invalidate_range_start without its end, or a callback "
        "that does not return)");
}

bool MmuNotifierSubscriptions::itree_intersects_locked(const MmuNotifierRange& range) const {
  lock_.assert_held();
  for (auto it = itree_.begin(); it != itree_.end() && it->first < range.end; ++it) {
    if (it->second->end_ > range.start) return true;
  }
  return false;
}

bool MmuNotifierSubscriptions::itree_inv_start(const MmuNotifierRange& range, uint64_t* cur_seq,
                                               PlainListRef* plain) {
  SpinLockGuard g(&lock_);
  active_invalidate_ranges_++;
  const bool walk = itree_intersects_locked(range);
  uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);  // lock_ held
  if (walk && !(seq & 1)) {
    seq |= 1;
    invalidate_seq_.store(seq, std::memory_order_release);  // pairs with the wait predicates
  }
  *cur_seq = seq;
  if (plain) *plain = plain_;  // a reference, dropped by the caller after the lock
  return walk;
}

bool MmuNotifierSubscriptions::itree_walk(const MmuNotifierRange& range, uint64_t cur_seq) {
  lock_.assert_not_held();  // callbacks may sleep and take driver locks
  if (!(invalidate_seq_.load(std::memory_order_relaxed) & 1)) {
    // relaxed: a sanity check of this thread's own odd sequence, which cannot go even
    // before this walk's invalidation ends.
    panic("interval tree walked with an even sequence during " + describe_invalidation(range));
  }
  for (auto it = itree_.begin(); it != itree_.end() && it->first < range.end; ++it) {
    MmuIntervalNotifier* sub = it->second;
    if (sub->end_ <= range.start) continue;
    interval_callbacks.add();
    if (sub->ops_->invalidate(sub, range, cur_seq)) continue;
    if (range.blockable()) {
      panic("interval notifier " + describe_interval(sub->start_, sub->end_) +
            " refused the invalidation " + describe_invalidation(range) + " with sequence " +
            std::to_string(cur_seq) + ": invalidate() may return false only when non-blockable");
    }
    return false;  // Linux skips the rest too: the caller backs off
  }
  return true;
}

void MmuNotifierSubscriptions::apply_deferred_locked() {
  lock_.assert_held();
  while (MmuIntervalNotifier* sub = deferred_) {
    deferred_ = sub->deferred_next_;
    sub->deferred_next_ = nullptr;
    if (sub->deferred_ == MmuIntervalNotifier::Deferred::kInsert) {
      sub->it_ = itree_.insert(std::move(sub->node_));
    } else {
      sub->node_ = itree_.extract(sub->it_);  // remove() frees it after the lock
    }
    sub->deferred_ = MmuIntervalNotifier::Deferred::kNone;
  }
}

void MmuNotifierSubscriptions::itree_inv_end(PlainListRef* plain) {
  bool wake = false;
  {
    SpinLockGuard g(&lock_);
    const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);  // lock_ held
    if (active_invalidate_ranges_ <= 0) {
      panic("invalidate_range_end without a matching invalidate_range_start (sequence " +
            std::to_string(seq) + ")");
    }
    if (plain) *plain = plain_;
    if (--active_invalidate_ranges_ == 0 && (seq & 1)) {
      apply_deferred_locked();
      // release: pairs with the wait predicates' acquire, so a woken remove() finds its node
      // unlinked and a woken read_begin() reads the finished page tables.
      invalidate_seq_.store(seq + 1, std::memory_order_release);
      wake = true;
    }
  }
  if (wake) wq_.wake_all();
}

int MmuNotifierSubscriptions::invalidate_range_start(const MmuNotifierRange& range) {
  invalidations.add();
  uint64_t cur_seq = 0;
  PlainListRef plain;
  const bool walk = itree_inv_start(range, &cur_seq, &plain);
  int rc = 0;
  if (walk && !itree_walk(range, cur_seq)) {
    rc = -EAGAIN;  // plain notifiers are not started, as in Linux
  } else if (plain) {
    rc = plain_start(*plain, range);
  }
  // Refused: undo the start here, since the caller does not call invalidate_range_end().
  // Notifiers already called have moved their sequence; their mirrors merely retry.
  if (rc != 0) itree_inv_end(nullptr);
  return rc;
}

void MmuNotifierSubscriptions::invalidate_range_end(const MmuNotifierRange& range) {
  PlainListRef plain;
  itree_inv_end(&plain);
  if (!plain) return;
  for (MmuNotifier* n : plain->notifiers) n->invalidate_range_end(range);
}

// ---- MmuNotifierSubscriptions: plain notifiers ----

int MmuNotifierSubscriptions::plain_start(const PlainList& list, const MmuNotifierRange& range) {
  // Which notifiers accepted, to end them if another refuses. Only a non-blockable range can
  // be refused, so only that case needs the (unlocked) allocation.
  std::vector<char> accepted;
  if (!range.blockable()) accepted.assign(list.notifiers.size(), 0);
  bool refused = false;
  for (size_t i = 0; i < list.notifiers.size(); i++) {
    const int rc = list.notifiers[i]->invalidate_range_start(range);
    if (rc == 0) {
      if (!accepted.empty()) accepted[i] = 1;
      continue;
    }
    if (range.blockable() || rc != -EAGAIN) {
      panic("mmu notifier " + std::to_string(i) + " answered " + std::to_string(rc) +
            " to the invalidation " + describe_invalidation(range) +
            ": only -EAGAIN for a non-blockable range is allowed");
    }
    refused = true;  // the others are still started, as in Linux
  }
  if (!refused) return 0;
  for (size_t i = 0; i < list.notifiers.size(); i++) {
    if (accepted[i]) list.notifiers[i]->invalidate_range_end(range);
  }
  return -EAGAIN;
}

void MmuNotifierSubscriptions::synchronize_plain(PlainListRef list, const char* what) {
  list_mutex_.assert_held();
  std::atomic<bool> gone{false};
  list->retired.store(&gone, std::memory_order_release);  // pairs with ~PlainList's acquire
  list.reset();  // when ours was the last reference, the destructor has raised the flag
  // acquire: pairs with ~PlainList's release, so the readers' callbacks happen before.
  if (wq_.wait_for([&] { return gone.load(std::memory_order_acquire); }, hang_timeout())) return;
  long active;
  {
    SpinLockGuard g(&lock_);
    active = active_invalidate_ranges_;
  }
  panic(std::string(what) + ": an invalidation kept running plain-notifier callbacks for " +
        std::to_string(hang_timeout().count()) + " ms (" + std::to_string(active) +
        " invalidations active, sequence " +
        std::to_string(invalidate_seq_.load(std::memory_order_relaxed)) + ")");
}

int MmuNotifierSubscriptions::register_notifier(MmuNotifier* n) {
  if (!n) return -EINVAL;
  MutexLock w(&list_mutex_);
  PlainListRef cur;  // plain_ changes only under list_mutex_, which this thread holds
  {
    SpinLockGuard g(&lock_);
    if (released_) return -EINVAL;
    cur = plain_;
  }
  if (cur && std::find(cur->notifiers.begin(), cur->notifiers.end(), n) != cur->notifiers.end()) {
    return -EINVAL;
  }
  auto next = std::make_shared<PlainList>(&wq_);
  if (cur) next->notifiers = cur->notifiers;
  next->notifiers.push_back(n);
  PlainListRef swap = std::move(next);
  {
    SpinLockGuard g(&lock_);
    plain_.swap(swap);
  }
  // `swap` holds the old list. Invalidations still using it merely do not see n yet (a
  // notifier registered during an invalidation may get an end without a start, as in Linux).
  return 0;
}

void MmuNotifierSubscriptions::unregister_notifier(MmuNotifier* n) {
  if (!n) return;
  MutexLock w(&list_mutex_);
  PlainListRef cur;
  {
    SpinLockGuard g(&lock_);
    cur = plain_;
  }
  if (!cur || std::find(cur->notifiers.begin(), cur->notifiers.end(), n) == cur->notifiers.end()) {
    return;  // not registered, or dropped by release()
  }
  PlainListRef swap;
  if (cur->notifiers.size() > 1) {
    auto next = std::make_shared<PlainList>(&wq_);
    for (MmuNotifier* m : cur->notifiers) {
      if (m != n) next->notifiers.push_back(m);
    }
    swap = std::move(next);
  }
  {
    SpinLockGuard g(&lock_);
    plain_.swap(swap);
  }
  swap.reset();  // the old list; `cur` still references it
  synchronize_plain(std::move(cur), "mmu_notifier_unregister");
}

void MmuNotifierSubscriptions::release_plain() {
  MutexLock w(&list_mutex_);
  PlainListRef list;
  {
    SpinLockGuard g(&lock_);
    plain_.swap(list);
  }
  if (!list) return;
  const std::vector<MmuNotifier*> notifiers = list->notifiers;
  // In-flight invalidation callbacks finish first: release() is the last callback each
  // notifier sees. An invalidation already started gets no plain end (as in Linux).
  synchronize_plain(std::move(list), "mmu_notifier_release");
  for (MmuNotifier* n : notifiers) n->release(mm_);
}

void MmuNotifierSubscriptions::release() {
  {
    SpinLockGuard g(&lock_);
    if (released_) return;
    released_ = true;
  }
  // mn_itree_release: a RELEASE invalidation of every interval notifier. Linux makes it
  // non-blockable; here it is blockable so drivers may take their sleeping locks (nothing
  // else can fail at exit), and so it cannot be refused.
  const MmuNotifierRange range{mm_, 0, kTaskSize, MmuNotifyEvent::kRelease,
                               kMmuNotifierRangeBlockable, nullptr};
  invalidations.add();
  uint64_t cur_seq = 0;
  if (itree_inv_start(range, &cur_seq, nullptr)) (void)itree_walk(range, cur_seq);
  itree_inv_end(nullptr);
  release_plain();
}

bool MmuNotifierSubscriptions::invalidation_in_progress() const {
  SpinLockGuard g(&lock_);
  return active_invalidate_ranges_ > 0;
}

size_t MmuNotifierSubscriptions::interval_count() const {
  SpinLockGuard g(&lock_);
  size_t n = itree_.size();
  for (const MmuIntervalNotifier* sub = deferred_; sub; sub = sub->deferred_next_) {
    if (sub->deferred_ == MmuIntervalNotifier::Deferred::kInsert) {
      n++;
    } else {
      n--;
    }
  }
  return n;
}

}  // namespace gpusvm::mm
