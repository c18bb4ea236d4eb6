#include "gpusvm/mm/physmem.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {
namespace {
GPUSVM_FAULT_POINT(g_fail_alloc_folio, "mm.alloc_folio");
GPUSVM_FAULT_POINT(g_fail_alloc_thp, "mm.alloc_folio_thp");
GPUSVM_FAULT_POINT(g_fail_alloc_hugetlb, "mm.alloc_hugetlb");
}  // namespace

// ---- Folio ----

void Folio::get(int n) {
  int old = refcount_.fetch_add(n, std::memory_order_relaxed);
  if (old <= 0) panic("folio_get on a folio with refcount " + std::to_string(old) + " pfn " +
                      std::to_string(pfn_));
}

bool Folio::try_get() {
  int old = refcount_.load(std::memory_order_relaxed);
  do {
    if (old == 0) return false;
  } while (!refcount_.compare_exchange_weak(old, old + 1, std::memory_order_acquire));
  return true;
}

void Folio::put(int n) {
  // acq_rel: the final put must see every write made by earlier holders before freeing.
  int old = refcount_.fetch_sub(n, std::memory_order_acq_rel);
  if (old < n) panic("folio_put underflow on pfn " + std::to_string(pfn_));
  if (old != n) return;
  if (test(kFolioZero)) panic("zero folio refcount reached zero");
  if (pagemap_) {
    pagemap_->free_folio(this);
  } else {
    mem_->free_folio(this);
  }
}

int Folio::total_mapcount() const {
  int n = entire_mapcount();
  for (uint64_t i = 0; i < nr_pages(); i++) {
    n += const_cast<Folio*>(this)->page(i)->page_mapcount();
  }
  return n;
}

std::byte* Folio::data(uint64_t i) const {
  if (!pagemap_) return mem_->ram_data(pfn_ + i);
  return pagemap_->page_data(pfn_ + i);
}

// ---- folio lock ----

void folio_lock(Folio* folio) {
  lockdep::check_class_order(&kFolioLockClass);
  for (;;) {
    uint32_t f = folio->flags_.load(std::memory_order_relaxed);
    if (!(f & kFolioLocked) &&
        folio->flags_.compare_exchange_weak(f, f | kFolioLocked, std::memory_order_acquire)) {
      break;
    }
    WaitQueue& wq = folio->mem()->folio_waitqueue(folio);
    if (!wq.wait_for([folio] { return !folio_test_locked(folio); }, hang_timeout())) {
      panic("folio_lock: folio " + folio_describe(folio) + " stayed locked longer than the hang timeout (" +
            std::to_string(hang_timeout().count()) + " ms)");
    }
  }
  folio->lock_holder_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire_class(&kFolioLockClass);
}

bool folio_trylock(Folio* folio) {
  uint32_t f = folio->flags_.load(std::memory_order_relaxed);
  do {
    if (f & kFolioLocked) return false;
  } while (!folio->flags_.compare_exchange_weak(f, f | kFolioLocked, std::memory_order_acquire));
  folio->lock_holder_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire_class(&kFolioLockClass);
  return true;
}

void folio_unlock(Folio* folio) {
  lockdep::release_class(&kFolioLockClass);
  // relaxed: diagnostics only (a waiter that reads a stale holder names the previous one).
  folio->lock_holder_.store(0, std::memory_order_relaxed);
  // release: the unlocking holder's writes are visible to the next locker (acquire above).
  uint32_t old = folio->flags_.fetch_and(~static_cast<uint32_t>(kFolioLocked),
                                         std::memory_order_release);
  if (!(old & kFolioLocked)) panic("folio_unlock of an unlocked folio pfn " + std::to_string(folio->pfn()));
  folio->mem()->folio_waitqueue(folio).wake_all();
}

bool folio_test_locked(const Folio* folio) { return folio->flags() & kFolioLocked; }

