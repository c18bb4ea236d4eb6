// VramPagemap: one VRAM region of the reference GPU registered as a device pagemap through
// gpusvm/svm's provider (Xe's xe_pagemap / xe_svm devmem ops), and the region's allocator
// with eviction (the part of Xe's VRAM manager and TTM eviction an SVM driver needs).
//
// Design notes:
//  - The region's frames are an mm::DevPagemap of device-private pages without host storage:
//    their bytes live in the region's VramArena, at offset (pfn - first_pfn) << 12. The
//    device-private owner is the one given at creation (an svm PagemapOwnerList group's
//    owner, so that two linked refgpu devices map each other's pages in place), or this
//    object.
//  - device_map gives the device itself the VRAM offset (kDeviceLocal: what a GPU PTE with a
//    VRAM target holds) and a linked peer an interconnect address (kDeviceInterconnect: the
//    device pfn << 12, resolved back to the owning region's arena by the copies).
//  - An allocation (VramAllocation) is an svm::Devmem plus a VramLruEntry: its buddy blocks
//    (2 MiB blocks first, then 64 KiB and 4 KiB, as the buddy's non-contiguous allocation
//    gives them), a per-frame owner table entry for each frame (so that get_pages' devmem_fn
//    can bump the LRU from a page without allocating), and statistics.
//  - alloc_vram() is the allocation path shared with buffer objects: the buddy, and when it
//    is full, LRU eviction and retry, bounded by Config::evict_attempts and
//    Config::evict_budget. Oversubscription works because every evictable byte is on the LRU.
//  - Copies go through the CopyEngine (system <-> VRAM), or its backend directly for VRAM to
//    VRAM (the same region or a linked peer's), timed into VramStats.
//
// Fault points (gpusvm/base/fault_inject.h):
//   "refgpu.vram_alloc"         VramPagemap::alloc fails with -ENOMEM before anything is taken
//   "refgpu.vram_populate_pfn"  populate_devmem_pfn fails with -ENOMEM (the migration rolls
//                               back and releases the allocation)
//   and the buddy's "refgpu.buddy_alloc" (-ENOSPC: the allocator evicts and retries) and the
//   copy engine's "refgpu.copy" (-EIO: the migration rolls back).
//
// Locking: the owner table has a spin lock of the LRU's class (kVramLruLockClass), never nested
// with the list's own (touch_pages takes a reference under it, then bumps the list); the buddy
// has its own. Nothing of this class is held across a call into gpusvm/svm.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "gpusvm/base/result.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/device.h"
#include "gpusvm/svm/pagemap.h"
#include "drivers/refgpu/buddy.h"
#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vram_lru.h"
#include "drivers/refgpu/vram_region.h"
#include "drivers/refgpu/vram_stats.h"

namespace gpusvm::refgpu {

class VramPagemap;

// One svm device-memory allocation in VRAM (Xe's xe_bo of an SVM range, reduced to what the
// provider needs). Created by VramPagemap::alloc; handed to svm::migrate_to_devmem.
class VramAllocation final : public svm::Devmem, public VramLruEntry {
 public:
  VramPagemap* vram() const { return vram_; }
  // The buddy blocks, in the order populate_devmem_pfn hands out their frames.
  const std::vector<BuddyBlock>& blocks() const { return blocks_; }
  // devmem_release ran (every page went, or the migration failed). The blocks stay the
  // allocation's until its last reference goes (an evictor may still hold one), as Xe's bo
  // keeps its VRAM until xe_bo_put.
  bool released() const { return released_.load(std::memory_order_acquire); }

  // VramLruEntry: evict_to_ram (-EBUSY while pages are under another migration).
  int evict() override;

 private:
  friend class VramPagemap;
  VramAllocation(VramPagemap* vram, mm::AddressSpace* as, uint64_t size, std::vector<BuddyBlock> blocks);
  ~VramAllocation() override = default;
  // The last reference went: the frames leave the owner table and go back to the buddy, then
  // the object is deleted. May run from folio_free: spin locks and the buddy's leaf only.
  void destroy() override;

