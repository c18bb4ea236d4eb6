// get_pages, pages_valid, unmap_pages, free_pages: the mapping side of Gpusvm.
//
// get_pages follows drm_gpusvm_get_pages:
//
//   retry:                                  (bounded: 1 s of -EBUSY / read_retry, then -EBUSY)
//     seq = read_begin(notifier)            waits out an invalidation of the notifier
//     mmap read lock; hmm_range_fault(REQ_FAULT[|REQ_WRITE]); unlock
//     plan the address array from the pfns (entry count, folding) and allocate it
//     notifier lock (read)
//       unmapped? -> -EFAULT                an UNMAP event took the range away
//       read_retry(seq)? -> unlock, retry    the pfns may be stale
//       resolve pages (still mapped: no invalidation since seq), placement checks
//       map every invalid Pages object, publish array, seq and flags
//     unlock; free replaced arrays
//
// Why the pages can be resolved and mapped under the read lock without page references: an
// invalidation of any of them runs the notifier callback, which needs the write lock, and
// would have bumped the sequence before the CPU page table changed; read_retry under the
// lock sees that. While we hold the lock, the callback waits, so the pages stay mapped until
// we publish, and the callback then unmaps what we published.
#include <bit>
#include <chrono>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/gpusvm.h"

namespace gpusvm::svm {
namespace {
GPUSVM_FAULT_POINT(g_fail_pfns_alloc, "svm.pfns_alloc");
GPUSVM_FAULT_POINT(g_fail_addrs_alloc, "svm.pages_alloc");
// Between hmm_range_fault and the notifier lock: the window an invalidation (an eviction, a
// munmap) can hit, which read_retry must catch.
GPUSVM_SCHED_POINT(g_sp_get_pages_faulted, "svm.get_pages.faulted");

using Clock = std::chrono::steady_clock;

using PlanEntry = Gpusvm::PlanEntry;

// drm_gpusvm_hmm_pfn_to_order: the order hmm mapped the page at (a PMD-mapped THP gives one
// entry), as long as the whole folio lies inside [0, npages) at an aligned index.
unsigned entry_order(uint64_t word, uint64_t index, uint64_t npages) {
  const unsigned order = mm::hmm_pfn_to_map_order(word);
  if (order == 0) return 0;
  const uint64_t n = uint64_t{1} << order;
  const mm::Pfn pfn = mm::hmm_pfn_to_pfn(word);
  if ((index & (n - 1)) || (pfn & (n - 1)) || index + n > npages) return 0;
  return order;
}

// Plans the entries: one per folio, or one folded entry when the pfns of the whole span are
// contiguous, of one kind (all system or all device private) and a power of two long.
std::vector<PlanEntry> plan_entries(mm::PhysMem* mem, const std::vector<uint64_t>& pfns) {
  const uint64_t npages = pfns.size();
  std::vector<PlanEntry> plan;
  const mm::Pfn first = mm::hmm_pfn_to_pfn(pfns[0]);
  bool contiguous = std::has_single_bit(npages);
  bool first_device = false;
  if (contiguous) {
    mm::Folio* p0 = mem->pfn_to_page(first);
    first_device = p0 && mm::folio_is_zone_device(p0);
  }
  for (uint64_t i = 1; contiguous && i < npages; i++) {
    contiguous = mm::hmm_pfn_to_pfn(pfns[i]) == first + i;
  }
  // Device pages are folded only within one folio (hmm's order), never across folios of
  // possibly different allocations: the pagemap maps per allocation.
  if (contiguous && !first_device) {
    plan.push_back({first, 0, static_cast<unsigned>(std::countr_zero(npages))});
    return plan;
  }
  for (uint64_t i = 0; i < npages;) {
    const unsigned order = entry_order(pfns[i], i, npages);
    plan.push_back({mm::hmm_pfn_to_pfn(pfns[i]), i, order});
    i += uint64_t{1} << order;
  }
  return plan;
}

int read_fault(mm::AddressSpace* as, mm::HmmRange* r) {
  ReadLock mmap(&as->mmap_lock());
  if (as->exited()) return -EFAULT;
  return mm::hmm_range_fault(r);
}
}  // namespace

DmaAddr Pages::addr_of(uint64_t page_index) const {
  uint64_t idx = 0;
  for (uint32_t i = 0; i < nr_addrs_; i++) {
    const uint64_t n = uint64_t{1} << addrs_[i].order;
    if (page_index < idx + n) return addrs_[i].addr + ((page_index - idx) << mm::kPageShift);
    idx += n;
  }
  return kDmaMappingError;
}

Pages::~Pages() {
  if (flags() & pages_flags::kHasDmaMapping) {
    panic("svm::Pages of " + dev_->name() + " destroyed while still mapped");
  }
}

int Gpusvm::range_get_pages(Range* range, const Ctx& ctx) {
  assert_driver_lock_held("range_get_pages");
  Notifier* notifier = range->notifier();
  if (!notifier) return -ENOENT;  // removed (stable: removal needs the driver lock)
  std::vector<Pages*> v;
  v.reserve(range->pages_.size());
  for (auto& p : range->pages_) v.push_back(p.get());
  return get_pages_impl(v.data(), v.size(), cfg_.as, &notifier->notifier_,
                        range->start_, range->end_, ctx, range);
}

int Gpusvm::get_pages(Pages* const* pages, size_t n, mm::AddressSpace* as,
                      mm::MmuIntervalNotifier* notifier, mm::Va start, mm::Va end,
                      const Ctx& ctx) {
  return get_pages_impl(pages, n, as, notifier, start, end, ctx, nullptr);
}

int Gpusvm::get_pages_impl(Pages* const* pages, size_t n, mm::AddressSpace* as,
                           mm::MmuIntervalNotifier* notifier, mm::Va start, mm::Va end,
                           const Ctx& ctx, Range* range) {
  if (!pages || n == 0 || !as || !notifier || start >= end ||
      ((start | end) & (mm::kPageSize - 1)) || notifier->mm() != as ||
      start < notifier->start() || end > notifier->end()) {
    return -EINVAL;
  }
  for (size_t i = 0; i < n; i++) {
    if (!pages[i]) return -EINVAL;
  }
  lockdep::check_order(&as->mmap_lock(), &mm::kMmapLockClass);
  const uint64_t npages = (end - start) >> mm::kPageShift;
  if (g_fail_pfns_alloc.should_fail()) return -ENOMEM;
  std::vector<uint64_t> pfns(npages);
  const uint64_t fault_flags =
      mm::HMM_PFN_REQ_FAULT | (ctx.read_only ? 0 : mm::HMM_PFN_REQ_WRITE);
  const DmaDirection dir = ctx.read_only ? DmaDirection::kToDevice : DmaDirection::kBidirectional;
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHmmRangeDefaultTimeoutMs);
  mm::PhysMem* mem = as->mem();