void folio_assert_locked(const Folio* folio) {
  if (!folio_test_locked(folio)) panic("folio pfn " + std::to_string(folio->pfn()) + " not locked");
}

bool folio_wait_unlocked(Folio* folio, std::chrono::nanoseconds timeout) {
  return folio->mem()->folio_waitqueue(folio).wait_for(
      [folio] { return !folio_test_locked(folio); }, timeout);
}

pid_t folio_lock_holder(const Folio* folio) {
  return folio_test_locked(folio) ? folio->lock_holder_.load(std::memory_order_relaxed) : 0;
}

std::string folio_describe(const Folio* folio) {
  char buf[256];
  const pid_t holder = folio_lock_holder(folio);
  std::snprintf(buf, sizeof(buf),
                "pfn %#llx (order %u, refcount %d, mapcount %d, pins %d, flags %#x%s%s, %s",
                static_cast<unsigned long long>(folio->pfn()), folio->order(), folio->refcount(),
                folio->total_mapcount(), folio->pincount(), folio->flags(),
                folio_is_device_private(folio) ? ", device-private" : "",
                folio_is_device_coherent(folio) ? ", device-coherent" : "",
                folio_test_locked(folio) ? "locked" : "unlocked");
  std::string s(buf);
  if (holder) s += " by tid " + std::to_string(holder);
  else if (folio_test_locked(folio)) s += " (holder unknown)";
  return s + ")";
}

// ---- PhysMem ----

Result<std::unique_ptr<PhysMem>> PhysMem::create(const Config& config) {
  // Two blocks are reserved for the zero page and the huge zero folio.
  if (config.ram_bytes == 0 || !pmd_aligned(config.ram_bytes) || config.ram_bytes > (1ULL << 40)) {
    return Err{-EINVAL};
  }
  if (config.swap_slots > (1ULL << 32)) return Err{-EINVAL};  // fits the pfn field easily
  std::unique_ptr<PhysMem> mem(new PhysMem(config));
  mem->swap_ = std::make_unique<SwapArea>(config.swap_slots);
  size_t bytes = config.ram_bytes + 2 * kPmdSize;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
  if (p == MAP_FAILED) return Err{-ENOMEM};
  mem->base_ = static_cast<std::byte*>(p);
  mem->ram_pages_ = bytes >> kPageShift;
  mem->frames_ = std::make_unique<Folio[]>(mem->ram_pages_);
  const uint64_t nblocks = mem->ram_pages_ / kPagesPerPmd;
  {
    SpinLockGuard g(&mem->zone_lock_);
    mem->blocks_.resize(nblocks);
    // Block 0: the zero page (frame 0) and 511 frames never handed out. Block 1: huge zero.
    for (uint64_t b = nblocks; b-- > 2;) {
      mem->blocks_[b].whole_free = true;
      mem->whole_free_.push_back(b);
    }
    mem->nr_free_ = (nblocks - 2) * kPagesPerPmd;
  }
  for (Pfn pfn = 0; pfn < mem->ram_pages_; pfn++) {
    Folio& f = mem->frames_[pfn];
    f.mem_ = mem.get();
    f.pfn_ = pfn;
    f.head_.store(&f, std::memory_order_relaxed);
    f.flags_.store(pfn >= 2 * kPagesPerPmd ? uint32_t{kFolioFree} : 0u, std::memory_order_relaxed);
  }
  mem->zero_page_ = &mem->frames_[0];
  Folio::init_frames(mem->zero_page_, 0, 0);
  mem->zero_page_->set(kFolioZero);
  mem->huge_zero_ = &mem->frames_[kPagesPerPmd];
  Folio::init_frames(mem->huge_zero_, kPmdOrder, 0);
  mem->huge_zero_->set(kFolioZero);
  return mem;
}

PhysMem::PhysMem(const Config& config)
    : config_(config), thp_mode_(config.thp), use_zero_page_(config.use_zero_page) {}

