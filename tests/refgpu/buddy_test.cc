// The VRAM buddy allocator: sizes, alignment, merging, failure injection, and a random
// alloc/free run checked against a reference model of the region's pages.
#include "drivers/refgpu/buddy.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::refgpu {
namespace {

uint64_t total(const std::vector<BuddyBlock>& bs) {
  uint64_t t = 0;
  for (const BuddyBlock& b : bs) t += b.size;
  return t;
}

TEST(Buddy, FourKiBSplitsATwoMiBBlockAndMergesBackOnFree) {
  Buddy b(4 * kSZ2M);
  auto a = b.alloc(kSZ4K);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(a->size(), 1u);
  EXPECT_EQ((*a)[0], (BuddyBlock{0, kSZ4K}));  // lowest offset first
  EXPECT_EQ(b.used_bytes(), kSZ4K);
  // One split per order from 2 MiB down to 4 KiB: a free buddy at every order 0..8.
  for (unsigned o = 0; o < Buddy::kMaxOrder; o++) EXPECT_EQ(b.free_blocks(o), 1u) << "order " << o;
  EXPECT_EQ(b.free_blocks(Buddy::kMaxOrder), 3u);
  EXPECT_EQ(b.stats().splits.get(), 9u);
  EXPECT_EQ(b.check(), "");
  ASSERT_EQ(b.free(*a), 0);
  EXPECT_EQ(b.free_blocks(Buddy::kMaxOrder), 4u);
  for (unsigned o = 0; o < Buddy::kMaxOrder; o++) EXPECT_EQ(b.free_blocks(o), 0u);
  EXPECT_EQ(b.stats().merges.get(), 9u);
  EXPECT_EQ(b.used_bytes(), 0u);
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, SixtyFourKiBBlocksAreNaturallyAligned) {
  Buddy b(kSZ2M);
  auto a = b.alloc(3 * kSZ64K, kSZ64K);
  ASSERT_TRUE(a.ok());
  for (const BuddyBlock& blk : *a) {
    EXPECT_GE(blk.size, kSZ64K);
    EXPECT_EQ(blk.offset % blk.size, 0u);
  }
  EXPECT_EQ(total(*a), 3 * kSZ64K);
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, ContiguousSmallAllocationTrimsTheTail) {
  Buddy b(kSZ2M);
  // 12 KiB contiguous: a 16 KiB block, the last 4 KiB given back.
  auto a = b.alloc(3 * kSZ4K, kSZ4K, 0, Buddy::kContiguous);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(total(*a), 3 * kSZ4K);
  EXPECT_EQ((*a)[0].offset, 0u);
  for (size_t i = 1; i < a->size(); i++) EXPECT_EQ((*a)[i].offset, (*a)[i - 1].offset + (*a)[i - 1].size);
  EXPECT_EQ(b.used_bytes(), 3 * kSZ4K);
  auto next = b.alloc(kSZ4K);
  ASSERT_TRUE(next.ok());
  EXPECT_EQ((*next)[0].offset, 3 * kSZ4K) << "the trimmed tail is free again";
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, ContiguousAlignedAndLargeRuns) {
  Buddy b(8 * kSZ2M);
  auto small = b.alloc(kSZ4K);  // occupies block 0
  ASSERT_TRUE(small.ok());
  // 4 MiB aligned to 4 MiB: blocks 0 and 1 are not both free, so it starts at 4 MiB.
  auto big = b.alloc(2 * kSZ2M, kSZ4K, 2 * kSZ2M, Buddy::kContiguous);
  ASSERT_TRUE(big.ok());
  ASSERT_EQ(big->size(), 2u);
  EXPECT_EQ((*big)[0].offset, 2 * kSZ2M);
  EXPECT_EQ((*big)[1].offset, 3 * kSZ2M);
  // 64 KiB aligned to 1 MiB.
  auto al = b.alloc(kSZ64K, kSZ4K, 1 << 20, Buddy::kContiguous);
  ASSERT_TRUE(al.ok());
  EXPECT_EQ((*al)[0].offset % (1 << 20), 0u);
  EXPECT_EQ(total(*al), kSZ64K);
  // Eight blocks in a row cannot be found any more.
  EXPECT_EQ(b.alloc(8 * kSZ2M, kSZ4K, 0, Buddy::kContiguous).error(), -ENOSPC);
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, BadArgumentsAndBadFreesChangeNothing) {
  Buddy b(2 * kSZ2M);
  EXPECT_EQ(b.alloc(0).error(), -EINVAL);
  EXPECT_EQ(b.alloc(100).error(), -EINVAL);
  EXPECT_EQ(b.alloc(kSZ4K, 8192).error(), -EINVAL);             // min_block not 4K/64K/2M
  EXPECT_EQ(b.alloc(kSZ4K, kSZ64K).error(), -EINVAL);           // size not a multiple of it
  EXPECT_EQ(b.alloc(kSZ4K, kSZ4K, 3 * kSZ4K, Buddy::kContiguous).error(), -EINVAL);
  EXPECT_EQ(b.alloc(kSZ4K, kSZ4K, kSZ64K).error(), -EINVAL);    // alignment needs contiguous
  EXPECT_EQ(b.alloc(kSZ4K, kSZ4K, 0, 0x80).error(), -EINVAL);   // unknown flag
  EXPECT_EQ(b.alloc(3 * kSZ2M).error(), -EINVAL);               // above the region
  auto a = b.alloc(2 * kSZ4K);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(b.free({{a->front().offset, kSZ64K}}), -EINVAL);     // wrong size
  EXPECT_EQ(b.free({a->front(), a->front()}), -EINVAL);          // the same block twice
  EXPECT_EQ(b.used_bytes(), 2 * kSZ4K);
  ASSERT_EQ(b.free(*a), 0);
  EXPECT_EQ(b.free(*a), -EINVAL);                                // double free
  EXPECT_EQ(b.used_bytes(), 0u);
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, FullRegionFailsWithEnospcAndAllocatesNothing) {
  Buddy b(kSZ2M);
  auto a = b.alloc(kSZ2M - kSZ64K, kSZ64K);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(b.alloc(2 * kSZ64K, kSZ64K).error(), -ENOSPC);
  EXPECT_EQ(b.used_bytes(), kSZ2M - kSZ64K) << "a failed allocation gives back what it took";
  EXPECT_EQ(b.stats().failures.get(), 1u);
  EXPECT_EQ(b.largest_free_block(), kSZ64K);
  EXPECT_EQ(b.check(), "");
}

TEST(Buddy, InjectedFailureLooksLikeAFullRegion) {
  Buddy b(kSZ2M);
  fault_inject::ScopedArm arm("refgpu.buddy_alloc", {.nth = 2});
  ASSERT_EQ(arm.status(), 0);
  auto first = b.alloc(kSZ4K);
  EXPECT_TRUE(first.ok());
  EXPECT_EQ(b.alloc(kSZ4K).error(), -ENOSPC);
  EXPECT_TRUE(b.alloc(kSZ4K).ok());
  EXPECT_EQ(b.used_bytes(), 2 * kSZ4K);
  EXPECT_EQ(b.check(), "");
}

// Random allocations and frees of every shape against a page-owner model: blocks never
// overlap, sizes add up, and check() holds after every step. Seeded and replayable.
TEST(Buddy, RandomAllocFreeAgainstReferenceModel) {
  const uint64_t seed = 0x5eed0b0d;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr uint64_t kRegion = 8 * kSZ2M;
  Buddy b(kRegion);
  std::vector<int> owner(kRegion / kSZ4K, -1);  // page -> allocation id
  std::map<int, std::vector<BuddyBlock>> live;
  int next_id = 0;
  uint64_t used = 0;
  for (int step = 0; step < 3000; step++) {
    if (live.empty() || rng() % 3 != 0) {
      const uint64_t mins[] = {kSZ4K, kSZ64K, kSZ2M};
      const uint64_t min = mins[rng() % 3];
      const uint64_t size = min * (1 + rng() % (min == kSZ2M ? 2 : 12));
      const bool contig = rng() % 2;
      auto a = b.alloc(size, contig ? kSZ4K : min, 0, contig ? uint32_t{Buddy::kContiguous} : 0u);
      if (!a.ok()) {
        ASSERT_EQ(a.error(), -ENOSPC) << "step " << step;
        ASSERT_EQ(b.used_bytes(), used);
        continue;
      }
      ASSERT_EQ(total(*a), size);
      const int id = next_id++;
      for (const BuddyBlock& blk : *a) {
        ASSERT_EQ(blk.offset % blk.size, 0u);
        if (!contig) {
          ASSERT_GE(blk.size, min);
        }
        for (uint64_t p = blk.offset / kSZ4K; p < (blk.offset + blk.size) / kSZ4K; p++) {
          ASSERT_EQ(owner[p], -1) << "page " << p << " handed out twice (step " << step << ")";
          owner[p] = id;
        }
      }
      if (contig) {
        for (size_t i = 1; i < a->size(); i++) ASSERT_EQ((*a)[i].offset, (*a)[i - 1].offset + (*a)[i - 1].size);
      }
      used += size;
      live[id] = std::move(*a);
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      ASSERT_EQ(b.free(it->second), 0);
      for (const BuddyBlock& blk : it->second)
        for (uint64_t p = blk.offset / kSZ4K; p < (blk.offset + blk.size) / kSZ4K; p++) owner[p] = -1;
      used -= total(it->second);
      live.erase(it);
    }
    ASSERT_EQ(b.used_bytes(), used);
    ASSERT_EQ(b.check(), "") << "step " << step;
  }
  for (auto& [id, blocks] : live) ASSERT_EQ(b.free(blocks), 0);
  EXPECT_EQ(b.free_blocks(Buddy::kMaxOrder), kRegion / kSZ2M) << "everything merged back";
  EXPECT_EQ(b.check(), "");
}

}  // namespace
}  // namespace gpusvm::refgpu

