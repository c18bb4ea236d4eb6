// The 4-level page table of an address space (PGD -> PUD -> PMD -> PTE, 9 bits each).
//
// Locking (split page-table locks, as Linux with USE_SPLIT_PTE_PTLOCKS/PMD_PTLOCKS):
//  - Each PTE table has its own lock (ptl). A PTE word changes only under it.
//  - Each PMD table has its own lock. A PMD word changes only under it (installing a PTE
//    table, a huge leaf, splitting or collapsing).
//  - PGD/PUD slots are filled once under AddressSpace's page_table_lock and emptied only at
//    exit.
//  - Tables are freed only with the mmap lock held for write (collapse, exit). Anyone holding
//    the mmap lock (read) may therefore read a PMD word locklessly, follow it to a PTE table,
//    and then lock that table's ptl; pte_offset_map_lock() re-checks that the PMD still points
//    to the table after taking the lock (a concurrent collapse or zap could have changed it).
//  - Lockless reads (load_lockless) are snapshots: the hmm snapshot walk and the checker use
//    them to decide, and re-read under the lock before acting.
//
// Every accessor that requires a lock asserts it.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/pte.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

inline unsigned pgd_index(Va va) { return (va >> kPgdShift) & (kPtrsPerTable - 1); }
inline unsigned pud_index(Va va) { return (va >> kPudShift) & (kPtrsPerTable - 1); }
inline unsigned pmd_index(Va va) { return (va >> kPmdShift) & (kPtrsPerTable - 1); }
inline unsigned pte_index(Va va) { return (va >> kPageShift) & (kPtrsPerTable - 1); }

struct PteTable {
  // The entry under the ptl (asserted).
  Pte get(unsigned i) const {
    ptl.assert_held();
    return Pte(e_[i].load(std::memory_order_relaxed));
  }
  void set(unsigned i, Pte v) {
    ptl.assert_held();
    // release: a lockless reader that sees the entry also sees the frame it points to
    // initialised (pairs with load_lockless's acquire).
    e_[i].store(v.raw(), std::memory_order_release);
  }
  // READ_ONCE-style snapshot without the lock.
  Pte load_lockless(unsigned i) const { return Pte(e_[i].load(std::memory_order_acquire)); }

  mutable SpinLock ptl{&kPteLockClass};

 private:
  std::atomic<uint64_t> e_[kPtrsPerTable] = {};
};

struct PmdTable {
  Pmd get(unsigned i) const {
    lock.assert_held();
    return Pmd(e_[i].load(std::memory_order_relaxed));
  }
  void set(unsigned i, Pmd v) {
    lock.assert_held();
    e_[i].store(v.raw(), std::memory_order_release);  // pairs with load_lockless
  }
  Pmd load_lockless(unsigned i) const { return Pmd(e_[i].load(std::memory_order_acquire)); }

  // A PTE table deposited with a huge leaf (pgtable_trans_huge_deposit): allocated when the
  // leaf is installed so that splitting the leaf later can never fail for lack of memory.
  void deposit(unsigned i, PteTable* table) {
    lock.assert_held();
    if (deposited_[i]) panic("PMD slot already has a deposited table");
    deposited_[i] = table;
  }
  PteTable* withdraw(unsigned i) {
    lock.assert_held();
    PteTable* t = deposited_[i];
    deposited_[i] = nullptr;
    return t;
  }
  bool has_deposit(unsigned i) const {
    lock.assert_held();
    return deposited_[i] != nullptr;
  }

  mutable SpinLock lock{&kPmdLockClass};

 private:
  friend class PageTable;
  std::atomic<uint64_t> e_[kPtrsPerTable] = {};
  PteTable* deposited_[kPtrsPerTable] = {};  // guarded by lock (accessors assert it)
};

struct PudTable {
  std::atomic<PmdTable*> e[kPtrsPerTable] = {};
};

struct PgdTable {
  std::atomic<PudTable*> e[kPtrsPerTable] = {};
};

// The PMD slot covering an address.
struct PmdSlot {
  PmdTable* table = nullptr;
  unsigned index = 0;
  explicit operator bool() const { return table != nullptr; }
  Pmd load_lockless() const { return table->load_lockless(index); }
};

