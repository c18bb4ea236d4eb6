// madvise (mm/madvise.c): MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_COLLAPSE and
// the VMA-flag advice.
#include <cerrno>
#include <vector>

#include "gpusvm/mm/hugetlb.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/shmem.h"
#include "gpusvm/mm/vmscan.h"

namespace gpusvm::mm {
namespace {

// Whether split_folio_exclusive can take the large folio of a page mapped in the locked PTE
// table `t` (which covers [table_va, table_va + 2 MiB)): every mapping of the folio is a PTE of
// `mm` in this table, present or device-exclusive (the split gives that page back to the CPU,
// as Linux's try_to_migrate does). A mapping in another table keeps the folio whole here. PTE
// lock of t held.
bool folio_splittable_here(AddressSpace& mm, PteTable* t, Va table_va, Folio* folio)
    GPUSVM_REQUIRES(t->ptl) {
  t->ptl.assert_held();
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.pmd || item.mm != &mm || pmd_align_down(item.va) != table_va) return false;
    const Pte pte = t->get(pte_index(item.va));
    if (!pte.present() && !pte.is_device_exclusive()) return false;
  }
  return true;
}

// folio_maybe_mapped_shared: some mapping of the folio belongs to another address space.
bool folio_maybe_mapped_shared(Folio* folio, const AddressSpace* mm) {
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.mm != mm) return true;
  }
  return false;
}

// The PTE walk MADV_FREE, MADV_COLD and MADV_PAGEOUT share (their *_pte_range in Linux):
// for each present page of [addr, next) (inside the 2 MiB of `slot`) whose folio `want`
// accepts, a large folio only this mm maps in this table is split first (split_folio_exclusive,
// with the PTE lock dropped) and its pages looked at again; one that cannot be split is left
// alone. Each small folio only this mm maps goes to page_fn(t, index, pte, folio) under the PTE
// lock; after_unlock() runs after each PTE-lock hold, with no page-table lock held. mmap lock
// held (read suffices).
template <typename Want, typename PageFn, typename AfterUnlock>
void for_each_exclusive_small_page(AddressSpace& mm, PmdSlot slot, Va addr, Va next, Want&& want,
                                   PageFn&& page_fn, AfterUnlock&& after_unlock)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  Folio* unsplittable = nullptr;
  for (Va va = addr; va < next;) {
    PteTable* t = pt.pte_offset_map_lock(slot);
    if (!t) break;
    t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
    Folio* split = nullptr;
    for (; va < next; va += kPageSize) {
      const unsigned i = pte_index(va);
      const Pte pte = t->get(i);
      if (!pte.present() || pte.special()) continue;
      Folio* folio = mem->folio_of(pte.pfn());
      if (!want(folio)) continue;
      if (folio->large()) {
        // Split it if only we map it (as Linux does), then look at this page again.
        if (folio != unsplittable && folio_mapped_only_by(folio, &mm) &&
            folio_splittable_here(mm, t, pmd_align_down(va), folio) && folio_trylock(folio)) {
          folio->get();
          split = folio;
          break;
        }
        continue;
      }
      if (folio->total_mapcount() != 1) continue;  // folio_maybe_mapped_shared
      page_fn(t, i, pte, folio);
    }
    PageTable::pte_unmap_unlock(t);
    after_unlock();
    if (split) {
      if (split_folio_exclusive(mm, split) != 0) unsplittable = split;
      folio_unlock(split);
      split->put();
    }
  }
}

// madvise_free_huge_pmd for the huge leaf at slot, [addr, next) of its 2 MiB: returns true
// when the PTE level must be walked next (the PMD was split because [addr, next) covers only
// part of an exclusively mapped THP; the folio split follows there). A whole exclusive THP
// becomes clean and lazily freeable and stays PMD-mapped. Left alone, PMD and all: the huge
// zero folio (a later write still gets a whole THP), a THP another process maps too (a fork
// child), a busy (locked) THP, a non-present huge leaf. mmap lock held, no page-table lock.
bool madvise_free_huge_pmd(AddressSpace& mm, PmdSlot slot, Va addr, Va next)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return pmd.is_table();  // a table meanwhile: walk it
    if (!pmd.is_huge_present() || mem->is_huge_zero_pfn(pmd.leaf().pfn())) return false;
    Folio* folio = mem->folio_of(pmd.leaf().pfn());
    if (folio_is_zone_device(folio) || folio_maybe_mapped_shared(folio, &mm)) return false;
    if (next - addr == kPmdSize) {
      folio->clear(kFolioDirty);
      folio->set(kFolioLazyfree);
      slot.table->set(slot.index, Pmd::make_leaf(pmd.leaf().mkclean().mkold()));
      return false;
    }
    if (folio_test_locked(folio)) return false;  // folio_trylock would fail: skip, as Linux does
  }
  split_huge_pmd(mm, slot, pmd_align_down(addr));
  return true;
}