  for (unsigned attempt = 0;; attempt++) {
    if (attempt > 0) {
      if (range) range->stats_.get_pages_retries.add();
      if (Clock::now() > deadline) {
        log::get().warn("gpusvm {}: get_pages [{:#x}, {:#x}) kept colliding for {} ms ({} "
                        "attempts, notifier [{:#x}, {:#x}) seq {}): -EBUSY",
                        cfg_.name, start, end, kHmmRangeDefaultTimeoutMs, attempt,
                        notifier->start(), notifier->end(), notifier->read_begin());
        return -EBUSY;
      }
    }
    std::fill(pfns.begin(), pfns.end(), 0);
    mm::HmmRange hr{.notifier = notifier, .notifier_seq = notifier->read_begin(),
                    .start = start, .end = end, .hmm_pfns = pfns.data(),
                    .default_flags = fault_flags,
                    .dev_private_owner = ctx.device_private_page_owner};
    const int rc = read_fault(as, &hr);
    if (rc == -EBUSY) continue;
    if (rc != 0) return rc;
    g_sp_get_pages_faulted.reach();

    // Allocations before the lock: the plan and one array per Pages object.
    const std::vector<PlanEntry> plan = plan_entries(mem, pfns);
    std::vector<std::unique_ptr<PagemapAddr[]>> arrays(n);
    if (!ctx.no_dma_map) {
      for (size_t i = 0; i < n; i++) {
        if (g_fail_addrs_alloc.should_fail()) return -ENOMEM;
        arrays[i].reset(new (std::nothrow) PagemapAddr[plan.size()]);
        if (!arrays[i]) return -ENOMEM;
      }
    }
    int err = 0;
    bool retry = false;
    {
      ReadLock nl(&notifier_lock_);
      for (size_t i = 0; i < n && err == 0; i++) {
        if (pages[i]->unmapped()) err = -EFAULT;
      }
      if (range && !range->inserted()) err = -EFAULT;
      if (err == 0 && notifier->read_retry(hr.notifier_seq)) retry = true;
      if (err == 0 && !retry) {
        err = map_locked(pages, n, mem, plan, &arrays, hr.notifier_seq, dir, ctx);
      }
    }
    // `arrays` now holds the replaced ones (or the unused new ones): freed here, unlocked.
    if (retry) continue;
    if (err == 0 && range) range->stats_.get_pages.add();
    return err;
  }
}