class PageTable {
 public:
  PageTable();
  ~PageTable();  // frees every table; the address space must hold no mapping any more
  PageTable(const PageTable&) = delete;
  PageTable& operator=(const PageTable&) = delete;

  // The PMD slot for va if its PUD and PMD tables exist. Caller holds the mmap lock.
  PmdSlot pmd_lookup(Va va) const;
  // Same, allocating missing PUD/PMD tables. Returns -ENOMEM (injected at
  // "mm.alloc_pgtable"). Caller holds the mmap lock.
  Result<PmdSlot> pmd_alloc(Va va);
  // Makes a none PMD point to a new empty PTE table (__pte_alloc). Returns 0 when the PMD is
  // anything but none afterwards (including a racing huge leaf: the caller re-reads), or
  // -ENOMEM. Takes the PMD lock; caller holds the mmap lock and no page-table lock.
  [[nodiscard]] int pte_alloc(PmdSlot slot);

  // pte_offset_map_lock: if the PMD points to a PTE table, locks the table's ptl, re-checks
  // that the PMD still points to it, and returns it locked. Returns nullptr (nothing locked)
  // when the PMD is none or a leaf. Unlock with pte_unmap_unlock().
  // The lock is chosen at run time, which clang's static analysis cannot follow: these two
  // are exempt from it, and the PTE accessors assert the lock at run time instead.
  PteTable* pte_offset_map_lock(PmdSlot slot, unsigned subclass = 0)
      GPUSVM_NO_THREAD_SAFETY_ANALYSIS;
  static void pte_unmap_unlock(PteTable* table) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
    table->ptl.unlock();
  }

  // Walk support for the checker/teardown: calls fn(va_of_pmd, PmdTable*, index) for every
  // existing PMD slot in [start, end). Caller holds the mmap lock.
  template <typename Fn>
  void for_each_pmd_slot(Va start, Va end, Fn&& fn) const;

  // Frees a PTE table that is no longer referenced by any PMD (collapse, teardown).
  static void free_pte_table(PteTable* table);
  static PteTable* alloc_pte_table();  // nullptr on failure ("mm.alloc_pgtable")

  // Page-table reclaim (mm/pt_reclaim.c, CONFIG_PT_RECLAIM, as MADV_DONTNEED uses it): if the
  // PMD at slot points to a PTE table whose 512 entries are all none, clears the PMD and
  // returns true; a later fault there starts from a none PMD (and may map a THP or the huge
  // zero folio). The table is not freed but kept for reuse by this page table's pte_alloc
  // (freed with the page table): tables are type-stable, as RCU-freed tables are in Linux, so
  // a walker that loaded the PMD before and locks the table afterwards finds the PMD changed
  // (pte_offset_map_lock re-checks) and a lockless reader sees none entries. Hence the mmap
  // read lock suffices. Takes the PMD lock and the PTE lock; caller holds the mmap lock and
  // no page-table lock.
  bool try_reclaim_pte_table(PmdSlot slot);

  SpinLock& page_table_lock() { return page_table_lock_; }

 private:
  // A reclaimed table to reuse, or nullptr. Put back with keep_reclaimed.
  PteTable* take_reclaimed();
  void keep_reclaimed(PteTable* table);

  PgdTable pgd_;
  SpinLock page_table_lock_{&kPageTableLockClass};  // fills PGD/PUD slots
  std::vector<PteTable*> reclaimed_ GPUSVM_GUARDED_BY(page_table_lock_);  // empty, unreachable
};

template <typename Fn>
void PageTable::for_each_pmd_slot(Va start, Va end, Fn&& fn) const {
  for (Va va = pmd_align_down(start); va < end;) {
    PudTable* pud = pgd_.e[pgd_index(va)].load(std::memory_order_acquire);
    if (!pud) {
      va = (va & ~((1ULL << kPgdShift) - 1)) + (1ULL << kPgdShift);
      continue;
    }
    PmdTable* pmd = pud->e[pud_index(va)].load(std::memory_order_acquire);
    if (!pmd) {
      va = (va & ~((1ULL << kPudShift) - 1)) + (1ULL << kPudShift);
      continue;
    }
    fn(va, pmd, pmd_index(va));
    va += kPmdSize;
  }
}

}  // namespace gpusvm::mm
