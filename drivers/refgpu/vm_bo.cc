// BoBinding: a buffer object's GPU mapping and its move notifications (see vm_bo.h).
#include "drivers/refgpu/vm_bo.h"

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/lock.h"
#include "drivers/refgpu/vm.h"

namespace gpusvm::refgpu {

namespace {
uint64_t leaf_for(uint64_t va, uint64_t addr, uint64_t left) {
  for (uint64_t l : {kSZ2M, kSZ64K}) {
    if (left >= l && (va % l) == 0 && (addr % l) == 0) return l;
  }
  return kSZ4K;
}
}  // namespace

BoBinding::~BoBinding() {
  if (observing_) bo_->remove_observer(this);
}

void BoBinding::unbind() {
  if (observing_) bo_->remove_observer(this);  // no notification runs after this
  observing_ = false;
  vm_->zap(start_, end_);
}

void BoBinding::invalidate() {
  bound_seq_.store(kNeverBound);
  vm_->zap(start_, end_);
}

void BoBinding::bo_move_notify(Bo*) {
  moves_.fetch_add(1);  // seq_cst: pairs with bind()'s in_progress_ / moves_ check
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  while (in_progress_.load() != 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      panic("refgpu: a BO bind stayed in progress for the whole hang timeout");
    }
    std::this_thread::yield();
  }
  vm_->zap(start_, end_);
}

int BoBinding::bind() {
  const uint64_t npages = (end_ - start_) >> mm::kPageShift;
  std::vector<BoPageAddr> pa(npages);
  for (int attempt = 0; attempt < 16; attempt++) {
    Result<PtReservation> res = vm_->page_table().reserve(start_, end_, kSZ4K);
    if (!res) return res.error();
    const uint64_t seq = moves_.load();
    if (int rc = bo_->get_backing(bo_offset_ >> mm::kPageShift, npages, pa.data(), this)) return rc;
    observing_ = true;
    in_progress_.fetch_add(1);
    if (moves_.load() != seq) {  // moved since the query: query again
      in_progress_.fetch_sub(1);
      continue;
    }
    int rc = 0;
    bool replaced = false;
    for (uint64_t i = 0; i < npages && rc == 0;) {
      // A run of pages contiguous in one place.
      uint64_t j = i + 1;
      while (j < npages && pa[j].where == pa[i].where &&
             pa[j].addr == pa[i].addr + ((j - i) << mm::kPageShift)) {
        j++;
      }
      const Target t = pa[i].where == BoBacking::kVram ? Target::kVram : Target::kSystem;
      uint8_t perms = read_only_ ? 0 : kPermWrite;
      if (!read_only_ && vm_->atomic_allowed(REFGPU_ATOMIC_DEVICE, t)) perms |= kPermAtomic;
      const uint64_t va0 = start_ + (i << mm::kPageShift), bytes = (j - i) << mm::kPageShift;
      for (uint64_t off = 0; off < bytes && rc == 0;) {
        const uint64_t leaf = leaf_for(va0 + off, pa[i].addr + off, bytes - off);
        Result<bool> m = vm_->page_table().map(&*res, va0 + off, va0 + off + leaf, leaf, t,
                                               pa[i].addr + off, perms);
        if (!m) {
          rc = m.error();
        } else {
          replaced |= *m;
        }
        off += leaf;
      }
      i = j;
    }
    if (replaced) vm_->tlb().invalidate(start_, end_);  // no old translation survives
    if (rc == 0) bound_seq_.store(seq);  // a move since bumped moves_: needs_rebind() again
    in_progress_.fetch_sub(1);
    if (rc == -EAGAIN) continue;
    return rc;
  }
  return -EAGAIN;
}

}  // namespace gpusvm::refgpu
