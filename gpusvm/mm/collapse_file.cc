// collapse_file (mm/khugepaged.c): MADV_COLLAPSE of shmem builds a PMD-sized page-cache folio.
//
// Steps, all under the object lock (faults and lookups of the object wait, as Linux's wait on
// the new folio's lock in the cache; nothing else can add a reference meanwhile):
//   1. scan: every cached folio of the range is 4 KiB (a 2 MiB one at `start`: done already)
//      and holds exactly its cache reference and one per mapping (is_refcount_suitable);
//   2. allocate the 2 MiB folio;
//   3. lock each small folio (trylock: a busy one fails the collapse, SCAN_PAGE_LOCK) and
//      unmap it from every address space through its reverse map (try_to_unmap), then check
//      that only the cache and we hold it (SCAN_PAGE_COUNT: a reference taken since the scan);
//   4. copy each page into the new folio, replace the 512 cache slots by it, free the old ones.
// A failure in 1-3 leaves the cache as it was; pages unmapped in 3 refault from it.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/shmem.h"

namespace gpusvm::mm {
namespace {

// Held: the object lock, the locks of every small folio of the range, one reference on each;
// every one is unmapped; the refcount check has not run yet.
GPUSVM_SCHED_POINT(g_sp_collapse_unmapped, "mm.collapse_file.unmapped");

// try_to_unmap of a locked 4 KiB page-cache folio: clears every PTE that maps it, in every
// address space its reverse map names, each under a CLEAR invalidation of that address space
// (a mirror must drop the page before it is freed). Held: the folio lock (so no migration
// moves it), no page-table lock; the rmap walk lock is taken shared here (the rules of
// migrate_rmap.cc: a record names a live address space, the entry is re-read under its PTL).
// A page-cache folio is mapped by PTEs only while it is small. Returns false if it is still
// mapped afterwards (a mapping added meanwhile: fork copying a shared PTE).
// Each address space and 2 MiB block it unmapped goes to *mapped_in, for retract_page_tables.
bool unmap_cache_folio(Folio* folio, std::vector<std::pair<AddressSpace*, Va>>* mapped_in) {
  folio_assert_locked(folio);
  ReadLock walk(&folio->mem()->rmap_walk_lock());
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.pmd || item.migration) continue;
    AddressSpace& mm = *item.mm;
    mapped_in->emplace_back(&mm, pmd_align_down(item.va));
    bool dropped = false;
    {
      MmuInvalidation inv(mm, item.va, item.va + kPageSize, MmuNotifyEvent::kClear);
      PmdSlot slot = mm.page_table().pmd_lookup(item.va);
      PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
      if (!t) continue;  // unmapped meanwhile, and its record with it
      t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
      const unsigned i = pte_index(item.va);
      const Pte pte = t->get(i);
      if (pte.present() && !pte.special() && pte.pfn() == folio->pfn()) {
        if (pte.dirty()) folio->set(kFolioDirty);
        t->set(i, Pte::none());
        page_remove_rmap_pte(folio, &mm, item.va);
        dropped = true;
      }
      PageTable::pte_unmap_unlock(t);
    }
    if (dropped) folio->put();  // the mapping's; the cache and the caller hold theirs
  }
  return !folio->mapped();
}

}  // namespace

// retract_page_tables: the PTE tables that mapped the old pages are empty now; detach them
// where the VMA could map the new folio by a PMD (shared, covering the aligned 2 MiB at
// object offset `start`), so the next fault there maps it whole (do_set_pmd) instead of one
// page at a time. Linux finds the VMAs through the file's i_mmap tree without mmap locks; the
// model has no i_mmap, so it takes each address space's mmap lock by trylock (read): one
// whose lock is busy for write - the caller's own, mapped by collapse_pte_mapped_thp, or one
// in munmap / mprotect - keeps its empty table, and a fault there maps the folio by PTEs.
// The rmap walk lock (shared) keeps every address space the registry still lists alive
// (~AddressSpace takes it exclusive before it leaves the registry). Held: the object lock,
// no page-table lock.
void ShmemObject::retract_page_tables(uint64_t start,
                                      std::vector<std::pair<AddressSpace*, Va>> mapped_in) {
  lock_.assert_held();
  std::sort(mapped_in.begin(), mapped_in.end());
  mapped_in.erase(std::unique(mapped_in.begin(), mapped_in.end()), mapped_in.end());
  ReadLock walk(&mem_->rmap_walk_lock());
  const std::vector<AddressSpace*> live = mem_->address_spaces();
  for (auto [mm, haddr] : mapped_in) {
    if (std::find(live.begin(), live.end(), mm) == live.end()) continue;  // gone meanwhile
    if (!mm->mmap_lock().try_lock_shared()) continue;
    const Vma* v = mm->vma_lookup(haddr);
    if (v && v->file.get() == this && v->is_shared() && v->thp_fits(haddr) &&
        v->pgoff_of(haddr) == start) {
      PageTable& pt = mm->page_table();
      if (PmdSlot slot = pt.pmd_lookup(haddr)) (void)pt.try_reclaim_pte_table(slot);
    }
    mm->mmap_lock().unlock_shared();
  }
}