// MADV_FREE on [start, end) of a private anonymous VMA: exclusive pages become clean and
// lazily freeable. A partly covered exclusive THP is split first (madvise_free_huge_pmd).
// mmap lock held (read suffices: only entries change, as in Linux).
void madvise_free_range(AddressSpace& mm, Va start, Va end) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PageTable& pt = mm.page_table();
  for (Va addr = start, next; addr < end; addr = next) {
    next = std::min(pmd_align_down(addr) + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (!slot) continue;
    if (slot.load_lockless().is_leaf() && !madvise_free_huge_pmd(mm, slot, addr, next)) continue;
    for_each_exclusive_small_page(
        mm, slot, addr, next,
        // device memory is never reclaimed lazily
        [](Folio* folio) { return !folio_is_zone_device(folio); },
        [&](PteTable* t, unsigned i, Pte pte, Folio* folio) {
          t->ptl.assert_held();  // the walk calls this under the PTE lock
          folio->clear(kFolioDirty);
          folio->set(kFolioLazyfree);
          t->set(i, pte.mkclean().mkold());
        },
        [] {});
  }
}

// madvise_cold_or_pageout_huge_pmd for the huge leaf at slot, [addr, next) of its 2 MiB.
// Returns true when the PTE level must be walked next. A THP only this process maps: with
// COLD and the whole 2 MiB covered it is aged (PMD old, folio deactivated) and stays mapped;
// otherwise (PAGEOUT - no THP swap here, so the folio is split first, as Linux's reclaim does
// without CONFIG_THP_SWAP - or a partial range) the PMD is split and the PTE walk splits the
// folio. Anything else (huge zero folio, device memory, a THP another process maps, a
// non-present leaf) is left alone. mmap lock held, no page-table lock.
bool cold_or_pageout_huge_pmd(AddressSpace& mm, PmdSlot slot, Va addr, Va next, bool pageout)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return pmd.is_table();
    if (!pmd.is_huge_present() || mem->is_huge_zero_pfn(pmd.leaf().pfn())) return false;
    Folio* folio = mem->folio_of(pmd.leaf().pfn());
    if (folio_is_zone_device(folio) || folio_maybe_mapped_shared(folio, &mm)) return false;
    if (!pageout && next - addr == kPmdSize) {
      slot.table->set(slot.index, Pmd::make_leaf(pmd.leaf().mkold()));
      mem->folio_deactivate(folio);
      return false;
    }
  }
  split_huge_pmd(mm, slot, pmd_align_down(addr));
  return true;
}

// madvise_cold_or_pageout_pte_range over [start, end) of one private or shared VMA: every
// present anonymous page only this process maps gets an old PTE; COLD deactivates its folio,
// PAGEOUT reclaims it (reclaim_pages: swapped out, or discarded when lazily freed and clean),
// references ignored. Skipped as in Linux: non-present entries (swap, migration, device-private
// and device-exclusive entries: the walk only looks at present PTEs), the zero page, device
// memory, pages another process maps too (fork-shared, shared mappings), page-cache pages
// (file pageout is not modelled). A large folio is split first if only this mm maps it here
// (split_folio_exclusive), else skipped. mmap lock held (read).
void madvise_cold_or_pageout(AddressSpace& mm, Va start, Va end, bool pageout)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  for (Va addr = start, next; addr < end; addr = next) {
    next = std::min(pmd_align_down(addr) + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (!slot) continue;
    if (slot.load_lockless().is_leaf() && !cold_or_pageout_huge_pmd(mm, slot, addr, next, pageout)) continue;
    std::vector<Folio*> reclaim;
    for_each_exclusive_small_page(
        mm, slot, addr, next,
        [](Folio* folio) {
          return !folio_is_zone_device(folio) && folio->test(kFolioAnon) && !folio->test(kFolioShmem);
        },
        [&](PteTable* t, unsigned i, Pte pte, Folio* folio) {
          t->ptl.assert_held();  // the walk calls this under the PTE lock
          if (pte.young()) t->set(i, pte.mkold());
          if (pageout) {
            folio->get();  // the PTE's reference keeps it alive: the count is not zero
            reclaim.push_back(folio);
          } else {
            mem->folio_deactivate(folio);
          }
        },
        [&] {
          if (reclaim.empty()) return;
          (void)reclaim_pages(*mem, reclaim);  // no PTL held: reclaim sleeps
          reclaim.clear();
        });
  }
}

