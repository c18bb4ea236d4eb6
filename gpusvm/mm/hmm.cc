// hmm_range_fault: the one page walk behind snapshot, fault and fault-and-migrate
// (mm/hmm.c's contract, with seed 002's unified migration walk).
//
// Lock states of the walk (the review of seed 002 asked for them to be explicit):
//   none   between PMDs, in hole handling, while faulting (asserted) and while splitting;
//   pmd    one hold per huge leaf (hmm_handle_pmd_locked): it is read, reported and, when
//          migrating and selected, replaced by its PMD migration entry (issue 9 §1: deciding
//          from a copy and acting in a second hold let another page be collected);
//   pte    the whole PTE loop of one PMD: the decision for an entry (report, fault or
//          migrate) and the migration entry that replaces it happen in one critical section,
//          so nothing can change the entry in between (the v1 race of seed 000).
// Every exit from a lock state goes through one place that releases it.
#include "gpusvm/mm/hmm.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <optional>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/migrate_internal.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/pagewalk.h"

namespace gpusvm::mm {
namespace {

GPUSVM_FAULT_POINT(g_fail_migrate_trylock, "mm.migrate_trylock");
GPUSVM_FAULT_POINT(g_fail_migrate_split, "mm.migrate_split");
// A huge leaf was seen by the lockless PMD read; the PMD-lock hold in which the walk reads it
// again, decides and acts on it has not begun.
// Held: mmap lock (read); when migrating the walk's MIGRATE invalidation and the folio locks
// of the pages collected so far.
GPUSVM_SCHED_POINT(g_sp_pmd_read, "mm.hmm.pmd_read");
// Schedule points in the other windows of the walk, where no page-table lock is held and the
// entry may change before the walk acts; each window ends in a fresh read of the entry.
// Held at each: mmap lock (read); when migrating, the MIGRATE invalidation of the walk and
// the folio locks of the pages collected so far.
//   pte_lock:       a PTE table was seen by the lockless PMD read; its lock not taken yet.
//   split_pmd:      a selected huge leaf must be split (only part of it is asked for); the
//                   PMD lock was dropped, split_huge_pmd not begun.
//   split_folio:    a PTE of a large folio was selected; the PTE lock was dropped; held in
//                   addition: a reference on the folio (taken under the PTE lock).
//   wait_migration: a migration entry must be waited on; its lock was dropped.
//   fault:          pages must be faulted; every page-table lock was dropped.
GPUSVM_SCHED_POINT(g_sp_pte_lock, "mm.hmm.pte_lock");
GPUSVM_SCHED_POINT(g_sp_split_pmd, "mm.hmm.split_pmd");
GPUSVM_SCHED_POINT(g_sp_split_folio, "mm.hmm.split_folio");
GPUSVM_SCHED_POINT(g_sp_wait_migration, "mm.hmm.wait_migration");
GPUSVM_SCHED_POINT(g_sp_fault, "mm.hmm.fault");

// What hmm_pte_need_fault decides for a page.
enum NeedFault : unsigned {
  kNeedFault = 1u << 0,
  kNeedWriteFault = 1u << 1,
};

// The walk restarts after each fault, wait or split, at the address it stopped at (w.last).
// A walk whose restart point has not moved forward for hang_timeout() is a livelock
// (invalidations keep undoing its faults; a folio that stays locked while the walk may not
// wait for it) or a bug (a leaked folio lock): it fails -ETIMEDOUT and logs what the last
// restart was for. A long walk that keeps advancing is not cut short.
// Re-reads of one PMD that keeps changing under the walk before it restarts the walk instead
// (so that the restart deadline bounds them too).
constexpr int kPmdRereads = 64;

struct HmmWalk {
  HmmRange* range;
  Va last;  // where the next pass starts (the last fault or split address)
  // Migrating: the select flags (0 when not migrating) and what the walk owns meanwhile.
  unsigned select = 0;
  Folio* fault_page = nullptr;
  bool no_wait = false;  // folio locks of a migration are held: never wait on another one
  std::vector<Folio*> puts;          // references to drop once no page-table lock is held
  std::vector<Folio*> unsplittable;  // large folios whose split failed: left where they are
  // Why the walk last restarted (for the diagnostic of a walk that stops making progress):
  // what it did at restart_va, and the pfn of the folio involved (0: none).
  const char* restart_why = nullptr;
  Va restart_va = 0;
  Pfn restart_pfn = 0;
  bool migrating() const { return select != 0; }
  void note_restart(const char* why, Va va, Pfn pfn) {
    restart_why = why;
    restart_va = va;
    restart_pfn = pfn;
  }
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

// A hole (no entry) of the walked VMA: a migration may put a new page there when the VMA is
// anonymous and system memory is selected.
uint64_t hole_value(const HmmWalk& w, const Vma* vma) {
  if (w.migrating() && vma && vma->is_anonymous() && (w.select & MIGRATE_VMA_SELECT_SYSTEM)) {
    return HMM_PFN_VALID | HMM_PFN_MIGRATE;
  }
  return 0;
}

// A migrating walk gives a hole or the zero page of an anonymous VMA a new page (the
// destination, zeroed), so faulting one in first would only be undone: the migration itself
// satisfies the request - unless it asks for write access the VMA lacks, which stays a fault
// (and -EPERM) as for any page.
unsigned migrate_hole_need(const HmmWalk& w, const Vma* vma, unsigned need) {
  if (!need || !hole_value(w, vma)) return need;
  if ((need & kNeedWriteFault) && !(vma->flags & VM_WRITE)) return need;
  return 0;
}

// A migrating walk takes a whole aligned 2 MiB as one compound entry when asked to.
bool compound_selected(const HmmWalk& w, Va start, Va end) {
  return (w.select & MIGRATE_VMA_SELECT_COMPOUND) && pmd_aligned(start) && end - start == kPmdSize;
}

// A 2 MiB hole (or the huge zero folio) that may receive one 2 MiB destination: the first
// word says so (COMPOUND), the other 511 belong to it.
int fill_compound_hole(HmmWalk& w, Va start) {
  uint64_t* out = pfn_slot(w, start);
  out[0] = (out[0] & HMM_PFN_INOUT_FLAGS) | HMM_PFN_VALID | HMM_PFN_MIGRATE | HMM_PFN_COMPOUND;
  for (uint64_t i = 1; i < kPagesPerPmd; i++) out[i] = (out[i] & HMM_PFN_INOUT_FLAGS) | HMM_PFN_VALID;
  return 0;
}

// Output for [start, end) of a hole in `vma`.
int fill_hole(HmmWalk& w, const Vma* vma, Va start, Va end) {
  const uint64_t value = hole_value(w, vma);
  for (Va a = start; a < end;) {
    const Va next = std::min(pmd_align_down(a) + kPmdSize, end);
    if (value && compound_selected(w, a, next)) {
      fill_compound_hole(w, a);
    } else {
      pfns_fill(w, a, next, value);
    }
    a = next;
  }
  return 0;
}

// hmm_vma_fault: faults every page of [addr, end) and asks the walk to restart at addr.
// No page-table lock may be held here (faults sleep and take those locks themselves); folio
// locks of pages this walk has collected may be, as the kernel's unified walk holds them.
int hmm_vma_fault(Va addr, Va end, unsigned need, MmWalk& walk) {
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  if (lockdep::max_held_rank() >= kRmapWalkLockClass.rank) {
    panic("hmm_vma_fault: a page-table lock is still held; holds " + lockdep::held_locks_string());
  }
  w.last = addr;
  g_sp_fault.reach();
  unsigned flags = kFaultRemote;
  if (need & kNeedWriteFault) {
    if (!(walk.vma->flags & VM_WRITE)) return -EPERM;
    flags |= kFaultWrite;
  }
  // A walk that holds folio locks of collected pages never sleeps on a migration: the entry
  // may be its own (the three-step path) or another migrator's that waits for ours.
  if (w.no_wait) flags |= kFaultRetryNowait;
  walk.mm->stats().hmm_faults.add((end - addr) >> kPageShift);
  w.note_restart("fault", addr, 0);
  for (; addr < end; addr += kPageSize) {
    VmFault r = handle_mm_fault(*walk.mm, addr, flags);
    if (r == VmFault::kTimeout) return -ETIMEDOUT;  // logged by the fault, naming the folio
    if (r != VmFault::kOk && r != VmFault::kRetry) return -EFAULT;
  }
  return -EBUSY;
}

int hmm_test_walk(Va start, Va end, MmWalk& walk) {
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
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
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  const unsigned need = range_need_fault(w, start, end, 0);
  if (!walk.vma) {
    if (need) return -EFAULT;
    return pfns_fill(w, start, end, HMM_PFN_ERROR);
  }
  if (migrate_hole_need(w, walk.vma, need)) return hmm_vma_fault(start, end, need, walk);
  return fill_hole(w, walk.vma, start, end);
}

// Waits for the migration holding `pfn` and restarts the walk at addr; -ETIMEDOUT (logged)
// when it did not end within hang_timeout(). The entry's lock must have been dropped.
int wait_migration_and_restart(MmWalk& walk, Pfn pfn, Va addr) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  w.last = addr;
  g_sp_wait_migration.reach();
  w.note_restart("wait for a migration", addr, pfn);
  if (wait_for_migration(walk.mm->mem()->pfn_to_page(pfn), addr) == VmFault::kTimeout) return -ETIMEDOUT;
  return -EBUSY;
}

bool owned_device_private(MmWalk& walk, Pte entry) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  if (!entry.is_device_private()) return false;
  DevPagemap* pgmap = walk.mm->mem()->pfn_to_pagemap(entry.pfn());
  return pgmap && w.range->dev_private_owner && pgmap->owner() == w.range->dev_private_owner;
}

// Whether a migrating walk takes `folio`, whose mapping it reported VALID (migrate_vma's
// select rules): system memory with SELECT_SYSTEM; device memory of the walk's owner with the
// SELECT flag of its kind. Device-private pages of another owner are never VALID here.
bool migrate_selects(const HmmWalk& w, const Folio* folio) {
  if (!folio_is_zone_device(folio)) return w.select & MIGRATE_VMA_SELECT_SYSTEM;
  if (folio->pagemap()->owner() != w.range->dev_private_owner) return false;
  return w.select & (folio_is_device_coherent(folio) ? MIGRATE_VMA_SELECT_DEVICE_COHERENT
                                                     : MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
}

// migrate_vma_collect_huge_pmd's step, in the PMD-lock hold in which hmm_handle_pmd_locked
// read `leaf` (a THP, an owned device-private PMD or the huge zero folio) and found it selected
// over [haddr, haddr + 2 MiB) with COMPOUND: replaces the PMD by a PMD migration entry (the
// folio moves as one), or marks the huge zero folio as a compound hole. A busy folio is
// reported but not taken. Context: PMD lock held (asserted); takes no sleeping lock.
// (slot by reference: the analysis cannot name a lock through a by-value copy.)
void migrate_prepare_pmd(HmmWalk& w, MmWalk& walk, const PmdSlot& slot, Va haddr, Pte leaf)
    GPUSVM_REQUIRES(slot.table->lock) {
  slot.table->lock.assert_held();
  PhysMem* mem = walk.mm->mem();
  if (leaf.present() && mem->is_huge_zero_pfn(leaf.pfn())) {
    fill_compound_hole(w, haddr);
    return;
  }
  const bool write = leaf.present() ? leaf.write() : leaf.soft_leaf_write();
  uint64_t* out = pfn_slot(w, haddr);
  const uint64_t flags = HMM_PFN_VALID | (write ? HMM_PFN_WRITE : 0) |
                         (static_cast<uint64_t>(kPmdOrder) << HMM_PFN_ORDER_SHIFT);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) out[i] = (out[i] & HMM_PFN_INOUT_FLAGS) | (leaf.pfn() + i) | flags;
  Folio* folio = mem->folio_of(leaf.pfn());
  if (!folio->test(kFolioAnon) || folio->pfn() != leaf.pfn()) return;
  folio->get();
  if (folio != w.fault_page && (g_fail_migrate_trylock.should_fail() || !folio_trylock(folio))) {
    w.puts.push_back(folio);  // busy: reported, not taken
    return;
  }
  if (leaf.dirty()) folio->set(kFolioDirty);
  slot.table->set(slot.index, Pmd::make_leaf(make_migration_entry(leaf, folio)));
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->clear_page(kPageAnonExclusive);
  folio_rmap_pmd_to_migration(folio, walk.mm, haddr);
  w.puts.push_back(folio);  // the mapping's reference; the migration keeps the one above
  out[0] |= HMM_PFN_MIGRATE | HMM_PFN_COMPOUND;
  walk.mm->stats().migrate_collected.add();
}

// What hmm_handle_pmd does once the PMD lock is dropped.
enum class PmdAction { kDone, kReread, kFault, kWaitMigration, kSplit };

// hmm_vma_handle_pmd and the decision of migrate_vma_collect_huge_pmd for [start, end) of the
// PMD at slot, in one PMD-lock hold: reads the entry, reports it, and when the walk migrates
// and selects it, replaces it by its migration entry before the lock is dropped (seed 000: the
// VALID report and MIGRATE are decided and set under one lock, so no other migration, CPU
// fault or zap-and-refault can put a page there that the walk never selected; issue 9 §1).
// *need / *pfn: for kFault / kWaitMigration. Context: PMD lock held (asserted).
PmdAction hmm_handle_pmd_locked(HmmWalk& w, MmWalk& walk, const PmdSlot& slot, Va start, Va end,
                                unsigned* need, Pfn* pfn) GPUSVM_REQUIRES(slot.table->lock) {
  slot.table->lock.assert_held();
  const Pmd pmd = slot.table->get(slot.index);
  if (!pmd.is_leaf()) return PmdAction::kReread;  // split (or zapped) since the lockless read
  const Pte leaf = pmd.leaf();
  *pfn = leaf.pfn();
  uint64_t cpu_flags = 0;
  if (leaf.present()) {
    cpu_flags = HMM_PFN_VALID | (leaf.write() ? HMM_PFN_WRITE : 0);
  } else if (owned_device_private(walk, leaf)) {
    cpu_flags = HMM_PFN_VALID | (leaf.soft_leaf_write() ? HMM_PFN_WRITE : 0);
  }
  if (w.no_wait && leaf.is_migration()) {
    pfns_fill(w, start, end, 0);  // another migration owns it: skip, never wait
    return PmdAction::kDone;
  }
  *need = range_need_fault(w, start, end, cpu_flags);
  if (leaf.present() && walk.mm->mem()->is_huge_zero_pfn(leaf.pfn())) *need = migrate_hole_need(w, walk.vma, *need);
  if (*need) return leaf.is_migration() ? PmdAction::kWaitMigration : PmdAction::kFault;
  // Migration never takes hugetlb pages (migrate_vma_setup refuses hugetlb VMAs; a
  // migrating hmm walk reports them as they are).
  const Folio* leaf_folio = (cpu_flags & HMM_PFN_VALID) ? walk.mm->mem()->folio_of(leaf.pfn()) : nullptr;
  // Nor page-cache THPs (shmem): reported as they are, never split or collected, as the
  // page cache's 4 KiB pages (hmm_handle_pte) are.
  if (w.migrating() && leaf_folio && !walk.vma->is_hugetlb() && !leaf_folio->test(kFolioShmem) &&
      migrate_selects(w, leaf_folio)) {
    // Only part of it is asked for: split the mapping and collect its pages one by one.
    if (!compound_selected(w, start, end)) return PmdAction::kSplit;
    migrate_prepare_pmd(w, walk, slot, pmd_align_down(start), leaf);
    return PmdAction::kDone;
  }
  if (!(cpu_flags & HMM_PFN_VALID)) {
    pfns_fill(w, start, end, 0);
    return PmdAction::kDone;
  }
  cpu_flags |= static_cast<uint64_t>(kPmdOrder) << HMM_PFN_ORDER_SHIFT;
  // Hoisted: the output may alias the range, so a per-page pfn_slot() reload would keep the
  // compiler from vectorising the 512-word fill.
  uint64_t* out = pfn_slot(w, start);
  const uint64_t n = (end - start) >> kPageShift;
  const uint64_t first = (leaf.pfn() + ((start - pmd_align_down(start)) >> kPageShift)) | cpu_flags;
  for (uint64_t i = 0; i < n; i++) out[i] = (out[i] & HMM_PFN_INOUT_FLAGS) | (first + i);
  return PmdAction::kDone;
}

// A huge leaf (present or device-private) seen by the lockless read of hmm_pmd_entry. Returns
// 1 when the caller must read the PMD again (it changed, or was split here), 0 when done,
// < 0 to stop/restart. Whatever is decided on the entry is decided in the one PMD-lock hold
// of hmm_handle_pmd_locked; faults, waits and splits happen after it, with no page-table lock,
// and each ends in a fresh read of the entry.
int hmm_handle_pmd(PmdSlot slot, Va start, Va end, MmWalk& walk) {
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  unsigned need = 0;
  Pfn pfn = 0;
  PmdAction action;
  {
    SpinLockGuard g(&slot.table->lock);
    action = hmm_handle_pmd_locked(w, walk, slot, start, end, &need, &pfn);
  }
  switch (action) {
    case PmdAction::kDone:
      return 0;
    case PmdAction::kReread:
      return 1;
    case PmdAction::kFault:
      return hmm_vma_fault(start, end, need, walk);
    case PmdAction::kWaitMigration:
      return wait_migration_and_restart(walk, pfn, start);
    case PmdAction::kSplit:
      // Whatever is there now is split (splitting is always legal under the mmap lock); the
      // caller reads the PTEs and decides on each under the table lock.
      g_sp_split_pmd.reach();
      split_huge_pmd(*walk.mm, slot, pmd_align_down(start));
      return 1;
  }
  return 1;
}

enum class PteAction { kDone, kFault, kWaitMigration, kSplitFolio };

// hmm_vma_handle_pte: decides one PTE under the PTL. Writes the output word unless a fault
// or wait is needed.
PteAction hmm_handle_pte(MmWalk& walk, Va addr, Pte pte, unsigned* need) {
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  uint64_t* out = pfn_slot(w, addr);
  const uint64_t req = *out;
  uint64_t value;
  if (pte.is_none()) {
    *need = migrate_hole_need(w, walk.vma, pte_need_fault(*w.range, req, 0));
    if (*need) return PteAction::kFault;
    value = hole_value(w, walk.vma);
  } else if (pte.present()) {
    const uint64_t cpu_flags = HMM_PFN_VALID | (pte.write() ? HMM_PFN_WRITE : 0);
    *need = pte_need_fault(*w.range, req, cpu_flags);
    if (pte.special() && walk.mm->mem()->is_zero_pfn(pte.pfn())) *need = migrate_hole_need(w, walk.vma, *need);
    if (*need) return PteAction::kFault;
    if (pte.special() && !walk.mm->mem()->is_zero_pfn(pte.pfn())) {
      value = HMM_PFN_ERROR;  // a special mapping without a page behind it
    } else {
      value = pte.pfn() | cpu_flags;
    }
  } else if (owned_device_private(walk, pte)) {
    // The caller's own device memory: reported as is, never faulted back.
    value = pte.pfn() | HMM_PFN_VALID | (pte.soft_leaf_write() ? HMM_PFN_WRITE : 0);
  } else if (w.no_wait && pte.is_migration()) {
    value = 0;  // another migration owns the page: skipped, never waited on
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

// migrate_vma_collect_pmd's per-entry step, run under the same PTE-lock hold in which
// hmm_handle_pte reported the entry (*out already holds VALID|pfn[|WRITE]). Replaces a page
// that may move by a migration entry and marks *out MIGRATE; a hole or the zero page was
// marked by the report already. Returns kSplitFolio for a page of a large folio.
PteAction migrate_prepare_pte(HmmWalk& w, MmWalk& walk, PteTable* t, Va addr, Pte pte)
    GPUSVM_REQUIRES(t->ptl) {
  t->ptl.assert_held();
  uint64_t* out = pfn_slot(w, addr);
  PhysMem* mem = walk.mm->mem();
  if (pte.is_none() || !(*out & HMM_PFN_VALID)) return PteAction::kDone;
  if (pte.present() && pte.special()) {
    if (mem->is_zero_pfn(pte.pfn()) && (w.select & MIGRATE_VMA_SELECT_SYSTEM) && walk.vma->is_anonymous()) {
      *out |= HMM_PFN_MIGRATE;  // no source page: the destination starts zeroed
    }
    return PteAction::kDone;
  }
  Folio* page = mem->pfn_to_page(pte.pfn());
  Folio* folio = page->head();
  if (!migrate_selects(w, folio)) return PteAction::kDone;
  if (!folio->test(kFolioAnon)) return PteAction::kDone;  // page cache stays put
  if (folio->large()) {
    if (std::find(w.unsplittable.begin(), w.unsplittable.end(), folio) != w.unsplittable.end()) {
      return PteAction::kDone;
    }
    return PteAction::kSplitFolio;
  }
  folio->get();
  if (folio != w.fault_page && (g_fail_migrate_trylock.should_fail() || !folio_trylock(folio))) {
    w.puts.push_back(folio);  // busy: skip it, as the kernel does
    return PteAction::kDone;
  }
  // The migration keeps the reference taken above; the mapping's goes with the PTL dropped.
  w.puts.push_back(install_migration_pte(*walk.mm, t, addr, pte, page));
  *out |= HMM_PFN_MIGRATE;
  walk.mm->stats().migrate_collected.add();
  return PteAction::kDone;
}

// The large folio that `pte` maps, referenced for split_folio_and_restart, as
// migrate_vma_split_folio's caller does before it drops the lock: the folio cannot be freed
// and its frames handed to another mapping before the split (which would then split that
// one). The fault page's folio is referenced by the CPU fault handler already. PTE lock held.
Folio* get_folio_to_split(HmmWalk& w, MmWalk& walk, PteTable* t, Pte pte) GPUSVM_REQUIRES(t->ptl) {
  t->ptl.assert_held();
  Folio* folio = walk.mm->mem()->folio_of(pte.pfn());
  if (folio != w.fault_page) folio->get();  // the mapping holds one: the count is not zero
  return folio;
}

// Splits `folio`, which the walk found mapped at addr (referenced by get_folio_to_split), so
// that its pages can be collected one by one (migrate_vma_split_folio), then restarts the
// walk at addr. No page-table lock held. A folio that is busy or cannot be split (pinned, an
// unexpected reference) is remembered and left where it is. The fault page's folio is locked
// and referenced by the CPU fault handler already; after the split its first page keeps
// both, the others are free to collect.
int split_folio_and_restart(HmmWalk& w, MmWalk& walk, Va addr, Folio* folio) {
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
  w.last = addr;
  g_sp_split_folio.reach();
  w.note_restart("split of a large folio", addr, folio->pfn());
  const bool fault_folio = folio == w.fault_page;
  // Blocking on a folio lock while holding the collected ones could deadlock: trylock.
  bool split = false;
  if (folio->large() && !g_fail_migrate_split.should_fail() && (fault_folio || folio_trylock(folio))) {
    // Mapped by another process (a fork child, by PTE or PMD): split through the rmap.
    int rc = split_folio_exclusive(*walk.mm, folio);
    if (rc == -EBUSY) rc = split_folio_rmap(*walk.mm, folio);
    split = rc == 0;
    if (!fault_folio) folio_unlock(folio);  // the first page's folio, which kept our reference
  }
  if (!split && folio->large()) w.unsplittable.push_back(folio);
  if (!fault_folio) folio->put();
  return -EBUSY;
}

int hmm_pmd_entry(PmdSlot slot, Va start, Va end, MmWalk& walk) {
  walk.mm->mmap_assert_locked();  // a walk callback: walk_page_range's caller holds it
  HmmWalk& w = *static_cast<HmmWalk*>(walk.priv);
  for (int rereads = 0;; rereads++) {
    if (rereads == kPmdRereads) {  // the PMD keeps changing: let the bounded restart loop retry
      w.last = start;
      w.note_restart("PMD kept changing", start, 0);
      return -EBUSY;
    }
    const Pmd pmd = slot.load_lockless();
    if (pmd.is_none()) return hmm_pte_hole(start, end, walk);
    if (pmd.is_leaf()) {
      g_sp_pmd_read.reach();
      int rc = hmm_handle_pmd(slot, start, end, walk);
      if (rc == 1) continue;  // split under us: read again
      return rc;
    }
    g_sp_pte_lock.reach();
    PteTable* t = walk.mm->page_table().pte_offset_map_lock(slot);
    if (!t) continue;  // the PMD changed between the read and the lock
    t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
    for (Va a = start; a < end; a += kPageSize) {
      const Pte pte = t->get(pte_index(a));
      unsigned need = 0;
      PteAction action = hmm_handle_pte(walk, a, pte, &need);
      if (action == PteAction::kDone && w.migrating()) action = migrate_prepare_pte(w, walk, t, a, pte);
      if (action == PteAction::kDone) continue;
      Folio* to_split = action == PteAction::kSplitFolio ? get_folio_to_split(w, walk, t, pte) : nullptr;
      PageTable::pte_unmap_unlock(t);
      switch (action) {
        case PteAction::kFault:
          return hmm_vma_fault(a, end, need, walk);
        case PteAction::kWaitMigration:
          return wait_migration_and_restart(walk, pte.pfn(), a);
        case PteAction::kSplitFolio:
          return split_folio_and_restart(w, walk, a, to_split);
        case PteAction::kDone:
          break;
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

// Undoes the collection of every page marked MIGRATE (an error ends the walk): each
// migration entry becomes the original mapping again and the page is released.
void abort_collected(HmmWalk& w, PhysMem* mem) {
  const uint64_t n = (w.range->end - w.range->start) >> kPageShift;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t& word = w.range->hmm_pfns[i];
    if (!(word & HMM_PFN_MIGRATE)) continue;
    if (hmm_pfn_migrate_has_source(word)) {
      Folio* folio = mem->folio_of(hmm_pfn_to_pfn(word));
      remove_migration_ptes(folio, folio);
      if (folio != w.fault_page) folio_unlock(folio);
      folio->put();
    }
    word &= ~HMM_PFN_MIGRATE;
  }
}

// The pfn the CPU entry at va refers to (0: none, or no entry). mmap lock held, no page-table
// lock. For diagnostics: the entry may change as soon as the lock is dropped.
Pfn entry_pfn_at(AddressSpace& mm, Va va) {
  PmdSlot slot = mm.page_table().pmd_lookup(va);
  if (!slot) return 0;
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (pmd.is_leaf()) return pmd.leaf().pfn();
    if (!pmd.is_table()) return 0;
  }
  PteTable* t = mm.page_table().pte_offset_map_lock(slot);
  if (!t) return 0;
  const Pte pte = t->get(pte_index(va));
  PageTable::pte_unmap_unlock(t);
  return pte.is_none() ? 0 : pte.pfn();
}

// The walk kept restarting for hang_timeout(): says where it was and for what, naming the
// folio involved (the one the restart was for, else the one the entry at that address maps:
// a fault that could not wait for its lock).
void log_no_progress(AddressSpace& mm, const HmmWalk& w, uint64_t restarts) {
  const Pfn pfn = w.restart_pfn ? w.restart_pfn : entry_pfn_at(mm, w.restart_va);
  Folio* folio = pfn ? mm.mem()->folio_of(pfn) : nullptr;
  log::get().error("hmm_range_fault [{:#x}, {:#x}){}: no progress past {:#x} for {} ms ({} "
                   "restarts); last restart: {} at {:#x}{}{}",
                   w.range->start, w.range->end, w.migrating() ? " (migrating)" : "", w.last,
                   hang_timeout().count(), restarts + 1, w.restart_why ? w.restart_why : "?",
                   w.restart_va, folio ? ", folio " : "", folio ? folio_describe(folio) : std::string());
}

}  // namespace

int hmm_walk_range(AddressSpace& mm, HmmRange* range, unsigned select, Folio* fault_page, bool no_wait) {
  mm.mmap_assert_locked();
  HmmWalk w{range, range->start};
  w.select = select;
  w.fault_page = fault_page;
  w.no_wait = no_wait || select != 0;
  std::optional<MmuInvalidation> inv;
  if (w.migrating()) {
    const Vma* vma = mm.vma_lookup(range->start);
    if (!vma || range->end > vma->end) return -ERANGE;
    if (range->notifier && range->notifier->read_retry(range->notifier_seq)) return -EBUSY;
    // One invalidation for the whole walk, begun before the first entry changes (an explicit
    // bracket, not the "owner set" test of seed 002 v2, which breaks for a null owner).
    inv.emplace(mm, range->start, range->end, MmuNotifyEvent::kMigrate, range->dev_private_owner);
  }
  int rc = -EBUSY;
  // Started at the first restart (a walk that needs none never reads the clock) and moved
  // whenever the restart point advances.
  std::chrono::steady_clock::time_point deadline{};
  Va progress = 0;
  for (uint64_t restarts = 0;; restarts++) {
    // An invalidation since read_begin makes everything gathered so far suspect.
    if (!w.migrating() && range->notifier && range->notifier->read_retry(range->notifier_seq)) {
      rc = -EBUSY;
      break;
    }
    mm.stats().hmm_walks.add();
    if (w.migrating()) mm.stats().migrate_walks.add();
    rc = walk_page_range(mm, w.last, range->end, kHmmWalkOps, &w);
    for (Folio* f : w.puts) f->put();
    w.puts.clear();
    if (rc != -EBUSY) break;
    mm.stats().hmm_restarts.add();
    const auto now = std::chrono::steady_clock::now();
    if (restarts == 0 || w.last > progress) {
      deadline = now + hang_timeout();
      progress = w.last;
    } else if (now > deadline) {
      log_no_progress(mm, w, restarts);
      rc = -ETIMEDOUT;
      break;
    }
  }
  if (rc != 0 && w.migrating()) abort_collected(w, mm.mem());
  return rc;
}

int hmm_range_fault(HmmRange* range) {
  if (!range || !range->notifier || !range->notifier->inserted() || !range->hmm_pfns) {
    return -EINVAL;
  }
  const uint64_t allowed = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE | HMM_PFN_INOUT_FLAGS;
  const bool migrate = range->default_flags & HMM_PFN_REQ_MIGRATE;
  if (!page_aligned(range->start) || !page_aligned(range->end) || range->start >= range->end ||
      range->start < range->notifier->start() || range->end > range->notifier->end() ||
      (range->default_flags & ~allowed) || (range->pfn_flags_mask & HMM_PFN_REQ_MIGRATE) ||
      (migrate && (!range->migrate || !range->migrate->src || !range->migrate->dst))) {
    return -EINVAL;
  }
  AddressSpace& mm = *range->notifier->mm();
  // Asserted after the -EINVAL checks, not stated in hmm.h: a null range or notifier is
  // documented bad input, and the analysis could not name the lock through them there.
  mm.mmap_assert_locked();
  const unsigned select = migrate ? (range->migrate->flags | MIGRATE_VMA_SELECT_SYSTEM) : 0;
  return hmm_walk_range(mm, range, select, nullptr, false);
}

}  // namespace gpusvm::mm