PhysMem::~PhysMem() {
  if (base_) ::munmap(base_, ram_pages_ << kPageShift);
}

void Folio::init_frames(Folio* head, unsigned order, uint32_t flags) {
  const uint64_t n = 1ULL << order;
  for (uint64_t i = 0; i < n; i++) {
    Folio* p = head + i;
    p->head_.store(head, std::memory_order_relaxed);
    p->order_.store(0, std::memory_order_relaxed);
    p->mapcount_.store(0, std::memory_order_relaxed);
    p->page_flags_.store(0, std::memory_order_relaxed);
    p->flags_.store(flags, std::memory_order_relaxed);
  }
  head->order_.store(static_cast<uint8_t>(order), std::memory_order_relaxed);
  head->entire_mapcount_.store(0, std::memory_order_relaxed);
  head->mapping_ = nullptr;
  head->index_ = 0;
  head->zone_device_data = nullptr;
  // release: publishes the initialised descriptor with the first reference.
  head->refcount_.store(1, std::memory_order_release);
}

int64_t PhysMem::take_whole_block_locked(bool as_frames) {
  zone_lock_.assert_held();
  if (whole_free_.empty()) return -1;
  const uint64_t b = whole_free_.back();
  whole_free_.pop_back();
  Block& blk = blocks_[b];
  blk.whole_free = false;
  // As frames: all 512 free in the bitmap. As a THP: all in use; if the THP is split later its
  // frames come back one by one through free_folio.
  blk.split = as_frames;
  blk.nr_free = as_frames ? kPagesPerPmd : 0;
  std::fill(std::begin(blk.free_bitmap), std::end(blk.free_bitmap), as_frames ? ~0ULL : 0ULL);
  return static_cast<int64_t>(b);
}

Folio* PhysMem::folio_alloc(unsigned order, bool zero) {
  if (order != 0 && order != kPmdOrder) panic("folio_alloc: unsupported order " + std::to_string(order));
  if (order == 0 ? g_fail_alloc_folio.should_fail() : g_fail_alloc_thp.should_fail()) {
    stat_alloc_fail.add();
    return nullptr;
  }
  return alloc_frames(order, zero);
}

uint64_t PhysMem::used_pages() const {
  SpinLockGuard g(&zone_lock_);
  return (blocks_.size() - 2) * kPagesPerPmd - nr_free_;
}

Folio* PhysMem::alloc_frames(unsigned order, bool zero) {
  Pfn pfn;
  {
    SpinLockGuard g(&zone_lock_);
    // The memory limit (Config::memory_limit_pages) counts every RAM frame in use.
    if (config_.memory_limit_pages &&
        (blocks_.size() - 2) * kPagesPerPmd - nr_free_ + (1ULL << order) > config_.memory_limit_pages) {
      stat_alloc_fail.add();
      return nullptr;
    }
    if (order == kPmdOrder) {
      const int64_t b = take_whole_block_locked(/*as_frames=*/false);
      if (b < 0) {
        stat_alloc_fail.add();
        return nullptr;
      }
      nr_free_ -= kPagesPerPmd;
      pfn = static_cast<uint64_t>(b) * kPagesPerPmd;
    } else {
      if (partial_.empty()) {
        const int64_t b = take_whole_block_locked(/*as_frames=*/true);
        if (b < 0) {
          stat_alloc_fail.add();
          return nullptr;
        }
        partial_.push_back(static_cast<uint64_t>(b));
      }
      uint64_t b = partial_.back();
      Block& blk = blocks_[b];
      unsigned bit = 0;
      for (unsigned w = 0; w < kPagesPerPmd / 64; w++) {
        if (blk.free_bitmap[w]) {
          unsigned t = static_cast<unsigned>(__builtin_ctzll(blk.free_bitmap[w]));
          blk.free_bitmap[w] &= ~(1ULL << t);
          bit = w * 64 + t;
          break;
        }
      }
      if (--blk.nr_free == 0) partial_.pop_back();
      nr_free_--;
      pfn = b * kPagesPerPmd + bit;
    }
  }
  Folio* head = &frames_[pfn];
  Folio::init_frames(head, order, 0);
  if (zero) std::memset(ram_data(pfn), 0, kPageSize << order);
  (order ? stat_alloc_thp : stat_alloc_order0).add();
  return head;
}

