// range_evict and scan_mm: the two whole-range walks that map nothing.
#include <chrono>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/gpusvm.h"

namespace gpusvm::svm {
namespace {
using Clock = std::chrono::steady_clock;

// One hmm_range_fault over the range with the mmap lock (read); -EFAULT once exited.
int walk(mm::AddressSpace* as, mm::HmmRange* r) {
  ReadLock mmap(&as->mmap_lock());
  if (as->exited()) return -EFAULT;
  return mm::hmm_range_fault(r);
}
}  // namespace

int Gpusvm::range_evict(Range* range) {
  mm::AddressSpace* as = cfg_.as;
  std::vector<uint64_t> pfns(range->npages());
  range->stats_.evictions.add();
  Notifier* n = range->notifier();
  if (!n) return -ENOENT;  // removed: nothing mirrored to evict (its notifier is gone)
  mm::MmuIntervalNotifier* notifier = &n->notifier_;
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHmmRangeDefaultTimeoutMs);
  for (;;) {
    if (Clock::now() > deadline) {
      log::get().warn("gpusvm {}: range_evict [{:#x}, {:#x}) collided for {} ms: -ETIME",
                      cfg_.name, range->start_, range->end_, kHmmRangeDefaultTimeoutMs);
      return -ETIME;
    }
    // No owner: every device page, ours included, is faulted back to system memory.
    mm::HmmRange hr{.notifier = notifier, .notifier_seq = notifier->read_begin(),
                    .start = range->start_, .end = range->end_, .hmm_pfns = pfns.data(),
                    .default_flags = mm::HMM_PFN_REQ_FAULT, .dev_private_owner = nullptr};
    const int rc = walk(as, &hr);
    if (rc != -EBUSY) return rc;
  }
}

ScanResult Gpusvm::scan_mm(Range* range, const void* owner, const Pagemap* pagemap) {
  mm::AddressSpace* as = cfg_.as;
  std::vector<uint64_t> pfns(range->npages());
  Notifier* n = range->notifier();
  if (!n) return ScanResult::kUnpopulated;  // removed: its notifier is gone
  mm::MmuIntervalNotifier* notifier = &n->notifier_;
  const auto deadline = Clock::now() + std::chrono::milliseconds(kHmmRangeDefaultTimeoutMs);
  while (Clock::now() <= deadline) {
    std::fill(pfns.begin(), pfns.end(), 0);
    mm::HmmRange hr{.notifier = notifier, .notifier_seq = notifier->read_begin(),
                    .start = range->start_, .end = range->end_, .hmm_pfns = pfns.data(),
                    .default_flags = 0, .dev_private_owner = owner};
    const int rc = walk(as, &hr);
    if (rc == -EBUSY) continue;
    // A walk that cannot finish says nothing: "mixed" makes the driver migrate (the
    // conservative answer).
    if (rc != 0) return ScanResult::kMixed;
    uint64_t system = 0, equal = 0, other = 0;
    const Pagemap* first_other = nullptr;
    bool several_other = false;
    {
      // Under the notifier lock with the sequence unchanged the pages are still mapped, so
      // page_to_pagemap is safe without page references (as in get_pages).
      ReadLock nl(&notifier_lock_);
      if (notifier->read_retry(hr.notifier_seq)) continue;
      for (uint64_t w : pfns) {
        if (!(w & mm::HMM_PFN_VALID)) continue;  // hole, or another owner's device page
        mm::Folio* page = as->mem()->pfn_to_page(mm::hmm_pfn_to_pfn(w));
        const Pagemap* pm =
            page && mm::folio_is_zone_device(page) ? page_to_pagemap(page) : nullptr;
        if (!pm) {
          system++;
        } else if (pm == pagemap) {
          equal++;
        } else {
          other++;
          if (first_other && pm != first_other) several_other = true;
          if (!first_other) first_other = pm;
        }
      }
    }
    const uint64_t device = equal + other;
    if (system == 0 && device == 0) return ScanResult::kUnpopulated;
    if (device == 0) return ScanResult::kSystem;
    if (system != 0) return ScanResult::kMixed;
    if (other == 0) return ScanResult::kEqual;
    if (equal == 0 && !several_other) return ScanResult::kOther;
    return ScanResult::kMixedDevice;
  }
  return ScanResult::kMixed;
}

}  // namespace gpusvm::svm
