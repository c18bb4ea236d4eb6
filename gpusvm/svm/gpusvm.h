// Gpusvm: the GPU shared-virtual-memory helper of one device VM (the kernel's drm_gpusvm).
//
// A driver mirrors a window [mm_start, mm_start + mm_range) of a CPU address space into a
// device VM. The helper tracks what the device maps in ranges, grouped by notifier:
//  - Notifier: one per notifier-size-aligned window that holds a range; it owns an MMU
//    interval notifier over that window, created on the first fault in it.
//  - Range: a fault-sized chunk (the largest chunk size that fits, see range_find_or_insert),
//    never split (a partial unmap invalidates the whole range; the garbage collector removes
//    it and the next fault rebuilds what is still mapped). Refcounted. It embeds one Pages
//    object per device of the Gpusvm, so several devices can map one range.
//  - Pages (pages.h): the address array of one device.
//
// The fault path of a driver (xe_svm_handle_pagefault shape), driver range lock held:
//     garbage_collector(...)                      remove what UNMAP events queued
//     range = range_find_or_insert(addr, gpuva_start, gpuva_end, ctx)
//   retry:
//     get_pages(range, ctx)                      faults, maps, publishes the sequence
//     reserve GPU page-table memory               (nothing allocates under the lock)
//     ReadLock(notifier_lock())
//     if (!pages_valid(range pages)) -> unlock, goto retry (-EAGAIN)
//     write GPU PTEs from the address array
// and its invalidate op (called with the notifier lock held for write, sequence bumped) zaps
// the GPU PTEs of the ranges in the event, flushes the device TLB and unmap_pages them
// (in_notifier) before it returns. The sequence alone does not decide: notifiers are wider
// than ranges, so pages_valid (the pages' own flags, cleared by unmap_pages) is the check.
//
// Locking (outermost first; ranks in gpusvm/base/lock_order.h):
//   driver VM / range lock (set at init, asserted by the calls that say so)
//     -> mmap lock (taken only inside this layer and mm, never across device work)
//       -> notifier lock (rw: write in invalidation and tree changes, read in get_pages'
//          publish step and the driver's commit)
//         -> the DMA record of a Device, pagemap device_map
// The notifier tree of the Gpusvm is guarded by the driver lock. The range tree of a notifier
// changes under the driver lock and the notifier lock held for write, so either lock alone
// gives a stable tree. The garbage-collector list is guarded by the notifier lock. Nothing
// allocates or sleeps under the notifier lock: tree nodes, address arrays and pfn arrays are
// allocated before it is taken and freed after it is dropped.
//
// Design notes / non-goals:
//  - No range splitting (as drm_gpusvm). A partial munmap marks the range partial_unmap; the
//    driver evicts what is left in device memory and removes it.
//  - The helper knows no GPU page-table format and no placement policy.
//  - Trees are ordered maps keyed by start (ranges in one notifier never overlap, nor do
//    notifiers), so a lookup is O(log n).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gpusvm/base/function_ref.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/types.h"
#include "gpusvm/svm/device.h"
#include "gpusvm/svm/pagemap.h"
#include "gpusvm/svm/pages.h"

namespace gpusvm::mm {
class AddressSpace;
class PhysMem;
}

