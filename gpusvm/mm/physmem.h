// Physical memory: frames of real bytes and the folio descriptors that describe them.
//
// Design notes
//  - One Folio descriptor per frame (Linux's struct page). A folio of order 0 or kPmdOrder is
//    described by its head frame's descriptor; a tail frame's descriptor holds only its own
//    mapcount and a link to the head. folio_of(pfn) returns the head.
//  - System RAM is an arena of host memory (mmap'd MAP_NORESERVE, so untouched frames cost
//    nothing). Migration and copies move real bytes.
//  - The pfn space is shared by system RAM ([0, ram_pages)) and device-private ranges that
//    drivers register (DevPagemap, gpusvm/mm/devmap.h) above it.
//  - The allocator keeps 2 MiB blocks whole when it can (free list of whole blocks) and splits
//    one into 4 KiB frames on demand; a block whose frames are all free again is whole again.
//  - The zero page and the huge zero folio are frames that are never freed; mapping them does
//    not take references (Linux does the same: they are "special").
//
// Reference counting (the contract mm::check verifies):
//   refcount == (PTE mappings of its pages) + (PMD mappings) + (page-cache reference, if in a
//               ShmemObject) + (swap-cache reference, if kFolioSwapCache)
//               + (transient pins held by code in progress)
//   page mapcount == PTE mappings of that page; entire_mapcount == PMD mappings.
//
// Locking: allocator state under zone_lock_; folio fields are atomics or guarded by the folio
// lock / rmap lock as noted per field.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <sys/types.h>
#include <utility>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class DevPagemap;
class PhysMem;
class ShmemObject;
class SwapArea;

// Folio flags (head descriptor).
enum FolioFlag : uint32_t {
  kFolioLocked = 1u << 0,         // the sleeping folio lock (folio_lock)
  kFolioDirty = 1u << 1,
  kFolioAnon = 1u << 2,           // anonymous (rmap list); else page cache or special
  kFolioYoung = 1u << 3,
  kFolioLazyfree = 1u << 4,       // MADV_FREE'd and clean: reclaim may drop it
  kFolioZero = 1u << 5,           // the zero page or the huge zero folio
  kFolioDevicePrivate = 1u << 6,  // device-private memory (never mapped present)
  kFolioFree = 1u << 7,           // on the allocator's free lists
  kFolioDeferredSplit = 1u << 8,  // partially unmapped large folio queued for split
  kFolioShmem = 1u << 9,          // in a ShmemObject's page cache
  kFolioHugetlb = 1u << 10,       // a 2 MiB page of the hugetlb pool (PMD-mapped only)
  kFolioDeviceCoherent = 1u << 11,  // device-coherent memory (mapped present, CPU-addressable)
  // Reclaim (vmscan.cc, swap.h). kFolioLru/kFolioActive change only under the LRU lock.
  kFolioLru = 1u << 12,         // on one of the LRU lists
  kFolioActive = 1u << 13,      // ... the active one
  kFolioReferenced = 1u << 14,  // PG_referenced: seen referenced by one inactive scan already
  kFolioSwapCache = 1u << 15,   // in the swap cache (swap_slot() valid); folio lock + swap lock
  kFolioIsolated = 1u << 16,    // taken off the LRU by reclaim, which puts it back (LRU lock)
};

// Per-page flags (every descriptor).
enum PageFlag : uint32_t {
  kPageAnonExclusive = 1u << 0,  // mapped by exactly one process, may be reused on write fault
};

// One reverse-map record: `mm` maps page `page` of this folio at `va` (a PTE mapping), or
// the whole folio at `va` (a PMD mapping). While the folio is being migrated, a mapping that
// was replaced by a migration entry keeps its record with `migration` set (it no longer
// counts in the mapcount): that is how remove_migration_ptes finds every entry to restore,
// in every address space, as the kernel finds them through the anon_vma.
struct RmapItem {
  AddressSpace* mm;
  Va va;
  uint32_t page;  // index within the folio; 0 for a PMD mapping
  bool pmd;
  bool migration = false;
};