#include "drivers/refgpu/vram_region.h"

namespace gpusvm::refgpu {
namespace {

// A region's usage is what its allocator has handed out; its blocks address its own arena.
TEST(VramRegion, UsageFollowsAllocationsAndBlocksAddressTheArena) {
  EXPECT_EQ(VramRegion::create(0, kSZ2M).error(), -EINVAL) << "instance 0 is system memory";
  EXPECT_EQ(VramRegion::create(1, kSZ4K).error(), -EINVAL);
  auto r = VramRegion::create(1, 4 * kSZ2M);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->instance(), 1u);
  EXPECT_EQ((*r)->total_size(), 4 * kSZ2M);
  EXPECT_EQ((*r)->used(), 0u);
  auto a = (*r)->buddy().alloc(kSZ2M + kSZ64K, kSZ64K);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ((*r)->used(), kSZ2M + kSZ64K);
  for (const BuddyBlock& b : *a) {
    ASSERT_TRUE((*r)->arena().contains(b.offset, b.size));
    (*r)->arena().data(b.offset)[b.size - 1] = std::byte{0x5a};
  }
  ASSERT_EQ((*r)->buddy().free(*a), 0);
  EXPECT_EQ((*r)->used(), 0u);
}

}  // namespace
}  // namespace gpusvm::refgpu