// MADV_COLLAPSE of [start, end) inside `v` (madvise_collapse). -EINVAL when the VMA cannot
// hold a THP at all (neither private anonymous nor shared anonymous (shmem), MADV_NOHUGEPAGE,
// no aligned 2 MiB block inside the VMA, or - shmem - the block not 2 MiB aligned in the
// object: thp_vma_allowable_order / thp_vma_suitable_order) or when [start, end) lies inside
// one 2 MiB block without covering it (Linux's hstart > hend; a range that is empty after
// alignment, hstart == hend, succeeds with nothing done). Otherwise every aligned block is
// collapsed - shmem by collapse_file in the object, then mapped here by a PMD
// (collapse_pte_mapped_thp) - and a block that fails does not stop the others, the result is
// then the last block's error (-ENOMEM stops at once). shmem_enabled does not matter: the
// collapse forces a THP. mmap lock held for write.
int madvise_collapse(AddressSpace& mm, Vma& v, Va start, Va end) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  const bool shmem = v.file && v.is_shared();
  if ((!shmem && (!v.is_anonymous() || v.is_shared())) || (v.flags & VM_NOHUGEPAGE)) return -EINVAL;
  if (pmd_align_up(v.start) + kPmdSize > v.end) return -EINVAL;  // thp_vma_suitable_order
  if (shmem && v.pgoff_of(pmd_align_up(v.start)) % kPagesPerPmd != 0) return -EINVAL;
  const Va hs = pmd_align_up(start);
  const Va he = pmd_align_down(end);
  if (hs > he) return -EINVAL;
  int err = 0;
  for (Va h = hs; h < he; h += kPmdSize) {
    int rc = 0;
    if (shmem) {
      rc = v.file->collapse_file(v.pgoff_of(h));
      if (rc >= 0) rc = collapse_pte_mapped_thp(mm, v, h);
    } else {
      rc = collapse_huge_page(mm, v, h);
    }
    if (rc == -ENOMEM) return rc;
    if (rc) err = rc;
  }
  return err;
}

// Page-table reclaim after MADV_DONTNEED zapped [start, end) of one VMA (Linux >= 6.14 with
// CONFIG_PT_RECLAIM, as on the reference host): a PTE table is freed when the zap covered
// all of it (reclaim_pt_is_enabled: end - start >= PMD_SIZE for that table) and left every
// entry none. Only MADV_DONTNEED does this; munmap frees tables through free_pgtables.
// mmap lock held (read suffices, see PageTable::try_reclaim_pte_table), no page-table lock.
void reclaim_pte_tables(AddressSpace& mm, Va start, Va end) {
  PageTable& pt = mm.page_table();
  for (Va h = pmd_align_up(start); h + kPmdSize <= end; h += kPmdSize) {
    if (PmdSlot slot = pt.pmd_lookup(h)) (void)pt.try_reclaim_pte_table(slot);
  }
}

bool valid_advice(int advice) {
  switch (advice) {
    case MADV_DONTNEED: case MADV_FREE: case MADV_HUGEPAGE: case MADV_NOHUGEPAGE:
    case MADV_COLLAPSE: case MADV_DONTFORK: case MADV_DOFORK: case MADV_WIPEONFORK:
    case MADV_KEEPONFORK: case MADV_COLD: case MADV_PAGEOUT:
      return true;
    default:
      return false;
  }
}
}  // namespace

