// BoBinding: one MAP of a buffer object into a VM at [start, end) (Xe's xe_vma of a BO),
// and the BoBindingObserver that keeps its GPU PTEs from outliving a move of the backing.
//
// Design notes:
//  - The binding's fields are const after creation; bo_move_notify touches nothing of the VM
//    but its page table and TLB (their own locks), so it needs no VM lock: the BO calls it
//    with its BO lock held, which ranks after the VM lock.
//  - The race between a bind and a move is closed without a lock: bind() reads `moves_`,
//    queries the backing (get_backing registers the observer under the BO lock), marks itself
//    in progress, re-checks `moves_`, writes the PTEs, and unmarks. bo_move_notify bumps
//    `moves_` first, waits (bounded) for a bind in progress to finish, then zaps. A bind that
//    saw the old sequence and marked itself before the bump is zapped after its PTEs are
//    written; one that marked itself after the bump sees the new sequence and starts over
//    (its next get_backing waits for the move on the BO lock). So no PTE to the old backing
//    survives bo_move_notify, before the BO copies and frees it.
//  - A zapped binding is bound again by the next GPU fault on it (fault mode), or, in a VM
//    without fault mode, by Vm::prepare_exec before the next job (Xe's rebind in the exec
//    path) and by the fault unit for a suspended LR job (see vm.h). needs_rebind() tells a
//    zapped binding from a valid one: the move sequence its PTEs were written for differs
//    from the current one.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "drivers/refgpu/bo.h"

namespace gpusvm::refgpu {

class Vm;

class BoBinding final : public BoBindingObserver {
 public:
  BoBinding(Vm* vm, BoRef bo, uint64_t start, uint64_t end, uint64_t bo_offset, bool read_only)
      : vm_(vm), bo_(std::move(bo)), start_(start), end_(end), bo_offset_(bo_offset),
        read_only_(read_only) {}
  ~BoBinding() override;  // unbind() first

  // Writes the PTEs of the whole binding from the BO's current backing. 0, -ENOMEM, -EAGAIN
  // (the backing kept moving). Context: the VM lock held; no other lock; may sleep.
  [[nodiscard]] int bind();
  // Stops notifications (remove_observer) and zaps the PTEs. VM lock held.
  void unbind();
  // Zaps the PTEs and marks the binding as needing a rebind (a rolled-back rebind). VM lock
  // held.
  void invalidate();
  // The backing moved since the PTEs were written (or they were never written, or
  // invalidate() ran): the binding maps nothing until bind() runs again.
  bool needs_rebind() const { return moves_.load() != bound_seq_.load(); }

  void bo_move_notify(Bo* bo) override;

  Bo* bo() const { return bo_.get(); }
  const BoRef& bo_ref() const { return bo_; }
  uint64_t start() const { return start_; }
  uint64_t end() const { return end_; }
  uint64_t moves() const { return moves_.load(); }

 private:
  Vm* const vm_;
  const BoRef bo_;
  const uint64_t start_, end_, bo_offset_;
  const bool read_only_;
  bool observing_ = false;  // VM lock
  std::atomic<uint64_t> moves_{0};
  // The move sequence the PTEs were written for (kNeverBound: none).
  static constexpr uint64_t kNeverBound = ~0ull;
  std::atomic<uint64_t> bound_seq_{kNeverBound};
  std::atomic<int> in_progress_{0};
};

// BOs marked busy for eviction (VramLruEntry::begin_busy) while a job may use them: the
// model's version of a job's fence in each BO's dma-resv, which TTM's eviction skips (or
// waits for). The LRU passes busy BOs over, so a BO a queued or running job may touch is not
// evicted under it; explicit moves (Bo::move_to_system, a CPU mapping) still may, and the
// binding is then zapped (the job faults). Move-only; the destructor ends the hold.
class BoBusyHold {
 public:
  BoBusyHold() = default;
  BoBusyHold(const BoBusyHold&) = delete;
  BoBusyHold& operator=(const BoBusyHold&) = delete;
  BoBusyHold(BoBusyHold&& o) noexcept : bos_(std::move(o.bos_)) { o.bos_.clear(); }
  BoBusyHold& operator=(BoBusyHold&& o) noexcept {
    if (this != &o) {
      release();
      bos_ = std::move(o.bos_);
      o.bos_.clear();
    }
    return *this;
  }
  ~BoBusyHold() { release(); }
  void add(const BoRef& bo) {
    bo->begin_busy();
    bos_.push_back(bo);
  }
  void release() {
    for (BoRef& b : bos_) b->end_busy();
    bos_.clear();
  }
  size_t size() const { return bos_.size(); }

 private:
  std::vector<BoRef> bos_;
};

}  // namespace gpusvm::refgpu