class Folio {
 public:
  Folio() = default;
  Folio(const Folio&) = delete;
  Folio& operator=(const Folio&) = delete;

  Pfn pfn() const { return pfn_; }
  unsigned order() const { return order_.load(std::memory_order_acquire); }
  uint64_t nr_pages() const { return 1ULL << order(); }
  bool large() const { return order() > 0; }
  bool is_head() const { return head() == this; }
  // acquire: pairs with the release stores of allocation and split, which publish the new
  // folio's fields before a page points at it.
  Folio* head() const { return head_.load(std::memory_order_acquire); }
  // Descriptor of page i of this folio (i < nr_pages()). The descriptors of a pfn range live
  // in one array (PhysMem's or a DevPagemap's), so page i is simply the i-th after the head.
  Folio* page(uint64_t i) { return this + i; }
  uint64_t page_index() const { return pfn_ - head()->pfn_; }
  PhysMem* mem() const { return mem_; }
  DevPagemap* pagemap() const { return pagemap_; }

  // Reference count (head only). get() on a folio with refcount 0 is a bug.
  int refcount() const { return refcount_.load(std::memory_order_acquire); }
  void get(int n = 1);
  // Drops n references; frees the folio (to its zone or its pagemap) at zero.
  void put(int n = 1);
  // Takes a reference only if the refcount is not zero (folio_try_get).
  bool try_get();
  // FOLL_PIN pins held by get/pin_user_pages (gup.h), head only. Every pin is also one
  // reference (the kernel's pin bias, kept as a separate count here so mm::check can tell a
  // pin from a leak): refcount == mappings + page cache + pincount at a quiescent point.
  int pincount() const { return pincount_.load(std::memory_order_acquire); }
  bool maybe_dma_pinned() const { return pincount() > 0; }

  // Mapcounts. page_mapcount is per page, entire_mapcount on the head.
  int page_mapcount() const { return mapcount_.load(std::memory_order_acquire); }
  int entire_mapcount() const { return entire_mapcount_.load(std::memory_order_acquire); }
  // Total mappings of the folio: entire mappings plus every page's PTE mappings.
  int total_mapcount() const;
  bool mapped() const { return total_mapcount() > 0; }

  uint32_t flags() const { return flags_.load(std::memory_order_acquire); }
  bool test(FolioFlag f) const { return flags() & f; }
  void set(FolioFlag f) { flags_.fetch_or(f, std::memory_order_acq_rel); }
  void clear(FolioFlag f) { flags_.fetch_and(~static_cast<uint32_t>(f), std::memory_order_acq_rel); }
  bool test_page(PageFlag f) const { return page_flags_.load(std::memory_order_acquire) & f; }
  void set_page(PageFlag f) { page_flags_.fetch_or(f, std::memory_order_acq_rel); }
  void clear_page(PageFlag f) {
    page_flags_.fetch_and(~static_cast<uint32_t>(f), std::memory_order_acq_rel);
  }

  // Real bytes of page i (system RAM, or device memory whose pagemap provides storage).
  std::byte* data(uint64_t i = 0) const;

  // Page cache identity (kFolioShmem): the object and page offset. Stable while in the cache.
  ShmemObject* mapping() const { return mapping_; }
  uint64_t index() const { return index_; }

  // Driver data for device-private folios (zone_device_data).
  void* zone_device_data = nullptr;

  // The swap slot of a folio in the swap cache (kFolioSwapCache; the kernel's folio->swap).
  // Set and cleared under the swap lock with the folio locked: stable for a folio-lock holder.
  uint64_t swap_slot() const { return swap_slot_; }

 private:
  friend class SwapArea;
  friend class PhysMem;
  friend class DevPagemap;
  friend class ShmemObject;
  // Turns the frames [head, head + 2^order) into one folio with refcount 1 and `flags`
  // (allocation, for RAM and device frames alike). The frames must be free.
  static void init_frames(Folio* head, unsigned order, uint32_t flags);

