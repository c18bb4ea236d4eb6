#include "drivers/refgpu/vram_pagemap.h"

#include <thread>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"

namespace gpusvm::refgpu {

using mm::kPageShift;
using mm::kPageSize;

GPUSVM_FAULT_POINT(g_fail_vram_alloc, "refgpu.vram_alloc");
GPUSVM_FAULT_POINT(g_fail_vram_populate_pfn, "refgpu.vram_populate_pfn");
// Reached by migrate_to_vram after the allocation exists and before the migration starts
// (tests race an eviction or a CPU access into this window).
GPUSVM_SCHED_POINT(g_sp_vram_allocated, "refgpu.vram.allocated");
// Reached by the allocator when the buddy is full, before it evicts.
GPUSVM_SCHED_POINT(g_sp_vram_evicting, "refgpu.vram.evicting");

namespace {

uint64_t ns_since(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

int wait_fence(svm::Fence* fence) { return fence ? fence->wait(hang_timeout()) : 0; }

}  // namespace

VramAllocation::VramAllocation(VramPagemap* vram, mm::AddressSpace* as, uint64_t size,
                               std::vector<BuddyBlock> blocks)
    : svm::Devmem(vram->device(), as, vram, vram->pagemap(), size), VramLruEntry(size), vram_(vram),
      blocks_(std::move(blocks)) {}

void VramAllocation::destroy() {
  vram_->release_frames(this);
  delete this;
}

int VramAllocation::evict() {
  // drm_pagemap_evict_to_ram: every page still in use goes back to system memory, found
  // through the reverse map; the allocation is released when the last one goes.
  return svm::evict_to_ram(this);
}

VramPagemap::VramPagemap(mm::PhysMem* mem, svm::Device* dev, VramRegion* region, CopyEngine* copy,
                         const Config& config)
    : mem_(mem), dev_(dev), region_(region), copy_(copy), config_(config) {}

Result<std::unique_ptr<VramPagemap>> VramPagemap::create(mm::PhysMem* mem, svm::Device* dev, VramRegion* region,
                                                         CopyEngine* copy, const Config& config) {
  if (!mem || !dev || !region || !copy || copy->vram() != &region->arena()) return Err{-EINVAL};
  std::unique_ptr<VramPagemap> v(new VramPagemap(mem, dev, region, copy, config));
  const uint64_t nr_pages = region->total_size() >> kPageShift;
  Result<std::unique_ptr<mm::DevPagemap>> d = mm::DevPagemap::create(
      mem, nr_pages, config.owner ? config.owner : v.get(), svm::pagemap_dev_pagemap_ops(), /*storage=*/false);
  if (!d) return Err{d.error()};
  v->dpm_ = std::move(*d);
  {
    SpinLockGuard g(&v->owners_lock_);
    v->owners_.assign(nr_pages, nullptr);
  }
  Result<svm::Pagemap*> p = svm::Pagemap::create(dev, v->dpm_.get(), v.get());
  if (!p) return Err{p.error()};
  v->pagemap_ = *p;
  return v;
}

VramPagemap::~VramPagemap() {
  // Evict what is still in VRAM (bounded: an entry busy in a migration gets a few chances),
  // then let go of the pagemap; the last device page (if any stayed) would hold it.
  for (int round = 0; round < 8 && lru_.linked_count() > 0; round++) {
    (void)lru_.evict(UINT64_MAX);
  }
  if (lru_.linked_count() > 0) {
    log::get().error("refgpu: VramPagemap destroyed with {} allocations that could not be evicted",
                     lru_.linked_count());
  }
  if (svm::Pagemap* p = pagemap_) {
    pagemap_ = nullptr;
    p->put();
  }
  svm::pagemap_flush_destroy_work();
  if (live_device_maps_.load() != 0) {
    log::get().error("refgpu: VramPagemap destroyed with {} device mappings live", live_device_maps_.load());
  }
}

void VramPagemap::add_peer(VramPagemap* peer) {
  if (peer && peer != this) peers_.push_back(peer);
}

bool VramPagemap::is_peer(svm::Device* dev) const {
  for (VramPagemap* p : peers_) {
    if (p->device() == dev) return true;
  }
  return false;
}

Result<std::vector<BuddyBlock>> VramPagemap::alloc_vram(uint64_t size, uint64_t min_block, uint32_t buddy_flags) {
  if (size == 0 || size % kSZ4K || (min_block != kSZ4K && min_block != kSZ64K && min_block != kSZ2M) ||
      size % min_block) {
    return Err{-EINVAL};
  }
  if (size > region_->total_size()) {  // can never fit: no point evicting anything
    stats_.allocation_failures.add();
    return Err{-ENOSPC};
  }
  const auto deadline = std::chrono::steady_clock::now() + config_.evict_budget;
  for (unsigned attempt = 0;; attempt++) {
    Result<std::vector<BuddyBlock>> r = region_->buddy().alloc(size, min_block, 0, buddy_flags);
    if (r) return r;
    if (r.error() != -ENOSPC) {
      stats_.allocation_failures.add();
      return r;
    }
    if (attempt >= config_.evict_attempts || std::chrono::steady_clock::now() >= deadline) break;
    stats_.allocation_retries.add();
    g_sp_vram_evicting.reach();
    // Evict at least what is missing; fragmentation may need more, which the next round
    // takes. Nothing freed: every entry is busy (migrations or faults in flight hold them);
    // give them a moment rather than spin, within the time budget.
    const uint64_t free = region_->buddy().free_bytes();
    const uint64_t want = size > free ? size - free : size;
    if (lru_.evict(want) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  stats_.allocation_failures.add();
  return Err{-ENOSPC};
}

void VramPagemap::free_vram(const std::vector<BuddyBlock>& blocks) {
  if (blocks.empty()) return;
  if (int rc = region_->buddy().free(blocks)) panic("refgpu: VRAM blocks freed twice (" + std::to_string(rc) + ")");
}

Result<VramAllocation*> VramPagemap::alloc(mm::AddressSpace* as, uint64_t size) {
  if (!as || size == 0 || size % kPageSize) return Err{-EINVAL};
  if (!pagemap_) return Err{-ENODEV};
  if (g_fail_vram_alloc.should_fail()) {
    stats_.allocation_failures.add();
    return Err{-ENOMEM};
  }
  Result<std::vector<BuddyBlock>> blocks = alloc_vram(size);
  if (!blocks) return Err{blocks.error()};
  stats_.allocations.add();
  stats_.allocated_bytes.add(size);
  return new VramAllocation(this, as, size, std::move(*blocks));
}

int VramPagemap::migrate_to_vram(mm::AddressSpace* as, mm::Va start, mm::Va end, unsigned timeslice_ms) {
  if (end <= start) return -EINVAL;
  Result<VramAllocation*> a = alloc(as, end - start);
  if (!a) return a.error();
  VramAllocation* alloc = *a;
  // Our own reference across the migration: the creator's is the pages' (migrate_to_devmem
  // consumes it; devmem_release drops it), and a CPU fault may take every page back before
  // the allocation is linked.
  alloc->get();
  g_sp_vram_allocated.reach();
  const int rc = svm::migrate_to_devmem(alloc, as, start, end, svm::MigrateDetails{.timeslice_ms = timeslice_ms});
  // Linked (evictable) once the migration returned, also after a partial commit (-EBUSY with
  // pages that moved); a no-op when it was released meanwhile.
  lru_.add(alloc);
  alloc->put();
  return rc;
}

void VramPagemap::touch_pages(mm::Folio* page, uint64_t npages) {
  if (!page || !dpm_->contains(page->pfn())) return;
  const uint64_t first = page->pfn() - dpm_->first_pfn();
  const uint64_t end = std::min<uint64_t>(first + npages, dpm_->nr_pages());
  VramAllocation* last = nullptr;
  for (uint64_t i = first; i < end; i++) {
    VramAllocation* a;
    {
      SpinLockGuard g(&owners_lock_);
      a = owners_[i];
      if (!a || a == last || !a->try_get()) continue;
    }
    lru_.touch(a);
    stats_.lru_touches.add();
    last = a;
    a->put();  // never the last one here in practice (the pages hold theirs); never sleeps
  }
}

VramAllocation* VramPagemap::frame_owner(mm::Pfn pfn) const {
  if (!dpm_->contains(pfn)) return nullptr;
  SpinLockGuard g(&owners_lock_);
  return owners_[pfn - dpm_->first_pfn()];
}

svm::PagemapAddr VramPagemap::device_map(svm::Pagemap*, svm::Device* dev, mm::Folio* page, unsigned order,
                                         svm::DmaDirection dir) {
  if (!page || !dpm_->contains(page->pfn())) return svm::PagemapAddr{};
  if (dev == dev_) {
    live_device_maps_.fetch_add(1, std::memory_order_relaxed);
    return svm::PagemapAddr{pfn_to_offset(page->pfn()), svm::PagemapAddrProto::kDeviceLocal,
                            static_cast<uint8_t>(order), dir};
  }
  if (!is_peer(dev)) return svm::PagemapAddr{};  // no link: the caller migrates instead
  live_device_maps_.fetch_add(1, std::memory_order_relaxed);
  return svm::PagemapAddr{page->pfn() << kPageShift, svm::PagemapAddrProto::kDeviceInterconnect,
                          static_cast<uint8_t>(order), dir};
}

void VramPagemap::device_unmap(svm::Pagemap*, svm::Device*, const svm::PagemapAddr& addr) {
  if (addr.addr == svm::kDmaMappingError) return;
  live_device_maps_.fetch_sub(1, std::memory_order_relaxed);
}

int VramPagemap::populate_mm(svm::Pagemap*, mm::Va start, mm::Va end, mm::AddressSpace* as,
                             unsigned timeslice_ms) {
  return migrate_to_vram(as, start, end, timeslice_ms ? timeslice_ms : config_.default_timeslice_ms);
}

void VramPagemap::destroy(svm::Pagemap*) { destroyed_.store(true, std::memory_order_release); }

void VramPagemap::devmem_release(svm::Devmem* devmem) {
  // May run from folio_free under page-table locks: spin locks and the buddy's leaf only.
  auto* a = static_cast<VramAllocation*>(devmem);
  lru_.remove(a);
  a->released_.store(true, std::memory_order_release);
  a->put();  // the creator's (the pages') reference; an evictor may still hold one, and the
             // frames are freed with the last (release_frames)
}

void VramPagemap::release_frames(VramAllocation* a) {
  {
    SpinLockGuard g(&owners_lock_);
    for (const BuddyBlock& b : a->blocks()) {
      for (uint64_t off = b.offset; off < b.offset + b.size; off += kPageSize) {
        VramAllocation*& o = owners_[off >> kPageShift];
        if (o == a) o = nullptr;
      }
    }
  }
  free_vram(a->blocks());
}

int VramPagemap::populate_devmem_pfn(svm::Devmem* devmem, uint64_t npages, uint64_t* pfns) {
  auto* a = static_cast<VramAllocation*>(devmem);
  if (g_fail_vram_populate_pfn.should_fail()) return -ENOMEM;
  if (npages > a->npages()) return -EINVAL;
  uint64_t k = 0;
  SpinLockGuard g(&owners_lock_);
  for (const BuddyBlock& b : a->blocks()) {
    for (uint64_t off = b.offset; off < b.offset + b.size && k < npages; off += kPageSize) {
      owners_[off >> kPageShift] = a;
      pfns[k++] = offset_to_pfn(off);
    }
  }
  return 0;
}

std::byte* VramPagemap::device_bytes(const svm::PagemapAddr& a, uint64_t page) const {
  if (a.proto == svm::PagemapAddrProto::kDeviceLocal) {
    const uint64_t off = a.addr + (page << kPageShift);
    return region_->arena().contains(off, kPageSize) ? region_->arena().data(off) : nullptr;
  }
  const mm::Pfn pfn = (a.addr >> kPageShift) + page;
  if (dpm_->contains(pfn)) return region_->arena().data(pfn_to_offset(pfn));
  for (VramPagemap* p : peers_) {
    if (p->dpm_->contains(pfn)) return p->region_->arena().data(p->pfn_to_offset(pfn));
  }
  return nullptr;
}

int VramPagemap::copy_to_devmem(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                                svm::Fence* fence) {
  if (int rc = wait_fence(fence)) return rc;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<mm::Pfn> src_pfns;
  std::vector<uint64_t> dst_offsets, clear_offsets;
  std::vector<CopyRegion> peer_regions;
  for (uint64_t i = 0; i < npages;) {
    const bool hole = addrs[i].addr == svm::kDmaMappingError;
    const uint64_t n = hole ? 1 : (1ULL << addrs[i].order);
    for (uint64_t j = 0; j < n && i + j < npages; j++) {
      mm::Folio* page = pages[i + j];
      if (!page) continue;
      if (!dpm_->contains(page->pfn())) return -EINVAL;
      const uint64_t dst = pfn_to_offset(page->pfn());
      if (hole) {
        clear_offsets.push_back(dst);  // a hole: the new page reads zeroes
      } else if (addrs[i].proto == svm::PagemapAddrProto::kSystem) {
        src_pfns.push_back((addrs[i].addr >> kPageShift) + j);
        dst_offsets.push_back(dst);
      } else {
        const std::byte* src = device_bytes(addrs[i], j);
        if (!src) return -EINVAL;
        peer_regions.push_back(CopyRegion{region_->arena().data(dst), src, kPageSize});
      }
    }
    i += n;
  }
  if (!src_pfns.empty()) {
    if (int rc = copy_->copy_to_vram(src_pfns.data(), dst_offsets.data(), src_pfns.size())) return rc;
  }
  if (!clear_offsets.empty()) {
    if (int rc = copy_->clear_vram(clear_offsets.data(), clear_offsets.size())) return rc;
  }
  if (!peer_regions.empty()) {
    if (int rc = copy_->backend().copy(peer_regions)) return rc;
  }
  stats_.migrations_to_vram.add();
  stats_.bytes_to_vram.add((src_pfns.size() + clear_offsets.size() + peer_regions.size()) << kPageShift);
  stats_.ns_to_vram.add(ns_since(t0));
  return 0;
}

int VramPagemap::copy_to_ram(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                             svm::Fence* fence) {
  if (int rc = wait_fence(fence)) return rc;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<uint64_t> src_offsets;
  std::vector<mm::Pfn> dst_pfns;
  std::vector<CopyRegion> peer_regions;
  for (uint64_t i = 0; i < npages;) {
    if (addrs[i].addr == svm::kDmaMappingError) {
      i++;
      continue;
    }
    const uint64_t n = 1ULL << addrs[i].order;
    for (uint64_t j = 0; j < n && i + j < npages; j++) {
      mm::Folio* page = pages[i + j];
      if (!page) continue;
      if (!dpm_->contains(page->pfn())) return -EINVAL;
      const uint64_t src = pfn_to_offset(page->pfn());
      if (addrs[i].proto == svm::PagemapAddrProto::kSystem) {
        src_offsets.push_back(src);
        dst_pfns.push_back((addrs[i].addr >> kPageShift) + j);
      } else {
        std::byte* dst = device_bytes(addrs[i], j);
        if (!dst) return -EINVAL;
        peer_regions.push_back(CopyRegion{dst, region_->arena().data(src), kPageSize});
      }
    }
    i += n;
  }
  if (!src_offsets.empty()) {
    if (int rc = copy_->copy_to_ram(src_offsets.data(), dst_pfns.data(), src_offsets.size())) return rc;
  }
  if (!peer_regions.empty()) {
    if (int rc = copy_->backend().copy(peer_regions)) return rc;
  }
  stats_.migrations_to_ram.add();
  stats_.bytes_to_ram.add((src_offsets.size() + peer_regions.size()) << kPageShift);
  stats_.ns_to_ram.add(ns_since(t0));
  return 0;
}

}  // namespace gpusvm::refgpu
