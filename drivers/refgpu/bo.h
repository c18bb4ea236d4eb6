// Bo: a buffer object as GEM gives it (Xe's xe_bo over TTM, reduced to the model): a size,
// allowed placements, a current backing in VRAM (buddy blocks of one region) or in system
// memory (a shmem object's folios), a fake mmap offset for the CPU mapping, and the list of
// GPU bindings to tell when the backing moves.
//
// Design notes:
//  - System backing is an mm::ShmemObject of the BO's size, created with the BO and kept for
//    its life: a CPU mapping is a MAP_SHARED mapping of it in an mm::AddressSpace (what an
//    mmap of the DRM file at mmap_offset() gives), so the CPU and a system-placed BO see the
//    same folios. Its pages are allocated on first touch (CPU fault, pwrite, or get_backing).
//    Pages handed out (get_backing, moves) are DMA-pinned by the BO (folio_pin) until it is
//    destroyed, so reclaim never takes a page a GPU PTE points at; while the BO is in VRAM
//    they stay allocated as the copy it is evicted into.
//  - VRAM backing is buddy blocks allocated through VramPagemap::alloc_vram (so a VRAM BO can
//    evict svm allocations and other BOs, and be evicted). The model has no CPU-visible VRAM
//    BAR: cpu_map() of a BO in VRAM first moves it to system memory (TTM moves a BO to a
//    mappable placement on a CPU fault the same way) and a CPU-mapped BO stays in system
//    memory from then on (move_to_vram: -EBUSY), so a CPU mapping never goes stale.
//  - Moves (eviction to system memory, move_to_vram) tell every BoBindingObserver first, with
//    the BO lock held (Xe's xe_bo_move_notify invalidating VMAs under the BO's reservation),
//    then copy through the copy engine, then free the old VRAM blocks. An observer zaps its
//    GPU PTEs over the BO and re-queries the backing when it binds again.
//  - Eviction under VRAM pressure: a VRAM BO is a VramLruEntry on its region's LRU. The
//    evictor only try-locks the BO (-EBUSY: skipped), so a fault that is binding the BO (and
//    holds its lock) is never waited for.
//  - Refcounted: BoRef is a handle; the creator's reference is the GEM handle's. The last
//    reference frees the VRAM blocks and the shmem object.
//
// Locking: one Mutex per BO (kBoLockClass, 60: after a VM's outer lock, before the mmap lock).
// Held across moves (folio locks, shmem lock, copy engine pool inside) and observer calls.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/thread_annotations.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/shmem.h"
#include "gpusvm/mm/types.h"
#include "drivers/refgpu/buddy.h"
#include "drivers/refgpu/vram_lru.h"

namespace gpusvm::mm {
class AddressSpace;
}