int Gpusvm::map_locked(Pages* const* pages, size_t n, mm::PhysMem* mem,
                       const std::vector<PlanEntry>& plan,
                       std::vector<std::unique_ptr<PagemapAddr[]>>* arrays, uint64_t seq,
                       DmaDirection dir, const Ctx& ctx) {
  notifier_lock_.assert_held();
  // Placement: resolve every entry's page (mapped, so stable: see the file comment).
  // pfn_to_page is a lookup, not an allocation, so it is repeated per pass.
  bool has_system = false;
  Pagemap* pagemap = nullptr;
  for (const PlanEntry& e : plan) {
    mm::Folio* page = mem->pfn_to_page(e.pfn);
    Pagemap* pm = page && mm::folio_is_zone_device(page) ? page_to_pagemap(page) : nullptr;
    if (page && mm::folio_is_device_private(page) && !pm) return -EFAULT;  // not ours to map
    if (!pm) {
      has_system = true;
    } else if (pagemap && pm != pagemap) {
      return -EOPNOTSUPP;  // two pagemaps in one Pages object: evict and retry
    } else {
      pagemap = pm;
    }
  }
  if (pagemap && has_system && !ctx.allow_mixed) return -EOPNOTSUPP;
  if (ctx.devmem_only && has_system) return -EFAULT;
  if (ctx.no_dma_map) return 0;

  for (size_t i = 0; i < n; i++) {
    Pages* p = pages[i];
    if (p->flags() & pages_flags::kHasDmaMapping) {
      if (ctx.read_only || p->writable_) continue;  // still valid for this access: keep it
      unmap_pages_locked(p);  // mapped read-only, now written: map again for writing
    }
    PagemapAddr* a = (*arrays)[i].get();
    size_t done = 0;
    for (; done < plan.size(); done++) {
      const PlanEntry& e = plan[done];
      mm::Folio* page = mem->pfn_to_page(e.pfn);
      if (pagemap && page && mm::folio_is_zone_device(page)) {
        a[done] = pagemap->device_map(p->dev_, page, e.order, dir);
      } else {
        a[done] = {.addr = p->dev_->dma_map_page(e.pfn, e.order, dir),
                   .proto = PagemapAddrProto::kSystem, .order = static_cast<uint8_t>(e.order),
                   .dir = dir};
      }
      if (a[done].addr == kDmaMappingError) break;
    }
    if (done < plan.size()) {
      // Roll back this object's entries and every object mapped by this call.
      unmap_entries(p->dev_, pagemap, a, done);
      rollback_published(pages, i, arrays);
      return -EFAULT;
    }
    // Publish: the new array in, the old one out to be freed after the lock.
    std::swap(p->addrs_, (*arrays)[i]);
    p->nr_addrs_ = static_cast<uint32_t>(plan.size());
    p->npages_ = plan.empty() ? 0 : plan.back().index + (uint64_t{1} << plan.back().order);
    p->notifier_seq_ = seq;
    if (pagemap) pagemap->get();
    p->pagemap_ = pagemap;
    p->writable_ = !ctx.read_only;
    p->published_now_ = true;
    // release: pairs with the acquire in flags(); a reader seeing the bit sees the array.
    p->set_flag(pages_flags::kHasDmaMapping | (pagemap ? pages_flags::kHasDevmemPages : 0));
  }
  for (size_t i = 0; i < n; i++) pages[i]->published_now_ = false;
  if (pagemap && ctx.devmem_fn) call_devmem_fn(mem, plan, pagemap, ctx);
  return 0;
}

