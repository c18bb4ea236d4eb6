// MMU notifiers: how a device mirror learns that CPU page-table entries are about to change.
//
// Two kinds, as in Linux:
//  - MmuIntervalNotifier: covers [start, end) of one address space and carries a sequence
//    number for the collision-retry protocol below. This is what drivers use for mirroring.
//  - MmuNotifier: whole-address-space callbacks (invalidate_range_start/end, release).
//
// The sequence protocol (mmu_interval_read_begin / read_retry / set_seq). A mirror that builds
// device mappings from CPU page tables does:
//
//     again:
//       seq = notifier.read_begin();         // waits out an invalidation of this notifier
//       hmm_range_fault(range with seq)      // reads CPU page tables, may fault
//       driver_lock();
//       if (notifier.read_retry(seq)) { driver_unlock(); goto again; }
//       program device page tables from the result
//       driver_unlock();
//
// and its invalidate() callback does:
//       driver_lock(); notifier.set_seq(cur_seq); zap device mappings; driver_unlock();
//
// Why it is safe:
//
//     mirror thread                       invalidating thread
//     seq = read_begin() (even)
//                                         invalidate_range_start(): subscriptions go odd
//     hmm_range_fault reads old entries   invalidate(): driver_lock, set_seq(cur_seq), unlock
//                                         CPU page table changes
//     driver_lock(); read_retry(seq) -> true (set_seq changed it): retry, nothing stale is
//     committed. If the mirror took driver_lock first, its commit is zapped by invalidate().
//
// read_begin() blocks while an invalidation that covers this notifier is in progress, so a
// retry does not spin against one long invalidation. The driver lock is what orders set_seq
// against read_retry; read_retry() alone may be called without it only as an early-out hint.
//
// Invalidations are announced by the layer changing page tables: invalidate_range_start()
// before the first entry changes, invalidate_range_end() after the last, with the mmap lock
// held and no page-table lock held (callbacks may sleep). A MmuNotifierRange carries the event
// and an owner: a driver that migrates memory itself tags the MIGRATE invalidation with its
// owner and may skip the device work for its own (seed 001); its callback still calls
// set_seq(), so the sequence advances for every notifier and no mirror commits stale data.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class MmuNotifierSubscriptions;

enum class MmuNotifyEvent {
  kUnmap,           // munmap, mremap source: the range goes away
  kClear,           // entries cleared, VMA stays (MADV_DONTNEED, MADV_FREE, collapse)
  kProtectionVma,   // mprotect
  kProtectionPage,  // per-page write-protect (fork COW)
  kSoftDirty,
  kRelease,         // the address space is being torn down
  kMigrate,         // migrate_vma / migrate_device unmapping pages
  kExclusive,       // make_device_exclusive
};

const char* mmu_notify_event_name(MmuNotifyEvent e);

inline constexpr unsigned kMmuNotifierRangeBlockable = 1u << 0;

struct MmuNotifierRange {
  AddressSpace* mm = nullptr;
  Va start = 0;
  Va end = 0;
  MmuNotifyEvent event = MmuNotifyEvent::kUnmap;
  unsigned flags = kMmuNotifierRangeBlockable;
  // Who caused the invalidation (the migrate owner for kMigrate, the device for kExclusive);
  // nullptr for CPU-side changes.
  const void* owner = nullptr;

  bool blockable() const { return flags & kMmuNotifierRangeBlockable; }
};

class MmuIntervalNotifier;

// Callbacks of an interval notifier. Context: called from the thread changing the page
// tables, mmap lock held (read or write) - or, for a CLEAR invalidation from an rmap walk
// (try_to_migrate of an eviction or of another process's migration), only the rmap walk lock
// (shared) and the folio lock -, no page-table lock held; may sleep when
// range.blockable(). Must call notifier->set_seq(cur_seq) under the driver lock that also
// guards read_retry(), unless it returns false.
class MmuIntervalNotifierOps {
 public:
  virtual ~MmuIntervalNotifierOps() = default;
  // Returns false only for a non-blockable range it cannot handle without sleeping; the
  // invalidation then fails with -EAGAIN (the OOM-reaper case).
  virtual bool invalidate(MmuIntervalNotifier* notifier, const MmuNotifierRange& range,
                          uint64_t cur_seq) = 0;
};