namespace gpusvm::svm {

class Gpusvm;
class Notifier;
class Range;

inline constexpr uint64_t kDefaultNotifierSize = 512ULL << 20;
inline constexpr uint64_t kDefaultCheckPagesThreshold = 64ULL << 10;
// Budget of one get_pages / range_evict / check_pages against -EBUSY collisions.
inline constexpr unsigned kHmmRangeDefaultTimeoutMs = 1000;

// Per-call context (drm_gpusvm_ctx).
struct Ctx {
  // Device-private pages of this owner are mapped in place; others are faulted to RAM.
  const void* device_private_page_owner = nullptr;
  // At or below this chunk size, a new range covers only pages the CPU has faulted in.
  uint64_t check_pages_threshold = kDefaultCheckPagesThreshold;
  unsigned timeslice_ms = 0;
  bool read_only = false;       // fault without write; the mapping is read-only
  bool devmem_possible = false; // the driver may migrate this range to device memory
  bool devmem_only = false;     // get_pages fails with -EFAULT on system pages
  bool allow_mixed = false;     // accept system and device pages in one Pages object
  bool in_notifier = false;     // unmap_pages: called from invalidate (write lock held)
  bool no_dma_map = false;      // get_pages: fault only, map nothing (pages stay invalid)
  // Called under the notifier lock (read) once per contiguous run of device pages of one
  // device allocation (same zone_device_data) that get_pages maps: (pagemap, first page,
  // number of pages). Must not sleep or allocate and must be safe to repeat (an LRU bump).
  std::function<void(Pagemap*, mm::Folio*, uint64_t)> devmem_fn;
};

// Driver ops. invalidate is required; the rest default to plain new/delete.
class GpusvmOps {
 public:
  virtual ~GpusvmOps() = default;
  // Required. Called with the notifier lock held for write and the notifier's sequence
  // already bumped, from the thread changing the CPU page tables (mmap lock or rmap walk
  // lock held). Must zap the device PTEs of every range of `notifier` intersecting
  // [range.start, range.end), flush the device TLB and unmap_pages them (ctx.in_notifier)
  // before returning. Must not sleep on device work it has not already reserved, nor
  // allocate.
  virtual void invalidate(Gpusvm* gpusvm, Notifier* notifier, const mm::MmuNotifierRange& range) = 0;
  // Optional. A driver embedding Range/Notifier in its own type returns one of those; nullptr
  // is -ENOMEM. Called with the driver lock held and no notifier lock; may sleep.
  virtual Range* range_alloc(Gpusvm* gpusvm);
  virtual void range_free(Range* range);
  virtual Notifier* notifier_alloc(Gpusvm* gpusvm);
  virtual void notifier_free(Notifier* notifier);
};

// One notifier-size window (drm_gpusvm_notifier). Owned by its Gpusvm.
class Notifier : public mm::MmuIntervalNotifierOps {
 public:
  Notifier() = default;
  ~Notifier() override = default;

  Gpusvm* gpusvm() const { return gpusvm_; }
  mm::Va start() const { return start_; }
  mm::Va end() const { return end_; }
  mm::MmuIntervalNotifier* interval() { return &notifier_; }
  // Ranges of this notifier; read with the driver lock or the notifier lock held.
  const std::map<mm::Va, Range*>& ranges() const { return ranges_; }

  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                  uint64_t cur_seq) override;

 private:
  friend class Gpusvm;
  Gpusvm* gpusvm_ = nullptr;  // const after insert
  mm::Va start_ = 0, end_ = 0;  // const after insert
  mm::MmuIntervalNotifier notifier_;
  std::map<mm::Va, Range*> ranges_;  // driver lock + notifier lock (write) to change
};

// Per-range statistics (counters, read without locks).
struct RangeStats {
  StatCounter get_pages;        // get_pages calls that mapped this range's pages
  StatCounter get_pages_retries;  // hmm -EBUSY and read_retry restarts
  StatCounter invalidations;    // invalidate callbacks that covered it
  StatCounter evictions;        // range_evict calls
};

// A fault-sized range (drm_gpusvm_range). Refcounted: range_find_or_insert's result carries a
// reference for the caller (range_put), the notifier's tree holds one until range_remove.
class Range {
 public:
  Range() = default;
  virtual ~Range();

  // The owning Gpusvm and notifier while the range is in the tree; nullptr once it was
  // removed (range_remove, the garbage collector, fini): a detached range the driver still
  // holds a reference to outlives both, so it must not point at them.
  Gpusvm* gpusvm() const { return gpusvm_.load(std::memory_order_acquire); }
  Notifier* notifier() const { return notifier_.load(std::memory_order_acquire); }
  mm::Va start() const { return start_; }
  mm::Va end() const { return end_; }
  uint64_t size() const { return end_ - start_; }
  uint64_t npages() const { return size() >> mm::kPageShift; }
  // The Pages object of device i of the Gpusvm (i < gpusvm->devices().size()).
  Pages& pages(size_t i = 0) { return *pages_[i]; }
  size_t nr_pages_objects() const { return pages_.size(); }
  // Unmapped by an UNMAP event and queued to the garbage collector (flags of pages(0) mirror
  // it for every Pages object).
  bool unmapped() const { return pages_[0]->unmapped(); }
  bool partial_unmap() const { return pages_[0]->partial_unmap(); }
  // In the trees (range_remove not yet called).
  bool inserted() const { return inserted_.load(std::memory_order_acquire); }
  RangeStats& stats() { return stats_; }