void PhysMem::free_folio(Folio* folio) {
  if (folio->total_mapcount() != 0) {
    panic("freeing mapped folio pfn " + std::to_string(folio->pfn()));
  }
  if (folio->test(kFolioLocked)) panic("freeing locked folio pfn " + std::to_string(folio->pfn()));
  if (folio->test(kFolioSwapCache) || folio->test(kFolioIsolated)) {
    panic("freeing a folio still in the swap cache or isolated: " + folio_describe(folio));
  }
  lru_del(folio);
  deferred_split_remove(folio);
  const uint64_t n = folio->nr_pages();
  const Pfn pfn = folio->pfn();
  const bool hugetlb = folio->test(kFolioHugetlb);
  for (uint64_t i = 0; i < n; i++) {
    Folio* p = &frames_[pfn + i];
    p->head_.store(p, std::memory_order_relaxed);
    p->order_.store(0, std::memory_order_relaxed);
    p->flags_.store(kFolioFree, std::memory_order_relaxed);
    p->page_flags_.store(0, std::memory_order_relaxed);
    p->mapping_ = nullptr;
  }
  stat_free_pages.add(n);
  SpinLockGuard g(&zone_lock_);
  const uint64_t b = pfn / kPagesPerPmd;
  Block& blk = blocks_[b];
  nr_free_ += n;
  if (hugetlb) {
    if (hugetlb_in_use_ == 0) panic("hugetlb pool: freeing more pages than are in use");
    hugetlb_in_use_--;
  }
  if (n == kPagesPerPmd) {
    blk.whole_free = true;
    whole_free_.push_back(b);
    return;
  }
  const unsigned bit = static_cast<unsigned>(pfn % kPagesPerPmd);
  if (blk.free_bitmap[bit / 64] & (1ULL << (bit % 64))) {
    panic("double free of frame " + std::to_string(pfn));
  }
  blk.split = true;  // a split THP's block now holds single frames
  blk.free_bitmap[bit / 64] |= 1ULL << (bit % 64);
  if (blk.nr_free++ == 0) partial_.push_back(b);
  if (blk.nr_free == kPagesPerPmd) {
    // Every frame of the block is free again: coalesce into a whole block.
    partial_.erase(std::find(partial_.begin(), partial_.end(), b));
    blk.split = false;
    blk.nr_free = 0;
    blk.whole_free = true;
    whole_free_.push_back(b);
  }
}

uint64_t PhysMem::free_pages() const {
  SpinLockGuard g(&zone_lock_);
  return nr_free_;
}

namespace {
// pfn_to_page of a device pfn found its descriptor, the registry lock is dropped. Reached
// only by lookups made without a spin lock held (a lookup under the PTL of an entry that maps
// the page is covered by the entry's reference). Held: the caller's sleeping locks.
GPUSVM_SCHED_POINT(g_sp_pagemap_looked_up, "mm.devmap.pagemap_looked_up");
}  // namespace

Folio* PhysMem::pfn_to_page(Pfn pfn) {
  if (pfn < ram_pages_) return &frames_[pfn];
  // The descriptor is found under the registry lock from the registry's own record: once
  // the lock is dropped the pagemap may be unregistered and freed (a fault on a migration
  // entry looks the pfn up after dropping the PTE lock, while RELEASE evicts and removes the
  // chunk), but its descriptors are retired, never freed.
  Folio* page = nullptr;
  {
    SpinLockGuard g(&registry_lock_);
    for (const PagemapRange& r : pagemaps_) {
      if (pfn >= r.start && pfn < r.start + r.nr) {
        page = &r.frames[pfn - r.start];
        break;
      }
    }
  }
  if (page) g_sp_pagemap_looked_up.reach();  // not under a spin lock only: see sched_point.h
  return page;
}