// The interval tree of a MmuNotifierSubscriptions: notifiers keyed by start.
using MmuNotifierItree = std::multimap<Va, MmuIntervalNotifier*>;

class MmuIntervalNotifier {
 public:
  MmuIntervalNotifier() = default;
  ~MmuIntervalNotifier();  // removes itself if still inserted
  MmuIntervalNotifier(const MmuIntervalNotifier&) = delete;
  MmuIntervalNotifier& operator=(const MmuIntervalNotifier&) = delete;

  // mmu_interval_notifier_insert. Watches [start, start + length) of `mm`. Returns 0, or
  // -EINVAL (empty, overflowing or non-user range, already inserted, null ops, or an address
  // space whose notifiers were released by exit: Linux requires the caller to hold a user of
  // the mm, so inserting into an exited one is a caller bug, reported instead of ignored).
  // May be called while an invalidation is in progress: then the notifier becomes visible
  // when it ends, and read_begin() waits for that.
  [[nodiscard]] int insert(AddressSpace* mm, Va start, uint64_t length,
                           MmuIntervalNotifierOps* ops);
  // mmu_interval_notifier_remove. After it returns no callback runs or will run. Waits for
  // an invalidation in progress that covers the notifier. Must not be called from the
  // notifier's own callback. A no-op when the notifier is not inserted.
  void remove();

  // mmu_interval_read_begin: returns the sequence to pass to read_retry(). Sleeps (bounded by
  // hang_timeout(), then panics naming the notifier) while an invalidation covering this
  // notifier is in progress. The value is opaque: as in Linux it is the sequence of the last
  // invalidation that reached this notifier (odd), not a count.
  uint64_t read_begin();
  // mmu_interval_read_retry: true if an invalidation started since read_begin() returned seq.
  // Authoritative only under the driver lock that the invalidate callback takes.
  bool read_retry(uint64_t seq) const;
  // mmu_interval_check_retry: the same test, documented as a lockless hint.
  bool check_retry(uint64_t seq) const { return read_retry(seq); }
  // mmu_interval_set_seq: called from invalidate() under the driver lock.
  void set_seq(uint64_t cur_seq);

  AddressSpace* mm() const { return mm_; }
  Va start() const { return start_; }
  Va end() const { return end_; }  // exclusive
  bool inserted() const { return subs_ != nullptr; }

 private:
  friend class MmuNotifierSubscriptions;
  enum class Deferred : uint8_t { kNone, kInsert, kRemove };

  // Written by insert() before the notifier is published under the subscriptions lock, then
  // constant until remove() returns; read by invalidations walking the tree.
  AddressSpace* mm_ = nullptr;
  MmuNotifierSubscriptions* subs_ = nullptr;  // set while inserted; owner thread only
  MmuIntervalNotifierOps* ops_ = nullptr;
  Va start_ = 0;
  Va end_ = 0;
  // Written by set_seq() (driver lock held) and by insert; read by read_retry without the
  // subscriptions lock. acquire/release: pairs set_seq's store with read_retry's load.
  std::atomic<uint64_t> invalidate_seq_{0};

  // Guarded by subs_->lock_ (clang cannot name a lock reached through a pointer; the
  // subscriptions code asserts it). The tree node is allocated by insert() before the lock is
  // taken and freed by remove() after it is dropped, so nothing allocates under it.
  MmuNotifierItree::node_type node_;        // the node while not linked into the tree
  MmuNotifierItree::iterator it_;           // its position while linked
  Deferred deferred_ = Deferred::kNone;     // pending on the subscriptions' deferred list
  MmuIntervalNotifier* deferred_next_ = nullptr;
};

