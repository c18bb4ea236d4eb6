#include "gpusvm/mm/page_state.h"

#include "gpusvm/mm/address_space.h"

namespace gpusvm::mm {

const char* page_kind_name(PageKind k) {
  switch (k) {
    case PageKind::kNone: return "none";
    case PageKind::kZeroPage: return "zero";
    case PageKind::kHugeZero: return "huge-zero";
    case PageKind::kSmall: return "4k";
    case PageKind::kThpPte: return "thp-pte";
    case PageKind::kThpPmd: return "thp-pmd";
    case PageKind::kSoftLeaf: return "soft-leaf";
  }
  return "?";
}

namespace {

void fill_folio_state(PageState& st, Folio* page) {
  Folio* head = page->head();
  st.anon_exclusive = page->test_page(kPageAnonExclusive);
  st.mapcount = head->total_mapcount();
  st.refcount = head->refcount();
  st.page_mapcount = page->page_mapcount();
  st.large = head->large();
  st.folio_dirty = head->test(kFolioDirty);
}

}  // namespace

PageState query_page(AddressSpace& mm, Va va) {
  PageState st;
  PhysMem* mem = mm.mem();
  ReadLock g(&mm.mmap_lock());
  PmdSlot slot = mm.page_table().pmd_lookup(va);
  if (!slot) return st;
  Pte pte;
  bool huge = false;
  {
    SpinLockGuard pl(&slot.table->lock);
    Pmd pmd = slot.table->get(slot.index);
    if (pmd.is_none()) return st;
    if (pmd.is_leaf()) {
      huge = true;
      pte = pmd.leaf();
      if (pte.present()) pte = pte.with_pfn(pte.pfn() + pte_index(va));
    }
  }
  if (!huge) {
    PteTable* t = mm.page_table().pte_offset_map_lock(slot);
    if (!t) return st;
    pte = t->get(pte_index(va));
    PageTable::pte_unmap_unlock(t);
  }
  if (pte.is_none()) return st;
  st.pfn = pte.pfn();
  if (!pte.present()) {
    st.kind = PageKind::kSoftLeaf;
    st.leaf = pte.soft_leaf_type();
    st.writable = pte.soft_leaf_write();
    // A PMD-sized soft leaf that names a folio (a device-private THP, a PMD migration entry)
    // holds the head pfn; page i of it is head + i, as hmm_vma_handle_absent_pmd reports
    // each subpage of a device-private PMD entry.
    const bool names_folio = pte.is_device_private() || pte.is_device_exclusive() || pte.is_migration();
    if (huge && names_folio) st.pfn += pte_index(va);
    if (pte.is_device_private() || pte.is_device_exclusive()) fill_folio_state(st, mem->pfn_to_page(st.pfn));
    return st;
  }
  st.writable = pte.write();
  st.dirty = pte.dirty();
  if (huge && mem->is_huge_zero_pfn(pte.pfn())) {
    st.kind = PageKind::kHugeZero;
    return st;
  }
  if (pte.special()) {
    st.kind = PageKind::kZeroPage;
    return st;
  }
  Folio* page = mem->pfn_to_page(pte.pfn());
  Folio* head = page->head();
  st.kind = huge ? PageKind::kThpPmd : head->large() ? PageKind::kThpPte : PageKind::kSmall;
  fill_folio_state(st, page);
  return st;
}

}  // namespace gpusvm::mm
