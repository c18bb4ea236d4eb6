// GpuPageTable: the page table of one GPU VM (what xe_pt.c builds for Xe).
//
// Design notes:
//  - Four levels of 512 entries over a 48-bit VA, as on x86 and Xe: L3 (512 GiB per entry),
//    L2 (1 GiB), L1 (2 MiB), L0 (4 KiB). Leaves: 2 MiB at L1, 4 KiB at L0, and 64 KiB as 16
//    consecutive L0 entries marked kPs64 with one 64 KiB-aligned target (Xe's PS64 pages).
//    No 1 GiB leaves.
//  - A leaf targets system memory (a DMA address) or VRAM (an offset in the device's arena),
//    with read / write / atomic permission bits; read is implied by presence.
//  - Reserve / commit (Xe's "prepare" and "commit" of a bind): page-table memory is reserved
//    first, with no lock of the caller held, where it may fail (-ENOMEM, "refgpu.pt_alloc");
//    map() and unmap() then take nodes only from that reservation, so a commit under the
//    notifier lock never allocates. A commit that needs more nodes than reserved (the table
//    changed in between) changes nothing and returns -EAGAIN: reserve again. Nodes a commit
//    empties go into the reservation and are freed with it, outside the caller's locks.
//  - zap() is the notifier-callback path: it needs no reservation and never allocates; it
//    clears every leaf that intersects the range whole (a 2 MiB leaf partly covered goes
//    entirely: in fault mode the rest faults back in) and returns the extent it cleared, so the
//    TLB invalidation covers exactly that.
//  - The table does not invalidate the TLB: the caller invalidates the extents a commit or zap
//    reports (Xe's invalidation fence after the PT update), under the same outer lock.
//
// Locking: one RwLock per table (kGpuPtLockClass). Walks (lookup, walk, the GPU MMU's
// translation) take it shared; map, unmap and zap exclusive. A TLB fill happens under the
// shared lock so that it cannot overtake a zap (see tlb.h).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "drivers/refgpu/vram.h"

namespace gpusvm::refgpu {

enum class Target : uint8_t { kSystem, kVram };

enum GpuPerm : uint8_t { kPermWrite = 1u << 0, kPermAtomic = 1u << 1 };

// A leaf as a walk reports it.
struct GpuLeaf {
  uint64_t va = 0;      // leaf start, aligned to size
  uint64_t size = 0;    // kSZ4K, kSZ64K or kSZ2M
  Target target = Target::kSystem;
  uint64_t addr = 0;    // DMA address or VRAM offset of the leaf start
  uint8_t perms = 0;    // GpuPerm bits
  bool operator==(const GpuLeaf&) const = default;
};

struct GpuPtStats {
  StatCounter nodes_allocated;
  StatCounter nodes_freed;
  StatCounter maps;            // map() commits
  StatCounter unmaps;          // unmap() commits
  StatCounter zaps;
  StatCounter leaf_splits;     // 2 MiB / 64 KiB leaves split by a partial map or unmap
  StatCounter commit_eagain;   // commits refused for want of reserved nodes
};

struct PtNode;

// Page-table memory reserved for one commit; freed (with what a commit emptied) on destruction.
class PtReservation {
 public:
  PtReservation();
  ~PtReservation();
  PtReservation(PtReservation&&) noexcept;
  PtReservation& operator=(PtReservation&&) noexcept;
  size_t nodes() const { return pool_.size(); }

 private:
  friend class GpuPageTable;
  std::vector<std::unique_ptr<PtNode>> pool_;
  GpuPtStats* stats_ = nullptr;  // where frees are counted
};

class GpuPageTable {
 public:
  static constexpr unsigned kVaBits = 48;
  static constexpr uint64_t kVaLimit = 1ull << kVaBits;

  GpuPageTable();
  ~GpuPageTable();
  GpuPageTable(const GpuPageTable&) = delete;
  GpuPageTable& operator=(const GpuPageTable&) = delete;

