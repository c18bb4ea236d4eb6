#include "gpusvm/mm/pagewalk.h"

#include <algorithm>

#include "gpusvm/mm/address_space.h"

namespace gpusvm::mm {
namespace {

int walk_vma_range(PageTable& pt, Va start, Va end, const MmWalkOps& ops, MmWalk& walk) {
  for (Va addr = start; addr < end;) {
    const Va next = std::min(pmd_align_down(addr) + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    int rc = 0;
    if (!slot) {
      // No PMD table: the hole extends to the end of the PUD (1 GiB) at most.
      const Va hole_end = std::min<Va>((addr & ~((1ULL << kPudShift) - 1)) + (1ULL << kPudShift), end);
      if (ops.pte_hole) rc = ops.pte_hole(addr, hole_end, walk);
      if (rc) return rc;
      addr = hole_end;
      continue;
    }
    if (ops.pmd_entry) rc = ops.pmd_entry(slot, addr, next, walk);
    if (rc) return rc;
    addr = next;
  }
  return 0;
}

}  // namespace

int walk_page_range(AddressSpace& mm, Va start, Va end, const MmWalkOps& ops, void* priv) {
  mm.mmap_assert_locked();
  MmWalk walk{&mm, nullptr, priv};
  PageTable& pt = mm.page_table();
  Va addr = start;
  while (addr < end) {
    const Vma* vma = mm.find_vma(addr);
    if (!vma || vma->start >= end) {
      walk.vma = nullptr;
      return ops.pte_hole ? ops.pte_hole(addr, end, walk) : 0;
    }
    if (vma->start > addr) {
      walk.vma = nullptr;
      if (ops.pte_hole) {
        if (int rc = ops.pte_hole(addr, vma->start, walk)) return rc;
      }
      addr = vma->start;
    }
    const Va vend = std::min(end, vma->end);
    walk.vma = vma;
    int rc = ops.test_walk ? ops.test_walk(addr, vend, walk) : 0;
    if (rc < 0) return rc;
    if (rc == 0) {
      rc = walk_vma_range(pt, addr, vend, ops, walk);
      if (rc) return rc;
    }
    addr = vend;
  }
  return 0;
}

}  // namespace gpusvm::mm
