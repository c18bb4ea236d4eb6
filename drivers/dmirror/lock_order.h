// dmirror's locks and where they sit in gpusvm/mm's lock order (gpusvm/mm/lock_order.h).
//
//   mmap_lock (100) -> folio lock (200) -> rmap walk (250) -> dmirror mutex (280)
//   mmap_lock (100) -> folio lock (200) -> devmem lock (260) -> [pagemap registration]
//   ... PTE lock (600) -> zone lock (800) -> free-list lock (870)
//
//  - dmirror mutex: one per open file; guards its device page table. Taken by the file's
//    interval-notifier callback, which runs with the mmap lock and, for migrations, folio
//    locks and the rmap walk lock (try_to_migrate invalidates every mm mapping a page) held -
//    hence above them - and never with the notifier subscriptions lock or a page-table lock -
//    hence below them, and it may be a sleeping mutex. Nothing from gpusvm/mm is called while it is held.
//  - devmem lock: one per device; serializes adding and removing device-memory chunks. Taken
//    while a migration holds source folio locks; never held while locking a folio.
//  - free-list lock: one per device; guards the free device pages. Taken by folio_free, which
//    may run under page-table locks (the last reference can go in a zap), so it ranks after
//    the zone lock and calls nothing.
#pragma once

#include "gpusvm/base/lock.h"

namespace gpusvm::dmirror {

inline constexpr LockClass kDmirrorMutexClass{"dmirror_mutex", 280};
inline constexpr LockClass kDmirrorDevmemLockClass{"dmirror_devmem_lock", 260};
inline constexpr LockClass kDmirrorFreeLockClass{"dmirror_free_list", 870};

}  // namespace gpusvm::dmirror