  friend void page_add_rmap_pte(Folio*, AddressSpace*, Va);
  friend void page_remove_rmap_pte(Folio*, AddressSpace*, Va);
  friend void folio_add_rmap_pmd(Folio*, AddressSpace*, Va);
  friend void folio_remove_rmap_pmd(Folio*, AddressSpace*, Va);
  friend std::vector<RmapItem> folio_rmap_snapshot(Folio*);
  friend void folio_pin(Folio*);
  friend void folio_unpin(Folio*);
  friend void folio_lock(Folio*);
  friend bool folio_trylock(Folio*);
  friend void folio_unlock(Folio*);
  friend pid_t folio_lock_holder(const Folio*);
  friend int split_folio_exclusive(AddressSpace&, Folio*);
  friend int split_migrating_folio(Folio*, int);
  friend bool folio_mapped_only_by(Folio*, AddressSpace*);
  friend void folio_move_rmap(Folio*, const RmapItem&, AddressSpace*, Va);
  friend void page_rmap_pte_to_migration(Folio*, AddressSpace*, Va);
  friend void folio_rmap_pmd_to_migration(Folio*, AddressSpace*, Va);
  friend void folio_add_migration_item(Folio*, const RmapItem&);
  friend bool folio_remove_migration_item(Folio*, const RmapItem&);
  friend std::vector<RmapItem> folio_take_migration_items(Folio*);

  // Identity. head_ and order_ change at allocation, free and split; atomic because a fault
  // racing a split may look a page's folio up while it is being split (it then waits on the
  // folio lock, which the split holds on every new folio until it is done).
  std::atomic<Folio*> head_{this};
  PhysMem* mem_ = nullptr;
  DevPagemap* pagemap_ = nullptr;
  Pfn pfn_ = 0;
  std::atomic<uint8_t> order_{0};
  ShmemObject* mapping_ = nullptr;
  uint64_t index_ = 0;
  uint64_t swap_slot_ = 0;  // see swap_slot()
  // LRU list links (head only), guarded by PhysMem's LRU lock; meaningful with kFolioLru.
  Folio* lru_prev_ = nullptr;
  Folio* lru_next_ = nullptr;

  std::atomic<int32_t> refcount_{0};
  std::atomic<int32_t> mapcount_{0};         // PTE mappings of this page
  std::atomic<int32_t> entire_mapcount_{0};  // PMD mappings (head)
  std::atomic<int32_t> pincount_{0};         // FOLL_PIN pins (head), see pincount()
  std::atomic<uint32_t> flags_{0};           // FolioFlag (head)
  std::atomic<uint32_t> page_flags_{0};      // PageFlag (this page)
  // Diagnostics only: the tid that took the folio lock (0 when unlocked), for the message of
  // a wait that timed out. Written by the holder around the lock bit, read racily by waiters.
  std::atomic<pid_t> lock_holder_{0};

  // Reverse map (anonymous and device folios; head only).
  SpinLock rmap_lock_{&kRmapLockClass};
  std::vector<RmapItem> rmap_ GPUSVM_GUARDED_BY(rmap_lock_);
};

// ZONE_DEVICE kinds (flags set by the folio's DevPagemap, devmap.h). A device-private folio
// is reachable only through device-private entries; a device-coherent one is mapped by
// present entries like RAM, but is not system memory (no MADV_FREE, no collapse; a longterm
// pin moves it out first).
inline bool folio_is_zone_device(const Folio* folio) { return folio->pagemap() != nullptr; }
inline bool folio_is_device_private(const Folio* folio) { return folio->test(kFolioDevicePrivate); }
inline bool folio_is_device_coherent(const Folio* folio) { return folio->test(kFolioDeviceCoherent); }

