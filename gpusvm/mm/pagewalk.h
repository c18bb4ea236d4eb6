// walk_page_range: the generic page-table walker under hmm_range_fault, the checker-free
// baseline walk of the benchmarks, and future walkers (the migration collect walk).
//
// Like the kernel's mm_walk: a const table of callbacks and a private pointer. The walker
// visits [start, end) VMA by VMA; gaps between VMAs reach pte_hole with walk.vma == nullptr;
// inside a VMA, missing PUD/PMD tables reach pte_hole, and every existing PMD slot reaches
// pmd_entry with the slot unlocked: the callback reads the PMD and takes the PMD lock or the
// PTE table's lock itself (pte_offset_map_lock), so it can drop them to fault. A non-zero
// return from any callback stops the walk and is returned.
//
// Context: mmap lock held (read) - asserted; no page-table lock held on entry to callbacks.
#pragma once

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/page_table.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

struct MmWalk {
  AddressSpace* mm;
  const Vma* vma;  // the VMA being walked, nullptr in a gap
  void* priv;
};

struct MmWalkOps {
  // Optional. 0: walk this VMA's [start, end); 1: skip it; < 0: stop with that error.
  int (*test_walk)(Va start, Va end, MmWalk& walk) = nullptr;
  // Optional. A range with no page table below it (or no VMA).
  int (*pte_hole)(Va start, Va end, MmWalk& walk) = nullptr;
  // Optional. One PMD slot; [start, end) lies within its 2 MiB.
  int (*pmd_entry)(PmdSlot slot, Va start, Va end, MmWalk& walk) = nullptr;
};

[[nodiscard]] int walk_page_range(AddressSpace& mm, Va start, Va end, const MmWalkOps& ops,
                                  void* priv) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

}  // namespace gpusvm::mm