namespace gpusvm::refgpu {

class Bo;
class VramPagemap;

// Placement bits (as DRM_XE_GEM_CREATE's placement mask: a set of memory regions).
inline constexpr uint32_t kBoPlacementSystem = 1u << 0;
inline constexpr uint32_t kBoPlacementVram = 1u << 1;
inline constexpr uint32_t kBoPlacementMask = kBoPlacementSystem | kBoPlacementVram;
// Creation flags. kBoFlagVramContiguous: one contiguous VRAM run (as XE_BO_FLAG_CONTIG).
inline constexpr uint32_t kBoFlagVramContiguous = 1u << 0;
inline constexpr uint32_t kBoFlagMask = kBoFlagVramContiguous;
// Largest BO (a sanity bound of the model).
inline constexpr uint64_t kBoMaxSize = 1ULL << 36;

// Where the BO's bytes are now.
enum class BoBacking : uint8_t { kSystem, kVram };

// One page of the backing, as a binder writes it into a GPU PTE.
struct BoPageAddr {
  BoBacking where = BoBacking::kSystem;
  // kVram: the VRAM offset in the BO's region; kSystem: the system page's DMA address
  // (pfn << 12: the model has no IOMMU).
  uint64_t addr = 0;
};

// Told when a BO's backing moves. The VM that maps the BO at a GPU VA implements it.
class BoBindingObserver {
 public:
  virtual ~BoBindingObserver() = default;
  // The backing of `bo` is about to move: zap every GPU PTE mapping it and invalidate the TLB
  // before returning (the old VRAM blocks are overwritten or freed right after). Called with
  // the BO lock held (never with another refgpu lock); may sleep; must not call into the BO
  // and must not take a lock ranked at or below kBoLockClass (a VM's outer lock): the
  // page-table and TLB locks only. The next bind re-queries with get_backing.
  virtual void bo_move_notify(Bo* bo) = 0;
};

struct BoCreateInfo {
  mm::PhysMem* mem = nullptr;
  // The VRAM region's pagemap; required when placement has kBoPlacementVram.
  VramPagemap* vram = nullptr;
  uint64_t size = 0;  // a non-zero multiple of 4 KiB, at most kBoMaxSize
  uint32_t placement = 0;  // non-empty subset of kBoPlacementMask; the lowest-numbered
                           // preferred: VRAM when allowed, else system
  uint32_t flags = 0;      // subset of kBoFlagMask; kBoFlagVramContiguous needs VRAM
  std::string name = "bo";
};

class BoRef;

struct BoStats {
  StatCounter evictions;       // VRAM -> system by the LRU or evict()
  StatCounter moves_to_vram;   // system -> VRAM by move_to_vram()
  StatCounter move_notifies;   // observer calls
  StatCounter bytes_moved;
};

class Bo final : public VramLruEntry {
 public:
  // Creates a BO in VRAM when the placement allows it (allocating with eviction), else in
  // system memory. Errors: -EINVAL (bad size, placement, flags, missing mem/vram), -ENOMEM,
  // -ENOSPC (no VRAM even after eviction: for a VRAM-only BO; a BO that may live in system
  // memory falls back there). Context: no lock held; may sleep.
  static Result<BoRef> create(const BoCreateInfo& info);

  uint64_t size() const { return size_; }
  uint64_t npages() const { return size_ >> mm::kPageShift; }
  uint32_t placement() const { return placement_; }
  uint32_t flags() const { return flags_; }
  const std::string& name() const { return name_; }
  VramPagemap* vram() const { return vram_; }
  // The fake offset a CPU mmap of the DRM file uses for this BO (unique, page aligned, as
  // drm_vma_node_offset_addr).
  uint64_t mmap_offset() const { return mmap_offset_; }
  BoBacking backing() const GPUSVM_EXCLUDES(lock_);
  bool cpu_mapped() const { return cpu_mapped_.load(std::memory_order_acquire); }
  const BoStats& stats() const { return stats_; }

  // Maps the whole BO MAP_SHARED into `as` (mmap of the DRM file at mmap_offset()): moves it
  // to system memory first if in VRAM (-EINVAL for a VRAM-only BO: no CPU-visible VRAM in
  // the model). prot: PROT_READ and/or PROT_WRITE. Returns the address, or the move's or
  // mmap's error. Context: no lock held (takes the BO lock, then the mmap lock); may sleep.
  Result<mm::Va> cpu_map(mm::AddressSpace* as, mm::Va hint, int prot) GPUSVM_EXCLUDES(lock_);
  // cpu_map's first half, for a driver whose mmap hook runs under the mmap lock (where the
  // BO lock cannot be taken): moves the BO to system memory and keeps it there from then on.
  // 0; -EINVAL for a BO without a system placement; the move's error. Context: no lock held.
  int prepare_cpu_map() GPUSVM_EXCLUDES(lock_);
  // The shmem object a CPU mapping maps (set at creation, then const). Only a BO for which
  // prepare_cpu_map() succeeded may be mapped through it.
  const std::shared_ptr<mm::ShmemObject>& shmem() const { return shmem_; }

  // Moves a VRAM BO to system memory (TTM eviction; also a VRAM-only BO, which move_to_vram
  // brings back): observers told, bytes copied, blocks freed. 0 also when already in system
  // memory; -ENOMEM; the copy's error (the BO then stays in VRAM, unchanged). Context: no
  // lock held; may sleep.
  int move_to_system() GPUSVM_EXCLUDES(lock_);
  // Moves a system BO into VRAM (validate with a VRAM placement): allocates with eviction,
  // copies, tells observers. 0 also when already there; -EINVAL when VRAM is not an allowed
  // placement; -EBUSY when CPU-mapped; alloc_vram's or the copy's error (nothing changes).
  int move_to_vram() GPUSVM_EXCLUDES(lock_);

