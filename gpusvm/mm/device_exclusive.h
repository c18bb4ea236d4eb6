// Device-exclusive entries (seed 004, "mm: fixes for device-exclusive entries").
//
// A device that needs atomic access to a page that the CPU keeps in system memory asks for
// exclusive access to it: the page's PTE is replaced by a device-exclusive entry, so the CPU
// cannot reach the page until it faults, and that fault gives the page back to the CPU (the
// device learns of it through an MMU notifier invalidation). docs/device-exclusive.md has the
// full contract; the short form:
//
//  - The entry counts as a mapping: mapcount, reverse-map item and the mapping's reference
//    stay as they were for the present PTE (the fixed rule; 6.12 dropped the mapcount).
//  - One entry type (SoftLeafType::kDeviceExclusive), no read/write variants: writability is
//    recomputed when the CPU gets the page back (restore_exclusive_pte_locked).
//  - Only PTE-level, anonymous, private pages. A PMD-mapped THP has its PMD split first; the
//    folio stays large.
//
// Locking: make_device_exclusive is called with the mmap lock held (read) and nothing else;
// the returned folio is locked, and the caller must unlock it (and put it) before taking the
// mmap lock again - the folio lock ranks below the mmap lock (gpusvm/base/lock_order.h).
#pragma once

#include <cstdint>

#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/mm/pte.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class Folio;
struct PteTable;
struct Vma;

// make_device_exclusive: makes the page mapped at `addr` exclusive to the device `owner`.
//
// Faults the page in writable as GUP with FOLL_WRITE | FOLL_SPLIT_PMD would (a private file
// page or a COW-shared page is copied first, a PMD mapping is split, another device's
// exclusive entry is given back to the CPU), locks the folio, fires an EXCLUSIVE invalidation
// tagged with `owner` over the one page (a mirror may recognise its own request by the owner
// and skip it; with owner == nullptr, as test_hmm passes, every mirror sees a foreign one and
// the caller programs its device after the call), and under the PTE lock replaces the writable PTE by a
// device-exclusive entry (soft-dirty kept; the folio is marked dirty if the PTE was).
// If the page changed between the fault and the PTE lock (zapped, COWed, write-protected,
// PMD-mapped again), everything is dropped and the call starts over, bounded by
// hang_timeout().
//
// Returns the page (the frame's descriptor; head() is the folio) locked and with one
// reference. The caller programs its device, then folio_unlock(page->head()) and
// page->head()->put().
// Errors (nothing changed, nothing held):
//   -EINVAL      addr outside user space;
//   -EFAULT      no VMA, no VM_WRITE (GUP without FOLL_FORCE), VM_IO/VM_PFNMAP, or the fault
//                failed with SIGSEGV/SIGBUS (as GUP reports them);
//   -ENOMEM      the fault could not allocate;
//   -EOPNOTSUPP  a hugetlb VMA (GUP refuses FOLL_SPLIT_PMD there before the write check and
//                before faulting anything, seed 004 patch 1), or the page is not anonymous
//                (shared mapping / page cache);
//   -EBUSY       the page kept changing for hang_timeout() (logged: a livelock or a bug).
// Context: mmap lock held (read or write; asserted); no other gpusvm lock held. Sleeps
// (fault, folio lock, notifier callbacks).
Result<Folio*> make_device_exclusive(AddressSpace& mm, Va addr, const void* owner)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// restore_exclusive_pte: turns the device-exclusive entry `orig` at va back into a present
// PTE for `page`: not young, soft-dirty kept; writable iff the VMA has VM_WRITE and the page
// is anon-exclusive (can_change_pte_writable for private anonymous memory), and then dirty iff
// the folio is dirty. Mapcount, rmap and reference carry over unchanged.
// Context: the PTE lock of `t` held (asserted), the folio of `page` locked (asserted), the
// entry at va still equals `orig` (checked by the caller under this same lock).
void restore_exclusive_pte_locked(AddressSpace& mm, const Vma& vma, PteTable* t, Va va, Pte orig,
                                  Folio* page) GPUSVM_REQUIRES(t->ptl);

}  // namespace gpusvm::mm