// The sleeping folio lock. folio_lock sleeps (bounded by hang_timeout(), then panics naming
// the folio); must not be called with a page-table lock held (checked). A thread may hold many
// (a migration locks its whole range): blocking acquisitions go in pfn order, anything else
// uses folio_trylock and backs off. lockdep-lite counts them per thread, not per folio, so
// folio_assert_locked checks the lock bit.
void folio_lock(Folio* folio);
[[nodiscard]] bool folio_trylock(Folio* folio);
void folio_unlock(Folio* folio);
bool folio_test_locked(const Folio* folio);
void folio_assert_locked(const Folio* folio);
// Waits until the folio is unlocked (migration_entry_wait). Returns false on timeout; the
// caller must not ignore that (name the folio with folio_describe and fail or panic).
[[nodiscard]] bool folio_wait_unlocked(Folio* folio, std::chrono::nanoseconds timeout);
// The thread id that holds the folio lock, 0 when unlocked. A racy snapshot: diagnostics only.
pid_t folio_lock_holder(const Folio* folio);
// One line for diagnostics: "pfn 0x.. (order, refcount, mapcount, pins, flags, lock holder)".
// Racy reads of the folio's atomics: exact only at a quiescent point.
std::string folio_describe(const Folio* folio);

// Pin accounting for gup.h: folio_pin takes one reference and one pin on the head (the
// caller holds a reference or the page-table lock of a mapping, so the folio cannot be
// freed meanwhile); folio_unpin drops both (and frees the folio with its last reference).
void folio_pin(Folio* folio);
void folio_unpin(Folio* folio);

// Mapping accounting and reverse map (folio_add_anon_rmap_pte & co). The caller holds the
// page-table lock of the entry it installs or clears, and passes the mapping's folio
// reference separately (get before add, put after remove). Removing a PTE mapping from a
// large folio that stays partially mapped queues it for deferred split.
void page_add_rmap_pte(Folio* page, AddressSpace* mm, Va va);
void page_remove_rmap_pte(Folio* page, AddressSpace* mm, Va va);
void folio_add_rmap_pmd(Folio* folio, AddressSpace* mm, Va haddr);
void folio_remove_rmap_pmd(Folio* folio, AddressSpace* mm, Va haddr);
// True when every reference to the folio is a mapping in `mm` (no other process maps it, no
// pin): the kernel's "exclusively mapped by this MM" test for large folios.
bool folio_mapped_only_by(Folio* folio, AddressSpace* mm);
// Re-points a record at a new address space / address (mremap, fork child creation).
void folio_move_rmap(Folio* folio, const RmapItem& item, AddressSpace* mm, Va va);
std::vector<RmapItem> folio_rmap_snapshot(Folio* folio);

// Migration records (see RmapItem). The caller holds the folio lock (the migration owns the
// folio) and the page-table lock of the entry it changes.
// The PTE (PMD) mapping of page at (mm, va) became a migration entry: mapcount - 1, the record
// stays, marked.
void page_rmap_pte_to_migration(Folio* page, AddressSpace* mm, Va va);
void folio_rmap_pmd_to_migration(Folio* folio, AddressSpace* mm, Va haddr);
// fork copied a migration entry (item.migration must be set); mremap moves one with
// folio_move_rmap. Zapping one removes its record: false if there was none. These three also
// need the rmap walk lock (shared; split_migrating_folio moves records under it exclusive),
// asserted: the analysis cannot name it, callers reach it through mm.mem() or folio->mem().
void folio_add_migration_item(Folio* folio, const RmapItem& item);
bool folio_remove_migration_item(Folio* folio, const RmapItem& item);
// Removes and returns every migration record of the folio (remove_migration_ptes).
std::vector<RmapItem> folio_take_migration_items(Folio* folio);

