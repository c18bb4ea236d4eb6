// MMU notifiers: the interval-notifier sequence protocol (mm/mmu_notifier.c's contract) and
// whole-address-space notifiers.
#include "gpusvm/mm/mmu_notifier.h"

#include <algorithm>
#include <cerrno>

#include "gpusvm/mm/address_space.h"

namespace gpusvm::mm {

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

// ---- MmuIntervalNotifier ----

MmuIntervalNotifier::~MmuIntervalNotifier() {
  if (subs_) remove();
}

int MmuIntervalNotifier::insert(AddressSpace* mm, Va start, uint64_t length,
                                MmuIntervalNotifierOps* ops) {
  if (!mm || !ops || subs_ || length == 0 || start + length < start ||
      start + length > kTaskSize) {
    return -EINVAL;
  }
  mm_ = mm;
  ops_ = ops;
  start_ = start;
  end_ = start + length;
  return mm->notifier_subscriptions().insert(this);
}

void MmuIntervalNotifier::remove() {
  if (subs_) subs_->remove(this);
}

uint64_t MmuIntervalNotifier::read_begin() {
  if (!subs_) panic("mmu_interval_read_begin on a notifier that is not inserted");
  return subs_->read_begin(this);
}

bool MmuIntervalNotifier::read_retry(uint64_t seq) const {
  // acquire: pairs with set_seq's release, so a mirror that sees the old sequence under the
  // driver lock also saw everything before the invalidation started.
  return invalidate_seq_.load(std::memory_order_acquire) != seq;
}

void MmuIntervalNotifier::set_seq(uint64_t cur_seq) {
  invalidate_seq_.store(cur_seq, std::memory_order_release);  // pairs with read_retry
}

// ---- MmuNotifierSubscriptions ----

MmuNotifierSubscriptions::~MmuNotifierSubscriptions() {
  // Notifiers that outlive their address space must not reach back into it.
  SpinLockGuard g(&lock_);
  for (auto& [start, sub] : itree_) sub->subs_ = nullptr;
  for (MmuIntervalNotifier* sub : deferred_add_) sub->subs_ = nullptr;
}

int MmuNotifierSubscriptions::insert(MmuIntervalNotifier* sub) {
  SpinLockGuard g(&lock_);
  if (released_) return -EINVAL;  // the address space is exiting
  sub->subs_ = this;
  if (active_invalidate_ranges_ > 0) {
    // An invalidation is walking the tree: the notifier joins when the last one ends. It
    // missed the start of the current invalidations, so its readers must wait them out: force
    // the sequence odd and give the notifier that same value (read_begin then sleeps).
    invalidate_seq_.store(invalidate_seq_.load(std::memory_order_relaxed) | 1,
                          std::memory_order_release);
    deferred_add_.push_back(sub);
    sub->invalidate_seq_.store(invalidate_seq_.load(std::memory_order_relaxed),
                               std::memory_order_release);
  } else {
    // Idle: any value other than the current (even) sequence lets read_begin return at once.
    sub->invalidate_seq_.store(invalidate_seq_.load(std::memory_order_relaxed) - 1,
                               std::memory_order_release);
    itree_.emplace(sub->start_, sub);
  }
  return 0;
}

void MmuNotifierSubscriptions::remove(MmuIntervalNotifier* sub) {
  uint64_t wait_seq = 0;
  {
    SpinLockGuard g(&lock_);
    const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
    auto deferred = std::find(deferred_add_.begin(), deferred_add_.end(), sub);
    if (deferred != deferred_add_.end()) {
      deferred_add_.erase(deferred);  // never reached the tree: no callback can be running
    } else if (seq & 1) {
      // A walker may be calling this notifier right now: unlink it when the invalidations
      // end and wait for that, so no callback runs after remove() returns.
      deferred_remove_.push_back(sub);
      wait_seq = seq;
    } else {
      for (auto it = itree_.lower_bound(sub->start_); it != itree_.end() && it->first == sub->start_; ++it) {
        if (it->second == sub) {
          itree_.erase(it);
          break;
        }
      }
    }
  }
  if (wait_seq) {
    const bool done = wq_.wait_for(
        [&] { return invalidate_seq_.load(std::memory_order_acquire) != wait_seq; }, hang_timeout());
    if (!done) {
      panic("mmu_interval_notifier_remove [" + std::to_string(sub->start_) + ", " +
            std::to_string(sub->end_) + "): invalidation with seq " + std::to_string(wait_seq) +
            " did not end within the hang timeout");
    }
  }
  sub->subs_ = nullptr;
}

uint64_t MmuNotifierSubscriptions::read_begin(MmuIntervalNotifier* sub) {
  uint64_t seq;
  bool invalidating;
  {
    SpinLockGuard g(&lock_);
    // acquire: pairs with set_seq's release store.
    seq = sub->invalidate_seq_.load(std::memory_order_acquire);
    invalidating = seq == invalidate_seq_.load(std::memory_order_relaxed);
  }
  // The notifier's sequence equals the subscriptions' only while an invalidation that called
  // (or, for a deferred insert, preceded) this notifier is running: wait for it to end. The
  // end bumps the subscriptions' sequence, so seq can never match again; the mirror then
  // compares against seq in read_retry and any later set_seq makes it retry.
  if (invalidating) {
    const bool done = wq_.wait_for(
        [&] { return invalidate_seq_.load(std::memory_order_acquire) != seq; }, hang_timeout());
    if (!done) {
      panic("mmu_interval_read_begin [" + std::to_string(sub->start_) + ", " +
            std::to_string(sub->end_) + "): invalidation with seq " + std::to_string(seq) +
            " did not end within the hang timeout");
    }
  }
  return seq;
}

int MmuNotifierSubscriptions::invalidate_range_start(const MmuNotifierRange& range) {
  invalidations.add();
  std::vector<MmuNotifier*> plain;
  uint64_t cur_seq = 0;
  bool any = false;
  {
    SpinLockGuard g(&lock_);
    active_invalidate_ranges_++;
    for (auto it = itree_.begin(); it != itree_.end() && it->first < range.end; ++it) {
      if (it->second->end_ > range.start) {
        any = true;
        break;
      }
    }
    if (any) {
      invalidate_seq_.store(invalidate_seq_.load(std::memory_order_relaxed) | 1,
                            std::memory_order_release);
    }
    cur_seq = invalidate_seq_.load(std::memory_order_relaxed);
    plain = notifiers_;
  }
  // The tree cannot change while active_invalidate_ranges_ > 0 (inserts and removals are
  // deferred), so it is walked without the lock: callbacks may sleep.
  bool refused = false;
  if (any) {
    for (auto it = itree_.begin(); it != itree_.end() && it->first < range.end; ++it) {
      MmuIntervalNotifier* sub = it->second;
      if (sub->end_ <= range.start) continue;
      interval_callbacks.add();
      if (!sub->ops_->invalidate(sub, range, cur_seq)) {
        if (range.blockable()) panic("interval notifier refused a blockable invalidation");
        refused = true;
        break;
      }
    }
  }
  size_t started = 0;
  if (!refused) {
    for (; started < plain.size(); started++) {
      if (plain[started]->invalidate_range_start(range) != 0) {
        if (range.blockable()) panic("mmu notifier refused a blockable invalidation");
        refused = true;
        break;
      }
    }
  }
  if (!refused) return 0;
  // Non-blockable and refused: undo what started; the caller must not call _end.
  for (size_t i = 0; i < started; i++) plain[i]->invalidate_range_end(range);
  finish_range();
  return -EAGAIN;
}

void MmuNotifierSubscriptions::invalidate_range_end(const MmuNotifierRange& range) {
  std::vector<MmuNotifier*> plain;
  {
    SpinLockGuard g(&lock_);
    plain = notifiers_;
  }
  for (MmuNotifier* n : plain) n->invalidate_range_end(range);
  finish_range();
}

// mn_itree_inv_end: the last active range makes the sequence even again, applies deferred
// inserts/removes and wakes waiters.
void MmuNotifierSubscriptions::finish_range() {
  {
    SpinLockGuard g(&lock_);
    if (--active_invalidate_ranges_ == 0) {
      const uint64_t seq = invalidate_seq_.load(std::memory_order_relaxed);
      if (seq & 1) invalidate_seq_.store(seq + 1, std::memory_order_release);
      for (MmuIntervalNotifier* sub : deferred_remove_) {
        for (auto it = itree_.lower_bound(sub->start_); it != itree_.end() && it->first == sub->start_; ++it) {
          if (it->second == sub) {
            itree_.erase(it);
            break;
          }
        }
      }
      deferred_remove_.clear();
      for (MmuIntervalNotifier* sub : deferred_add_) itree_.emplace(sub->start_, sub);
      deferred_add_.clear();
    }
  }
  wq_.wake_all();
}

int MmuNotifierSubscriptions::register_notifier(MmuNotifier* n) {
  if (!n) return -EINVAL;
  SpinLockGuard g(&lock_);
  if (released_ || std::find(notifiers_.begin(), notifiers_.end(), n) != notifiers_.end()) {
    return -EINVAL;
  }
  notifiers_.push_back(n);
  return 0;
}

void MmuNotifierSubscriptions::unregister_notifier(MmuNotifier* n) {
  {
    SpinLockGuard g(&lock_);
    auto it = std::find(notifiers_.begin(), notifiers_.end(), n);
    if (it == notifiers_.end()) return;
    notifiers_.erase(it);
  }
  // Invalidations that took their snapshot before the removal may still call n: wait until
  // no invalidation is active (the kernel waits for SRCU readers for the same reason).
  const bool done = wq_.wait_for(
      [&] {
        SpinLockGuard g(&lock_);
        return active_invalidate_ranges_ == 0;
      },
      hang_timeout());
  if (!done) panic("mmu_notifier_unregister: invalidations kept running past the hang timeout");
}

void MmuNotifierSubscriptions::release() {
  std::vector<MmuNotifier*> plain;
  {
    SpinLockGuard g(&lock_);
    if (released_) return;
    released_ = true;
    plain.swap(notifiers_);
  }
  for (MmuNotifier* n : plain) n->release(mm_);
  // Interval notifiers see a RELEASE invalidation of everything (mn_itree_release); they
  // stay inserted and see the teardown's UNMAPs too, as in Linux.
  const MmuNotifierRange range{mm_, 0, kTaskSize, MmuNotifyEvent::kRelease,
                               kMmuNotifierRangeBlockable, nullptr};
  (void)invalidate_range_start(range);
  invalidate_range_end(range);
}

bool MmuNotifierSubscriptions::invalidation_in_progress() const {
  SpinLockGuard g(&lock_);
  return active_invalidate_ranges_ > 0;
}

size_t MmuNotifierSubscriptions::interval_count() const {
  SpinLockGuard g(&lock_);
  return itree_.size() + deferred_add_.size() - deferred_remove_.size();
}

}  // namespace gpusvm::mm
