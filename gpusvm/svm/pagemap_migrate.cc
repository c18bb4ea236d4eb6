// migrate_to_devmem (drm_pagemap_migrate_to_devmem) and the helpers the three provider
// migrations share.
#include <cerrno>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/vma.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap_migrate.h"
#include "gpusvm/svm/pagemap_zdd.h"

namespace gpusvm::svm {

using mm::kPageShift;
using mm::kPageSize;
using mm::kPagesPerPmd;

namespace {
// The record every page of a migration will point to could not be allocated (kmalloc).
GPUSVM_FAULT_POINT(g_fail_zdd_alloc, "svm.zdd_alloc");
// migrate_to_devmem: the walk collected the range (migration entries installed), nothing
// allocated or copied yet. Held: the mmap lock (read), the collected folios' locks.
GPUSVM_SCHED_POINT(g_sp_collected, "svm.migrate_to_devmem.collected");
// migrate_to_devmem: the copy is done, migrate_vma_pages not called yet. Held as above plus
// the destination folios' locks.
GPUSVM_SCHED_POINT(g_sp_copied, "svm.migrate_to_devmem.copied");

// Who copies a run of pages into the new allocation: the destination device (nullptr), or
// the peer device whose memory the pages are in (its devmem).
Devmem* copier_of(mm::PhysMem* mem, uint64_t src_word, const MigrateDetails& d, const Pagemap* local) {
  if (!d.source_peer_migrates) return nullptr;
  PagemapZdd* zdd = page_zdd(mpfn_folio(mem, src_word));
  if (!zdd || zdd->devmem->pagemap() == local) return nullptr;
  return zdd->devmem;
}

// Copies [a, b) of the migration: pages[] hold the destination pages for a local run, the
// source (peer) pages for a peer run.
int copy_run(mm::PhysMem* mem, Devmem* devmem, Devmem* peer, const uint64_t* src, const uint64_t* dst,
             mm::Folio** pages, PagemapAddr* addrs, uint64_t a, uint64_t b) {
  if (a >= b) return 0;
  const uint64_t n = b - a;
  int err;
  if (!peer) {
    // drm_pagemap_migrate_sys_to_dev: our device reads the sources (system pages, or device
    // pages it reaches through their pagemap: its own, or a peer's when the peer does not copy).
    err = map_pages(mem, devmem->device(), nullptr, addrs + a, src + a, n, DmaDirection::kToDevice);
    if (!err) err = devmem->ops()->copy_to_devmem(pages + a, addrs + a, n, devmem->pre_migrate_fence());
    unmap_pages(mem, devmem->device(), addrs + a, src + a, n);
    return err;
  }
  // drm_pagemap_migrate_remote_to_local: the peer writes our new pages over the interconnect.
  err = map_pages(mem, peer->device(), nullptr, addrs + a, dst + a, n, DmaDirection::kFromDevice);
  if (!err) err = peer->ops()->copy_to_ram(pages + a, addrs + a, n, devmem->pre_migrate_fence());
  unmap_pages(mem, peer->device(), addrs + a, dst + a, n);
  if (!err) pagemap_stats().peer_copies.fetch_add(1, std::memory_order_relaxed);
  return err;
}

// Pages whose source word still says MIGRATE after migrate_vma_pages.
uint64_t migrated_pages(const uint64_t* src, uint64_t npages) {
  uint64_t n = 0;
  for (uint64_t i = 0; i < npages;) {
    if (src[i] & mm::MIGRATE_PFN_MIGRATE) {
      n += mpfn_pages(src[i]);
      i += mpfn_pages(src[i]);
    } else {
      i++;
    }
  }
  return n;
}

// Initialises the destination folios from the allocation's pfns: a compound one where the
// source entry is compound and the pfns are an aligned 2 MiB block, else small ones. Each
// gets a zdd reference and is locked. Returns 0, or -EBUSY for a frame already in use (a
// populate_devmem_pfn that handed out busy frames); dst then holds what was initialised.
int init_destinations(mm::DevPagemap* dpm, PagemapZdd* zdd, const uint64_t* src, const uint64_t* pfns,
                      uint64_t* dst, mm::Folio** pages, uint64_t npages) {
  for (uint64_t i = 0; i < npages;) {
    const uint64_t write = src[i] & mm::MIGRATE_PFN_WRITE;
    bool compound = (src[i] & mm::MIGRATE_PFN_COMPOUND) && i + kPagesPerPmd <= npages &&
                    pfns[i] % kPagesPerPmd == 0;
    for (uint64_t j = 1; compound && j < kPagesPerPmd; j++) compound = pfns[i + j] == pfns[i] + j;
    const uint64_t n = compound ? kPagesPerPmd : 1;
    if (!dpm->contains(pfns[i]) || !dpm->contains(pfns[i] + n - 1)) return -EINVAL;
    mm::Folio* f = dpm->folio_init(pfns[i], compound ? mm::kPmdOrder : 0);
    if (!f) return -EBUSY;
    zdd->get();
    for (uint64_t j = 0; j < n; j++) {
      f->page(j)->zone_device_data = zdd;
      pages[i + j] = f->page(j);
    }
    mm::folio_lock(f);
    dst[i] = mm::migrate_pfn(f->pfn()) | write | (compound ? mm::MIGRATE_PFN_COMPOUND : 0);
    i += n;
  }
  return 0;
}

// The migration proper, under the mmap lock. zdd: the migration's reference (the caller
// drops it afterwards, with the lock released).
int migrate_locked(Devmem* devmem, mm::AddressSpace* as, mm::Va start, mm::Va end, const MigrateDetails& d,
                   PagemapZdd* zdd) GPUSVM_REQUIRES_SHARED(as->mmap_lock()) {
  as->mmap_assert_locked();
  Pagemap* pm = devmem->pagemap();
  mm::DevPagemap* dpm = pm->dev_pagemap();
  mm::PhysMem* mem = as->mem();
  const mm::Vma* vma = as->vma_lookup(start);
  if (!vma) return -ENOENT;
  if (start < vma->start || end > vma->end) return -EINVAL;
  if (!vma->is_anonymous()) return -EBUSY;

  const uint64_t npages = (end - start) >> kPageShift;
  std::vector<uint64_t> src(npages), dst(npages), pfns(npages);
  std::vector<PagemapAddr> addrs(npages);
  std::vector<mm::Folio*> pages(npages, nullptr);
  mm::MigrateVma m{.mm = as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
                   .pgmap_owner = pm->owner(),
                   .flags = mm::MIGRATE_VMA_SELECT_SYSTEM | mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE |
                            mm::MIGRATE_VMA_SELECT_COMPOUND | mm::MIGRATE_VMA_FAULT};
  if (int rc = mm::migrate_vma_setup(&m)) return rc;
  g_sp_collected.reach();
  int err = 0;
  auto abort = [&](int e) {
    // Nothing was given a destination: migrate_vma_pages commits nothing and finalize puts
    // every source back where it was.
    m.mm->mmap_assert_locked();  // the same lock, named through the MigrateVma
    mm::migrate_vma_pages(&m);
    mm::migrate_vma_finalize(&m);
    return e;
  };
  // Raced (another migration, a pin) or could not take everything: all or nothing.
  if (m.cpages != npages) return abort(-EBUSY);

  uint64_t own = 0;
  for (uint64_t i = 0; i < npages; i += mpfn_pages(src[i])) {
    mm::Folio* f = mpfn_folio(mem, src[i]);
    if (f && f->pagemap() == dpm) own += mpfn_pages(src[i]);
  }
  if (own == npages) return abort(0);  // already there: nothing to do
  if (own && !d.can_migrate_same_pagemap) return abort(-EBUSY);

  if ((err = devmem->ops()->populate_devmem_pfn(devmem, npages, pfns.data()))) return abort(err);
  if ((err = init_destinations(dpm, zdd, src.data(), pfns.data(), dst.data(), pages.data(), npages))) {
    unlock_put_pages(mem, dst.data(), npages);
    return abort(err);
  }

  // Runs of one copier (drm_pagemap_migrate_range): a peer's pages are copied by the peer.
  Devmem* run_copier = nullptr;
  uint64_t run_start = 0;
  for (uint64_t i = 0; i < npages && !err;) {
    Devmem* c = copier_of(mem, src[i], d, pm);
    if (c != run_copier) {
      err = copy_run(mem, devmem, run_copier, src.data(), dst.data(), pages.data(), addrs.data(), run_start, i);
      run_copier = c;
      run_start = i;
    }
    if (c) {  // the peer copies from its pages: pages[] names the sources for its run
      mm::Folio* s = mpfn_folio(mem, src[i]);
      for (uint64_t j = 0; j < mpfn_pages(src[i]); j++) pages[i + j] = s->page(j);
    }
    i += mpfn_pages(src[i]);
  }
  if (!err) {
    err = copy_run(mem, devmem, run_copier, src.data(), dst.data(), pages.data(), addrs.data(), run_start, npages);
  }
  if (err) {
    unlock_put_pages(mem, dst.data(), npages);
    return abort(err);
  }
  g_sp_copied.reach();
  devmem->migration_done(std::chrono::milliseconds(d.timeslice_ms));
  m.mm->mmap_assert_locked();
  mm::migrate_vma_pages(&m);
  // A page whose entry changed since the walk (it cannot: the migration entries hold it, but
  // the kernel checks, and so do we) stays behind: the range is then not all in devmem.
  if (migrated_pages(src.data(), npages) < npages) err = -EBUSY;
  mm::migrate_vma_finalize(&m);
  if (!err) pagemap_stats().migrations_to_devmem.fetch_add(1, std::memory_order_relaxed);
  return err;
}

}  // namespace

int map_pages(mm::PhysMem* mem, Device* dev, const Pagemap* skip_pagemap, PagemapAddr* addrs,
              const uint64_t* mpfns, uint64_t npages, DmaDirection dir) {
  for (uint64_t i = 0; i < npages;) {
    mm::Folio* page = mpfn_folio(mem, mpfns[i]);
    if (!page) {
      i++;
      continue;
    }
    mm::Folio* folio = page->head();
    const unsigned order = folio->order();
    if (mm::folio_is_zone_device(folio)) {
      PagemapZdd* zdd = page_zdd(folio);
      Pagemap* pm = zdd ? zdd->devmem->pagemap() : nullptr;
      if (!pm) return -EFAULT;  // a device page this layer did not hand out
      if (pm != skip_pagemap) {
        addrs[i] = pm->device_map(dev, folio, order, dir);
        if (addrs[i].addr == kDmaMappingError) return -EFAULT;
      }
    } else {
      const DmaAddr a = dev->dma_map_page(folio->pfn(), order, dir);
      if (a == kDmaMappingError) return -EFAULT;
      addrs[i] = PagemapAddr{a, PagemapAddrProto::kSystem, static_cast<uint8_t>(order), dir};
    }
    i += folio->nr_pages();
  }
  return 0;
}

void unmap_pages(mm::PhysMem* mem, Device* dev, PagemapAddr* addrs, const uint64_t* mpfns, uint64_t npages) {
  for (uint64_t i = 0; i < npages;) {
    const uint64_t step = addrs[i].addr == kDmaMappingError ? 1 : (1ULL << addrs[i].order);
    if (addrs[i].addr != kDmaMappingError) {
      mm::Folio* page = mpfn_folio(mem, mpfns[i]);
      if (addrs[i].proto == PagemapAddrProto::kSystem) {
        dev->dma_unmap_page(addrs[i].addr, addrs[i].order, addrs[i].dir);
      } else {
        page_to_pagemap(page)->device_unmap(dev, addrs[i]);
      }
      addrs[i] = PagemapAddr{};
    }
    i += step;
  }
}

void unlock_put_pages(mm::PhysMem* mem, uint64_t* dst, uint64_t npages) {
  for (uint64_t i = 0; i < npages; i++) {
    mm::Folio* f = mpfn_folio(mem, dst[i]);
    dst[i] = 0;
    if (!f) continue;
    mm::folio_unlock(f);
    f->put();
  }
}

int populate_ram_pfn(mm::PhysMem* mem, const Devmem* devmem, const uint64_t* src, uint64_t* dst,
                     uint64_t npages, uint64_t* mpages) {
  *mpages = 0;
  for (uint64_t i = 0; i < npages;) {
    mm::Folio* s = (src[i] & mm::MIGRATE_PFN_MIGRATE) ? mpfn_folio(mem, src[i]) : nullptr;
    const PagemapZdd* zdd = s ? page_zdd(s) : nullptr;
    if (!zdd || zdd->devmem != devmem) {
      i++;
      continue;
    }
    const unsigned order = s->head()->order();
    mm::Folio* f = mem->folio_alloc(order, /*zero=*/false);
    if (!f) {
      unlock_put_pages(mem, dst, npages);
      *mpages = 0;
      return -ENOMEM;
    }
    mm::folio_lock(f);
    dst[i] = mm::migrate_pfn(f->pfn()) | (order ? mm::MIGRATE_PFN_COMPOUND : 0);
    *mpages += f->nr_pages();
    i += f->nr_pages();
  }
  return 0;
}

int migrate_to_devmem(Devmem* devmem, mm::AddressSpace* as, mm::Va start, mm::Va end, const MigrateDetails& d) {
  if (!devmem) return -EINVAL;
  int err = 0;
  if (!as || !devmem->ops() || !devmem->pagemap() || !mm::page_aligned(start) || !mm::page_aligned(end) ||
      start >= end || ((end - start) >> kPageShift) > devmem->npages()) {
    err = -EINVAL;
  } else if (as->exited()) {
    err = -EFAULT;  // mmget_not_zero
  } else if (as->mem() != devmem->pagemap()->dev_pagemap()->mem()) {
    err = -EINVAL;
  } else if (g_fail_zdd_alloc.should_fail()) {
    err = -ENOMEM;
  }
  if (err) {
    devmem_detach(devmem, /*from_reclaim=*/false);  // the caller's reference is consumed
    return err;
  }
  // The migration's reference; each device page takes its own. Owns the devmem from here:
  // its last put (ours, on failure) releases the allocation.
  auto* zdd = new PagemapZdd(devmem);
  {
    ReadLock g(&as->mmap_lock());
    err = migrate_locked(devmem, as, start, end, d, zdd);
  }
  zdd->put(/*from_reclaim=*/false);
  return err;
}

}  // namespace gpusvm::svm