class PhysMem {
 public:
  struct Config {
    uint64_t ram_bytes = 1ULL << 30;  // multiple of 2 MiB
    ThpMode thp = ThpMode::kMadvise;  // transparent_hugepage/enabled
    bool use_zero_page = true;        // transparent_hugepage/use_zero_page (huge zero folio)
    // vm.nr_hugepages: how many 2 MiB hugetlb pages MAP_HUGETLB may use at most (the
    // oracle machine has 16). Taken from RAM only when reserved or faulted (see below).
    uint64_t hugetlb_pages = 16;
    // Reclaim (vmscan.cc). swap_slots: pages the in-memory swap device holds (0: a machine
    // without swap; only lazily freed pages can then be reclaimed). memory_limit_pages: RAM
    // frames that may be in use at once (0: all of ram_bytes); an allocation past the limit
    // fails, or reclaims first where the caller may sleep (folio_alloc_reclaim).
    uint64_t swap_slots = 0;
    uint64_t memory_limit_pages = 0;
  };

  // Returns the arena, -EINVAL for a bad size, -ENOMEM if the host refuses the memory.
  static Result<std::unique_ptr<PhysMem>> create(const Config& config);
  ~PhysMem();
  PhysMem(const PhysMem&) = delete;
  PhysMem& operator=(const PhysMem&) = delete;

  // Allocates a folio of order 0 or kPmdOrder with refcount 1, zeroed when `zero`.
  // Returns nullptr when memory is exhausted or an injected failure fires ("mm.alloc_folio"
  // for order 0, "mm.alloc_folio_thp" for kPmdOrder). Never sleeps.
  Folio* folio_alloc(unsigned order, bool zero = true);
  // folio_alloc for a context that may sleep and reclaim (the GFP_KERNEL faults): when the
  // allocation fails for want of memory (not an injected failure), direct reclaim frees up to
  // 32 pages from the LRU (shrink_lru) and the allocation is retried, a bounded number of
  // times. Context: no spin lock held (asserted), no folio lock, not the rmap walk lock; the
  // mmap lock of the faulting address space may be held (read) - reclaim never takes an mmap
  // lock, it reaches other address spaces through the reverse map. nullptr: OOM.
  Folio* folio_alloc_reclaim(unsigned order, bool zero = true);

  Folio* pfn_to_page(Pfn pfn);   // descriptor of the frame (nullptr outside every range)
  Folio* folio_of(Pfn pfn);      // head descriptor of the folio holding the frame
  std::byte* ram_data(Pfn pfn) const { return base_ + (pfn << kPageShift); }

  Folio* zero_page() { return zero_page_; }
  Pfn zero_pfn() const { return zero_page_->pfn(); }
  Folio* huge_zero_folio() { return huge_zero_; }
  bool is_zero_pfn(Pfn pfn) const { return pfn == zero_page_->pfn(); }
  bool is_huge_zero_pfn(Pfn pfn) const {
    return pfn >= huge_zero_->pfn() && pfn < huge_zero_->pfn() + kPagesPerPmd;
  }

  const Config& config() const { return config_; }
  void set_thp_mode(ThpMode mode) { thp_mode_.store(mode, std::memory_order_relaxed); }
  ThpMode thp_mode() const { return thp_mode_.load(std::memory_order_relaxed); }
  void set_use_zero_page(bool on) { use_zero_page_.store(on, std::memory_order_relaxed); }
  bool use_zero_page() const { return use_zero_page_.load(std::memory_order_relaxed); }

  uint64_t ram_pages() const { return ram_pages_; }
  uint64_t free_pages() const;
  // RAM frames in use (allocated folios, hugetlb reservations), what memory_limit_pages bounds.
  uint64_t used_pages() const;

