#include "drivers/refgpu/buddy.h"

#include <bit>
#include <cerrno>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::refgpu {

GPUSVM_FAULT_POINT(g_fail_buddy_alloc, "refgpu.buddy_alloc");

namespace {
bool is_pow2(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }
unsigned order_of(uint64_t block) { return static_cast<unsigned>(std::countr_zero(block / kSZ4K)); }
}  // namespace

Buddy::Buddy(uint64_t size) : size_(size) {
  if (size == 0 || size % kSZ2M != 0) panic("refgpu buddy: region size must be a multiple of 2 MiB");
  MutexLock g(&lock_);
  for (uint64_t off = 0; off < size_; off += kSZ2M) free_[kMaxOrder].insert(off);
}

// Takes the free block (offset, order) out of its free list and records it allocated.
void Buddy::take_locked(uint64_t offset, unsigned order) {
  lock_.assert_held();
  free_[order].erase(offset);
  allocated_[offset] = order;
  used_ += order_size(order);
}

// Lowest free block of `order`, splitting a larger one when none is free. The block is not
// recorded allocated: the caller takes it.
Result<uint64_t> Buddy::alloc_order_locked(unsigned order) {
  lock_.assert_held();
  unsigned o = order;
  while (o <= kMaxOrder && free_[o].empty()) o++;
  if (o > kMaxOrder) return Err{-ENOSPC};
  const uint64_t off = *free_[o].begin();
  // Split down: the lower half goes on, the upper half becomes free at the lower order.
  while (o > order) {
    free_[o].erase(off);
    o--;
    free_[o].insert(off + order_size(o));
    free_[o].insert(off);
    stats_.splits.add();
  }
  return off;
}

// Returns the block to the free lists, merging with free buddies up to 2 MiB.
void Buddy::free_order_locked(uint64_t offset, unsigned order) {
  lock_.assert_held();
  while (order < kMaxOrder) {
    const uint64_t buddy = offset ^ order_size(order);
    auto it = free_[order].find(buddy);
    if (it == free_[order].end()) break;
    free_[order].erase(it);
    offset = std::min(offset, buddy);
    order++;
    stats_.merges.add();
  }
  free_[order].insert(offset);
}

// Frees an arbitrary 4 KiB-aligned range that the caller owns (the trimmed tail of a
// contiguous allocation) as the largest aligned blocks that fit.
void Buddy::free_range_locked(uint64_t offset, uint64_t size) {
  lock_.assert_held();
  while (size > 0) {
    unsigned o = kMaxOrder;
    while (o > 0 && (offset % order_size(o) != 0 || order_size(o) > size)) o--;
    free_order_locked(offset, o);
    offset += order_size(o);
    size -= order_size(o);
  }
}

Result<std::vector<BuddyBlock>> Buddy::alloc_contig_small_locked(uint64_t size, uint64_t alignment) {
  lock_.assert_held();
  const uint64_t block = std::bit_ceil(std::max(size, alignment));
  const unsigned order = order_of(block);
  Result<uint64_t> off = alloc_order_locked(order);
  if (!off.ok()) return Err{off.error()};
  // Record the kept part as blocks (each naturally aligned), give the tail back.
  std::vector<BuddyBlock> out;
  uint64_t pos = *off;
  uint64_t left = size;
  free_[order].erase(*off);
  while (left > 0) {
    unsigned o = order_of(std::bit_floor(left));
    while (pos % order_size(o) != 0) o--;
    allocated_[pos] = o;
    used_ += order_size(o);
    out.push_back({pos, order_size(o)});
    pos += order_size(o);
    left -= order_size(o);
  }
  free_range_locked(pos, block - size);
  return out;
}

Result<std::vector<BuddyBlock>> Buddy::alloc_contig_large_locked(uint64_t size, uint64_t alignment) {
  lock_.assert_held();
  const uint64_t n = size / kSZ2M;
  const uint64_t align = std::max<uint64_t>(alignment, kSZ2M);
  // A run of n free 2 MiB blocks starting at an aligned offset (free_[9] is sorted).
  uint64_t run_start = 0;
  uint64_t run_len = 0;
  for (uint64_t off : free_[kMaxOrder]) {
    if (run_len > 0 && off == run_start + run_len * kSZ2M) {
      run_len++;
    } else if (off % align == 0) {
      run_start = off;
      run_len = 1;
    } else {
      run_len = 0;
      continue;
    }
    if (run_len == n) {
      std::vector<BuddyBlock> out;
      for (uint64_t i = 0; i < n; i++) {
        take_locked(run_start + i * kSZ2M, kMaxOrder);
        out.push_back({run_start + i * kSZ2M, kSZ2M});
      }
      return out;
    }
  }
  return Err{-ENOSPC};
}

