// Driver-inserted pages: what a device file's mmap hook uses to fill its mapping
// (vm_insert_page), and the VM_MIXEDMAP rules that follow from it.
//
// Design notes
//  - The inserted page is an ordinary, refcounted system page that is neither anonymous nor
//    in a page cache (test_hmm's dmirror_fops_mmap allocates a zeroed page per address). The
//    mapping takes one reference, one page mapcount and one reverse-map record, exactly like
//    any PTE mapping, so mm::check accounts for it with no special case; the driver drops its
//    own allocation reference afterwards and the mapping then owns the page.
//  - The PTE is a normal (not "special") present entry: hmm_range_fault reports VALID|pfn, and
//    a private mapping maps it read-only (vm_page_prot of a private mapping has no write), so a
//    CPU write copies it into an anonymous page (do_wp_page), as Linux does for VM_MIXEDMAP
//    pages with a struct page.
//  - The first insertion marks the VMA VM_MIXEDMAP, one of the VM_SPECIAL flags: such a VMA is
//    never merged and migrate_vma_setup refuses it (-EINVAL). A none entry in it faults
//    SIGBUS (the driver has no fault handler).
//  - Non-goals: inserting into VMAs other than a device file's (anonymous, hugetlb, page
//    cache), large folios, device pages, the zero page (all -EINVAL; Linux's callers insert
//    small kernel pages into their own mappings).
#pragma once

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {


// vm_insert_page: maps `page` at addr of `vma` (a VMA of `mm` created by mmap_device) and
// takes a reference for the mapping. Writable only in a shared VMA with VM_WRITE.
// Returns 0, or:
//   -EINVAL  null page; a page that is anonymous, in a page cache, device memory, the zero
//            page, free or part of a large folio; a VMA not created by mmap_device
//            (anonymous, hugetlb, shmem or file) or a VM_PFNMAP one;
//            addr not page aligned
//   -EFAULT  addr outside the VMA
//   -EBUSY   an entry is already there
//   -ENOMEM  no page table could be allocated (injectable: "mm.alloc_pgtable")
// Context: the mmap lock held - for write when the VMA is not VM_MIXEDMAP yet (asserted: the
// flag changes), as in mmap hooks; no page-table lock held. Does not sleep.
[[nodiscard]] int vm_insert_page(AddressSpace& mm, Vma& vma, Va addr, Folio* page)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

}  // namespace gpusvm::mm