  // Reserves the nodes a map (leaf_size != 0) or unmap (leaf_size == 0) of [start, end) needs
  // now. Errors: -EINVAL bad range or leaf size; -ENOMEM allocation failed (nothing reserved).
  // Context: may allocate; takes the table lock shared; call without the notifier lock.
  Result<PtReservation> reserve(uint64_t start, uint64_t end, uint64_t leaf_size)
      GPUSVM_EXCLUDES(lock_);

  // Maps [start, end) with leaves of leaf_size onto target addresses addr, addr + leaf_size..
  // replacing whatever was mapped there (a larger leaf partly covered is split first).
  // start, end and addr are aligned to leaf_size; perms are GpuPerm bits.
  // Returns whether a present leaf was replaced (the caller invalidates the TLB over [start,
  // end) then). Errors: -EINVAL bad arguments; -EAGAIN `res` is short (nothing changed).
  // Context: never allocates or sleeps; takes the table lock exclusive.
  Result<bool> map(PtReservation* res, uint64_t start, uint64_t end, uint64_t leaf_size,
                   Target target, uint64_t addr, uint8_t perms) GPUSVM_EXCLUDES(lock_);
  // Unmaps exactly [start, end) (4 KiB aligned), splitting leaves partly covered. Returns
  // whether anything was unmapped. Errors as map().
  Result<bool> unmap(PtReservation* res, uint64_t start, uint64_t end) GPUSVM_EXCLUDES(lock_);
  // Clears every leaf intersecting [start, end) whole and returns the extent cleared
  // ({0, 0} when nothing was mapped). Never allocates; for the invalidation path.
  std::pair<uint64_t, uint64_t> zap(uint64_t start, uint64_t end) GPUSVM_EXCLUDES(lock_);

  // The leaf mapping va, if any.
  std::optional<GpuLeaf> lookup(uint64_t va) const GPUSVM_EXCLUDES(lock_);
  // Calls fn for every leaf intersecting [start, end), in VA order, under the shared lock
  // (fn must not call back into the table).
  void walk(uint64_t start, uint64_t end, const std::function<void(const GpuLeaf&)>& fn) const
      GPUSVM_EXCLUDES(lock_);
  // lookup() for the GPU MMU, which holds the lock shared around its TLB fill.
  std::optional<GpuLeaf> lookup_locked(uint64_t va) const GPUSVM_REQUIRES_SHARED(lock_);
  RwLock& lock() const GPUSVM_RETURN_CAPABILITY(lock_) { return lock_; }

  // Page-table nodes in use (root included) and their bytes.
  uint64_t nodes() const GPUSVM_EXCLUDES(lock_);
  const GpuPtStats& stats() const { return stats_; }

 private:
  struct Need;
  uint64_t count_needed_locked(uint64_t start, uint64_t end, uint64_t leaf_size) const
      GPUSVM_REQUIRES_SHARED(lock_);
  PtNode* get_or_take_locked(PtNode* parent, unsigned idx, PtReservation* res)
      GPUSVM_REQUIRES(lock_);
  PtNode* split_l1_leaf_locked(PtNode* l1, unsigned idx, PtReservation* res) GPUSVM_REQUIRES(lock_);
  void set_range_locked(PtReservation* res, uint64_t start, uint64_t end, uint64_t leaf_size,
                        uint64_t pte_template, uint64_t addr, bool* replaced) GPUSVM_REQUIRES(lock_);
  PtNode* l1_for_locked(uint64_t va) const GPUSVM_REQUIRES_SHARED(lock_);
  void prune_locked(uint64_t start, uint64_t end, PtReservation* res) GPUSVM_REQUIRES(lock_);

  mutable RwLock lock_{&kGpuPtLockClass};
  std::unique_ptr<PtNode> root_ GPUSVM_PT_GUARDED_BY(lock_);
  uint64_t nodes_ GPUSVM_GUARDED_BY(lock_) = 1;
  GpuPtStats stats_;  // atomic counters
};

}  // namespace gpusvm::refgpu
