// hugetlb: MAP_HUGETLB mappings backed by PhysMem's pool of 2 MiB pages (mm/hugetlb.c's
// contract for one 2 MiB hstate, private anonymous mappings only). Internal to gpusvm/mm.
//
// Design notes
//  - A hugetlb VMA (VM_HUGETLB) starts and ends 2 MiB aligned and stays so: mmap rounds the
//    length up, and munmap / mprotect / madvise / MAP_FIXED that would cut one at another
//    address fail -EINVAL (hugetlb_vm_op_split), before anything changes.
//  - Its pages are PMD-order folios flagged kFolioHugetlb (and kFolioAnon), mapped only by
//    PMD leaves, never split into PTEs and never collapsed, migrated or made device-exclusive.
//    Accounting is the THP PMD rule: one reference, one entire mapcount and one PMD rmap item
//    per mapping; the leaf has a deposited PTE table like every huge leaf of the model (so the
//    zap and the checker need no special case; Linux has none for hugetlb).
//  - Faults (hugetlb_fault): none -> a zeroed pool page (the slot's reservation if any),
//    writable only for a write fault (a read maps it read-only and anon-exclusive, as
//    hugetlb_no_page does for private mappings); write to a read-only leaf -> reuse when
//    exclusive to this mm, else copy the whole 2 MiB into a new pool page (hugetlb_wp).
//    No pool page -> SIGBUS (alloc_hugetlb_folio's -ENOSPC).
//  - fork shares private hugetlb pages copy-on-write at PMD level (copy_huge_pmd does it for
//    any present leaf); the child has no reservations.
//  - Reservations: see PhysMem::hugetlb_reserve. mmap reserves (unless MAP_NORESERVE), so an
//    mmap the pool cannot back fails -ENOMEM; munmap and exit release what no fault consumed.
//
// Deliberate differences from Linux: shared (MAP_SHARED) and file-backed hugetlb, 1 GiB
// pages, mremap of hugetlb VMAs (-EINVAL here; Linux >= 5.16 moves aligned ranges) and
// surplus pages (overcommit) are not modelled. A failed COW in a fork child is SIGBUS; Linux
// may instead unmap the page from the children of the reservation owner.
#pragma once

#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

// The hugetlb part of handle_mm_fault, for a VMA with VM_HUGETLB whose permissions allow the
// access (checked by the caller). mmap lock held (read suffices), no other gpusvm lock. May
// sleep on the fault mutex of the slot (faults of one (mm, 2 MiB slot) are serialized, as by
// the kernel's hugetlb_fault_mutex_table). Returns kOk, kRetry (the PMD changed meanwhile),
// kOom (page-table allocation) or kSigbus (no pool page).
VmFault hugetlb_fault(AddressSpace& mm, Vma& vma, Va va, unsigned flags) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// -EINVAL when a VMA boundary at `start` or at `end` would cut a hugetlb VMA at an address
// that is not 2 MiB aligned (the split Linux refuses in hugetlb_vm_op_split), else 0. Call
// before changing anything. mmap lock held.
[[nodiscard]] int hugetlb_check_split(const VmaTree& vmas, Va start, Va end);

}  // namespace gpusvm::mm