  void get() { refcount_.fetch_add(1, std::memory_order_relaxed); }
  // Drops a reference; the last one frees the range (ops.range_free). Never under the
  // notifier lock.
  void put();
  // Metadata bytes: the range object, its Pages objects and their address arrays.
  uint64_t metadata_bytes() const;

 private:
  friend class Gpusvm;
  std::atomic<Gpusvm*> gpusvm_{nullptr};  // set at creation, cleared at removal
  GpusvmOps* ops_ = nullptr;     // const after creation (range_free after fini)
  std::atomic<Notifier*> notifier_{nullptr};  // set at creation, cleared at removal
  mm::Va start_ = 0, end_ = 0;
  std::vector<std::unique_ptr<Pages>> pages_;  // one per device, const after creation
  // acq_rel on the final decrement: the freeing thread sees every write of earlier holders.
  std::atomic<long> refcount_{1};
  std::atomic<bool> inserted_{false};
  Range* gc_next_ = nullptr;  // notifier lock
  bool gc_queued_ = false;    // notifier lock
  RangeStats stats_;
};

// A reference on a range (range_get on copy, range_put on destruction).
class RangeRef {
 public:
  RangeRef() = default;
  explicit RangeRef(Range* r) : r_(r) {}  // adopts a reference
  RangeRef(const RangeRef& o) : r_(o.r_) { if (r_) r_->get(); }
  RangeRef(RangeRef&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
  RangeRef& operator=(RangeRef o) { std::swap(r_, o.r_); return *this; }
  ~RangeRef() { if (r_) r_->put(); }
  Range* get() const { return r_; }
  Range* operator->() const { return r_; }
  explicit operator bool() const { return r_ != nullptr; }
  void reset() { RangeRef().swap(*this); }
  void swap(RangeRef& o) { std::swap(r_, o.r_); }

 private:
  Range* r_ = nullptr;
};

// scan_mm results (drm_gpusvm_scan_result).
enum class ScanResult : uint8_t {
  kUnpopulated,   // nothing is there
  kEqual,         // every present page is a device page of the given pagemap
  kOther,         // every present page is a device page of one other pagemap of the owner
  kSystem,        // every present page is a system page
  kMixedDevice,   // device pages only, of several pagemaps
  kMixed,         // system and device pages
};
const char* scan_result_name(ScanResult r);

struct GpusvmConfig {
  std::string name;
  // Null: pages-only mode (no ranges or notifiers; get_pages with the caller's notifier).
  mm::AddressSpace* as = nullptr;
  mm::Va mm_start = 0;
  uint64_t mm_range = 0;
  uint64_t notifier_size = kDefaultNotifierSize;
  GpusvmOps* ops = nullptr;
  // Descending powers of two ending in 4 KiB. Empty: 2 MiB, 64 KiB, 4 KiB.
  std::vector<uint64_t> chunk_sizes;
  // One Pages object per device in every range (at least one).
  std::vector<Device*> devices;
  // The driver's range lock (drm_gpusvm_driver_set_lock): any gpusvm lock (Mutex, RwLock),
  // asserted held by the calls documented so. Null: not checked.
  const void* driver_lock = nullptr;
  // The device-private owner of this VM's own migrations: a MIGRATE invalidation tagged with
  // it skips the driver's invalidate when no Pages of the ranges it covers is mapped (the
  // migrating driver zapped and unmapped first), yet still bumps the sequence, so a get_pages
  // in flight retries. A mapped range still gets the driver's invalidate: the same owner tags
  // a CPU fault's migrate_to_ram of our pages. Null: every MIGRATE event is passed on.
  const void* migrate_owner = nullptr;
};

class Gpusvm {
 public:
  // drm_gpusvm_init. Errors: -EINVAL (no ops or invalidate-less use with an address space,
  // empty or overflowing window, notifier size not a power of two or smaller than the
  // largest chunk, chunk sizes not descending powers of two ending in 4 KiB, no device),
  // -ENOMEM.
  static Result<std::unique_ptr<Gpusvm>> init(GpusvmConfig config);
  // drm_gpusvm_fini: unregisters every notifier first (no callback runs after), then removes
  // every range (unmapping what is still mapped); ranges the driver still holds references
  // to stay allocated until their last put, detached. Driver lock not held.
  ~Gpusvm();
  Gpusvm(const Gpusvm&) = delete;
  Gpusvm& operator=(const Gpusvm&) = delete;

