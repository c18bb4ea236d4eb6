#include "gpusvm/mm/page_table.h"

#include <cerrno>
#include <new>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"

namespace gpusvm::mm {
namespace {
GPUSVM_FAULT_POINT(g_fail_alloc_pgtable, "mm.alloc_pgtable");
// pte_offset_map_lock between the lockless PMD load and taking the table's PTL (held: the
// caller's sleeping locks, e.g. the mmap lock; never reached under a spin lock). A table
// reclaimed in this window must still be lockable (PageTable::try_reclaim_pte_table).
GPUSVM_SCHED_POINT(g_sp_pte_map, "mm.pgtable.pte_offset_map");
}  // namespace

PageTable::PageTable() = default;

PageTable::~PageTable() {
  for (auto& pgd_slot : pgd_.e) {
    PudTable* pud = pgd_slot.load(std::memory_order_relaxed);
    if (!pud) continue;
    for (auto& pud_slot : pud->e) {
      PmdTable* pmd = pud_slot.load(std::memory_order_relaxed);
      if (!pmd) continue;
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        Pmd v = pmd->load_lockless(i);
        if (v.is_table()) delete v.table();
        else if (!v.is_none()) panic("page table destroyed with a live PMD leaf");
        delete pmd->deposited_[i];
      }
      delete pmd;
    }
    delete pud;
  }
  for (PteTable* t : reclaimed_) delete t;
}

PteTable* PageTable::take_reclaimed() {
  SpinLockGuard g(&page_table_lock_);
  if (reclaimed_.empty()) return nullptr;
  PteTable* t = reclaimed_.back();
  reclaimed_.pop_back();
  return t;
}

void PageTable::keep_reclaimed(PteTable* table) {
  SpinLockGuard g(&page_table_lock_);
  reclaimed_.push_back(table);
}

bool PageTable::try_reclaim_pte_table(PmdSlot slot) {
  PteTable* table = nullptr;
  {
    SpinLockGuard pg(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_table()) return false;
    table = pmd.table();
    SpinLockGuard g(&table->ptl);
    for (unsigned i = 0; i < kPtrsPerTable; i++) {
      if (!table->get(i).is_none()) return false;  // refilled meanwhile: keep it
    }
    slot.table->set(slot.index, Pmd());
  }
  keep_reclaimed(table);
  return true;
}

PteTable* PageTable::alloc_pte_table() {
  if (g_fail_alloc_pgtable.should_fail()) return nullptr;
  return new (std::nothrow) PteTable();
}

void PageTable::free_pte_table(PteTable* table) { delete table; }

PmdSlot PageTable::pmd_lookup(Va va) const {
  PudTable* pud = pgd_.e[pgd_index(va)].load(std::memory_order_acquire);
  if (!pud) return {};
  PmdTable* pmd = pud->e[pud_index(va)].load(std::memory_order_acquire);
  if (!pmd) return {};
  return PmdSlot{pmd, pmd_index(va)};
}

namespace {

// Returns the table in an upper-level slot, allocating and installing it if the slot is
// empty; nullptr on (injected) allocation failure. A racing installer wins; ours is freed.
template <typename Table>
Table* populate_slot(std::atomic<Table*>& slot, SpinLock* lock) {
  Table* t = slot.load(std::memory_order_acquire);
  if (t) return t;
  if (g_fail_alloc_pgtable.should_fail()) return nullptr;
  auto* fresh = new (std::nothrow) Table();
  if (!fresh) return nullptr;
  SpinLockGuard g(lock);
  t = slot.load(std::memory_order_relaxed);
  if (t) {
    delete fresh;
    return t;
  }
  // release: lockless walkers that load the slot (acquire) see an initialised table.
  slot.store(fresh, std::memory_order_release);
  return fresh;
}

}  // namespace

Result<PmdSlot> PageTable::pmd_alloc(Va va) {
  PudTable* pud = populate_slot(pgd_.e[pgd_index(va)], &page_table_lock_);
  if (!pud) return Err{-ENOMEM};
  PmdTable* pmd = populate_slot(pud->e[pud_index(va)], &page_table_lock_);
  if (!pmd) return Err{-ENOMEM};
  return PmdSlot{pmd, pmd_index(va)};
}

int PageTable::pte_alloc(PmdSlot slot) {
  if (!slot.load_lockless().is_none()) return 0;
  PteTable* fresh = take_reclaimed();
  const bool reused = fresh != nullptr;
  if (!fresh) fresh = alloc_pte_table();
  if (!fresh) return -ENOMEM;
  {
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index).is_none()) {
      slot.table->set(slot.index, Pmd::make_table(fresh));
      fresh = nullptr;
    }
  }
  // Lost the race: someone else installed a table or a leaf. A reclaimed table may still be
  // looked at by a stale walker, so it goes back to the list rather than away.
  if (fresh && reused) keep_reclaimed(fresh);
  else delete fresh;
  return 0;
}

PteTable* PageTable::pte_offset_map_lock(PmdSlot slot, unsigned subclass) {
  Pmd pmd = slot.load_lockless();
  if (!pmd.is_table()) return nullptr;
  PteTable* table = pmd.table();
  g_sp_pte_map.reach();  // not under a spin lock only: see sched_point.h
  table->ptl.lock_nested(subclass);
  // The PMD may have changed between the load and the lock (collapse under the mmap write
  // lock cannot happen while we hold the mmap lock, but a zap of a huge leaf racing a fault
  // on a none PMD can): re-check, as pte_offset_map_lock does.
  if (slot.load_lockless() != pmd) {
    table->ptl.unlock();
    return nullptr;
  }
  return table;
}

}  // namespace gpusvm::mm
