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
// owner and may skip its own (seed 001) - the sequence still advances for every notifier.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "gpusvm/mm/lock_order.h"
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
// tables, mmap lock held (read or write), no page-table lock held; may sleep when
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

class MmuIntervalNotifier {
 public:
  MmuIntervalNotifier() = default;
  ~MmuIntervalNotifier();  // removes itself if still inserted
  MmuIntervalNotifier(const MmuIntervalNotifier&) = delete;
  MmuIntervalNotifier& operator=(const MmuIntervalNotifier&) = delete;

  // mmu_interval_notifier_insert. Watches [start, start + length) of `mm`. Returns 0, or
  // -EINVAL (empty, overflowing or non-user range, already inserted, null ops, or an address
  // space that is exiting).
  // May be called while an invalidation is in progress: then the notifier becomes visible
  // when it ends, and read_begin() waits for that.
  [[nodiscard]] int insert(AddressSpace* mm, Va start, uint64_t length,
                           MmuIntervalNotifierOps* ops);
  // mmu_interval_notifier_remove. After it returns no callback runs or will run. Waits for
  // an invalidation in progress that covers the notifier. Must not be called from the
  // notifier's own callback.
  void remove();

  // mmu_interval_read_begin: returns the sequence to pass to read_retry(). Sleeps (bounded by
  // hang_timeout(), then panics naming the notifier) while an invalidation covering this
  // notifier is in progress.
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
  AddressSpace* mm_ = nullptr;
  MmuNotifierSubscriptions* subs_ = nullptr;  // set while inserted
  MmuIntervalNotifierOps* ops_ = nullptr;
  Va start_ = 0;
  Va end_ = 0;
  // Written by set_seq() (driver lock held) and by insert; read by read_retry without the
  // subscriptions lock. acquire/release: pairs set_seq's store with read_retry's load.
  std::atomic<uint64_t> invalidate_seq_{0};
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

// Per-address-space notifier state (mm->notifier_subscriptions). Owned by AddressSpace.
//
// Locking: lock_ (spin) guards the interval tree, the invalidation bookkeeping and the
// deferred lists; it is never held across a callback. The tree is walked without lock_ while
// active_invalidate_ranges_ > 0: inserts and removals are deferred until the last
// invalidation ends, so the tree cannot change under a walker.
class MmuNotifierSubscriptions {
 public:
  explicit MmuNotifierSubscriptions(AddressSpace* mm) : mm_(mm) {}
  ~MmuNotifierSubscriptions();

  // Runs every intersecting interval notifier's invalidate() (after making the sequence odd)
  // and every MmuNotifier's invalidate_range_start. Returns 0, or -EAGAIN when a callback
  // refused a non-blockable range; then the start has been undone and the caller must not
  // call invalidate_range_end(). Context: mmap lock held, no page-table lock held.
  [[nodiscard]] int invalidate_range_start(const MmuNotifierRange& range);
  void invalidate_range_end(const MmuNotifierRange& range);

  // mmu_notifier_register / unregister. register returns 0 or -EINVAL (null, already
  // registered, or after release). unregister waits until no invalidation is active, so no
  // callback of n runs after it returns; after release() it is a no-op.
  [[nodiscard]] int register_notifier(MmuNotifier* n);
  void unregister_notifier(MmuNotifier* n);

  // exit_mmap: calls release() of every plain notifier (which are then dropped) and a
  // kRelease invalidation of every interval notifier. Interval notifiers stay inserted and,
  // as in Linux, also see the UNMAP invalidations of the teardown that follows.
  void release();

  // Test and checker hooks.
  bool invalidation_in_progress() const;
  size_t interval_count() const;
  StatCounter invalidations;          // invalidate_range_start calls
  StatCounter interval_callbacks;     // invalidate() calls made

 private:
  friend class MmuIntervalNotifier;
  int insert(MmuIntervalNotifier* sub);
  void remove(MmuIntervalNotifier* sub);
  uint64_t read_begin(MmuIntervalNotifier* sub);
  void finish_range();

  AddressSpace* const mm_;
  mutable SpinLock lock_{&kNotifierSubsLockClass};
  // Odd while at least one invalidation is active. Guarded by lock_; also read with acquire
  // by read_begin's wait predicate.
  std::atomic<uint64_t> invalidate_seq_{2};
  long active_invalidate_ranges_ GPUSVM_GUARDED_BY(lock_) = 0;
  // Notifiers keyed by start. A lookup visits those with start < range.end and filters on
  // end: O(n) at worst, and n is small (drivers use few, large notifiers). Written under
  // lock_ only while no invalidation is active; read by invalidations without lock_ (see the
  // class comment).
  std::multimap<Va, MmuIntervalNotifier*> itree_;
  std::vector<MmuIntervalNotifier*> deferred_add_ GPUSVM_GUARDED_BY(lock_);
  std::vector<MmuIntervalNotifier*> deferred_remove_ GPUSVM_GUARDED_BY(lock_);
  std::vector<MmuNotifier*> notifiers_ GPUSVM_GUARDED_BY(lock_);
  bool released_ GPUSVM_GUARDED_BY(lock_) = false;
  WaitQueue wq_;  // read_begin and remove wait here for invalidate_seq_ to move on
};

}  // namespace gpusvm::mm