// Whole-address-space notifier (mmu_notifier_register). Callbacks run in the same context as
// the interval callbacks. All are optional.
class MmuNotifier {
 public:
  virtual ~MmuNotifier() = default;
  // The address space is going away (exit). After this no callback of `mm` runs again.
  virtual void release(AddressSpace* mm) { (void)mm; }
  // Returns 0, or -EAGAIN for a non-blockable range it cannot handle.
  virtual int invalidate_range_start(const MmuNotifierRange& range) {
    (void)range;
    return 0;
  }
  virtual void invalidate_range_end(const MmuNotifierRange& range) { (void)range; }
};

// kMmuNotifierListLockClass (gpusvm/base/lock_order.h) serializes register/unregister/release
// of plain notifiers. Rank 0 (outside the lock order): release() callbacks run under it and may
// take driver locks of any rank, and no invalidation ever takes it.

// Per-address-space notifier state (mm->notifier_subscriptions). Owned by AddressSpace.
//
// Locking:
//  - lock_ (spin) guards the interval tree, the invalidation bookkeeping, the deferred list
//    and the published plain-notifier list. It is never held across a callback and nothing
//    allocates or frees under it.
//  - The tree is walked without lock_ while the sequence is odd: an invalidation walks only
//    after making it odd, it stays odd until the last active invalidation ends, and while it
//    is odd inserts and removals are deferred to that end (mn_itree_inv_end), so the tree
//    cannot change under a walker.
//  - Plain notifiers are an immutable list published through a shared_ptr (an RCU-like
//    scheme standing in for the kernel's SRCU): an invalidation takes a reference under lock_
//    and calls the list's callbacks without any lock. register/unregister/release (serialized
//    by list_mutex_) publish a new list; unregister and release then wait until every
//    invalidation still holding the old list has dropped it, so no callback of a removed
//    notifier runs after they return. Readers never block on writers.
class MmuNotifierSubscriptions {
 public:
  explicit MmuNotifierSubscriptions(AddressSpace* mm) : mm_(mm) {}
  ~MmuNotifierSubscriptions();

  // Runs every intersecting interval notifier's invalidate() (after making the sequence odd)
  // and every MmuNotifier's invalidate_range_start. Returns 0, or -EAGAIN when a callback
  // refused a non-blockable range; then the start has been undone and the caller must not
  // call invalidate_range_end(). Context: mmap lock held (or, from an rmap walk into another
  // address space, the rmap walk lock instead: not asserted here), no page-table lock held.
  [[nodiscard]] int invalidate_range_start(const MmuNotifierRange& range);
  void invalidate_range_end(const MmuNotifierRange& range);

  // mmu_notifier_register / unregister. register returns 0 or -EINVAL (null, already
  // registered, or after release). unregister waits until no invalidation still runs a
  // callback of n, so none runs after it returns; unlike Linux it does not call n->release().
  // After release() it is a no-op. Neither may be called from a notifier callback.
  [[nodiscard]] int register_notifier(MmuNotifier* n);
  void unregister_notifier(MmuNotifier* n);

  // exit_mmap: a kRelease invalidation of every interval notifier (blockable, unlike
  // Linux's, so drivers may take their sleeping locks), then release() of every plain
  // notifier, which are dropped: no plain callback runs after release() returns. Interval
  // notifiers stay inserted and, as in Linux, also see the UNMAP invalidations of the
  // teardown that follows. Later inserts and registrations fail with -EINVAL. Idempotent.
  void release();

  // Test and checker hooks.
  bool invalidation_in_progress() const;  // an invalidate_range_start without its end yet
  // Inserted interval notifiers, counting deferred inserts and removals as done.
  size_t interval_count() const;
  StatCounter invalidations;          // invalidate_range_start calls
  StatCounter interval_callbacks;     // invalidate() calls made

 private:
  friend class MmuIntervalNotifier;
  struct PlainList;
  using PlainListRef = std::shared_ptr<const PlainList>;

