// hmm_range_fault: snapshot and fault walk over the CPU page table (mm/hmm.c's contract).
#include "gpusvm/mm/hmm.h"

#include <cerrno>

#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/pagewalk.h"

namespace gpusvm::mm {
namespace {

// What hmm_pte_need_fault decides for a page.
enum NeedFault : unsigned {
  kNeedFault = 1u << 0,
  kNeedWriteFault = 1u << 1,
};

// Restarts after faults: each follows a successful fault, so many restarts mean concurrent
// invalidations keep undoing the work; the caller gets -EBUSY and retries with a new seq.
constexpr int kRestartBudget = 100000;

struct HmmWalk {
  HmmRange* range;
  Va last;  // where the next walk starts (the last fault address)
};

uint64_t* pfn_slot(HmmWalk& w, Va addr) {
  return &w.range->hmm_pfns[(addr - w.range->start) >> kPageShift];
}

// hmm_pte_need_fault: does the request for this page require a fault given what the CPU
// page table has (cpu_flags: VALID / WRITE)?
unsigned pte_need_fault(const HmmRange& r, uint64_t pfn_req, uint64_t cpu_flags) {
  pfn_req = (pfn_req & r.pfn_flags_mask) | r.default_flags;
  if (!(pfn_req & HMM_PFN_REQ_FAULT)) return 0;
  unsigned need = 0;
  if (!(cpu_flags & HMM_PFN_VALID)) need |= kNeedFault;
  if ((pfn_req & HMM_PFN_REQ_WRITE) && !(cpu_flags & HMM_PFN_WRITE)) {
    need |= kNeedFault | kNeedWriteFault;
  }
  return need;
}

// hmm_range_need_fault over [start, end).
unsigned range_need_fault(HmmWalk& w, Va start, Va end, uint64_t cpu_flags) {
  const HmmRange& r = *w.range;
  // Fast path: no page can request a fault.
  if (!((r.default_flags | r.pfn_flags_mask) & HMM_PFN_REQ_FAULT)) return 0;
  unsigned need = 0;
  for (Va a = start; a < end; a += kPageSize) {
    need |= pte_need_fault(r, *pfn_slot(w, a), cpu_flags);
    if (need == (kNeedFault | kNeedWriteFault)) break;
  }
  return need;
}

int pfns_fill(HmmWalk& w, Va start, Va end, uint64_t value) {
  uint64_t* out = pfn_slot(w, start);
  const uint64_t n = (end - start) >> kPageShift;
  for (uint64_t i = 0; i < n; i++) out[i] = (out[i] & HMM_PFN_INOUT_FLAGS) | value;
  return 0;
}

// hmm_vma_fault: faults every page of [addr, end) and asks the walk to restart at addr.
// No page-table lock may be held here (faults sleep and take those locks themselves).
int hmm_vma_fault(Va addr, Va end, unsigned need, MmWalk& walk) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  if (lockdep::max_held_rank() >= kFolioLockClass.rank) {
    panic("hmm_vma_fault: a page-table or folio lock is still held; holds " +
          lockdep::held_locks_string());
  }
  w.last = addr;
  unsigned flags = kFaultRemote;
  if (need & kNeedWriteFault) {
    if (!(walk.vma->flags & VM_WRITE)) return -EPERM;
    flags |= kFaultWrite;
  }
  walk.mm->stats().hmm_faults.add((end - addr) >> kPageShift);
  for (; addr < end; addr += kPageSize) {
    VmFault r = handle_mm_fault(*walk.mm, addr, flags);
    if (r != VmFault::kOk && r != VmFault::kRetry) return -EFAULT;
  }
  return -EBUSY;
}

int hmm_test_walk(Va start, Va end, MmWalk& walk) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  const Vma* vma = walk.vma;
  if (!(vma->flags & VM_READ) || (vma->flags & (VM_IO | VM_PFNMAP))) {
    // Nothing a device may mirror: fault requests fail, snapshots see ERROR.
    if (range_need_fault(w, start, end, 0)) return -EFAULT;
    pfns_fill(w, start, end, HMM_PFN_ERROR);
    return 1;
  }
  return 0;
}

int hmm_pte_hole(Va start, Va end, MmWalk& walk) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  const unsigned need = range_need_fault(w, start, end, 0);
  if (!walk.vma) {
    if (need) return -EFAULT;
    return pfns_fill(w, start, end, HMM_PFN_ERROR);
  }
  if (need) return hmm_vma_fault(start, end, need, walk);
  return pfns_fill(w, start, end, 0);
}

// Waits for the migration holding `pfn` and restarts the walk at addr. The entry's lock
// must have been dropped.
int wait_migration_and_restart(MmWalk& walk, Pfn pfn, Va addr) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  w.last = addr;
  (void)wait_for_migration(walk.mm->mem()->pfn_to_page(pfn));
  return -EBUSY;
}

bool owned_device_private(MmWalk& walk, Pte entry) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  if (!entry.is_device_private()) return false;
  DevPagemap* pgmap = walk.mm->mem()->pfn_to_pagemap(entry.pfn());
  return pgmap && w.range->dev_private_owner && pgmap->owner() == w.range->dev_private_owner;
}