  VramPagemap* const vram_;
  const std::vector<BuddyBlock> blocks_;
  std::atomic<bool> released_{false};
};

class VramPagemap final : public svm::PagemapOps, public svm::DevmemOps {
 public:
  struct Config {
    // Device-private owner of the pages (nullptr: this object). Devices of one owner group
    // pass the group's owner.
    const void* owner = nullptr;
    // The allocator's bounds when the buddy is full: eviction rounds, and total time.
    unsigned evict_attempts = 16;
    std::chrono::milliseconds evict_budget{5000};
    // Residency timeslice given to populate_mm migrations when the caller passes 0.
    unsigned default_timeslice_ms = 0;
  };

  // Registers `region` (kept by the caller, outliving this object) on `mem` for `dev` (the
  // refgpu device's DMA identity), copying with `copy` (over the same region's arena).
  // Errors: -EINVAL (null argument, copy engine of another arena), -ENOSPC / -ENOMEM from the
  // DevPagemap or Pagemap.
  static Result<std::unique_ptr<VramPagemap>> create(mm::PhysMem* mem, svm::Device* dev, VramRegion* region,
                                                     CopyEngine* copy, const Config& config);
  // Drops the driver's pagemap reference, evicts every allocation still in VRAM, waits for the
  // pagemap's deferred destroy. Every BO backed by this region must be gone. May sleep.
  ~VramPagemap() override;
  VramPagemap(const VramPagemap&) = delete;
  VramPagemap& operator=(const VramPagemap&) = delete;

  svm::Pagemap* pagemap() const { return pagemap_; }
  mm::DevPagemap* dev_pagemap() const { return dpm_.get(); }
  svm::Device* device() const { return dev_; }
  VramRegion* region() const { return region_; }
  CopyEngine* copy_engine() const { return copy_; }
  mm::PhysMem* mem() const { return mem_; }
  VramLru& lru() { return lru_; }
  const VramStats& stats() const { return stats_; }
  VramStats& mutable_stats() { return stats_; }
  const Config& config() const { return config_; }

  // Frame <-> VRAM offset.
  uint64_t pfn_to_offset(mm::Pfn pfn) const { return (pfn - dpm_->first_pfn()) << mm::kPageShift; }
  mm::Pfn offset_to_pfn(uint64_t offset) const { return dpm_->first_pfn() + (offset >> mm::kPageShift); }

  // A peer device reaches this VRAM over a link (device_map succeeds for its Device, copies
  // resolve its interconnect addresses). Link both ways for migrations in both directions.
  // Call before any migration involving the peer; not thread-safe against copies.
  void add_peer(VramPagemap* peer);

  // The allocator: `size` bytes (a non-zero multiple of 4 KiB) of blocks from the buddy,
  // evicting least-recently-used entries and retrying while it is full, within the config's
  // bounds. Errors: -EINVAL, -ENOSPC (no room after the bounds, or larger than the region:
  // counted as a failure).
  // Context: no gpusvm or mm lock held (eviction migrates pages); a driver's outer VM lock
  // may be held. May sleep.
  // buddy_flags: Buddy::kContiguous for one run.
  Result<std::vector<BuddyBlock>> alloc_vram(uint64_t size, uint64_t min_block = kSZ4K, uint32_t buddy_flags = 0);
  // Frees blocks from alloc_vram. Never sleeps.
  void free_vram(const std::vector<BuddyBlock>& blocks);