  const std::string& name() const { return cfg_.name; }
  mm::AddressSpace* as() const { return cfg_.as; }
  mm::Va mm_start() const { return cfg_.mm_start; }
  mm::Va mm_end() const { return cfg_.mm_start + cfg_.mm_range; }
  uint64_t notifier_size() const { return cfg_.notifier_size; }
  const std::vector<uint64_t>& chunk_sizes() const { return cfg_.chunk_sizes; }
  const std::vector<Device*>& devices() const { return cfg_.devices; }
  GpusvmOps* ops() const { return cfg_.ops; }

  // The notifier lock (drm_gpusvm_notifier_lock/unlock): read it around the commit.
  RwLock& notifier_lock() GPUSVM_RETURN_CAPABILITY(notifier_lock_) { return notifier_lock_; }
  // Panics unless the driver lock (if set) is held by this thread.
  void assert_driver_lock_held(const char* where) const;
  // The tree-walk rule of for_each_range: the driver lock or the notifier lock (any mode).
  void assert_tree_lock_held(const char* where) const;

  // drm_gpusvm_range_find_or_insert. Driver lock held (asserted); takes the mmap lock.
  // Returns a reference to the range covering fault_addr, existing or new: the largest chunk
  // aligned around fault_addr inside the CPU VMA, the notifier window, [gpuva_start,
  // gpuva_end) and the mirrored window, overlapping no range, and (at or below
  // ctx.check_pages_threshold) covering only pages the CPU has present. Errors:
  //   -EINVAL  fault_addr outside the window, or no chunk fits
  //   -EFAULT  the address space exited
  //   -ENOENT  no VMA at fault_addr
  //   -EPERM   !ctx.read_only and the VMA is not writable
  //   -EIO     a VM_IO / VM_PFNMAP VMA
  //   -ENOMEM  allocation failed (nothing was inserted)
  Result<RangeRef> range_find_or_insert(mm::Va fault_addr, mm::Va gpuva_start, mm::Va gpuva_end,
                                        const Ctx& ctx);
  // drm_gpusvm_range_remove: takes the range out of its notifier (and frees the notifier when
  // it was the last). The driver has zapped its PTEs; DMA mappings still there are unmapped
  // here. Driver lock held (asserted). A no-op on a removed range.
  void range_remove(Range* range);