Folio* PhysMem::folio_of(Pfn pfn) {
  Folio* p = pfn_to_page(pfn);
  return p ? p->head() : nullptr;
}

Result<Pfn> PhysMem::register_pagemap(DevPagemap* pgmap, Folio* frames, uint64_t nr_pages) {
  SpinLockGuard g(&registry_lock_);
  if (next_device_pfn_ == 0) next_device_pfn_ = pmd_align_up(ram_pages_ << kPageShift) >> kPageShift;
  // Device pfns are PMD aligned so device-private THPs are possible.
  Pfn start = next_device_pfn_;
  uint64_t span = pmd_align_up(nr_pages << kPageShift) >> kPageShift;
  if (start + span > (1ULL << 40)) return Err{-ENOSPC};
  next_device_pfn_ += span;
  pagemaps_.push_back(PagemapRange{start, nr_pages, pgmap, frames});
  return start;
}

void PhysMem::unregister_pagemap(DevPagemap* pgmap, std::unique_ptr<Folio[]> descriptors) {
  SpinLockGuard g(&registry_lock_);
  std::erase_if(pagemaps_, [pgmap](const PagemapRange& r) { return r.pgmap == pgmap; });
  if (descriptors) retired_descriptors_.push_back(std::move(descriptors));
}

DevPagemap* PhysMem::pfn_to_pagemap(Pfn pfn) {
  SpinLockGuard g(&registry_lock_);
  for (const PagemapRange& r : pagemaps_) {
    if (pfn >= r.start && pfn < r.start + r.nr) return r.pgmap;
  }
  return nullptr;
}

void PhysMem::add_address_space(AddressSpace* mm) {
  SpinLockGuard g(&registry_lock_);
  spaces_.push_back(mm);
}

void PhysMem::remove_address_space(AddressSpace* mm) {
  SpinLockGuard g(&registry_lock_);
  std::erase(spaces_, mm);
}

std::vector<DevPagemap*> PhysMem::pagemaps() const {
  SpinLockGuard g(&registry_lock_);
  std::vector<DevPagemap*> out;
  for (const PagemapRange& r : pagemaps_) out.push_back(r.pgmap);
  std::sort(out.begin(), out.end(), [](DevPagemap* a, DevPagemap* b) { return a->first_pfn() < b->first_pfn(); });
  return out;
}

std::vector<AddressSpace*> PhysMem::address_spaces() {
  SpinLockGuard g(&registry_lock_);
  return spaces_;
}

void PhysMem::deferred_split_folio(Folio* folio) {
  if (!folio->large() || folio->test(kFolioDeferredSplit)) return;
  SpinLockGuard g(&registry_lock_);
  if (folio->test(kFolioDeferredSplit)) return;
  folio->set(kFolioDeferredSplit);
  deferred_split_.push_back(folio);
}

}  // namespace gpusvm::mm

namespace gpusvm::mm {

void PhysMem::deferred_split_remove(Folio* folio) {
  if (!folio->test(kFolioDeferredSplit)) return;
  SpinLockGuard g(&registry_lock_);
  folio->clear(kFolioDeferredSplit);
  std::erase(deferred_split_, folio);
}

size_t PhysMem::deferred_split_count() const {
  SpinLockGuard g(&registry_lock_);
  return deferred_split_.size();
}

}  // namespace gpusvm::mm

// ---- hugetlb pool ----

