// Unmapping: zap_range and the huge-leaf zap.
#include <vector>

#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {
namespace {

// Mapping references dropped by a zap, released after the page-table lock is dropped (the
// kernel's mmu_gather batches frees after the TLB flush for the same reason: nobody can
// still reach the page through the entry when it is freed).
class PutBatch {
 public:
  void add(Folio* page) { pages_.push_back(page); }
  ~PutBatch() {
    // page->head(), not a head saved earlier: each reference belongs to the folio that holds
    // this page when it is dropped.
    for (Folio* p : pages_) {
      Folio* head = p->head();
      // free_swap_cache (free_pages_and_swap_cache): a swap-cache folio nothing maps any more
      // and no swap entry names leaves the cache, so exit and munmap give its frame back.
      if (head->test(kFolioSwapCache) && !head->mapped() && folio_trylock(head)) {
        Folio* cached = head->mem()->swap().release_if_unused(head);
        folio_unlock(head);
        if (cached) cached->put();
      }
      head->put();
    }
  }

 private:
  std::vector<Folio*> pages_;
};

// Drops what a PTE references. PTL held (not nameable here: the caller's table), mmap lock
// and rmap walk lock (shared) held.
void zap_one_pte(AddressSpace& mm, Pte pte, Va va, PutBatch& puts)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock(), mm.mem()->rmap_walk_lock()) {
  mm.mmap_assert_locked();
  mm.mem()->rmap_walk_lock().assert_held();
  PhysMem* mem = mm.mem();
  if (pte.present()) {
    if (pte.special()) return;  // zero page: not refcounted
    Folio* page = mem->pfn_to_page(pte.pfn());
    if (pte.dirty()) page->head()->set(kFolioDirty);
    page_remove_rmap_pte(page, &mm, va);
    puts.add(page);
    return;
  }
  if (pte.is_device_private() || pte.is_device_exclusive()) {
    // Both keep the page's mapping accounted (mapcount, rmap, reference) while the CPU
    // cannot reach it.
    Folio* page = mem->pfn_to_page(pte.pfn());
    page_remove_rmap_pte(page, &mm, va);
    puts.add(page);
  }
  if (pte.is_swap()) {
    // free_swap_and_cache: the slot loses this entry; a cached folio nobody maps any more
    // leaves the swap cache, its reference dropped with the others after the PTL.
    if (Folio* cached = mem->swap().free_entry(pte.swap_slot())) puts.add(cached);
    return;
  }
  if (pte.is_migration()) {
    // The entry's migration record goes with it: the migration must not look for the entry
    // (nor for this address space, which may be exiting).
    Folio* page = mem->pfn_to_page(pte.pfn());
    (void)folio_remove_migration_item(
        page, RmapItem{&mm, va, static_cast<uint32_t>(page->page_index()), false, true});
  }
  // Migration entries hold nothing: the migrating thread owns the folio references and finds
  // the entry gone when it restores (it then drops the page).
}

// The rmap walk lock (shared) is held by both zaps below: a zapped migration entry's record is
// removed from the folio that holds the page now, and a split during migration
// (split_migrating_folio) moves records between folios under that lock held for write. Without
// it a zap in the split's window found no record (the split had them in hand) and the stale
// record went to the new folio, for finalize to follow into an address space that had exited.
void zap_pte_range(AddressSpace& mm, PmdSlot slot, Va start, Va end)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PutBatch puts;  // released after the locks below (declared first, destroyed last)
  ReadLock walk(&mm.mem()->rmap_walk_lock());
  PteTable* t = mm.page_table().pte_offset_map_lock(slot);
  if (!t) return;  // the PMD changed under us (none now): nothing left to zap
  uint64_t zapped = 0;
  for (Va va = start; va < end; va += kPageSize) {
    const unsigned i = pte_index(va);
    Pte pte = t->get(i);
    if (pte.is_none()) continue;
    t->set(i, Pte::none());
    zap_one_pte(mm, pte, va, puts);
    zapped++;
  }
  PageTable::pte_unmap_unlock(t);
  mm.stats().zapped_pages.add(zapped);
}

// Clears a huge leaf covering exactly [haddr, haddr + 2 MiB). Returns false if the PMD is no
// longer a leaf (it was split meanwhile): the caller zaps PTEs instead.
bool zap_huge_pmd(AddressSpace& mm, PmdSlot slot, Va haddr) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  PteTable* deposit = nullptr;
  Folio* put = nullptr;
  {
    ReadLock walk(&mem->rmap_walk_lock());  // see zap_pte_range
    SpinLockGuard g(&slot.table->lock);
    Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return pmd.is_none();
    slot.table->set(slot.index, Pmd());
    deposit = slot.table->withdraw(slot.index);
    Pte leaf = pmd.leaf();
    if (leaf.present() && !mem->is_huge_zero_pfn(leaf.pfn())) {
      Folio* folio = mem->folio_of(leaf.pfn());
      if (leaf.dirty()) folio->set(kFolioDirty);
      folio_remove_rmap_pmd(folio, &mm, haddr);
      put = folio;
    } else if (leaf.is_device_private()) {
      Folio* folio = mem->folio_of(leaf.pfn());
      folio_remove_rmap_pmd(folio, &mm, haddr);
      put = folio;
    } else if (leaf.is_migration()) {
      (void)folio_remove_migration_item(mem->folio_of(leaf.pfn()), RmapItem{&mm, haddr, 0, true, true});
    }
  }
  PageTable::free_pte_table(deposit);
  if (put) put->put();
  mm.stats().zapped_pages.add(kPagesPerPmd);
  return true;
}

}  // namespace

void zap_range(AddressSpace& mm, Va start, Va end) {
  mm.mmap_assert_locked();
  PageTable& pt = mm.page_table();
  for (Va addr = start; addr < end;) {
    const Va haddr = pmd_align_down(addr);
    const Va next = std::min(haddr + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (!slot) {
      addr = next;
      continue;
    }
    Pmd pmd = slot.load_lockless();
    if (pmd.is_leaf()) {
      if (addr == haddr && next == haddr + kPmdSize && zap_huge_pmd(mm, slot, haddr)) {
        addr = next;
        continue;
      }
      split_huge_pmd(mm, slot, haddr);
      pmd = slot.load_lockless();
    }
    if (pmd.is_table()) zap_pte_range(mm, slot, addr, next);
    addr = next;
  }
}

}  // namespace gpusvm::mm
