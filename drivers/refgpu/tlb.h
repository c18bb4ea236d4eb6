// Tlb: the device TLB of one GPU VM: cached leaves of its GpuPageTable.
//
// Design notes:
//  - Entries are whole leaves (4 KiB, 64 KiB, 2 MiB), keyed by leaf VA, at most `capacity`;
//    when full, the lowest-VA entry goes (deterministic, so tests can count on it).
//  - invalidate(start, end) is exact: it drops the entries whose leaf intersects the range and
//    no other (statistics count both), then waits out accesses in flight (the fence below).
//  - The invalidation fence: an engine holds access_lock() shared from a translation to the
//    end of the access it made with it; invalidate() takes it exclusive once after dropping
//    entries. So when invalidate() returns, no access through a dropped translation is still
//    running - what lets a migration copy the pages right after (Xe waits on its TLB
//    invalidation fence for the same reason).
//  - Fills happen under the page table's shared lock (fill() asserts it), and a zap takes that
//    lock exclusive before the caller invalidates: a walk that read an entry before the zap
//    has filled the TLB before the zap finished, so the invalidation after it drops it.
//
// Locking: access_lock() (kTlbAccessLockClass) -> GpuPageTable lock -> entries lock
// (kTlbLockClass, a Mutex). invalidate() must be called without the page-table lock and
// without the access lock; it may sleep (waiting for accesses).
#pragma once

#include <cstdint>
#include <map>
#include <optional>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/stats.h"
#include "drivers/refgpu/gpu_page_table.h"

namespace gpusvm::refgpu {

struct TlbStats {
  StatCounter hits;
  StatCounter misses;
  StatCounter fills;
  StatCounter capacity_evictions;
  StatCounter invalidations;        // invalidate() calls
  StatCounter invalidated_entries;  // entries they dropped
  StatCounter invalidated_bytes;    // bytes of the leaves they dropped
};

class Tlb {
 public:
  explicit Tlb(size_t capacity = 4096) : capacity_(capacity) {}
  Tlb(const Tlb&) = delete;
  Tlb& operator=(const Tlb&) = delete;

  std::optional<GpuLeaf> lookup(uint64_t va) GPUSVM_EXCLUDES(lock_);
  // Caches a leaf read from `pt` under its shared lock (asserted).
  void fill(const GpuPageTable& pt, const GpuLeaf& leaf) GPUSVM_EXCLUDES(lock_);
  // Drops the entries intersecting [start, end) and waits for accesses in flight. Returns
  // how many were dropped. Context: may sleep; no page-table or access lock held.
  uint64_t invalidate(uint64_t start, uint64_t end) GPUSVM_EXCLUDES(lock_, access_);
  uint64_t invalidate_all() GPUSVM_EXCLUDES(lock_, access_) { return invalidate(0, ~0ull); }

  RwLock& access_lock() GPUSVM_RETURN_CAPABILITY(access_) { return access_; }
  size_t entries() const GPUSVM_EXCLUDES(lock_);
  const TlbStats& stats() const { return stats_; }

 private:
  const size_t capacity_;
  RwLock access_{&kTlbAccessLockClass};
  mutable Mutex lock_{&kTlbLockClass};
  std::map<uint64_t, GpuLeaf> entries_ GPUSVM_GUARDED_BY(lock_);  // by leaf VA; disjoint
  TlbStats stats_;
};

}  // namespace gpusvm::refgpu