int AddressSpace::madvise(Va start, uint64_t len, int advice) {
  if (!page_aligned(start) || !valid_advice(advice)) return -EINVAL;
  const uint64_t alen = page_align_up(len);
  if (alen < len || start + alen < start) return -EINVAL;
  if (alen == 0) return 0;  // as Linux
  const Va end = start + alen;
  if (end > kTaskSize) return -ENOMEM;

  if (advice == MADV_COLD || advice == MADV_PAGEOUT) {
    // Only entries and LRU state change: the read lock, as in Linux.
    ReadLock g(&mmap_lock_);
    const bool holes = !fully_mapped(vmas_, start, end);
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      // can_madv_lru_vma
      if ((v->flags & (VM_LOCKED | VM_PFNMAP)) || v->is_hugetlb()) return -EINVAL;
    }
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      const Va s = std::max(start, v->start);
      const Va e = std::min(end, v->end);
      if (s < e) madvise_cold_or_pageout(*this, s, e, advice == MADV_PAGEOUT);
    }
    return holes ? -ENOMEM : 0;
  }

  if (advice == MADV_DONTNEED || advice == MADV_FREE) {
    // Only the entries change, not the VMAs: the read lock suffices, as in Linux.
    ReadLock g(&mmap_lock_);
    const bool holes = !fully_mapped(vmas_, start, end);
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (v->flags & (VM_LOCKED | VM_PFNMAP)) return -EINVAL;
      if (advice == MADV_FREE && (!v->is_anonymous() || v->is_shared())) return -EINVAL;
      // madvise_dontneed_free_valid_vma: on hugetlb only DONTNEED, from a huge page boundary.
      if (v->is_hugetlb() && !pmd_aligned(std::max(start, v->start))) return -EINVAL;
    }
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      const Va s = std::max(start, v->start);
      // ... and the end rounded down to one ("callers may be unaware that this VMA uses huge
      // pages"), so a hugetlb page is zapped whole or not at all.
      const Va e = v->is_hugetlb() ? pmd_align_down(std::min(end, v->end)) : std::min(end, v->end);
      if (s >= e) continue;
      MmuInvalidation inv(*this, s, e, MmuNotifyEvent::kClear);
      if (advice == MADV_DONTNEED) {
        zap_range(*this, s, e);
        if (!v->is_hugetlb()) reclaim_pte_tables(*this, s, e);
      } else {
        madvise_free_range(*this, s, e);
      }
    }
    return holes ? -ENOMEM : 0;
  }

  WriteLock g(&mmap_lock_);
  const bool holes = !fully_mapped(vmas_, start, end);
  if (advice == MADV_COLLAPSE) {
    // madvise_walk_vmas: the first VMA that fails ends the walk with its error; holes make
    // the call fail with -ENOMEM after the rest was done.
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (int rc = madvise_collapse(*this, *v, std::max(start, v->start), std::min(end, v->end))) {
        return rc;
      }
    }
    return holes ? -ENOMEM : 0;
  }
  if (advice == MADV_WIPEONFORK) {
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (!v->is_anonymous() || v->is_shared()) return -EINVAL;
    }
  }
  if (int rc = hugetlb_check_split(vmas_, start, end)) return rc;
  split_vma_at(*this, vmas_, start);
  split_vma_at(*this, vmas_, end);
  std::vector<Vma*> targets = vmas_in(vmas_, start, end);
  for (Vma* v : targets) {
    switch (advice) {
      case MADV_HUGEPAGE: v->flags = (v->flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE; break;
      case MADV_NOHUGEPAGE: v->flags = (v->flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE; break;
      case MADV_DONTFORK: v->flags |= VM_DONTCOPY; break;
      case MADV_DOFORK: v->flags &= ~VM_DONTCOPY; break;
      case MADV_WIPEONFORK: v->flags |= VM_WIPEONFORK; break;
      case MADV_KEEPONFORK: v->flags &= ~VM_WIPEONFORK; break;
    }
  }
  merge_range(vmas_, start, end);
  return holes ? -ENOMEM : 0;
}

}  // namespace gpusvm::mm