int ShmemObject::collapse_file(uint64_t start) {
  if (start % kPagesPerPmd != 0 || start + kPagesPerPmd > size_pages_) return -EINVAL;
  MutexLock g(&lock_);
  // 1. Scan (hpage_collapse_scan_file).
  std::vector<Folio*> small;
  const uint64_t end = start + kPagesPerPmd;
  for (auto it = pages_.lower_bound(start); it != pages_.end() && it->first < end; ++it) {
    Folio* f = it->second;
    if (f->large()) return f->index() == start && f->order() == kPmdOrder ? 1 : -EINVAL;
    if (f->refcount() != 1 + f->total_mapcount()) return -EAGAIN;
    small.push_back(f);
  }
  if (small.empty()) return -EINVAL;  // nothing cached: Linux 6.18 refuses it too (observed)
  // 2. The new folio (alloc_charge_folio), zeroed: holes are collapsed as zero pages.
  Folio* thp = mem_->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!thp) return -ENOMEM;
  // 3. Lock, unmap, check the references.
  std::vector<Folio*> locked;
  std::vector<std::pair<AddressSpace*, Va>> mapped_in;
  auto rollback = [&](int err) {
    for (Folio* f : locked) {
      folio_unlock(f);
      f->put();
    }
    thp->put();
    return err;
  };
  for (Folio* f : small) {
    if (!folio_trylock(f)) return rollback(-EAGAIN);
    f->get();
    locked.push_back(f);
    if (!unmap_cache_folio(f, &mapped_in)) return rollback(-EAGAIN);
  }
  g_sp_collapse_unmapped.reach();
  for (Folio* f : locked) {
    // The cache's reference and ours: anything more is someone who may still use the page
    // after we copied it (a GUP-fast reference, a lookup that has not mapped yet).
    if (f->refcount() != 2 || f->pincount() != 0) return rollback(-EAGAIN);
  }
  // 4. Copy, replace, free.
  for (Folio* f : locked) {
    std::memcpy(thp->data(f->index() - start), f->data(), kPageSize);
    pages_.erase(f->index());
    f->clear(kFolioShmem);
    f->mapping_ = nullptr;
  }
  thp->set(kFolioShmem);
  thp->set(kFolioDirty);
  thp->mapping_ = this;
  thp->index_ = start;
  pages_.emplace(start, thp);  // the allocation's reference is the cache's
  for (Folio* f : locked) {
    folio_unlock(f);
    f->put(2);  // ours and the cache's: the folio is freed
  }
  retract_page_tables(start, std::move(mapped_in));
  return 0;
}

int collapse_pte_mapped_thp(AddressSpace& mm, Vma& vma, Va haddr) {
  mm.mmap_assert_write_locked();
  const uint64_t pgoff = vma.pgoff_of(haddr);
  Folio* folio = vma.file->find_folio(pgoff);  // the caller's reference, or the mapping's
  if (!folio) return -EINVAL;
  if (folio->order() != kPmdOrder || folio->index() != pgoff) {
    folio->put();
    return -EINVAL;  // SCAN_PAGE_COMPOUND
  }
  Result<PmdSlot> slot = mm.page_table().pmd_alloc(haddr);
  if (!slot) {
    folio->put();
    return slot.error();
  }
  PageTable& pt = mm.page_table();
  int rc = 0;
  {
    MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
    const Pmd pmd = slot->load_lockless();
    if (pmd.is_leaf()) {  // SCAN_PMD_MAPPED, or a leaf of something else
      rc = pmd.leaf().present() && pmd.leaf().pfn() == folio->pfn() ? 0 : -EINVAL;
      folio->put();
      return rc;
    }
    if (pmd.is_table()) {
      // Every entry must be none or map its own page of the folio; then all go.
      int cleared = 0;
      {
        ReadLock walk(&mm.mem()->rmap_walk_lock());  // page_remove_rmap_pte's records (zap rules)
        PteTable* t = pt.pte_offset_map_lock(*slot);
        if (t) {
          t->ptl.assert_held();  // locked by pte_offset_map_lock
          for (unsigned i = 0; i < kPtrsPerTable && rc == 0; i++) {
            const Pte pte = t->get(i);
            const bool own = pte.present() && !pte.special() && pte.pfn() == folio->pfn() + i;
            if (!pte.is_none() && !own) rc = -EINVAL;
          }
          for (unsigned i = 0; i < kPtrsPerTable && rc == 0; i++) {
            const Pte pte = t->get(i);
            if (pte.is_none()) continue;
            if (pte.dirty()) folio->set(kFolioDirty);
            t->set(i, Pte::none());
            page_remove_rmap_pte(folio->page(i), &mm, haddr + i * kPageSize);
            cleared++;
          }
          PageTable::pte_unmap_unlock(t);
        }
      }
      if (cleared) folio->put(cleared);  // the PTE mappings'; ours and the cache's remain
      // The emptied table goes (retract): the mmap write lock keeps every fault out.
      if (rc == 0 && slot->load_lockless().is_table() && !pt.try_reclaim_pte_table(*slot)) {
        rc = -EAGAIN;
      }
    }
    if (rc == 0) {
      SpinLockGuard g(&slot->table->lock);
      if (slot->table->get(slot->index).is_none()) {
        const bool writable = vma.is_shared() && (vma.flags & VM_WRITE);
        folio_add_rmap_pmd(folio, &mm, haddr);  // our reference becomes the mapping's
        slot->table->set(slot->index,
                         Pmd::make_leaf(Pte::make_present(folio->pfn(), writable, true).mkyoung()));
        folio = nullptr;
      } else {
        rc = -EAGAIN;
      }
    }
  }
  if (folio) folio->put();
  if (rc == 0) mm.stats().thp_collapse.add();
  return rc;
}

}  // namespace gpusvm::mm