  // get_pages of every Pages object of `range` (devices()), with the range's notifier.
  // Driver lock held (asserted). -ENOENT for a removed range. See get_pages below.
  [[nodiscard]] int range_get_pages(Range* range, const Ctx& ctx);
  // drm_gpusvm_get_pages: for [start, end) of `as` under `notifier`: read_begin, one
  // hmm_range_fault (REQ_FAULT, REQ_WRITE unless ctx.read_only; device pages of
  // ctx.device_private_page_owner in place), retried on -EBUSY within 1 s, then under the
  // notifier lock (read) and read_retry, maps into every Pages object of `pages` that is not
  // valid: system pages through its Device, device pages through their pagemap's
  // device_map, and publishes the sequence and flags. The caller serializes calls on one
  // Pages object. Returns 0 or:
  //   -EBUSY   collisions for the whole budget (retry the fault later)
  //   -EFAULT  a page cannot be faulted (PROT_NONE, no VMA, ...), the pages were unmapped
  //            by an UNMAP event, the address space exited, devmem_only found system
  //            pages, or a mapping failed (nothing stays mapped)
  //   -EPERM   write fault on a read-only VMA
  //   -EOPNOTSUPP  system and device pages (or two pagemaps) without allow_mixed: evict
  //            and retry
  //   -ENOMEM  pfn or address array allocation failed
  //   -EINVAL  bad arguments
  [[nodiscard]] int get_pages(Pages* const* pages, size_t n, mm::AddressSpace* as,
                              mm::MmuIntervalNotifier* notifier, mm::Va start, mm::Va end,
                              const Ctx& ctx);
  // drm_gpusvm_pages_valid: the driver's last check before it commits GPU PTEs.
  bool pages_valid(const Pages& pages) const GPUSVM_REQUIRES_SHARED(notifier_lock_);
  // A lockless hint (drm_gpusvm_range_pages_valid_unlocked).
  static bool pages_valid_unlocked(const Pages& pages) { return pages.has_dma_mapping(); }
  // drm_gpusvm_unmap_pages: drops the mappings of `pages`. ctx.in_notifier: from invalidate,
  // the write lock is held (asserted); else it takes the write lock itself.
  void unmap_pages(Pages* pages, const Ctx& ctx);
  void range_unmap_pages(Range* range, const Ctx& ctx);
  // drm_gpusvm_free_pages: unmaps and frees the address array. Notifier lock not held.
  void free_pages(Pages* pages);

  // drm_gpusvm_range_evict: faults the whole range with no device-private owner, so every
  // device page (of any owner) is migrated back to system memory. 0, -ETIME when collisions
  // lasted the whole budget, -ENOENT for a removed range, or hmm_range_fault's error. No
  // lock held (it takes the mmap lock); the driver lock may be held, and must be where the
  // range could be removed concurrently (its notifier goes with its last range).
  [[nodiscard]] int range_evict(Range* range);
  // drm_gpusvm_scan_mm: a non-faulting snapshot of where the pages of `range` are.
  // `owner`: device pages of that owner are seen (others look unpopulated); a removed range
  // is kUnpopulated. No lock held (the driver lock, as for range_evict, against removal).
  ScanResult scan_mm(Range* range, const void* owner, const Pagemap* pagemap);

  // Lookups. Driver lock held (asserted).
  // The range intersecting [start, end) with the lowest start in `notifier`, or nullptr.
  Range* range_find(Notifier* notifier, mm::Va start, mm::Va end) const;
  // The notifier intersecting [start, end) with the lowest start, or nullptr.
  Notifier* notifier_find(mm::Va start, mm::Va end) const;
  // drm_gpusvm_has_mapping: whether any range intersects [start, end).
  bool has_mapping(mm::Va start, mm::Va end) const;
  // Calls fn for every range intersecting [start, end), in address order (fn must not
  // insert or remove ranges; collect them to do so). Either lock keeps both trees stable
  // (they change only with the driver lock and the notifier lock held for write): the
  // driver lock, or the notifier lock in either mode - the invalidate callback walks the
  // ranges of its event this way. Panics with neither held. `fn` is a FunctionRef, not a
  // std::function: a walk under the notifier lock must not allocate, and a std::function
  // copies a capture larger than its small buffer onto the heap.
  void for_each_range(mm::Va start, mm::Va end, FunctionRef<void(Range*)> fn) const;
  // drm_gpusvm_for_each_range: the ranges of one notifier intersecting [start, end), with
  // the same locking rule.
  void for_each_range(const Notifier* notifier, mm::Va start, mm::Va end,
                      FunctionRef<void(Range*)> fn) const;
  // drm_gpusvm_find_vma_start: start of the first VMA intersecting [start, end), or
  // ~0 when none. Takes the mmap lock.
  mm::Va find_vma_start(mm::Va start, mm::Va end) const;

  // The garbage collector: removes every range an UNMAP event queued. For each it calls
  // `fn(range)` (driver lock held, no notifier lock: the driver zaps its PTEs and evicts the
  // device memory left after a partial unmap), then range_remove. Returns how many it
  // removed. Driver lock held (asserted). Call before each fault.
  size_t garbage_collector(const std::function<void(Range*)>& fn);

  // One planned entry of an address array: 2^order pages from pfn, at page `index`.
  struct PlanEntry {
    mm::Pfn pfn;
    uint64_t index;
    unsigned order;
  };

