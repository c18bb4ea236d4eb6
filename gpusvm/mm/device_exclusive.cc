// make_device_exclusive and restore_exclusive_pte (device_exclusive.h).
//
// Lock steps of make_device_exclusive (outermost first; gpusvm/base/lock_order.h has the ranks):
//   1. mmap lock (caller, read)        fault the page in writable, split a PMD mapping
//                                      (handle_mm_fault / split_huge_pmd take what they need)
//   2. + folio lock (sleeping)         taken with only the mmap lock held
//   3. + EXCLUSIVE invalidation        callbacks run with mmap + folio lock, no page-table lock
//   4. + PTE lock                      re-check the entry, install the device-exclusive entry
//   5. drop PTE lock, end invalidation; return with the folio still locked.
#include "gpusvm/mm/device_exclusive.h"

#include <cerrno>
#include <chrono>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/log.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// Makes the re-check under the PTE lock fail as if the entry had changed (retry path).
GPUSVM_FAULT_POINT(g_fail_exclusive_recheck, "mm.device_exclusive.recheck");

// The page mapped writable by the PTE at addr, referenced; nullptr when the PTE does not map
// a page writable (follow_page_pte with FOLL_WRITE | FOLL_GET). mmap lock held.
Folio* follow_write_pte(AddressSpace& mm, PmdSlot slot, Va addr) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PteTable* t = mm.page_table().pte_offset_map_lock(slot);
  if (!t) return nullptr;
  const Pte pte = t->get(pte_index(addr));
  Folio* page = nullptr;
  if (pte.present() && pte.write() && !pte.special()) {
    page = mm.mem()->pfn_to_page(pte.pfn());
    page->head()->get();  // the mapping holds a reference: the count is not zero
  }
  PageTable::pte_unmap_unlock(t);
  return page;
}

// GUP of one page with FOLL_GET | FOLL_WRITE | FOLL_SPLIT_PMD: returns the page at addr
// mapped writable by a PTE, referenced, faulting (as a remote write) until it is. A present
// huge PMD is split first, whatever it maps, as follow_pmd_mask does with FOLL_SPLIT_PMD.
// Errors: -EFAULT (no VMA, VM_IO/VM_PFNMAP, no VM_WRITE, SIGSEGV/SIGBUS), -EOPNOTSUPP (a
// hugetlb VMA: check_vma_flags refuses FOLL_SPLIT_PMD there before the write check and before
// anything is faulted, seed 004 patch 1), -ENOMEM, -EBUSY (past the deadline). mmap lock held,
// nothing else.
Result<Folio*> get_user_page_write(AddressSpace& mm, Va addr, const Vma** vma_out,
                                   std::chrono::steady_clock::time_point deadline)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  for (;;) {
    if (std::chrono::steady_clock::now() > deadline) return Err{-EBUSY};
    const Vma* vma = mm.vma_lookup(addr);
    if (!vma || (vma->flags & (VM_IO | VM_PFNMAP))) return Err{-EFAULT};
    // check_vma_flags, in Linux's order: FOLL_SPLIT_PMD on hugetlb before the write check.
    if (vma->is_hugetlb()) return Err{-EOPNOTSUPP};
    if (!(vma->flags & VM_WRITE)) return Err{-EFAULT};  // FOLL_WRITE without FOLL_FORCE
    PmdSlot slot = mm.page_table().pmd_lookup(addr);
    if (slot) {
      if (slot.load_lockless().is_huge_present()) {
        split_huge_pmd(mm, slot, pmd_align_down(addr));
        // A page-cache PMD split is a zap that leaves the PMD none: stuff a table in, as
        // follow_pmd_mask does, or the fault below would map the PMD again.
        if (slot.load_lockless().is_none() && mm.page_table().pte_alloc(slot) != 0) {
          return Err{-ENOMEM};
        }
      }
      if (slot.load_lockless().is_table()) {
        if (Folio* page = follow_write_pte(mm, slot, addr)) {
          *vma_out = vma;
          return page;
        }
      }
    }
    switch (handle_mm_fault(mm, addr, kFaultWrite | kFaultRemote)) {
      case VmFault::kOk:
      case VmFault::kRetry:
        continue;
      case VmFault::kSigsegv:
      case VmFault::kSigbus:
        return Err{-EFAULT};
      case VmFault::kOom:
        return Err{-ENOMEM};
      case VmFault::kTimeout:
        return Err{-ETIMEDOUT};  // logged by the fault, naming the folio
    }
  }
}