  // ---- reclaim (vmscan.cc; design in docs/reclaim.md) ----
  // The LRU: anonymous folios (small and THP, not zone-device, not hugetlb, not the zero
  // folios) join the inactive list when first mapped (page_add_rmap_pte /
  // folio_add_rmap_pmd) and leave it when freed; reclaim isolates them off it. Leaf lock.
  void lru_add(Folio* folio);      // no-op when ineligible or already on it
  void lru_del(Folio* folio);      // no-op when not on it
  void folio_deactivate(Folio* folio);  // MADV_COLD: to the inactive list, unreferenced
  struct LruCounts {
    uint64_t active = 0;
    uint64_t inactive = 0;
  };
  LruCounts lru_counts() const;
  // Reclaims up to nr pages from the LRU tails (shrink_inactive_list / shrink_active_list):
  // ages references through the reverse map, swaps anonymous pages out, discards lazily freed
  // clean ones. Returns the pages freed. Context as folio_alloc_reclaim. Every folio is only
  // trylocked; busy, pinned and large folios (THP reclaim from the LRU is not modelled: see
  // docs/reclaim.md) are skipped.
  uint64_t shrink_lru(uint64_t nr);
  // The swap device (slots, counts, swap cache). Exists with zero slots too.
  SwapArea& swap() { return *swap_; }

  // ---- hugetlb pool (mm/hugetlb.c's hstate for 2 MiB pages) ----
  // Decision: the pool is a limit of config().hugetlb_pages pages, not memory set aside at
  // create time (tests build machines of a few MiB). A page is taken from the allocator as a
  // whole 2 MiB block when a mapping reserves it (mmap) or when a fault needs one without a
  // reservation, and goes back to the allocator when it is freed or its reservation is
  // dropped. So, as with Linux's pool: in_use + reserved <= total, an mmap that cannot reserve
  // fails -ENOMEM up front, and a fault in a reserved slot cannot fail.
  // Reservations are per (address space, 2 MiB slot) - the resv_map of a private mapping: the
  // first fault of the slot consumes it, munmap/exit of an unfaulted slot releases it, a
  // fork child has none (its COW copies are allocated unreserved and may fail).
  // Locking: all pool state is under the zone lock (a leaf lock: callers may hold page-table
  // locks, none of this sleeps).
  struct HugetlbCounts {
    uint64_t total = 0;     // HugePages_Total (the limit)
    uint64_t free = 0;      // HugePages_Free: total - in_use (reserved pages count as free)
    uint64_t reserved = 0;  // HugePages_Rsvd: reserved, not yet faulted
    uint64_t in_use = 0;    // live hugetlb folios (mapped, or referenced in flight)
  };
  HugetlbCounts hugetlb_counts() const;
  // Reserves one page for every 2 MiB slot of [start, end) (2 MiB aligned) of `mm`.
  // Returns 0 or -ENOMEM (limit reached or no whole block left): nothing reserved then.
  [[nodiscard]] int hugetlb_reserve(AddressSpace* mm, Va start, Va end);
  // Drops the reservations of `mm` in [start, end) that no fault consumed.
  void hugetlb_unreserve(AddressSpace* mm, Va start, Va end);
  // A zeroed hugetlb folio (refcount 1, anon + hugetlb) for the slot at haddr of `mm`: the
  // slot's reservation if it has one (*reserved = true), else a new page within the limit.
  // nullptr when neither is possible (or "mm.alloc_hugetlb" fires for an unreserved page).
  Folio* hugetlb_alloc_folio(AddressSpace* mm, Va haddr, bool* reserved);
  // The reserved slots, for mm::check.
  std::vector<std::pair<AddressSpace*, Va>> hugetlb_reservations() const;