  // The backing of pages [first, first + n) into out[0, n), allocating system pages that were
  // never touched, and registers `observer` (if not null, once) to be told of the next moves,
  // atomically with the query (under the BO lock), so no move can fall between the two.
  // Errors: -EINVAL (range outside the BO), -ENOMEM. Context: no lock held; may sleep.
  int get_backing(uint64_t first, uint64_t n, BoPageAddr* out, BoBindingObserver* observer)
      GPUSVM_EXCLUDES(lock_);
  // Unregisters `observer`; once it returns no notification to it is running or will come.
  void remove_observer(BoBindingObserver* observer) GPUSVM_EXCLUDES(lock_);

  // CPU-side access to the BO's bytes wherever they are (tests, the ioctl layer's pread-like
  // paths). Errors: -EINVAL (range), -ENOMEM.
  int read(uint64_t off, void* buf, uint64_t len) GPUSVM_EXCLUDES(lock_);
  int write(uint64_t off, const void* buf, uint64_t len) GPUSVM_EXCLUDES(lock_);

  // VramLruEntry: move_to_system with a try-lock (-EBUSY when the BO lock is held).
  int evict() override;

 private:
  friend class BoRef;
  explicit Bo(const BoCreateInfo& info);
  ~Bo() override;
  // VramLruEntry: the last reference went; unlinks, frees the backing, deletes.
  void destroy() override;
  int move_to_system_locked() GPUSVM_REQUIRES(lock_);
  void notify_locked() GPUSVM_REQUIRES(lock_);
  // The shmem folios of pages [first, first + n), allocated if absent, each with a reference
  // the caller drops. -ENOMEM.
  int system_pages_locked(uint64_t first, uint64_t n, std::vector<mm::Folio*>* out) GPUSVM_REQUIRES(lock_);
  // VRAM offset of page i of the backing.
  uint64_t vram_page_offset_locked(uint64_t i) const GPUSVM_REQUIRES(lock_);

  mm::PhysMem* const mem_;
  VramPagemap* const vram_;
  const uint64_t size_;
  const uint32_t placement_;
  const uint32_t flags_;
  const std::string name_;
  const uint64_t mmap_offset_;
  BoStats stats_;
  std::shared_ptr<mm::ShmemObject> shmem_;  // set at creation, then const
  std::atomic<bool> cpu_mapped_{false};
  mutable Mutex lock_{&kBoLockClass};
  BoBacking backing_ GPUSVM_GUARDED_BY(lock_) = BoBacking::kSystem;
  std::vector<BuddyBlock> blocks_ GPUSVM_GUARDED_BY(lock_);  // VRAM backing, in page order
  std::vector<BoBindingObserver*> observers_ GPUSVM_GUARDED_BY(lock_);
  // The system pages handed out (by get_backing or a move), one DMA pin each, so that they
  // stay where a GPU PTE points while the BO lives (TTM's tt pages); indexed by page.
  std::vector<mm::Folio*> pinned_ GPUSVM_GUARDED_BY(lock_);
};

// A counted handle on a Bo (the GEM handle's reference, or a binding's).
class BoRef {
 public:
  BoRef() = default;
  static BoRef adopt(Bo* bo) { return BoRef(bo); }
  BoRef(const BoRef& o) : bo_(o.bo_) {
    if (bo_) bo_->get();
  }
  BoRef(BoRef&& o) noexcept : bo_(o.bo_) { o.bo_ = nullptr; }
  BoRef& operator=(BoRef o) noexcept {
    std::swap(bo_, o.bo_);
    return *this;
  }
  ~BoRef() { reset(); }
  void reset();
  Bo* get() const { return bo_; }
  Bo* operator->() const { return bo_; }
  explicit operator bool() const { return bo_ != nullptr; }

 private:
  explicit BoRef(Bo* bo) : bo_(bo) {}
  Bo* bo_ = nullptr;
};

}  // namespace gpusvm::refgpu
