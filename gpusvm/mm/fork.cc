// fork: copy the address space with copy-on-write sharing of private pages.
#include <cerrno>

#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// copy_present_pte / copy_nonpresent_pte for one entry. Both PTLs held. Returns the entries
// to store in the parent and the child, or -EBUSY for an entry fork cannot copy.
int copy_one_pte(AddressSpace& dst_mm, Va va, bool cow, Pte src, Pte* src_out, Pte* dst_out) {
  PhysMem* mem = dst_mm.mem();
  *src_out = src;
  *dst_out = src;
  if (src.present()) {
    if (src.special()) return 0;  // zero page: shared freely
    Folio* page = mem->pfn_to_page(src.pfn());
    Folio* head = page->head();
    head->get();
    page_add_rmap_pte(page, &dst_mm, va);
    if (head->test(kFolioAnon)) page->clear_page(kPageAnonExclusive);
    if (cow && src.write()) {
      *src_out = src.wrprotect();
      *dst_out = src.wrprotect();
    }
    *dst_out = dst_out->mkold();
    return 0;
  }
  if (src.is_device_private()) {
    // Device-private pages are shared read-only after fork, as in Linux: a write by either
    // side faults and migrates the page back.
    Folio* page = mem->pfn_to_page(src.pfn());
    page->head()->get();
    page_add_rmap_pte(page, &dst_mm, va);
    page->clear_page(kPageAnonExclusive);
    if (cow && src.soft_leaf_write()) {
      Pte ro = Pte::make_soft_leaf(SoftLeafType::kDevicePrivateRead, src.pfn());
      *src_out = ro;
      *dst_out = ro;
    }
    return 0;
  }
  // Migration and device-exclusive entries are transient states owned by a migration or a
  // device; the migration layer resolves them before fork may copy (not reachable until it
  // creates them).
  return -EBUSY;
}

int copy_pte_range(AddressSpace& src_mm, AddressSpace& dst_mm, PmdSlot src_slot, Va start,
                   Va end, bool cow) {
  Result<PmdSlot> dst_slot = dst_mm.page_table().pmd_alloc(start);
  if (!dst_slot) return dst_slot.error();
  if (dst_mm.page_table().pte_alloc(*dst_slot) != 0) return -ENOMEM;
  PteTable* ts = src_mm.page_table().pte_offset_map_lock(src_slot, 0);
  if (!ts) return 0;
  PteTable* td = dst_slot->load_lockless().table();
  td->ptl.lock_nested(1);
  int rc = 0;
  for (Va va = start; va < end; va += kPageSize) {
    const unsigned i = pte_index(va);
    Pte pte = ts->get(i);
    if (pte.is_none()) continue;
    Pte s, d;
    rc = copy_one_pte(dst_mm, va, cow, pte, &s, &d);
    if (rc) break;
    if (s != pte) ts->set(i, s);
    td->set(i, d);
  }
  td->ptl.unlock();
  PageTable::pte_unmap_unlock(ts);
  return rc;
}

// copy_huge_pmd. Returns 1 when the PMD was not a leaf any more (copy its PTEs instead).
int copy_huge_pmd(AddressSpace& src_mm, AddressSpace& dst_mm, PmdSlot src_slot, Va haddr,
                  bool cow) {
  PhysMem* mem = src_mm.mem();
  Result<PmdSlot> dst_slot = dst_mm.page_table().pmd_alloc(haddr);
  if (!dst_slot) return dst_slot.error();
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return -ENOMEM;
  int rc = 0;
  {
    SpinLockGuard gs(&src_slot.table->lock);
    SpinLockGuard gd(&dst_slot->table->lock, 1);
    Pmd pmd = src_slot.table->get(src_slot.index);
    if (!pmd.is_leaf()) {
      rc = 1;
    } else if (!pmd.leaf().present()) {
      rc = -EBUSY;  // PMD migration / device entries: see copy_one_pte
    } else {
      Pte leaf = pmd.leaf();
      if (!mem->is_huge_zero_pfn(leaf.pfn())) {
        Folio* folio = mem->folio_of(leaf.pfn());
        folio->get();
        folio_add_rmap_pmd(folio, &dst_mm, haddr);
        for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->clear_page(kPageAnonExclusive);
        if (cow && leaf.write()) {
          leaf = leaf.wrprotect();
          src_slot.table->set(src_slot.index, Pmd::make_leaf(leaf));
        }
      }
      dst_slot->table->set(dst_slot->index, Pmd::make_leaf(leaf.mkold()));
      dst_slot->table->deposit(dst_slot->index, deposit);
      deposit = nullptr;
    }
  }
  PageTable::free_pte_table(deposit);
  return rc;
}

int copy_page_range(AddressSpace& src_mm, AddressSpace& dst_mm, const Vma& vma) {
  // is_cow_mapping: private mappings that may become writable share pages copy-on-write.
  const bool cow = !vma.is_shared() && (vma.flags & VM_MAYWRITE);
  PageTable& pt = src_mm.page_table();
  for (Va addr = vma.start; addr < vma.end;) {
    const Va haddr = pmd_align_down(addr);
    const Va next = std::min(haddr + kPmdSize, vma.end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (slot) {
      Pmd pmd = slot.load_lockless();
      int rc = 1;
      if (pmd.is_leaf()) rc = copy_huge_pmd(src_mm, dst_mm, slot, haddr, cow);
      if (rc < 0) return rc;
      if (rc == 1 && slot.load_lockless().is_table()) {
        rc = copy_pte_range(src_mm, dst_mm, slot, addr, next, cow);
        if (rc) return rc;
      }
    }
    addr = next;
  }
  return 0;
}

}  // namespace

Result<std::unique_ptr<AddressSpace>> AddressSpace::fork() {
  Result<std::unique_ptr<AddressSpace>> child_r = create(mem_);
  if (!child_r) return child_r;
  std::unique_ptr<AddressSpace> child = std::move(*child_r);
  AddressSpace& c = *child;
  int rc = 0;
  {
    WriteLock g(&mmap_lock_);
    if (exited()) return Err{-EINVAL};
    // The child is not visible to anyone yet; its lock is taken for the assertions and the
    // static analysis, nested under the parent's.
    c.mmap_lock_.lock_nested(1);
    for (Vma* v = vmas_.find(0); v && !rc; v = vmas_.next(v)) {
      if (v->flags & VM_DONTCOPY) continue;
      Vma* cv = c.vmas_.insert(std::make_unique<Vma>(*v));
      if (v->flags & VM_WIPEONFORK) continue;
      if (!v->is_shared()) {
        // Write-protecting the parent's entries for COW must reach device mirrors too.
        MmuInvalidation inv(*this, v->start, v->end, MmuNotifyEvent::kProtectionPage);
        rc = copy_page_range(*this, c, *cv);
      } else {
        rc = copy_page_range(*this, c, *cv);
      }
    }
    c.mmap_lock_.unlock();
  }
  if (rc) return Err{rc};  // the child's destructor unmaps what was copied
  return child;
}

}  // namespace gpusvm::mm