  // Device pagemaps: a pfn range above RAM for a driver's device-private frames, whose
  // descriptors are frames[0, nr_pages). Returns the first pfn, or -ENOSPC.
  Result<Pfn> register_pagemap(DevPagemap* pgmap, Folio* frames, uint64_t nr_pages);
  // The pagemap's frame descriptors stay allocated until the machine goes: a thread that
  // looked a device page up without a reference (a fault waiting for a migration to end,
  // wait_for_migration) may still read the descriptor while the driver removes its memory.
  // pfn_to_page resolves a device pfn to its descriptor under the registry lock and never
  // touches the DevPagemap object, which the driver frees right after this call (the
  // kernel's pfn_to_page is memmap arithmetic too; only the memmap's lifetime differs).
  void unregister_pagemap(DevPagemap* pgmap, std::unique_ptr<Folio[]> descriptors);
  // The pagemap registered for pfn, or nullptr. The pointer stays valid only while the
  // caller holds something that keeps one of its pages in use - a reference on the page, or
  // the page-table lock over an entry that maps it (page_pgmap() rules): a pagemap is
  // destroyed only once every page is free. Without that, use pfn_to_page.
  DevPagemap* pfn_to_pagemap(Pfn pfn);
  // The registered pagemaps, in pfn order (for the checker: at a quiescent point, when no
  // driver registers or removes memory).
  std::vector<DevPagemap*> pagemaps() const;

  // Every live address space of this machine (for the checker and the reverse map).
  void add_address_space(AddressSpace* mm);
  void remove_address_space(AddressSpace* mm);
  std::vector<AddressSpace*> address_spaces();

  // Deferred split queue: large folios that lost part of their mappings (the kernel splits
  // them under memory pressure). Freed folios leave the queue.
  void deferred_split_folio(Folio* folio);
  size_t deferred_split_count() const;

  // The reverse-map walk lock (the kernel's anon_vma lock, one for the machine). An rmap walk
  // that reaches into another address space's page tables without its mmap lock
  // (try_to_migrate, remove_migration_ptes) holds it shared; freeing a page table that is
  // still linked or an address space holds it exclusive, so a walker never follows a record
  // into freed memory; so does whatever moves records a walker may hold (mremap's moves of
  // entries, split_migrating_folio). Ranked after the folio lock, before page-table locks.
  RwLock& rmap_walk_lock() GPUSVM_RETURN_CAPABILITY(rmap_walk_lock_) { return rmap_walk_lock_; }

  StatCounter stat_alloc_order0, stat_alloc_thp, stat_alloc_fail, stat_free_pages;
  StatCounter stat_split_migrating;  // large folios split during a migration (seed 003)
  // Reclaim: pages written to swap, read back, dropped clean (a swap-cache page whose slot
  // still holds its bytes), lazily freed pages discarded, folios scanned / activated.
  StatCounter stat_pswpout, stat_pswpin, stat_reclaim_clean, stat_reclaim_lazyfree;
  StatCounter stat_reclaim_scanned, stat_reclaim_activate, stat_direct_reclaim;

 private:
  explicit PhysMem(const Config& config);
  friend class Folio;
  friend class DevPagemap;
  friend int split_folio_exclusive(AddressSpace&, Folio*);
  friend int split_migrating_folio(Folio*, int);
  void free_folio(Folio* folio);  // refcount reached zero
  Folio* alloc_frames(unsigned order, bool zero);  // folio_alloc without the injection point
  // The LRU (see lru_add). Intrusive doubly linked lists through Folio::lru_prev_/lru_next_.
  struct LruList {
    Folio* head = nullptr;  // most recently added
    Folio* tail = nullptr;  // oldest: reclaim scans from here
    uint64_t nr = 0;
  };
  void lru_link_locked(Folio* folio, bool active) GPUSVM_REQUIRES(lru_lock_);
  void lru_unlink_locked(Folio* folio) GPUSVM_REQUIRES(lru_lock_);
  std::vector<Folio*> lru_isolate(bool active, uint64_t nr);
 public:
  // folio_isolate_lru for a folio the caller references: false if another reclaimer has it
  // isolated; else it is off the lists and the caller's reference is the isolation's.
  bool lru_isolate_folio(Folio* folio);
  // Puts an isolated folio back (if still eligible: mapped anon) and drops the isolation's
  // reference.
  void lru_putback(Folio* folio, bool active);
 private:
  void shrink_active(uint64_t nr);
  mutable SpinLock lru_lock_{&kLruLockClass};
  LruList lru_[2] GPUSVM_GUARDED_BY(lru_lock_);  // [0] inactive, [1] active
  std::unique_ptr<SwapArea> swap_;
  void deferred_split_remove(Folio* folio);