// Second walk, under the PTE lock: if addr still maps `page` writable at PTE level, replaces
// the PTE by a device-exclusive entry and returns true. Folio locked, invalidation started.
// mmap lock held (read).
bool convert_to_exclusive(AddressSpace& mm, Va addr, Folio* page) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PmdSlot slot = mm.page_table().pmd_lookup(addr);
  PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
  if (!t) return false;  // no table, or a PMD mapping again: not PTE level
  const unsigned i = pte_index(addr);
  const Pte pte = t->get(i);
  const bool same = pte.present() && pte.write() && !pte.special() && pte.pfn() == page->pfn() &&
                    !g_fail_exclusive_recheck.should_fail();
  if (same) {
    // The dirty bit lives only in the PTE: move it to the folio before the PTE goes.
    if (pte.dirty()) page->head()->set(kFolioDirty);
    Pte e = Pte::make_soft_leaf(SoftLeafType::kDeviceExclusive, page->pfn());
    if (pte.soft_dirty()) e = e.swp_mksoft_dirty();
    // Mapcount, rmap item and the mapping's reference stay: the entry is still a mapping.
    t->set(i, e);
  }
  PageTable::pte_unmap_unlock(t);
  return same;
}

}  // namespace

Result<Folio*> make_device_exclusive(AddressSpace& mm, Va addr, const void* owner) {
  if (addr >= kTaskSize) return Err{-EINVAL};
  mm.mmap_assert_locked();
  addr = page_align_down(addr);
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (uint64_t attempt = 0;; attempt++) {
    // Resume invariant: nothing held but the mmap lock; the entry may be anything.
    const Vma* vma = nullptr;
    Result<Folio*> got = get_user_page_write(mm, addr, &vma, deadline);
    if (!got) {
      if (got.error() == -EBUSY) {
        log::get().error("make_device_exclusive {:#x}: page still changing after {} attempts "
                         "and {} ms", addr, attempt, hang_timeout().count());
      }
      return got;
    }
    Folio* page = *got;
    Folio* folio = page->head();
    if (!folio->test(kFolioAnon) || folio->test(kFolioHugetlb)) {  // shmem / page cache, hugetlb
      folio->put();
      return Err{-EOPNOTSUPP};
    }
    folio_lock(folio);
    bool done;
    {
      // Secondary MMUs drop the page now; the caller's own mirror recognises the owner.
      MmuInvalidation inv(mm, addr, addr + kPageSize, MmuNotifyEvent::kExclusive, owner);
      done = convert_to_exclusive(mm, addr, page);
    }
    if (done) {
      mm.stats().exclusive_made.add();
      return page;  // locked, with the GUP reference
    }
    // Zapped, COWed, write-protected or re-mapped meanwhile: start over (never -EBUSY for a
    // benign race, seed 004 patch 17).
    mm.stats().exclusive_retries.add();
    folio_unlock(folio);
    folio->put();
  }
}

void restore_exclusive_pte_locked(AddressSpace& mm, const Vma& vma, PteTable* t, Va va, Pte orig,
                                  Folio* page) {
  t->ptl.assert_held();
  Folio* folio = page->head();
  folio_assert_locked(folio);
  Pte pte = Pte::make_present(page->pfn(), false);  // not young
  if (orig.soft_dirty()) pte = Pte(pte.raw() | pte_bits::kSoftDirty);
  // can_change_pte_writable for a private anonymous page: only an anon-exclusive page may be
  // mapped writable without a write fault deciding between reuse and copy.
  const bool writable = (vma.flags & VM_WRITE) &&
                        (vma.is_shared() ||
                         (folio->test(kFolioAnon) && page->test_page(kPageAnonExclusive)));
  if (writable) {
    if (folio->test(kFolioDirty)) pte = pte.mkdirty();
    pte = pte.mkwrite();
  }
  t->set(pte_index(va), pte);
  mm.stats().exclusive_restored.add();
}

}  // namespace gpusvm::mm
