// get_user_pages / pin_user_pages: references to the pages behind user addresses, faulted in
// as a CPU access would (mm/gup.c's contract).
//
// Design notes
//  - Each page is looked up under its page-table lock; when the entry does not allow the
//    access (none, read-only for FOLL_WRITE, device-private, migration, device-exclusive) the
//    lock is dropped and handle_mm_fault runs as for a CPU access (a write fault for
//    FOLL_WRITE), then the lookup is repeated. So a device-private page comes back to RAM
//    through its driver's migrate_to_ram, and a COW page is broken for FOLL_WRITE.
//  - FOLL_GET (get_user_pages*) takes one plain reference per page, dropped with put_page. It
//    is a transient reference: mm::check cannot tell it from a leak, so callers drop it before
//    a check (as with any reference held by code in progress).
//  - FOLL_PIN (pin_user_pages*) takes one reference and one pin (Folio::pincount, the
//    kernel's pin bias kept apart), dropped with unpin_user_page. mm::check counts pins: a
//    pinned page is accounted for, mapped or not. A pinned anonymous page is never migrated
//    (migration's reference check finds the extra reference) and a pinned large folio is
//    never split.
//  - The zero page and the huge zero folio are not refcounted in the model: a read-only GUP of
//    them returns the page without a reference or a pin, and put_page / unpin_user_page of
//    them do nothing (Linux no longer pins the zero folio either).
//  - The "fast" variants take the mmap lock themselves and do the same locked walk (Linux's
//    lockless fast path falls back to it; the result is the same).
//  - FOLL_LONGTERM: a device-coherent page is moved to system memory before it is pinned
//    (migrate_device_coherent_folio); a device-private page comes back through its fault
//    anyway. The model has no movable zones or CMA, Linux's other pages to move out.
//  - Non-goals (with the reason): a read-only pin of a COW-shared anonymous page does not
//    unshare it first (Linux >= 5.19 does: FAULT_FLAG_UNSHARE); fork does not copy pinned
//    pages eagerly (page_needs_cow_for_dma): pin with FOLL_WRITE and do not fork while pinned.
#pragma once

#include <cstdint>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class Folio;

// gup_flags (Linux values).
inline constexpr unsigned FOLL_WRITE = 1u << 0;     // the pages must be writable (write fault)
inline constexpr unsigned FOLL_LONGTERM = 1u << 8;  // the pin may be held indefinitely (pins only)

// Each returns the number of pages referenced, pages[0 .. n) (page descriptors: a page of a
// THP is its own descriptor, the reference is on the folio). When a page fails after others
// succeeded the call stops there and returns the count so far (the caller releases them);
// when the first page fails it returns:
//   -EINVAL  null pages with nr_pages > 0, unknown gup_flags, FOLL_LONGTERM with get_*
//   -EFAULT  no VMA, a VMA without the permission (VM_READ, VM_WRITE for FOLL_WRITE), a
//            VM_IO/VM_PFNMAP VMA, a special entry without a page, or a fault that failed
//            with SIGSEGV/SIGBUS; also a range past the user address space
//   -EOVERFLOW  start + nr_pages pages wraps around
//   -ENOMEM  the fault could not allocate
//   -EBUSY   a page kept faulting for hang_timeout() (a livelock or a bug; logged); or a
//            FOLL_LONGTERM pin met a device-coherent page that could not be moved out (pinned
//            or referenced elsewhere at that moment), as Linux reports it
//   -ETIMEDOUT  the fault waited hang_timeout() for a folio lock (logged naming the folio)
// start is rounded down to a page. nr_pages == 0 returns 0.
// Context of get_user_pages / pin_user_pages: the mmap lock held (read), asserted, no other
// gpusvm lock; may sleep (faults). The _fast variants take the mmap lock (read) themselves and
// must be called with no gpusvm lock held.
[[nodiscard]] long get_user_pages(AddressSpace& mm, Va start, unsigned long nr_pages,
                                  unsigned gup_flags, Folio** pages) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());
[[nodiscard]] long get_user_pages_fast(AddressSpace& mm, Va start, unsigned long nr_pages,
                                       unsigned gup_flags, Folio** pages);
[[nodiscard]] long pin_user_pages(AddressSpace& mm, Va start, unsigned long nr_pages,
                                  unsigned gup_flags, Folio** pages) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());
[[nodiscard]] long pin_user_pages_fast(AddressSpace& mm, Va start, unsigned long nr_pages,
                                       unsigned gup_flags, Folio** pages);

// Drop what get_user_pages* (put_page) or pin_user_pages* (unpin_user_page) took for one page.
// Unpinning a page that is not pinned is a bug (panics). Any context; may free the page.
void put_page(Folio* page);
void unpin_user_page(Folio* page);
void unpin_user_pages(Folio** pages, unsigned long n);

}  // namespace gpusvm::mm