  const Config config_;
  std::atomic<ThpMode> thp_mode_;
  std::atomic<bool> use_zero_page_;
  std::byte* base_ = nullptr;  // ram arena, ram_pages_ frames
  uint64_t ram_pages_ = 0;
  std::unique_ptr<Folio[]> frames_;  // one descriptor per RAM frame
  Folio* zero_page_ = nullptr;
  Folio* huge_zero_ = nullptr;

  // Allocator state (see file comment).
  struct Block {
    uint64_t free_bitmap[kPagesPerPmd / 64];  // bit set = frame free (split blocks only)
    uint16_t nr_free = 0;
    bool split = false;   // handed out as order-0 frames
    bool whole_free = false;
  };
  RwLock rmap_walk_lock_{&kRmapWalkLockClass};
  mutable SpinLock zone_lock_{&kZoneLockClass};
  // Takes a whole free block, set up to be handed out as single frames or as one THP.
  // Returns its index, or -1 when none is left.
  int64_t take_whole_block_locked(bool as_frames) GPUSVM_REQUIRES(zone_lock_);
  std::vector<Block> blocks_ GPUSVM_GUARDED_BY(zone_lock_);
  std::vector<uint64_t> whole_free_ GPUSVM_GUARDED_BY(zone_lock_);    // indices of whole free blocks
  std::vector<uint64_t> partial_ GPUSVM_GUARDED_BY(zone_lock_);       // split blocks with free frames
  uint64_t nr_free_ GPUSVM_GUARDED_BY(zone_lock_) = 0;
  // hugetlb pool (see hugetlb_counts). hugetlb_resv_blocks_ are whole blocks taken out of the
  // allocator for reservations: frames neither free nor in a folio (refcount 0), exactly one
  // per entry of hugetlb_resv_.
  std::set<std::pair<AddressSpace*, Va>> hugetlb_resv_ GPUSVM_GUARDED_BY(zone_lock_);
  std::vector<uint64_t> hugetlb_resv_blocks_ GPUSVM_GUARDED_BY(zone_lock_);
  uint64_t hugetlb_in_use_ GPUSVM_GUARDED_BY(zone_lock_) = 0;
  // Returns a block taken for the pool to the allocator. Zone lock held.
  void give_back_block_locked(uint64_t b) GPUSVM_REQUIRES(zone_lock_);

  // Pagemaps, address spaces and the deferred split queue. A leaf lock: may be taken under
  // page-table locks (a folio freed by a zap leaves the deferred split queue).
  mutable SpinLock registry_lock_{&kRegistryLockClass};
  struct PagemapRange {
    Pfn start;
    uint64_t nr;
    DevPagemap* pgmap;  // valid while registered (see pfn_to_pagemap)
    Folio* frames;      // its descriptors; outlive the pagemap (retired_descriptors_)
  };
  std::vector<PagemapRange> pagemaps_ GPUSVM_GUARDED_BY(registry_lock_);
  Pfn next_device_pfn_ GPUSVM_GUARDED_BY(registry_lock_) = 0;
  std::vector<AddressSpace*> spaces_ GPUSVM_GUARDED_BY(registry_lock_);
  std::vector<Folio*> deferred_split_ GPUSVM_GUARDED_BY(registry_lock_);
  std::vector<std::unique_ptr<Folio[]>> retired_descriptors_ GPUSVM_GUARDED_BY(registry_lock_);

  WaitQueue folio_waitqueues_[64];  // hashed by pfn (folio_waitqueue)
  friend void folio_unlock(Folio*);
  friend bool folio_wait_unlocked(Folio*, std::chrono::nanoseconds);
  friend void folio_lock(Folio*);
  WaitQueue& folio_waitqueue(const Folio* f) { return folio_waitqueues_[(f->pfn() >> 0) % 64]; }
};

}  // namespace gpusvm::mm
