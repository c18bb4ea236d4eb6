#include "gpusvm/mm/address_space.h"

#include <cerrno>
#include <vector>

#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {

MmuInvalidation::MmuInvalidation(AddressSpace& mm, Va start, Va end, MmuNotifyEvent event,
                                 const void* owner)
    : mm_(mm), range_{&mm, start, end, event, kMmuNotifierRangeBlockable, owner} {
  // Blockable ranges cannot be refused; the return value only matters for non-blockable ones.
  (void)mm_.notifier_subscriptions().invalidate_range_start(range_);
}

MmuInvalidation::~MmuInvalidation() { mm_.notifier_subscriptions().invalidate_range_end(range_); }

Result<std::unique_ptr<AddressSpace>> AddressSpace::create(PhysMem* mem) {
  if (!mem) return Err{-EINVAL};
  std::unique_ptr<AddressSpace> mm(new AddressSpace(mem));
  mem->add_address_space(mm.get());
  return mm;
}

AddressSpace::AddressSpace(PhysMem* mem) : mem_(mem) {}

AddressSpace::~AddressSpace() {
  exit();
  // exit() removed every record naming this address space; a reverse-map walker that read
  // one before may still be in our page tables: wait for it before they are freed.
  { WriteLock walkers(&mem_->rmap_walk_lock()); }
  mem_->remove_address_space(this);
}

bool AddressSpace::thp_allowed(const Vma& vma, Va va) const {
  if (!vma.thp_fits(va) || (vma.flags & VM_NOHUGEPAGE)) return false;
  switch (mem_->thp_mode()) {
    case ThpMode::kAlways: return true;
    case ThpMode::kMadvise: return vma.flags & VM_HUGEPAGE;
    case ThpMode::kNever: return false;
  }
  return false;
}

void AddressSpace::exit() {
  if (exited_.exchange(true, std::memory_order_acq_rel)) return;
  // Notifiers first (exit_mmap): mirrors drop everything; then nobody is told about the
  // teardown below.
  notifiers_.release();
  WriteLock g(&mmap_lock_);
  while (Vma* v = vmas_.find(0)) {
    {
      // Interval notifiers outlive release() and see the teardown, as in Linux's exit_mmap.
      MmuInvalidation inv(*this, v->start, v->end, MmuNotifyEvent::kUnmap);
      zap_range(*this, v->start, v->end);
    }
    if (v->is_hugetlb()) mem_->hugetlb_unreserve(this, v->start, v->end);
    (void)vmas_.erase(v);
  }
}

}  // namespace gpusvm::mm