  // A new svm allocation of `size` bytes for a range of `as`, with the creator's reference
  // (which migrate_to_devmem consumes). Errors: -EINVAL, -ENOMEM ("refgpu.vram_alloc"),
  // alloc_vram's. Context as alloc_vram.
  Result<VramAllocation*> alloc(mm::AddressSpace* as, uint64_t size);
  // Migrates [start, end) of `as` into a new allocation (alloc + svm::migrate_to_devmem), and
  // links it on the LRU unless the migration released it. 0 or a negative errno
  // (migrate_to_devmem's, alloc's). Context: no lock held; may sleep.
  int migrate_to_vram(mm::AddressSpace* as, mm::Va start, mm::Va end, unsigned timeslice_ms);

  // get_pages' devmem_fn (svm::Ctx::devmem_fn): bumps the LRU entry of each allocation backing
  // `npages` pages from `page`. Runs under the notifier lock: never sleeps or allocates.
  void touch_pages(mm::Folio* page, uint64_t npages);
  // The allocation owning a frame now (nullptr if free), no reference taken (tests).
  VramAllocation* frame_owner(mm::Pfn pfn) const;

  // PagemapOps.
  svm::PagemapAddr device_map(svm::Pagemap* pagemap, svm::Device* dev, mm::Folio* page, unsigned order,
                              svm::DmaDirection dir) override;
  void device_unmap(svm::Pagemap* pagemap, svm::Device* dev, const svm::PagemapAddr& addr) override;
  int populate_mm(svm::Pagemap* pagemap, mm::Va start, mm::Va end, mm::AddressSpace* as,
                  unsigned timeslice_ms) override;
  void destroy(svm::Pagemap* pagemap) override;
  // DevmemOps.
  void devmem_release(svm::Devmem* devmem) override;
  int populate_devmem_pfn(svm::Devmem* devmem, uint64_t npages, uint64_t* pfns) override;
  int copy_to_devmem(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                     svm::Fence* pre_migrate_fence) override;
  int copy_to_ram(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                  svm::Fence* pre_migrate_fence) override;

  // Device mappings given out and not yet unmapped (teardown checks).
  int64_t live_device_maps() const { return live_device_maps_.load(std::memory_order_acquire); }
  bool destroyed() const { return destroyed_.load(std::memory_order_acquire); }

 private:
  friend class VramAllocation;  // destroy() -> release_frames
  VramPagemap(mm::PhysMem* mem, svm::Device* dev, VramRegion* region, CopyEngine* copy, const Config& config);
  // The last reference of `a` went (VramAllocation::destroy): clears the owner-table entries
  // that name it, then frees its blocks. Never sleeps.
  void release_frames(VramAllocation* a);
  // The host bytes behind a device-side address of a copy (local VRAM offset, or an
  // interconnect address of this region or a peer's), nullptr when none.
  std::byte* device_bytes(const svm::PagemapAddr& a, uint64_t page) const;
  bool is_peer(svm::Device* dev) const;

  mm::PhysMem* const mem_;
  svm::Device* const dev_;
  VramRegion* const region_;
  CopyEngine* const copy_;
  const Config config_;
  VramStats stats_;
  VramLru lru_{&stats_};
  std::unique_ptr<mm::DevPagemap> dpm_;
  svm::Pagemap* pagemap_ = nullptr;  // the driver's reference; null once dropped
  std::vector<VramPagemap*> peers_;
  std::atomic<int64_t> live_device_maps_{0};
  std::atomic<bool> destroyed_{false};
  // frame index -> the allocation holding it; set by populate_devmem_pfn, cleared by
  // release_frames before the frames are freed and the allocation deleted. (Clearing it at
  // devmem_release left a window: an evictor still holding a reference calls
  // populate_devmem_pfn after the release, which set the entries again, and touch_pages then
  // found a deleted allocation there; freeing the blocks at the release also let a new
  // allocation reuse frames the evictor was still about to collect.)
  mutable SpinLock owners_lock_{&kVramLruLockClass};
  std::vector<VramAllocation*> owners_ GPUSVM_GUARDED_BY(owners_lock_);
};

}  // namespace gpusvm::refgpu
