// The lock order of gpusvm/mm, outermost first. lockdep-lite (gpusvm/base/lock.h) checks it
// at every acquisition; the ranks below are the order.
//
//   mmap_lock (AddressSpace, rw, sleeping)
//     -> hugetlb fault mutex (hashed by (mm, 2 MiB slot); held across one hugetlb fault)
//     -> shmem object lock (ShmemObject, mutex)            page-cache lookups in faults
//       -> folio lock (sleeping bit lock; several only in pfn order, as subclasses)
//         -> rmap walk lock (PhysMem, rw: the anon_vma lock of cross-mm rmap walks)
//         -> notifier subscriptions lock (spin; never held across callbacks)
//         -> page_table_lock (AddressSpace, spin: PGD/PUD/PMD table allocation)
//           -> PMD lock (one per PMD table, spin)
//             -> PTE lock (one per PTE table, spin; two only as src/dst subclasses 0/1
//                in fork and mremap)
//               -> folio rmap lock (spin)
//                 -> zone lock (PhysMem allocator, spin)
//                   -> registry lock (PhysMem: pagemaps, address spaces, deferred split)
//
// Rules that ranks cannot express:
//  - MMU notifier callbacks run with the mmap lock (and for migration, folio locks) held but
//    never with a page-table lock, so a driver may sleep in them.
//  - Sleeping (folio_lock, waiting for a migration, allocating a THP that may fail) never
//    happens under a page-table lock.
#pragma once

#include "gpusvm/base/lock.h"

namespace gpusvm::mm {

inline constexpr LockClass kMmapLockClass{"mmap_lock", 100};
inline constexpr LockClass kHugetlbFaultMutexClass{"hugetlb_fault_mutex", 120};
inline constexpr LockClass kShmemLockClass{"shmem_lock", 150};
inline constexpr LockClass kFolioLockClass{"folio_lock", 200};
inline constexpr LockClass kRmapWalkLockClass{"rmap_walk", 250};
inline constexpr LockClass kNotifierSubsLockClass{"mmu_notifier_subscriptions", 300};
inline constexpr LockClass kPageTableLockClass{"page_table_lock", 400};
inline constexpr LockClass kPmdLockClass{"pmd_lock", 500};
inline constexpr LockClass kPteLockClass{"pte_lock", 600};
inline constexpr LockClass kRmapLockClass{"folio_rmap_lock", 700};
inline constexpr LockClass kZoneLockClass{"zone_lock", 800};
inline constexpr LockClass kRegistryLockClass{"physmem_registry", 850};

}  // namespace gpusvm::mm
