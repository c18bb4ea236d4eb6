// Transparent huge pages: PMD-mapped faults, PMD splits, MADV_COLLAPSE.
#include <cstring>
#include <vector>

#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {

void copy_page_data(Folio* dst, const Folio* src) {
  std::memcpy(dst->data(), src->data(), kPageSize);
}

void split_huge_pmd(AddressSpace& mm, PmdSlot slot, Va haddr) {
  mm.mmap_assert_locked();
  if (!slot.load_lockless().is_leaf()) return;
  PhysMem* mem = mm.mem();
  MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
  SpinLockGuard g(&slot.table->lock);
  const Pmd pmd = slot.table->get(slot.index);
  if (!pmd.is_leaf()) return;  // split or zapped by someone else meanwhile
  PteTable* t = slot.table->withdraw(slot.index);
  if (!t) panic("split_huge_pmd: huge leaf without a deposited table");
  const Pte leaf = pmd.leaf();
  {
    // The table is not reachable yet; its lock is taken because set() asserts it.
    SpinLockGuard tg(&t->ptl);
    if (leaf.present() && mem->is_huge_zero_pfn(leaf.pfn())) {
      for (unsigned i = 0; i < kPtrsPerTable; i++) t->set(i, Pte::make_zero(mem->zero_pfn()));
    } else {
      Folio* folio = mem->folio_of(leaf.pfn());
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        // Keep every bit but "huge"; each PTE points at its own page of the folio.
        Pte pte(leaf.raw() & ~pte_bits::kHuge);
        t->set(i, pte.with_pfn(leaf.pfn() + i));
        page_add_rmap_pte(folio->page(i), &mm, haddr + i * kPageSize);
      }
      // One reference per PTE mapping instead of one for the PMD mapping.
      folio->get(kPtrsPerTable - 1);
      folio_remove_rmap_pmd(folio, &mm, haddr);
    }
  }
  slot.table->set(slot.index, Pmd::make_table(t));
  mm.stats().thp_split_pmd.add();
}

void split_huge_pmd_address(AddressSpace& mm, Va addr) {
  if (pmd_aligned(addr)) return;
  PmdSlot slot = mm.page_table().pmd_lookup(addr);
  if (slot && slot.load_lockless().is_leaf()) split_huge_pmd(mm, slot, pmd_align_down(addr));
}

VmFault do_huge_pmd_anonymous_page(AddressSpace& mm, Vma& vma, PmdSlot slot, Va va,
                                   bool write, bool* fallback) {
  *fallback = false;
  PhysMem* mem = mm.mem();
  const Va haddr = pmd_align_down(va);
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return VmFault::kOom;

  if (!write && mem->use_zero_page()) {
    {
      SpinLockGuard g(&slot.table->lock);
      if (slot.table->get(slot.index).is_none()) {
        slot.table->set(slot.index, Pmd::make_leaf(Pte::make_zero(mem->huge_zero_folio()->pfn(), true)));
        slot.table->deposit(slot.index, deposit);
        deposit = nullptr;
        mm.stats().faults_huge_zero.add();
      }
    }
    PageTable::free_pte_table(deposit);
    return VmFault::kOk;
  }

  Folio* folio = mem->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!folio) {
    PageTable::free_pte_table(deposit);
    mm.stats().faults_thp_fallback.add();
    *fallback = true;
    return VmFault::kOk;
  }
  folio->set(kFolioAnon);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->set_page(kPageAnonExclusive);
  {
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index).is_none()) {
      Pte leaf = Pte::make_present(folio->pfn(), vma.flags & VM_WRITE, true).mkdirty().mkyoung();
      folio_add_rmap_pmd(folio, &mm, haddr);  // the allocation's reference is the mapping's
      slot.table->set(slot.index, Pmd::make_leaf(leaf));
      slot.table->deposit(slot.index, deposit);
      deposit = nullptr;
      folio = nullptr;
      mm.stats().faults_thp.add();
    }
  }
  PageTable::free_pte_table(deposit);
  if (folio) {
    folio->put();  // lost a race with another fault: retry sees its entry
    return VmFault::kRetry;
  }
  return VmFault::kOk;
}

int collapse_huge_page(AddressSpace& mm, Vma& vma, Va haddr) {
  mm.mmap_assert_write_locked();
  PhysMem* mem = mm.mem();
  PmdSlot slot = mm.page_table().pmd_lookup(haddr);
  if (!slot) return -EINVAL;  // nothing mapped: the kernel reports SCAN_PMD_NULL as -EINVAL
  const Pmd first = slot.load_lockless();
  if (first.is_huge_present()) return 0;  // already PMD-mapped (THP or huge zero)
  if (first.is_huge_soft_leaf()) return -EAGAIN;
  if (!first.is_table()) return -EINVAL;

  // Scan: at least one page present, none busy. The mmap write lock keeps the table stable.
  PteTable* t = first.table();
  std::vector<Folio*> locked;
  auto unlock_all = [&locked] {
    for (Folio* f : locked) folio_unlock(f);
    locked.clear();
  };
  int present = 0;
  {
    SpinLockGuard g(&t->ptl);
    for (unsigned i = 0; i < kPtrsPerTable; i++) {
      Pte pte = t->get(i);
      if (pte.is_none() || pte.special()) continue;
      if (!pte.present()) {
        for (Folio* f : locked) folio_unlock(f);
        return -EAGAIN;  // migration / device entry: busy
      }
      present++;
      Folio* head = mem->folio_of(pte.pfn());
      bool seen = false;
      for (Folio* f : locked) seen |= f == head;
      if (seen) continue;
      if (!folio_trylock(head)) {
        for (Folio* f : locked) folio_unlock(f);
        return -EAGAIN;
      }
      locked.push_back(head);
    }
  }
  if (present == 0) {
    unlock_all();
    return -EINVAL;  // every PTE none or zero page: exceeds max_ptes_none
  }
  Folio* thp = mem->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!thp) {
    unlock_all();
    return -ENOMEM;
  }
  thp->set(kFolioAnon);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) thp->page(i)->set_page(kPageAnonExclusive);

  std::vector<Folio*> puts;
  {
    MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
    SpinLockGuard pg(&slot.table->lock);
    {
      SpinLockGuard g(&t->ptl);
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        Pte pte = t->get(i);
        if (pte.is_none()) continue;
        t->set(i, Pte::none());
        if (pte.special()) continue;
        Folio* page = mem->pfn_to_page(pte.pfn());
        std::memcpy(thp->data(i), page->data(), kPageSize);
        page_remove_rmap_pte(page, &mm, haddr + i * kPageSize);
        puts.push_back(page);
      }
    }
    // The emptied PTE table becomes the deposit of the new huge leaf.
    Pte leaf = Pte::make_present(thp->pfn(), vma.flags & VM_WRITE, true).mkdirty().mkyoung();
    folio_add_rmap_pmd(thp, &mm, haddr);
    slot.table->set(slot.index, Pmd::make_leaf(leaf));
    slot.table->deposit(slot.index, t);
  }
  unlock_all();
  for (Folio* p : puts) p->head()->put();
  mm.stats().thp_collapse.add();
  return 0;
}

}  // namespace gpusvm::mm
