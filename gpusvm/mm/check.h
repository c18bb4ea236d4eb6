// mm::check: the invariant checker (DESIGN.md §3.11).
//
// Walks the page tables of `mm` and of every other address space on the same PhysMem (a folio
// may be shared by fork), the page caches, and the allocator, and verifies:
//  - every folio's refcount equals its mapping references + page-cache reference + `pins`;
//    every page's mapcount equals the PTE entries mapping it, entire_mapcount the PMD entries;
//  - the reverse map of every anonymous/device folio lists exactly the entries that map it;
//  - no migration entry exists (checks run between operations: none may be left behind);
//  - device-private entries point to live device folios of a registered pagemap, and every
//    live device folio is mapped or pinned (a device folio nothing references is leaked);
//  - every present entry lies inside a VMA whose permissions allow it (no write bit without
//    VM_WRITE; zero page and huge zero folio never writable; COW-shared pages read-only);
//  - THP PMD leaves are 2 MiB aligned and point to a PMD-order folio head;
//  - hugetlb folios are mapped only by PMD leaves of hugetlb VMAs, which map nothing else; the
//    pool's in-use count is the number of live hugetlb folios (mapped, or pinned and zapped
//    since), in use + reserved <= total, and
//    every reservation is an unfaulted slot of a hugetlb VMA of a live address space;
//  - swap: every slot's count equals the swap PTEs naming it, swap PTEs name slots in use,
//    cached folios belong to their slot (refcount includes the swap cache's reference);
//  - free frames have refcount 0, no mapping and are counted by the allocator exactly once.
// Takes every address space's mmap lock (read) in address order: call it with no gpusvm lock
// held, at a quiescent point (no operation in flight on these address spaces).
#pragma once

#include <string>
#include <vector>

namespace gpusvm::mm {

class AddressSpace;
class PhysMem;

struct CheckReport {
  std::vector<std::string> problems;  // empty when every invariant holds
  uint64_t entries_checked = 0;
  uint64_t folios_checked = 0;

  bool ok() const { return problems.empty(); }
  std::string to_string() const;  // the first problems, one per line
};

CheckReport check(AddressSpace& mm);
CheckReport check(PhysMem& mem);  // every address space of the machine

}  // namespace gpusvm::mm