Result<std::vector<BuddyBlock>> Buddy::alloc_blocks_locked(uint64_t size, unsigned min_order) {
  lock_.assert_held();
  std::vector<BuddyBlock> out;
  uint64_t left = size;
  while (left > 0) {
    // The largest order that still fits what is left, falling back to smaller blocks while
    // none of that order can be made.
    unsigned o = std::min<unsigned>(kMaxOrder, order_of(std::bit_floor(left)));
    Result<uint64_t> off = Err{-ENOSPC};
    for (;; o--) {
      off = alloc_order_locked(o);
      if (off.ok() || o == min_order) break;
    }
    if (!off.ok()) {
      for (const BuddyBlock& b : out) {
        allocated_.erase(b.offset);
        used_ -= b.size;
        free_order_locked(b.offset, order_of(b.size));
      }
      return Err{-ENOSPC};
    }
    take_locked(*off, o);
    out.push_back({*off, order_size(o)});
    left -= order_size(o);
  }
  return out;
}

Result<std::vector<BuddyBlock>> Buddy::alloc(uint64_t size, uint64_t min_block, uint64_t alignment,
                                             uint32_t flags) {
  if (flags & ~uint32_t{kContiguous}) return Err{-EINVAL};
  if (min_block != kSZ4K && min_block != kSZ64K && min_block != kSZ2M) return Err{-EINVAL};
  if (size == 0 || size % min_block != 0 || size > size_) return Err{-EINVAL};
  if (alignment != 0 && (!is_pow2(alignment) || alignment < kSZ4K || !(flags & kContiguous)))
    return Err{-EINVAL};
  if (alignment > size_) return Err{-EINVAL};
  MutexLock g(&lock_);
  if (g_fail_buddy_alloc.should_fail()) {
    stats_.failures.add();
    return Err{-ENOSPC};
  }
  Result<std::vector<BuddyBlock>> r = Err{-ENOSPC};
  if (!(flags & kContiguous)) {
    r = alloc_blocks_locked(size, order_of(min_block));
  } else if (std::max(size, alignment) <= kSZ2M) {
    r = alloc_contig_small_locked(size, alignment);
  } else if (size % kSZ2M == 0) {
    r = alloc_contig_large_locked(size, alignment);
  } else {
    return Err{-EINVAL};  // a contiguous run above 2 MiB is made of whole 2 MiB blocks
  }
  if (r.ok()) {
    stats_.allocs.add();
  } else {
    stats_.failures.add();
  }
  return r;
}

int Buddy::free(const std::vector<BuddyBlock>& blocks) {
  MutexLock g(&lock_);
  // Validate every block first: a bad one frees nothing.
  std::set<uint64_t> seen;
  for (const BuddyBlock& b : blocks) {
    auto it = allocated_.find(b.offset);
    if (it == allocated_.end() || order_size(it->second) != b.size || !seen.insert(b.offset).second)
      return -EINVAL;
  }
  for (const BuddyBlock& b : blocks) {
    allocated_.erase(b.offset);
    used_ -= b.size;
    free_order_locked(b.offset, order_of(b.size));
    stats_.frees.add();
  }
  return 0;
}

uint64_t Buddy::used_bytes() const {
  MutexLock g(&lock_);
  return used_;
}

uint64_t Buddy::free_bytes() const {
  MutexLock g(&lock_);
  return size_ - used_;
}

uint64_t Buddy::free_blocks(unsigned order) const {
  MutexLock g(&lock_);
  return order <= kMaxOrder ? free_[order].size() : 0;
}

uint64_t Buddy::largest_free_block() const {
  MutexLock g(&lock_);
  for (unsigned o = kMaxOrder + 1; o-- > 0;)
    if (!free_[o].empty()) return order_size(o);
  return 0;
}

std::string Buddy::check() const {
  MutexLock g(&lock_);
  // offset -> (size, free?) over every block, then walk in order.
  std::map<uint64_t, std::pair<uint64_t, bool>> all;
  uint64_t used = 0;
  for (unsigned o = 0; o <= kMaxOrder; o++) {
    for (uint64_t off : free_[o]) {
      if (!all.emplace(off, std::make_pair(order_size(o), true)).second)
        return "free block at " + std::to_string(off) + " listed twice";
      if (o < kMaxOrder && free_[o].count(off ^ order_size(o)))
        return "free buddies at " + std::to_string(off) + " order " + std::to_string(o) + " not merged";
    }
  }
  for (const auto& [off, o] : allocated_) {
    if (!all.emplace(off, std::make_pair(order_size(o), false)).second)
      return "block at " + std::to_string(off) + " both free and allocated";
    used += order_size(o);
  }
  if (used != used_) return "used bytes " + std::to_string(used_) + " but blocks sum to " + std::to_string(used);
  uint64_t pos = 0;
  for (const auto& [off, e] : all) {
    if (off != pos) return "gap or overlap at " + std::to_string(pos) + " (next block " + std::to_string(off) + ")";
    if (off % e.first != 0) return "block at " + std::to_string(off) + " not naturally aligned";
    pos = off + e.first;
  }
  if (pos != size_) return "blocks end at " + std::to_string(pos) + ", region is " + std::to_string(size_);
  return "";
}

}  // namespace gpusvm::refgpu
