// Buddy: the VRAM allocator of one memory region (drm_buddy's job for Xe's VRAM manager).
//
// Design notes:
//  - The region is a row of 2 MiB blocks (the top order, kMaxOrder = 9 in 4 KiB units). A
//    block splits in halves down to 4 KiB; 64 KiB (order 4) is the other size the GPU page
//    table maps with one leaf, so device memory comes in 4 KiB, 64 KiB and 2 MiB blocks. A
//    freed block merges with its buddy as long as the buddy is free, up to 2 MiB.
//  - alloc() hands out a list of naturally aligned blocks covering `size`; with kContiguous
//    one run: below 2 MiB the power-of-two block that fits is taken and the tail beyond `size`
//    is given back at once (drm_buddy's trim), above 2 MiB a run of free 2 MiB blocks.
//    `min_block` bounds the block size of a non-contiguous allocation from below (a caller
//    that maps 64 KiB leaves asks for 64 KiB blocks); `alignment` aligns a contiguous run.
//  - Choice is deterministic: the lowest free offset of the chosen order, and larger blocks
//    first for non-contiguous requests, so tests and benchmarks see the same layout each run.
//  - Failure injection: "refgpu.buddy_alloc" makes an allocation fail with -ENOSPC as if the
//    region were full (test_hmm's FAIL_ALLOC for the device).
//  - Eviction under pressure is the owner's job (the driver's LRU): -ENOSPC says "evict and
//    retry"; the allocator never sleeps.
//
// Locking: one Mutex per region (kBuddyLockClass, a leaf of the device): allocation runs under
// folio locks in a migration, free runs from folio_free, possibly under page-table locks.
// Nothing is called under it.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "drivers/refgpu/vram.h"

namespace gpusvm::refgpu {

struct BuddyBlock {
  uint64_t offset = 0;
  uint64_t size = 0;  // a power of two, 4 KiB .. 2 MiB
  bool operator==(const BuddyBlock&) const = default;
};

struct BuddyStats {
  StatCounter allocs;        // successful alloc() calls
  StatCounter frees;         // blocks freed
  StatCounter failures;      // alloc() calls that returned -ENOSPC (injected ones included)
  StatCounter splits;        // blocks split in two
  StatCounter merges;        // buddy pairs merged on free
};

class Buddy {
 public:
  static constexpr unsigned kMaxOrder = 9;  // 2 MiB in 4 KiB units
  enum Flags : uint32_t { kContiguous = 1u << 0 };

  // `size`: a non-zero multiple of 2 MiB (the region's bytes, offsets start at 0).
  explicit Buddy(uint64_t size);
  Buddy(const Buddy&) = delete;
  Buddy& operator=(const Buddy&) = delete;

  // Allocates `size` bytes (a non-zero multiple of 4 KiB, and of min_block). min_block: 4 KiB,
  // 64 KiB or 2 MiB; alignment: 0 (natural) or a power of two >= 4 KiB, contiguous only.
  // Returns the blocks (offset order for contiguous; each block naturally aligned).
  // Errors: -EINVAL bad arguments; -ENOSPC not enough free memory in blocks of min_block (or
  // no contiguous run), nothing allocated then. Never sleeps.
  Result<std::vector<BuddyBlock>> alloc(uint64_t size, uint64_t min_block = kSZ4K,
                                        uint64_t alignment = 0, uint32_t flags = 0)
      GPUSVM_EXCLUDES(lock_);
  // Frees blocks returned by alloc() (any subset, in any order). -EINVAL, and nothing freed,
  // when a block is not allocated as given (a double free or a made-up block).
  [[nodiscard]] int free(const std::vector<BuddyBlock>& blocks) GPUSVM_EXCLUDES(lock_);

  uint64_t size() const { return size_; }
  uint64_t used_bytes() const GPUSVM_EXCLUDES(lock_);
  uint64_t free_bytes() const GPUSVM_EXCLUDES(lock_);
  // Free blocks of `order` (0..kMaxOrder).
  uint64_t free_blocks(unsigned order) const GPUSVM_EXCLUDES(lock_);
  // Largest block allocatable now without eviction (0 when full).
  uint64_t largest_free_block() const GPUSVM_EXCLUDES(lock_);
  const BuddyStats& stats() const { return stats_; }

  // Verifies the allocator's invariants: free and allocated blocks are naturally aligned,
  // disjoint and cover the region exactly; no two free buddies below 2 MiB (they would have
  // merged). Returns "" or a description of the first violation.
  std::string check() const GPUSVM_EXCLUDES(lock_);

 private:
  static uint64_t order_size(unsigned order) { return kSZ4K << order; }
  Result<uint64_t> alloc_order_locked(unsigned order) GPUSVM_REQUIRES(lock_);
  void free_order_locked(uint64_t offset, unsigned order) GPUSVM_REQUIRES(lock_);
  void free_range_locked(uint64_t offset, uint64_t size) GPUSVM_REQUIRES(lock_);
  Result<std::vector<BuddyBlock>> alloc_contig_small_locked(uint64_t size, uint64_t alignment)
      GPUSVM_REQUIRES(lock_);
  Result<std::vector<BuddyBlock>> alloc_contig_large_locked(uint64_t size, uint64_t alignment)
      GPUSVM_REQUIRES(lock_);
  Result<std::vector<BuddyBlock>> alloc_blocks_locked(uint64_t size, unsigned min_order)
      GPUSVM_REQUIRES(lock_);
  void take_locked(uint64_t offset, unsigned order) GPUSVM_REQUIRES(lock_);

  const uint64_t size_;  // const after construction
  mutable Mutex lock_{&kBuddyLockClass};
  // Free blocks per order, by offset (lowest first: the deterministic choice).
  std::set<uint64_t> free_[kMaxOrder + 1] GPUSVM_GUARDED_BY(lock_);
  // Allocated blocks: offset -> order.
  std::map<uint64_t, unsigned> allocated_ GPUSVM_GUARDED_BY(lock_);
  uint64_t used_ GPUSVM_GUARDED_BY(lock_) = 0;
  BuddyStats stats_;  // atomic counters
};

}  // namespace gpusvm::refgpu