// A huge leaf (present or device-private) read under the PMD lock. Returns 1 when the caller
// must re-read the PMD (it was split), 0 when done, < 0 to stop/restart.
int hmm_handle_pmd(PmdSlot slot, Va start, Va end, MmWalk& walk) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  const Va haddr = pmd_align_down(start);
  Pte leaf;
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return 1;
    leaf = pmd.leaf();
  }
  uint64_t cpu_flags = 0;
  if (leaf.present()) {
    cpu_flags = HMM_PFN_VALID | (leaf.write() ? HMM_PFN_WRITE : 0);
  } else if (owned_device_private(walk, leaf)) {
    cpu_flags = HMM_PFN_VALID | (leaf.soft_leaf_write() ? HMM_PFN_WRITE : 0);
  }
  const unsigned need = range_need_fault(w, start, end, cpu_flags);
  if (need) {
    if (leaf.is_migration()) return wait_migration_and_restart(walk, leaf.pfn(), start);
    return hmm_vma_fault(start, end, need, walk);
  }
  if (!(cpu_flags & HMM_PFN_VALID)) return pfns_fill(w, start, end, 0);
  cpu_flags |= static_cast<uint64_t>(kPmdOrder) << HMM_PFN_ORDER_SHIFT;
  // Hoisted: the output may alias the range, so a per-page pfn_slot() reload would keep the
  // compiler from vectorising the 512-word fill.
  uint64_t* out = pfn_slot(w, start);
  const uint64_t n = (end - start) >> kPageShift;
  const uint64_t first = (leaf.pfn() + ((start - haddr) >> kPageShift)) | cpu_flags;
  for (uint64_t i = 0; i < n; i++) out[i] = (out[i] & HMM_PFN_INOUT_FLAGS) | (first + i);
  return 0;
}

enum class PteAction { kDone, kFault, kWaitMigration };

// hmm_vma_handle_pte: decides one PTE under the PTL. Writes the output word unless a fault
// or wait is needed.
PteAction hmm_handle_pte(MmWalk& walk, Va addr, Pte pte, unsigned* need) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  uint64_t* out = pfn_slot(w, addr);
  const uint64_t req = *out;
  uint64_t value;
  if (pte.is_none()) {
    *need = pte_need_fault(*w.range, req, 0);
    if (*need) return PteAction::kFault;
    value = 0;
  } else if (pte.present()) {
    const uint64_t cpu_flags = HMM_PFN_VALID | (pte.write() ? HMM_PFN_WRITE : 0);
    *need = pte_need_fault(*w.range, req, cpu_flags);
    if (*need) return PteAction::kFault;
    if (pte.special() && !walk.mm->mem()->is_zero_pfn(pte.pfn())) {
      value = HMM_PFN_ERROR;  // a special mapping without a page behind it
    } else {
      value = pte.pfn() | cpu_flags;
    }
  } else if (owned_device_private(walk, pte)) {
    // The caller's own device memory: reported as is, never faulted back.
    value = pte.pfn() | HMM_PFN_VALID | (pte.soft_leaf_write() ? HMM_PFN_WRITE : 0);
  } else {
    *need = pte_need_fault(*w.range, req, 0);
    if (!*need) {
      value = 0;
    } else if (pte.is_migration()) {
      return PteAction::kWaitMigration;
    } else {
      return PteAction::kFault;  // another owner's device page, device-exclusive
    }
  }
  *out = (req & HMM_PFN_INOUT_FLAGS) | value;
  return PteAction::kDone;
}

int hmm_pmd_entry(PmdSlot slot, Va start, Va end, MmWalk& walk) {
  for (;;) {
    const Pmd pmd = slot.load_lockless();
    if (pmd.is_none()) return hmm_pte_hole(start, end, walk);
    if (pmd.is_leaf()) {
      int rc = hmm_handle_pmd(slot, start, end, walk);
      if (rc == 1) continue;  // split under us: read again
      return rc;
    }
    PteTable* t = walk.mm->page_table().pte_offset_map_lock(slot);
    if (!t) continue;  // the PMD changed between the read and the lock
    for (Va a = start; a < end; a += kPageSize) {
      const Pte pte = t->get(pte_index(a));
      unsigned need = 0;
      switch (hmm_handle_pte(walk, a, pte, &need)) {
        case PteAction::kDone:
          continue;
        case PteAction::kFault:
          PageTable::pte_unmap_unlock(t);
          return hmm_vma_fault(a, end, need, walk);
        case PteAction::kWaitMigration:
          PageTable::pte_unmap_unlock(t);
          return wait_migration_and_restart(walk, pte.pfn(), a);
      }
    }
    PageTable::pte_unmap_unlock(t);
    return 0;
  }
}

constexpr MmWalkOps kHmmWalkOps{
    .test_walk = hmm_test_walk,
    .pte_hole = hmm_pte_hole,
    .pmd_entry = hmm_pmd_entry,
};

}  // namespace

int hmm_range_fault(HmmRange* range) {
  if (!range || !range->notifier || !range->notifier->inserted() || !range->hmm_pfns) {
    return -EINVAL;
  }
  const uint64_t allowed = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_INOUT_FLAGS;
  if (!page_aligned(range->start) || !page_aligned(range->end) || range->start >= range->end ||
      range->start < range->notifier->start() || range->end > range->notifier->end() ||
      (range->default_flags & ~allowed)) {
    return -EINVAL;
  }
  AddressSpace& mm = *range->notifier->mm();
  mm.mmap_assert_locked();
  HmmWalk w{range, range->start};
  for (int restarts = 0; restarts < kRestartBudget; restarts++) {
    // An invalidation since read_begin makes everything gathered so far suspect.
    if (range->notifier->read_retry(range->notifier_seq)) return -EBUSY;
    mm.stats().hmm_walks.add();
    int rc = walk_page_range(mm, w.last, range->end, kHmmWalkOps, &w);
    if (rc != -EBUSY) return rc;
    mm.stats().hmm_restarts.add();
  }
  log::get().error("hmm_range_fault [{:#x}, {:#x}): no progress after {} restarts", range->start,
                   range->end, kRestartBudget);
  return -EBUSY;
}

}  // namespace gpusvm::mm
