// hugetlb faults and VMA-split checks (hugetlb.h).
#include "gpusvm/mm/hugetlb.h"

#include <cerrno>
#include <cstring>

#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// hugetlb_fault_mutex_table: the faults of one (mm, 2 MiB slot) run one at a time, so the
// first fault of a slot is the one that consumes its reservation, and a racing fault finds
// the page mapped instead of failing for want of a second page (with the pool used up) or
// leaving the reservation behind. Hashed like the kernel's table; a collision only
// serializes two unrelated faults.
struct FaultMutex {
  Mutex mu{&kHugetlbFaultMutexClass};
};
FaultMutex g_fault_mutex[64];

Mutex* fault_mutex(const AddressSpace* mm, Va haddr) {
  const uint64_t h = (reinterpret_cast<uintptr_t>(mm) >> 6) ^ (haddr >> kPmdShift);
  return &g_fault_mutex[(h * 0x9E3779B97F4A7C15ULL) >> 58].mu;
}

// The leaf a hugetlb folio is mapped with: present, huge, young; writable and dirty when
// asked (a write fault in a VM_WRITE VMA).
Pmd hugetlb_leaf(const Folio* folio, bool write) {
  Pte leaf = Pte::make_present(folio->pfn(), write, /*huge=*/true).mkyoung();
  return Pmd::make_leaf(write ? leaf.mkdirty() : leaf);
}

void set_anon_exclusive(Folio* folio) {
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->set_page(kPageAnonExclusive);
}

// A fault on a none PMD (hugetlb_no_page): a zeroed pool page, mapped writable only for a
// write. The page and the deposit are allocated before the PMD lock is taken; the fault
// mutex keeps other faults of the slot out, so the PMD is still none under the lock (checked
// all the same: if not, the page is dropped and the access retried). Fault mutex held.
VmFault hugetlb_no_page(AddressSpace& mm, const Vma& vma, PmdSlot slot, Va haddr, bool write)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) GPUSVM_REQUIRES(fault_mutex(&mm, haddr)) {
  fault_mutex(&mm, haddr)->assert_held();
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return VmFault::kOom;
  bool reserved = false;
  Folio* folio = mem->hugetlb_alloc_folio(&mm, haddr, &reserved);
  if (!folio) {
    PageTable::free_pte_table(deposit);
    return VmFault::kSigbus;
  }
  set_anon_exclusive(folio);
  {
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index).is_none()) {
      folio_add_rmap_pmd(folio, &mm, haddr);  // the allocation's reference is the mapping's
      slot.table->set(slot.index, hugetlb_leaf(folio, write && (vma.flags & VM_WRITE)));
      slot.table->deposit(slot.index, deposit);
      deposit = nullptr;
      folio = nullptr;
    }
  }
  PageTable::free_pte_table(deposit);
  if (folio) {
    folio->put();  // a reservation it consumed is not given back: the slot is mapped
    return VmFault::kRetry;
  }
  mm.stats().faults_hugetlb.add();
  return VmFault::kOk;
}

// A write to a read-only hugetlb leaf (hugetlb_wp): reuse the page when only this mapping has
// it (anon-exclusive, or mapcount 1: the other side of a fork copied or went away), else copy
// all 2 MiB into a new pool page. The copy runs without the PMD lock, holding a reference on
// the source; the leaf must still be `pmd` when the lock is retaken (MADV_DONTNEED, which
// needs only the mmap read lock, may zap it meanwhile). Fault mutex held.
VmFault hugetlb_wp(AddressSpace& mm, PmdSlot slot, Va haddr, Pmd pmd)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) GPUSVM_REQUIRES(fault_mutex(&mm, haddr)) {
  fault_mutex(&mm, haddr)->assert_held();
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  Folio* src = mem->folio_of(pmd.leaf().pfn());
  {
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index) != pmd) return VmFault::kRetry;
    if (src->test_page(kPageAnonExclusive) || src->entire_mapcount() == 1) {
      set_anon_exclusive(src);
      slot.table->set(slot.index, Pmd::make_leaf(pmd.leaf().mkwrite().mkdirty().mkyoung()));
      mm.stats().faults_reuse.add();
      return VmFault::kOk;
    }
    src->get();  // keeps the source while it is copied without the lock
  }
  bool reserved = false;  // a mapped slot has no reservation left: always false here
  Folio* folio = mem->hugetlb_alloc_folio(&mm, haddr, &reserved);
  if (!folio) {
    src->put();
    return VmFault::kSigbus;
  }
  std::memcpy(folio->data(0), src->data(0), kPmdSize);  // a folio's frames are contiguous
  set_anon_exclusive(folio);
  bool done = false;
  {
    // Mirrors may map the old page: they drop it before the leaf changes (hugetlb_wp's
    // MMU_NOTIFY_CLEAR).
    MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index) == pmd) {
      folio_remove_rmap_pmd(src, &mm, haddr);
      folio_add_rmap_pmd(folio, &mm, haddr);
      slot.table->set(slot.index, hugetlb_leaf(folio, true));
      done = true;
    }
  }
  if (done) {
    src->put();  // the old mapping's reference
    mm.stats().faults_cow.add();
    mm.stats().cow_copies.add(kPagesPerPmd);
  } else {
    folio->put();
  }
  src->put();  // the copy's reference
  return done ? VmFault::kOk : VmFault::kRetry;
}

}  // namespace

VmFault hugetlb_fault(AddressSpace& mm, Vma& vma, Va va, unsigned flags) {
  mm.mmap_assert_locked();
  if (!vma.is_hugetlb()) panic("hugetlb_fault on a VMA without VM_HUGETLB");
  const Va haddr = pmd_align_down(va);
  const bool write = flags & kFaultWrite;
  Result<PmdSlot> slot = mm.page_table().pmd_alloc(haddr);
  if (!slot) return VmFault::kOom;
  MutexLock serialize(fault_mutex(&mm, haddr));
  const Pmd pmd = slot->load_lockless();
  if (pmd.is_none()) return hugetlb_no_page(mm, vma, *slot, haddr, write);
  if (!pmd.is_huge_present()) {
    // Nothing else is ever installed in a hugetlb VMA: no PTE table (the VMA owns its whole
    // aligned 2 MiB slots, whose tables free_pgtables removed), no migration or device entry.
    panic("hugetlb_fault: unexpected PMD " + std::to_string(pmd.raw()) + " in a hugetlb VMA");
  }
  if (write && !pmd.leaf().write()) return hugetlb_wp(mm, *slot, haddr, pmd);
  SpinLockGuard g(&slot->table->lock);
  if (slot->table->get(slot->index) != pmd) return VmFault::kRetry;
  const Pte upd = write ? pmd.leaf().mkyoung().mkdirty() : pmd.leaf().mkyoung();
  if (upd != pmd.leaf()) slot->table->set(slot->index, Pmd::make_leaf(upd));
  return VmFault::kOk;
}

int hugetlb_check_split(const VmaTree& vmas, Va start, Va end) {
  for (Va at : {start, end}) {
    const Vma* v = vmas.lookup(at);
    if (v && v->is_hugetlb() && v->start != at && !pmd_aligned(at)) return -EINVAL;
  }
  return 0;
}

}  // namespace gpusvm::mm
