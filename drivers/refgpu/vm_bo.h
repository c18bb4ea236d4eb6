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
//  - A zapped binding is bound again by the next GPU fault on it (fault mode).
#pragma once

#include <atomic>
#include <cstdint>

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

  void bo_move_notify(Bo* bo) override;

  Bo* bo() const { return bo_.get(); }
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
  std::atomic<int> in_progress_{0};
};

}  // namespace gpusvm::refgpu