  int insert(MmuIntervalNotifier* sub, MmuNotifierItree::node_type node) GPUSVM_EXCLUDES(lock_);
  void remove(MmuIntervalNotifier* sub) GPUSVM_EXCLUDES(lock_);
  uint64_t read_begin(MmuIntervalNotifier* sub) GPUSVM_EXCLUDES(lock_);

  // mn_itree_inv_start_range: counts the range active and, when it intersects a notifier,
  // makes the sequence odd. Returns whether the tree must be walked; *cur_seq is the
  // sequence to hand to the callbacks, *plain the plain list to run (may be null).
  bool itree_inv_start(const MmuNotifierRange& range, uint64_t* cur_seq, PlainListRef* plain)
      GPUSVM_EXCLUDES(lock_);
  // Calls invalidate() of every intersecting notifier. Returns false when one refused a
  // non-blockable range (the rest are skipped, as in Linux).
  bool itree_walk(const MmuNotifierRange& range, uint64_t cur_seq)
      GPUSVM_NO_THREAD_SAFETY_ANALYSIS;  // reads itree_ without lock_: see the class comment
  // mn_itree_inv_end: the last active range makes the sequence even, applies the deferred
  // inserts/removes and wakes the waiters. *plain: the plain list to run the ends of.
  void itree_inv_end(PlainListRef* plain) GPUSVM_EXCLUDES(lock_);
  void apply_deferred_locked() GPUSVM_REQUIRES(lock_);
  bool itree_intersects_locked(const MmuNotifierRange& range) const GPUSVM_REQUIRES(lock_);
  // Plain invalidate_range_start of every notifier of `list`; on a refusal the ones that
  // accepted get their end (mn_hlist_invalidate_range_start). Returns 0 or -EAGAIN.
  static int plain_start(const PlainList& list, const MmuNotifierRange& range);
  // Unpublished `list` (the caller's is the last reference it drops): waits until every
  // invalidation still using it has dropped it.
  void synchronize_plain(PlainListRef list, const char* what) GPUSVM_REQUIRES(list_mutex_);
  void release_plain() GPUSVM_EXCLUDES(lock_, list_mutex_);
  // Sleeps until the sequence differs from seq; panics after hang_timeout() naming `what`,
  // the notifier and both sequences.
  void wait_seq_changed(uint64_t seq, const MmuIntervalNotifier* sub, const char* what)
      GPUSVM_EXCLUDES(lock_);

  AddressSpace* const mm_;
  mutable SpinLock lock_{&kNotifierSubsLockClass};
  // Odd while an invalidation that intersects a notifier (or a notifier inserted during an
  // invalidation) is active. Written under lock_ with release; read under lock_, and with
  // acquire by the lockless wait predicates of read_begin and remove.
  std::atomic<uint64_t> invalidate_seq_{2};
  long active_invalidate_ranges_ GPUSVM_GUARDED_BY(lock_) = 0;
  // Notifiers keyed by start. A lookup visits those with start < range.end and filters on
  // end: O(n) at worst, and n is small (drivers use few, large notifiers). Written under
  // lock_ only while the sequence is even; read by walkers without lock_ (class comment).
  MmuNotifierItree itree_ GPUSVM_GUARDED_BY(lock_);
  // Notifiers inserted or removed while the sequence was odd, linked through deferred_next_.
  MmuIntervalNotifier* deferred_ GPUSVM_GUARDED_BY(lock_) = nullptr;
  // Blocks inserts and registrations once release() started.
  bool released_ GPUSVM_GUARDED_BY(lock_) = false;
  // The published plain-notifier list; null when empty. Replaced (swapped, never dropped)
  // under lock_, by list_mutex_ holders only.
  PlainListRef plain_ GPUSVM_GUARDED_BY(lock_);
  Mutex list_mutex_{&kMmuNotifierListLockClass};
  WaitQueue wq_;  // read_begin, remove and synchronize_plain wait here
};

}  // namespace gpusvm::mm
