#include "drivers/refgpu/bo.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstring>

#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "drivers/refgpu/vram_pagemap.h"

namespace gpusvm::refgpu {

using mm::kPageShift;
using mm::kPageSize;

namespace {
// Fake offsets start above 4 GiB (DRM_FILE_PAGE_OFFSET_START's role) and are never reused.
std::atomic<uint64_t> g_next_mmap_offset{1ULL << 32};
}  // namespace

void BoRef::reset() {
  if (Bo* b = bo_) {
    bo_ = nullptr;
    b->put();
  }
}

Bo::Bo(const BoCreateInfo& info)
    : VramLruEntry(info.size), mem_(info.mem), vram_(info.vram), size_(info.size), placement_(info.placement),
      flags_(info.flags), name_(info.name),
      mmap_offset_(g_next_mmap_offset.fetch_add(info.size + kPageSize, std::memory_order_relaxed)) {}

Bo::~Bo() {
  // The last reference: nobody else can reach the BO (the LRU unlinked it in destroy()).
  if (!observers_.empty()) log::get().error("refgpu: BO {} destroyed with {} binding observers", name_, observers_.size());
  for (mm::Folio* f : pinned_) {
    if (f) mm::folio_unpin(f);
  }
  if (vram_) vram_->free_vram(blocks_);
}

void Bo::destroy() {
  if (vram_) vram_->lru().remove(this);
  delete this;
}

Result<BoRef> Bo::create(const BoCreateInfo& info) {
  if (!info.mem || info.size == 0 || info.size % kPageSize || info.size > kBoMaxSize) return Err{-EINVAL};
  if (info.placement == 0 || (info.placement & ~kBoPlacementMask) || (info.flags & ~kBoFlagMask)) return Err{-EINVAL};
  const bool want_vram = info.placement & kBoPlacementVram;
  if (want_vram && !info.vram) return Err{-EINVAL};
  if ((info.flags & kBoFlagVramContiguous) && !want_vram) return Err{-EINVAL};
  Result<std::shared_ptr<mm::ShmemObject>> shmem = mm::ShmemObject::create(info.mem, info.size, info.name);
  if (!shmem) return Err{shmem.error()};
  BoRef ref = BoRef::adopt(new Bo(info));
  Bo* bo = ref.get();
  bo->shmem_ = std::move(*shmem);
  {
    MutexLock g(&bo->lock_);
    bo->pinned_.assign(bo->npages(), nullptr);
  }
  if (!want_vram) return ref;
  Result<std::vector<BuddyBlock>> blocks =
      info.vram->alloc_vram(info.size, kSZ4K, (info.flags & kBoFlagVramContiguous) ? uint32_t{Buddy::kContiguous} : 0u);
  if (!blocks) {
    if (info.placement & kBoPlacementSystem) return ref;  // falls back to system memory
    return Err{blocks.error()};
  }
  // A new BO reads zeroes: clear its blocks (they held someone else's bytes).
  std::vector<uint64_t> offsets;
  for (const BuddyBlock& b : *blocks) {
    for (uint64_t off = b.offset; off < b.offset + b.size; off += kPageSize) offsets.push_back(off);
  }
  if (int rc = info.vram->copy_engine()->clear_vram(offsets.data(), offsets.size())) {
    info.vram->free_vram(*blocks);
    if (info.placement & kBoPlacementSystem) return ref;
    return Err{rc};
  }
  {
    MutexLock g(&bo->lock_);
    bo->blocks_ = std::move(*blocks);
    bo->backing_ = BoBacking::kVram;
  }
  info.vram->mutable_stats().allocations.add();
  info.vram->mutable_stats().allocated_bytes.add(info.size);
  info.vram->lru().add(bo);
  return ref;
}

BoBacking Bo::backing() const {
  MutexLock g(&lock_);
  return backing_;
}

uint64_t Bo::vram_page_offset_locked(uint64_t i) const {
  uint64_t at = i << kPageShift;
  for (const BuddyBlock& b : blocks_) {
    if (at < b.size) return b.offset + at;
    at -= b.size;
  }
  panic("refgpu: BO page beyond its VRAM blocks");
}

int Bo::system_pages_locked(uint64_t first, uint64_t n, std::vector<mm::Folio*>* out) {
  out->clear();
  out->reserve(n);
  for (uint64_t i = first; i < first + n; i++) {
    if (!pinned_[i]) {
      bool beyond = false;
      mm::Folio* head = shmem_->get_folio(i, &beyond);
      if (!head) return -ENOMEM;  // what was pinned stays pinned (freed with the BO)
      // A DMA pin (a reference and a pin, as FOLL_PIN takes) per page index, also when a
      // (collapsed) 2 MiB folio holds several: each is unpinned once at destruction. The pin
      // keeps reclaim away from pages a GPU PTE may point at, and mm::check accounts it.
      mm::folio_pin(head);
      head->put();  // get_folio's lookup reference: the pin holds one of its own
      pinned_[i] = head;
    }
    out->push_back(pinned_[i]);
  }
  return 0;
}

void Bo::notify_locked() {
  for (BoBindingObserver* o : observers_) {
    stats_.move_notifies.add();
    o->bo_move_notify(this);
  }
}

namespace {
// The system pfn of page i when `head` is the shmem folio holding index i.
mm::Pfn page_pfn(mm::Folio* head, uint64_t i) { return head->pfn() + (i - head->index()); }
}  // namespace

int Bo::move_to_system_locked() {
  if (backing_ == BoBacking::kSystem) return 0;
  std::vector<mm::Folio*> folios;
  if (int rc = system_pages_locked(0, npages(), &folios)) return rc;
  // Bindings go first: no GPU access may use the VRAM copy once the bytes moved on.
  notify_locked();
  std::vector<uint64_t> src(npages());
  std::vector<mm::Pfn> dst(npages());
  for (uint64_t i = 0; i < npages(); i++) {
    src[i] = vram_page_offset_locked(i);
    dst[i] = page_pfn(folios[i], i);
  }
  if (int rc = vram_->copy_engine()->copy_to_ram(src.data(), dst.data(), npages())) return rc;
  vram_->mutable_stats().migrations_to_ram.add();
  vram_->mutable_stats().bytes_to_ram.add(size_);
  vram_->lru().unlink(this);
  vram_->free_vram(blocks_);
  blocks_.clear();
  backing_ = BoBacking::kSystem;
  stats_.evictions.add();
  stats_.bytes_moved.add(size_);
  return 0;
}

int Bo::move_to_system() {
  MutexLock g(&lock_);
  return move_to_system_locked();
}

int Bo::evict() {
  // Only a try: a fault binding this BO (or a move of it) holds the lock; the evictor takes
  // another entry rather than wait (and never inverts against a VM lock held around it).
  if (!lock_.try_lock()) return -EBUSY;
  const int rc = move_to_system_locked();
  lock_.unlock();
  return rc;
}

int Bo::move_to_vram() {
  MutexLock g(&lock_);
  if (backing_ == BoBacking::kVram) return 0;
  if (!(placement_ & kBoPlacementVram)) return -EINVAL;
  if (cpu_mapped_.load(std::memory_order_acquire)) return -EBUSY;
  Result<std::vector<BuddyBlock>> blocks =
      vram_->alloc_vram(size_, kSZ4K, (flags_ & kBoFlagVramContiguous) ? uint32_t{Buddy::kContiguous} : 0u);
  if (!blocks) return blocks.error();
  std::vector<mm::Folio*> folios;
  if (int rc = system_pages_locked(0, npages(), &folios)) {
    vram_->free_vram(*blocks);
    return rc;
  }
  notify_locked();
  blocks_ = std::move(*blocks);
  std::vector<mm::Pfn> src(npages());
  std::vector<uint64_t> dst(npages());
  for (uint64_t i = 0; i < npages(); i++) {
    src[i] = page_pfn(folios[i], i);
    dst[i] = vram_page_offset_locked(i);
  }
  if (int rc = vram_->copy_engine()->copy_to_vram(src.data(), dst.data(), npages())) {
    vram_->free_vram(blocks_);
    blocks_.clear();
    return rc;
  }
  backing_ = BoBacking::kVram;
  vram_->mutable_stats().migrations_to_vram.add();
  vram_->mutable_stats().bytes_to_vram.add(size_);
  vram_->mutable_stats().allocations.add();
  vram_->mutable_stats().allocated_bytes.add(size_);
  stats_.moves_to_vram.add();
  stats_.bytes_moved.add(size_);
  vram_->lru().add(this);
  return 0;
}

int Bo::prepare_cpu_map() {
  if (!(placement_ & kBoPlacementSystem)) return -EINVAL;
  MutexLock g(&lock_);
  if (int rc = move_to_system_locked()) return rc;
  // From here on the BO stays in system memory (move_to_vram: -EBUSY), so the mapping of
  // the shmem pages never goes stale.
  cpu_mapped_.store(true, std::memory_order_release);
  return 0;
}

Result<mm::Va> Bo::cpu_map(mm::AddressSpace* as, mm::Va hint, int prot) {
  if (!as || (prot & ~(PROT_READ | PROT_WRITE)) || prot == 0) return Err{-EINVAL};
  if (int rc = prepare_cpu_map()) return Err{rc};
  return as->mmap(hint, size_, prot, MAP_SHARED, shmem_, 0);
}

int Bo::get_backing(uint64_t first, uint64_t n, BoPageAddr* out, BoBindingObserver* observer) {
  if (!out || n == 0 || first >= npages() || n > npages() - first) return -EINVAL;
  MutexLock g(&lock_);
  if (backing_ == BoBacking::kVram) {
    for (uint64_t i = 0; i < n; i++) out[i] = {BoBacking::kVram, vram_page_offset_locked(first + i)};
  } else {
    std::vector<mm::Folio*> folios;
    if (int rc = system_pages_locked(first, n, &folios)) return rc;
    for (uint64_t i = 0; i < n; i++) {
      out[i] = {BoBacking::kSystem, page_pfn(folios[i], first + i) << kPageShift};
    }
  }
  if (observer && std::find(observers_.begin(), observers_.end(), observer) == observers_.end()) {
    observers_.push_back(observer);
  }
  return 0;
}

void Bo::remove_observer(BoBindingObserver* observer) {
  MutexLock g(&lock_);
  std::erase(observers_, observer);
}

int Bo::read(uint64_t off, void* buf, uint64_t len) {
  if (!buf || off > size_ || len > size_ - off) return -EINVAL;
  MutexLock g(&lock_);
  if (backing_ == BoBacking::kSystem) {
    const int64_t n = shmem_->pread(buf, len, off);
    return n < 0 ? static_cast<int>(n) : 0;
  }
  auto* p = static_cast<std::byte*>(buf);
  while (len > 0) {
    const uint64_t in_page = std::min<uint64_t>(len, kPageSize - (off & (kPageSize - 1)));
    std::memcpy(p, vram_->region()->arena().data(vram_page_offset_locked(off >> kPageShift) + (off & (kPageSize - 1))),
                in_page);
    p += in_page;
    off += in_page;
    len -= in_page;
  }
  return 0;
}

int Bo::write(uint64_t off, const void* buf, uint64_t len) {
  if (!buf || off > size_ || len > size_ - off) return -EINVAL;
  MutexLock g(&lock_);
  if (backing_ == BoBacking::kSystem) {
    const int64_t n = shmem_->pwrite(buf, len, off);
    if (n < 0) return static_cast<int>(n);
    return static_cast<uint64_t>(n) == len ? 0 : -ENOMEM;
  }
  auto* p = static_cast<const std::byte*>(buf);
  while (len > 0) {
    const uint64_t in_page = std::min<uint64_t>(len, kPageSize - (off & (kPageSize - 1)));
    std::memcpy(vram_->region()->arena().data(vram_page_offset_locked(off >> kPageShift) + (off & (kPageSize - 1))), p,
                in_page);
    p += in_page;
    off += in_page;
    len -= in_page;
  }
  return 0;
}

}  // namespace gpusvm::refgpu