  // Whole-Gpusvm statistics.
  uint64_t nr_ranges() const { return nr_ranges_.load(std::memory_order_relaxed); }
  uint64_t nr_notifiers() const { return nr_notifiers_.load(std::memory_order_relaxed); }
  // Owner-tagged MIGRATE invalidations of this VM's own migrations that needed no driver
  // invalidate (see GpusvmConfig::migrate_owner).
  uint64_t skipped_invalidations() const { return skipped_invalidations_.get(); }

 private:
  explicit Gpusvm(GpusvmConfig config) : cfg_(std::move(config)) {}
  friend class Notifier;

  void notifier_invalidate(Notifier* notifier, mm::MmuIntervalNotifier* n,
                           const mm::MmuNotifierRange& range, uint64_t cur_seq);
  Result<Notifier*> notifier_create(mm::Va fault_addr);
  void notifier_destroy(Notifier* notifier);
  Result<Range*> range_create(Notifier* notifier, mm::Va start, mm::Va end);
  // Chunk choice (drm_gpusvm_range_chunk_size); 0 when nothing fits. mmap lock held.
  uint64_t range_chunk_size(Notifier* notifier, const mm::Vma& vma, mm::Va fault_addr,
                            mm::Va gpuva_start, mm::Va gpuva_end, const Ctx& ctx)
      GPUSVM_NO_THREAD_SAFETY_ANALYSIS;
  // Every page of [start, end) present for the CPU (snapshot walk). mmap lock held.
  bool check_pages(Notifier* notifier, mm::Va start, mm::Va end, const void* owner);
  // Drops the mappings of `pages` (keeps its array allocated: nothing is freed under the
  // lock). Write lock held, or the read lock in get_pages (which the caller serializes).
  void unmap_pages_locked(Pages* pages) GPUSVM_REQUIRES_SHARED(notifier_lock_);
  void range_remove_internal(Range* range);
  // get_pages' publish step: placement checks, then maps every invalid Pages object with the
  // arrays allocated before the lock (swapped: *arrays gets the replaced ones back).
  [[nodiscard]] int map_locked(Pages* const* pages, size_t n, mm::PhysMem* mem,
                               const std::vector<PlanEntry>& plan,
                               std::vector<std::unique_ptr<PagemapAddr[]>>* arrays, uint64_t seq,
                               DmaDirection dir, const Ctx& ctx)
      GPUSVM_REQUIRES_SHARED(notifier_lock_);
  void rollback_published(Pages* const* pages, size_t count,
                          std::vector<std::unique_ptr<PagemapAddr[]>>* arrays)
      GPUSVM_REQUIRES_SHARED(notifier_lock_);
  void call_devmem_fn(mm::PhysMem* mem, const std::vector<PlanEntry>& plan, Pagemap* pagemap,
                      const Ctx& ctx) GPUSVM_REQUIRES_SHARED(notifier_lock_);
  static void unmap_entries(Device* dev, Pagemap* pagemap, const PagemapAddr* a, size_t count);
  [[nodiscard]] int get_pages_impl(Pages* const* pages, size_t n, mm::AddressSpace* as,
                                   mm::MmuIntervalNotifier* notifier, mm::Va start, mm::Va end,
                                   const Ctx& ctx, Range* range);

  const GpusvmConfig cfg_;  // const after init
  // Notifier lock: see the file comment (rank kGpusvmNotifierLockClass).
  mutable RwLock notifier_lock_{&kGpusvmNotifierLockClass};
  // Notifiers by start; changed with the driver lock and the notifier lock (write), so
  // either lock is enough to walk it (for_each_range). The map nodes are made and freed
  // outside the notifier lock (node handles), as nothing under it allocates.
  std::map<mm::Va, Notifier*> notifiers_;
  // UNMAP-queued ranges, each holding a reference; notifier lock (write to change).
  Range* gc_head_ GPUSVM_GUARDED_BY(notifier_lock_) = nullptr;
  std::atomic<uint64_t> nr_ranges_{0};
  std::atomic<uint64_t> nr_notifiers_{0};
  StatCounter skipped_invalidations_;
};

}  // namespace gpusvm::svm
