#include "drivers/refgpu/tlb.h"

namespace gpusvm::refgpu {

std::optional<GpuLeaf> Tlb::lookup(uint64_t va) {
  MutexLock g(&lock_);
  auto it = entries_.upper_bound(va);
  if (it != entries_.begin()) {
    --it;
    if (va < it->second.va + it->second.size) {
      stats_.hits.add();
      return it->second;
    }
  }
  stats_.misses.add();
  return std::nullopt;
}

void Tlb::fill(const GpuPageTable& pt, const GpuLeaf& leaf) {
  pt.lock().assert_held();
  MutexLock g(&lock_);
  // Entries stay disjoint: drop whatever overlaps (a stale entry would be a missed
  // invalidation, which the caller's protocol rules out; this keeps lookups well defined).
  auto it = entries_.lower_bound(leaf.va);
  if (it != entries_.begin() && std::prev(it)->second.va + std::prev(it)->second.size > leaf.va) --it;
  while (it != entries_.end() && it->second.va < leaf.va + leaf.size) it = entries_.erase(it);
  if (entries_.size() >= capacity_) {
    entries_.erase(entries_.begin());
    stats_.capacity_evictions.add();
  }
  entries_.emplace(leaf.va, leaf);
  stats_.fills.add();
}

uint64_t Tlb::invalidate(uint64_t start, uint64_t end) {
  uint64_t dropped = 0;
  {
    MutexLock g(&lock_);
    auto it = entries_.lower_bound(start);
    if (it != entries_.begin() && std::prev(it)->second.va + std::prev(it)->second.size > start) --it;
    while (it != entries_.end() && it->second.va < end) {
      stats_.invalidated_bytes.add(it->second.size);
      it = entries_.erase(it);
      dropped++;
    }
  }
  stats_.invalidations.add();
  stats_.invalidated_entries.add(dropped);
  // The fence: wait until every access that translated before the drop has finished.
  { WriteLock fence(&access_); }
  return dropped;
}

size_t Tlb::entries() const {
  MutexLock g(&lock_);
  return entries_.size();
}

}  // namespace gpusvm::refgpu
