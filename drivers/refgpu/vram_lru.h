// VramLru: the least-recently-used list of one VRAM region's allocations, and the eviction
// that makes room when the buddy allocator is full (Xe leaves this to TTM's LRU and
// ttm_bo_evict; svm allocations are evicted with drm_pagemap_evict_to_ram).
//
// Design notes:
//  - Entries are VramLruEntry objects: an svm allocation (VramAllocation, vram_pagemap.h) or
//    the VRAM backing of a buffer object (Bo, bo.h). They are intrusively linked, so adding,
//    bumping and removing never allocate: touch() is what get_pages' devmem_fn calls under the
//    notifier lock, remove() what devmem_release calls from folio_free under page-table locks.
//  - An entry is refcounted (get/put; the last put deletes it through destroy()). The list
//    holds no reference: an entry's owner removes it (remove()) before, or in destroy() right
//    after, dropping the reference that kept it alive; the evictor takes its reference with
//    try_get() under the list lock, so it never revives an entry being destroyed. An entry removed for good is marked dead: a later add() of it is a no-op, which
//    closes the window between a migration committing pages and the allocation being linked,
//    in which a CPU fault may take every page back and release the allocation.
//  - Busy entries are skipped by eviction: an allocation being migrated into is not linked
//    until its migration returns; an entry whose owner holds begin_busy() (a fault mapping
//    it, a BO being moved) is passed over. This is how eviction avoids deadlocking against a
//    fault being serviced: it never waits for a lock or a state the fault holds; it takes the
//    next entry, and the allocator retries within its bounds.
//  - evict(): takes the least recently used non-busy entry, unlinks it and marks it busy
//    while it runs the entry's evict() with no lock held; an entry that could not be evicted
//    goes back to the most-recent end (it is in use) if its owner still wants it listed.
//    Each call walks at most the entries
//    that were linked when it started.
//
// Locking: one SpinLock (kVramLruLockClass, 876) per list; nothing is called under it; taken
// under the notifier lock and under page-table locks; never nested with the buddy lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/thread_annotations.h"
#include "drivers/refgpu/vram_stats.h"

namespace gpusvm::refgpu {

class VramLru;

class VramLruEntry {
 public:
  // One reference for the creator. size: the VRAM bytes the entry holds.
  explicit VramLruEntry(uint64_t size) : size_(size) {}
  VramLruEntry(const VramLruEntry&) = delete;
  VramLruEntry& operator=(const VramLruEntry&) = delete;

  uint64_t vram_size() const { return size_; }
  // References: the caller already holds one (or the list lock, for the evictor). The last
  // put calls destroy(). put never sleeps (it may run from folio_free).
  void get() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void put() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) destroy();
  }
  // kref_get_unless_zero: takes a reference unless the last one already went (the entry is
  // being destroyed and about to unlink itself). What the evictor uses under the list lock.
  bool try_get() {
    int64_t r = refs_.load(std::memory_order_relaxed);
    while (r > 0) {
      if (refs_.compare_exchange_weak(r, r + 1, std::memory_order_acquire, std::memory_order_relaxed)) return true;
    }
    return false;
  }
  int64_t refcount() const { return refs_.load(std::memory_order_acquire); }

  // Marks the entry in use by its owner: eviction skips it while the count is non-zero.
  // Never sleeps or allocates.
  void begin_busy() { busy_.fetch_add(1, std::memory_order_acq_rel); }
  void end_busy() { busy_.fetch_sub(1, std::memory_order_acq_rel); }
  bool busy() const { return busy_.load(std::memory_order_acquire) != 0; }

  // Moves the entry's contents out of VRAM and frees its VRAM. Called by VramLru::evict with
  // no lock held and a reference held; may sleep. Returns 0 when the VRAM was freed (the
  // entry was removed from the list by its owner), -EBUSY when the entry is in use and was
  // left alone (a lock the owner holds, pages under migration), or another negative errno.
  virtual int evict() = 0;

 protected:
  virtual ~VramLruEntry() = default;
  // The last reference went. Default: delete. May run from folio_free (never sleeps).
  virtual void destroy() { delete this; }

 private:
  friend class VramLru;
  const uint64_t size_;
  std::atomic<int64_t> refs_{1};
  std::atomic<int> busy_{0};
  // Under the list lock of the VramLru the entry belongs to.
  VramLruEntry* prev_ = nullptr;
  VramLruEntry* next_ = nullptr;
  bool linked_ = false;
  bool wanted_ = false;    // the owner wants it listed (add, not unlink/remove since)
  bool evicting_ = false;  // taken off the list by an evictor that is running its evict()
  bool dead_ = false;      // removed for good
};

class VramLru {
 public:
  explicit VramLru(VramStats* stats) : stats_(stats) {}
  ~VramLru();  // the list must be empty (panics otherwise: an entry leaked)
  VramLru(const VramLru&) = delete;
  VramLru& operator=(const VramLru&) = delete;

  // Links `e` as the most recently used, unless it is linked already or dead (removed for
  // good); an entry being evicted is linked again when its eviction returns. Never sleeps or
  // allocates.
  void add(VramLruEntry* e) GPUSVM_EXCLUDES(lock_);
  // Unlinks `e` (its VRAM went, but it may come back: a BO moved to system memory); a later
  // add() links it again. Context as touch.
  void unlink(VramLruEntry* e) GPUSVM_EXCLUDES(lock_);
  // Moves a linked `e` to the most-recent end (an unlinked or dead entry is left alone).
  // Context: any, including under the notifier lock (get_pages' devmem_fn) and page-table
  // locks; never sleeps or allocates.
  void touch(VramLruEntry* e) GPUSVM_EXCLUDES(lock_);
  // Unlinks `e` for good (marks it dead). Idempotent. Context as touch.
  void remove(VramLruEntry* e) GPUSVM_EXCLUDES(lock_);

  // Evicts least-recently-used entries until `bytes` were freed or every entry linked at the
  // start was tried once. Returns the bytes freed (maybe 0: everything busy or nothing
  // linked). Context: no lock held (entries' evict() may sleep and take mm and gpusvm locks).
  uint64_t evict(uint64_t bytes) GPUSVM_EXCLUDES(lock_);

  bool linked(const VramLruEntry* e) const GPUSVM_EXCLUDES(lock_);
  uint64_t linked_count() const GPUSVM_EXCLUDES(lock_);
  uint64_t linked_bytes() const GPUSVM_EXCLUDES(lock_);
  // The linked entries, least recently used first (tests; allocates, so not under locks).
  std::vector<VramLruEntry*> snapshot() const GPUSVM_EXCLUDES(lock_);

 private:
  void unlink_locked(VramLruEntry* e) GPUSVM_REQUIRES(lock_);
  void link_tail_locked(VramLruEntry* e) GPUSVM_REQUIRES(lock_);

  VramStats* const stats_;
  mutable SpinLock lock_{&kVramLruLockClass};
  VramLruEntry* head_ GPUSVM_GUARDED_BY(lock_) = nullptr;  // least recently used
  VramLruEntry* tail_ GPUSVM_GUARDED_BY(lock_) = nullptr;  // most recently used
  uint64_t count_ GPUSVM_GUARDED_BY(lock_) = 0;
  uint64_t bytes_ GPUSVM_GUARDED_BY(lock_) = 0;
};

}  // namespace gpusvm::refgpu