void Gpusvm::rollback_published(Pages* const* pages, size_t count,
                                std::vector<std::unique_ptr<PagemapAddr[]>>* arrays) {
  notifier_lock_.assert_held();
  for (size_t j = 0; j < count; j++) {
    Pages* q = pages[j];
    if (!q->published_now_) continue;
    q->published_now_ = false;
    unmap_pages_locked(q);
    // Put the previous array back, so the one mapped here is freed after the lock.
    std::swap(q->addrs_, (*arrays)[j]);
  }
}

void Gpusvm::call_devmem_fn(mm::PhysMem* mem, const std::vector<PlanEntry>& plan,
                            Pagemap* pagemap, const Ctx& ctx) {
  // One call per run of pages of one allocation (one zone_device_data), contiguous in pfn.
  mm::Folio* run_first = nullptr;
  uint64_t run_pages = 0;
  mm::Pfn run_next = 0;
  for (const PlanEntry& e : plan) {
    mm::Folio* page = mem->pfn_to_page(e.pfn);
    const bool device = page && mm::folio_is_zone_device(page);
    const uint64_t n = uint64_t{1} << e.order;
    if (run_first && device && e.pfn == run_next &&
        page->zone_device_data == run_first->zone_device_data) {
      run_pages += n;
      run_next += n;
      continue;
    }
    if (run_first) ctx.devmem_fn(pagemap, run_first, run_pages);
    run_first = device ? page : nullptr;
    run_pages = device ? n : 0;
    run_next = e.pfn + n;
  }
  if (run_first) ctx.devmem_fn(pagemap, run_first, run_pages);
}

void Gpusvm::unmap_entries(Device* dev, Pagemap* pagemap, const PagemapAddr* a, size_t count) {
  for (size_t k = 0; k < count; k++) {
    if (a[k].proto == PagemapAddrProto::kSystem) {
      dev->dma_unmap_page(a[k].addr, a[k].order, a[k].dir);
    } else {
      pagemap->device_unmap(dev, a[k]);
    }
  }
}

void Gpusvm::unmap_pages_locked(Pages* p) {
  notifier_lock_.assert_held();
  if (!(p->flags() & pages_flags::kHasDmaMapping)) return;
  // Clear first: a lockless reader must not see the bit with the entries going.
  p->clear_flag(pages_flags::kHasDmaMapping | pages_flags::kHasDevmemPages);
  unmap_entries(p->dev_, p->pagemap_, p->addrs_.get(), p->nr_addrs_);
  if (p->pagemap_) {
    // Under the notifier lock the last put must not sleep: destroy is deferred.
    p->pagemap_->put(/*from_reclaim=*/true);
    p->pagemap_ = nullptr;
  }
}

bool Gpusvm::pages_valid(const Pages& pages) const {
  notifier_lock_.assert_held();
  return pages.flags() & pages_flags::kHasDmaMapping;
}

void Gpusvm::unmap_pages(Pages* pages, const Ctx& ctx) {
  if (ctx.in_notifier) {
    notifier_lock_.assert_write_held();
    unmap_pages_locked(pages);
    return;
  }
  WriteLock g(&notifier_lock_);
  unmap_pages_locked(pages);
}

void Gpusvm::range_unmap_pages(Range* range, const Ctx& ctx) {
  for (auto& p : range->pages_) unmap_pages(p.get(), ctx);
}

void Gpusvm::free_pages(Pages* pages) {
  std::unique_ptr<PagemapAddr[]> old;
  {
    WriteLock g(&notifier_lock_);
    unmap_pages_locked(pages);
    old = std::move(pages->addrs_);
    pages->nr_addrs_ = 0;
    pages->npages_ = 0;
  }
}

}  // namespace gpusvm::svm