namespace gpusvm::mm {

void PhysMem::give_back_block_locked(uint64_t b) {
  zone_lock_.assert_held();
  for (uint64_t i = 0; i < kPagesPerPmd; i++) {
    frames_[b * kPagesPerPmd + i].flags_.store(kFolioFree, std::memory_order_relaxed);
  }
  Block& blk = blocks_[b];
  blk.whole_free = true;
  whole_free_.push_back(b);
  nr_free_ += kPagesPerPmd;
}

PhysMem::HugetlbCounts PhysMem::hugetlb_counts() const {
  SpinLockGuard g(&zone_lock_);
  const uint64_t total = config_.hugetlb_pages;
  return HugetlbCounts{total, total - hugetlb_in_use_, hugetlb_resv_.size(), hugetlb_in_use_};
}

int PhysMem::hugetlb_reserve(AddressSpace* mm, Va start, Va end) {
  if (!pmd_aligned(start) || !pmd_aligned(end) || start >= end) {
    panic("hugetlb_reserve: range not 2 MiB aligned");
  }
  const uint64_t want = (end - start) / kPmdSize;
  SpinLockGuard g(&zone_lock_);
  if (hugetlb_in_use_ + hugetlb_resv_.size() + want > config_.hugetlb_pages ||
      whole_free_.size() < want) {
    return -ENOMEM;
  }
  for (Va h = start; h < end; h += kPmdSize) {
    if (!hugetlb_resv_.insert({mm, h}).second) panic("hugetlb_reserve: slot reserved twice");
    const int64_t b = take_whole_block_locked(/*as_frames=*/false);
    nr_free_ -= kPagesPerPmd;
    // Neither free nor a folio: mm::check skips frames with refcount 0 that are not free.
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      frames_[static_cast<uint64_t>(b) * kPagesPerPmd + i].flags_.store(0, std::memory_order_relaxed);
    }
    hugetlb_resv_blocks_.push_back(static_cast<uint64_t>(b));
  }
  return 0;
}

void PhysMem::hugetlb_unreserve(AddressSpace* mm, Va start, Va end) {
  SpinLockGuard g(&zone_lock_);
  auto it = hugetlb_resv_.lower_bound({mm, start});
  while (it != hugetlb_resv_.end() && it->first == mm && it->second < end) {
    it = hugetlb_resv_.erase(it);
    give_back_block_locked(hugetlb_resv_blocks_.back());
    hugetlb_resv_blocks_.pop_back();
  }
}

Folio* PhysMem::hugetlb_alloc_folio(AddressSpace* mm, Va haddr, bool* reserved) {
  uint64_t b;
  {
    SpinLockGuard g(&zone_lock_);
    auto it = hugetlb_resv_.find({mm, haddr});
    *reserved = it != hugetlb_resv_.end();
    if (*reserved) {
      hugetlb_resv_.erase(it);
      b = hugetlb_resv_blocks_.back();
      hugetlb_resv_blocks_.pop_back();
    } else {
      if (hugetlb_in_use_ + hugetlb_resv_.size() >= config_.hugetlb_pages ||
          g_fail_alloc_hugetlb.should_fail()) {
        stat_alloc_fail.add();
        return nullptr;
      }
      const int64_t got = take_whole_block_locked(/*as_frames=*/false);
      if (got < 0) {
        stat_alloc_fail.add();
        return nullptr;
      }
      nr_free_ -= kPagesPerPmd;
      b = static_cast<uint64_t>(got);
    }
    hugetlb_in_use_++;
  }
  Folio* head = &frames_[b * kPagesPerPmd];
  Folio::init_frames(head, kPmdOrder, kFolioAnon | kFolioHugetlb);
  std::memset(ram_data(head->pfn()), 0, kPmdSize);
  return head;
}

std::vector<std::pair<AddressSpace*, Va>> PhysMem::hugetlb_reservations() const {
  SpinLockGuard g(&zone_lock_);
  return {hugetlb_resv_.begin(), hugetlb_resv_.end()};
}

}  // namespace gpusvm::mm
