// DEVICE atomics on system memory through device-exclusive entries (vm.h, make_exclusive_locked).
//
// Under the DEVICE atomic policy a device atomic on a range that stays in system memory does
// not simply get an atomic GPU leaf over a page the CPU can still write: every page of the
// range is made device-exclusive first (mm::make_device_exclusive, owner = exclusive_owner()),
// so the CPU cannot reach it until it faults, and that CPU fault gives the page back through a
// CLEAR invalidation which zaps our mapping. The protocol, with the vm lock held throughout:
//
//   1. get_pages                 the range's pages are present and writable (hmm_range_fault
//                                gives any device-exclusive entry back to the CPU first)
//   2. per page, mmap lock read: make_device_exclusive; unlock and put the folio
//                                its EXCLUSIVE invalidation (our owner, this thread) is ours:
//                                Vm::invalidate skips it - zapping and unmapping the pages
//                                would make step 3 fail every time (the loop the contract
//                                forbids). Any other invalidation (a CPU touch of a page
//                                converted earlier, a PMD split, a zap) unmaps the pages.
//   3. commit                    pages_valid under the notifier lock: no foreign invalidation
//                                since step 1, so every page is still ours exclusively and
//                                the atomic bit may be set on the system leaves; otherwise
//                                -EAGAIN and the service runs again from step 1.
//
// Pages are converted one at a time and their folio locks dropped at once: holding them would
// only delay a CPU fault that must win anyway, and step 3 catches it.
#include <cerrno>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/physmem.h"
#include "drivers/refgpu/vm.h"

namespace gpusvm::refgpu {

namespace {
// After a page of the range became device-exclusive, before the next one (and before the
// commit, after the last): where a CPU access racing the conversion lands (race tests).
GPUSVM_SCHED_POINT(g_sp_exclusive_made, "refgpu.fault.exclusive_made");

// The VM whose make_device_exclusive the current thread is running (nullptr: none). The
// owner alone does not identify the request: every VM of a device shares its pagemap owner.
thread_local const Vm* tls_exclusive_vm = nullptr;

class ExclusiveScope {
 public:
  explicit ExclusiveScope(const Vm* vm) : prev_(tls_exclusive_vm) { tls_exclusive_vm = vm; }
  ~ExclusiveScope() { tls_exclusive_vm = prev_; }
  ExclusiveScope(const ExclusiveScope&) = delete;
  ExclusiveScope& operator=(const ExclusiveScope&) = delete;

 private:
  const Vm* const prev_;
};
}  // namespace

bool Vm::own_exclusive_invalidation(const mm::MmuNotifierRange& range) const {
  return range.event == mm::MmuNotifyEvent::kExclusive && range.owner == exclusive_owner() &&
         tls_exclusive_vm == this;
}

int Vm::make_exclusive_locked(svm::Range* range) {
  mm::AddressSpace& as = *cfg_.as;
  ReadLock mmap(&as.mmap_lock());
  if (as.exited()) return -EFAULT;
  for (uint64_t va = range->start(); va < range->end(); va += mm::kPageSize) {
    {
      // A foreign invalidation already took the pages: converting the rest is wasted work.
      ReadLock nl(&gpusvm_->notifier_lock());
      if (!gpusvm_->pages_valid(range->pages(0))) return -EAGAIN;
    }
    Result<mm::Folio*> page = Err{-EINVAL};
    {
      ExclusiveScope s(this);
      page = mm::make_device_exclusive(as, va, exclusive_owner());
    }
    if (!page) {
      switch (page.error()) {
        case -ENOMEM: return -ENOMEM;
        case -EBUSY: return -EAGAIN;  // kept changing: the service's attempts bound it
        default: return -EFAULT;      // not anonymous (shared, page cache), hugetlb, no VM_WRITE
      }
    }
    mm::Folio* folio = (*page)->head();
    mm::folio_unlock(folio);
    folio->put();
    stats_.exclusive_pages.add();
    g_sp_exclusive_made.reach();
  }
  return 0;
}

}  // namespace gpusvm::refgpu
