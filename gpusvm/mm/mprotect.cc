// mprotect (mm/mprotect.c): VMA flags and the entries of the range (change_protection).
#include <cerrno>
#include <vector>

#include "gpusvm/mm/hugetlb.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// A writable migration or device-private entry becomes read-only on any mprotect, as in
// Linux's change_pte_range ("a protection check is difficult so just be safe"): the page
// comes back read-only and a write fault makes it writable again if the VMA allows. A
// migration entry of an anonymous page keeps its exclusivity (read-exclusive), so that write
// fault reuses the page. Device-exclusive entries stay: their restore decides the write bit.
Pte wrprotect_soft_leaf(PhysMem* mem, Pte e) {
  switch (e.soft_leaf_type()) {
    case SoftLeafType::kMigrationWrite: {
      const Folio* folio = mem->folio_of(e.pfn());  // the migration holds a reference
      return e.with_soft_leaf_type(folio && folio->test(kFolioAnon) ? SoftLeafType::kMigrationReadExclusive
                                                                    : SoftLeafType::kMigrationRead);
    }
    case SoftLeafType::kDevicePrivateWrite:
      return e.with_soft_leaf_type(SoftLeafType::kDevicePrivateRead);
    default:
      return e;
  }
}

// Applies `write` permission changes to the entries of [start, end) inside `vma`
// (change_protection). Removing write protects every entry; adding write makes writable
// only what may be written without a fault: anon-exclusive pages and shared mappings - not
// private hugetlb pages, which hugetlb_change_protection leaves read-only until a write fault
// (the private mapping's page protection has no write bit). mmap lock held for write
// (mprotect changes the VMA flags in the same hold).
void change_protection(AddressSpace& mm, const Vma& vma, Va start, Va end, bool write)
    GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  auto may_write = [&](Pte pte) {
    if (!write || pte.special() || vma.is_hugetlb()) return false;
    if (vma.is_shared()) return true;
    Folio* page = mem->pfn_to_page(pte.pfn());
    return page->head()->test(kFolioAnon) && page->test_page(kPageAnonExclusive);
  };
  for_each_pmd_range(mm, start, end, [&](PmdSlot slot, Va addr, Va next) {
    {
      SpinLockGuard g(&slot.table->lock);
      Pmd pmd = slot.table->get(slot.index);
      if (pmd.is_huge_present() && !mem->is_huge_zero_pfn(pmd.leaf().pfn())) {
        Pte leaf = pmd.leaf();
        Pte upd = may_write(leaf) ? leaf.mkwrite() : (write ? leaf : leaf.wrprotect());
        if (upd != leaf) slot.table->set(slot.index, Pmd::make_leaf(upd));
      } else if (pmd.is_huge_soft_leaf()) {
        const Pte upd = wrprotect_soft_leaf(mem, pmd.leaf());
        if (upd != pmd.leaf()) slot.table->set(slot.index, Pmd::make_leaf(upd));
      }
    }
    if (PteTable* t = pt.pte_offset_map_lock(slot)) {
      for (Va va = addr; va < next; va += kPageSize) {
        const unsigned i = pte_index(va);
        Pte pte = t->get(i);
        if (pte.is_soft_leaf()) {
          const Pte upd = wrprotect_soft_leaf(mem, pte);
          if (upd != pte) t->set(i, upd);
          continue;
        }
        if (!pte.present()) continue;
        Pte upd = may_write(pte) ? pte.mkwrite() : (write ? pte : pte.wrprotect());
        if (upd != pte) t->set(i, upd);
      }
      PageTable::pte_unmap_unlock(t);
    }
  });
}

}  // namespace

int AddressSpace::mprotect(Va start, uint64_t len, int prot) {
  if (!page_aligned(start) || (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC))) return -EINVAL;
  const uint64_t alen = page_align_up(len);
  if (alen < len || start + alen < start) return -ENOMEM;
  if (alen == 0) return 0;  // as Linux: an empty mprotect succeeds and changes nothing
  WriteLock g(&mmap_lock_);
  // As do_mprotect_pkey: a hole at start fails with nothing changed; a later hole stops the
  // walk there, after the VMAs before it were changed, and the call fails with -ENOMEM.
  const Va end = mapped_run_end(vmas_, start, start + alen);
  if (end == start) return -ENOMEM;
  const int rc_hole = end < start + alen ? -ENOMEM : 0;
  if (int rc = hugetlb_check_split(vmas_, start, end)) return rc;
  split_vma_at(*this, vmas_, start);
  split_vma_at(*this, vmas_, end);
  const uint32_t newprot = prot_to_vm_flags(prot);
  {
    MmuInvalidation inv(*this, start, end, MmuNotifyEvent::kProtectionVma);
    for (Vma* v : vmas_in(vmas_, start, end)) {
      const bool was_writable = v->flags & VM_WRITE;
      v->flags = (v->flags & ~(VM_READ | VM_WRITE | VM_EXEC)) | newprot;
      const bool writable = v->flags & VM_WRITE;
      if (was_writable != writable || !(v->flags & VM_READ)) {
        change_protection(*this, *v, v->start, v->end, writable && (v->flags & VM_READ));
      }
    }
  }
  merge_range(vmas_, start, end);
  return rc_hole;
}

}  // namespace gpusvm::mm
