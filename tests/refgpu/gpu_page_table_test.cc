// The GPU page table: leaves of each size, exact unmaps that split larger leaves, zaps that
// never allocate, the reserve/commit contract, and random operations against a reference map.
#include "drivers/refgpu/gpu_page_table.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <vector>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::refgpu {
namespace {

constexpr uint64_t kBase = 0x7f0000000000ull;  // a typical mirrored user address

// Reserve + map in one step (what a bind does outside the notifier lock, then under it).
Result<bool> map(GpuPageTable& pt, uint64_t start, uint64_t size, uint64_t leaf, Target t, uint64_t addr,
                 uint8_t perms) {
  auto res = pt.reserve(start, start + size, leaf);
  if (!res.ok()) return Err{res.error()};
  return pt.map(&*res, start, start + size, leaf, t, addr, perms);
}

Result<bool> unmap(GpuPageTable& pt, uint64_t start, uint64_t size) {
  auto res = pt.reserve(start, start + size, 0);
  if (!res.ok()) return Err{res.error()};
  return pt.unmap(&*res, start, start + size);
}

TEST(GpuPageTable, EachLeafSizeTranslatesEveryPage) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, kSZ2M, kSZ2M, Target::kVram, 4 * kSZ2M, kPermWrite | kPermAtomic).ok());
  ASSERT_TRUE(map(pt, kBase + kSZ2M, 2 * kSZ64K, kSZ64K, Target::kSystem, 0x100000, kPermWrite).ok());
  ASSERT_TRUE(map(pt, kBase + kSZ2M + 2 * kSZ64K, kSZ4K, kSZ4K, Target::kSystem, 0x9000, 0).ok());
  for (uint64_t off = 0; off < kSZ2M; off += kSZ4K) {
    auto l = pt.lookup(kBase + off);
    ASSERT_TRUE(l);
    EXPECT_EQ(*l, (GpuLeaf{kBase, kSZ2M, Target::kVram, 4 * kSZ2M, kPermWrite | kPermAtomic}));
  }
  for (uint64_t off = 0; off < 2 * kSZ64K; off += kSZ4K) {
    auto l = pt.lookup(kBase + kSZ2M + off + 123);
    ASSERT_TRUE(l);
    const uint64_t leaf = off / kSZ64K;
    EXPECT_EQ(*l, (GpuLeaf{kBase + kSZ2M + leaf * kSZ64K, kSZ64K, Target::kSystem, 0x100000 + leaf * kSZ64K,
                           kPermWrite}));
  }
  auto small = pt.lookup(kBase + kSZ2M + 2 * kSZ64K);
  ASSERT_TRUE(small);
  EXPECT_EQ(*small, (GpuLeaf{kBase + kSZ2M + 2 * kSZ64K, kSZ4K, Target::kSystem, 0x9000, 0}));
  EXPECT_FALSE(pt.lookup(kBase + kSZ2M + 2 * kSZ64K + kSZ4K));
  EXPECT_FALSE(pt.lookup(kBase - kSZ4K));
  std::vector<GpuLeaf> leaves;
  pt.walk(kBase, kBase + 2 * kSZ2M, [&](const GpuLeaf& l) { leaves.push_back(l); });
  ASSERT_EQ(leaves.size(), 4u);  // 2M, 64K, 64K, 4K in VA order
  EXPECT_EQ(leaves[0].size, kSZ2M);
  EXPECT_EQ(leaves[1].size, kSZ64K);
  EXPECT_EQ(leaves[2].size, kSZ64K);
  EXPECT_EQ(leaves[3].size, kSZ4K);
}

TEST(GpuPageTable, PartialUnmapSplitsA2MiBLeafExactly) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, kSZ2M, kSZ2M, Target::kSystem, 0x40000000, kPermWrite).ok());
  auto r = unmap(pt, kBase + 5 * kSZ4K, 3 * kSZ4K);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r);
  EXPECT_EQ(pt.stats().leaf_splits.get(), 1u);
  for (uint64_t p = 0; p < 512; p++) {
    auto l = pt.lookup(kBase + p * kSZ4K);
    if (p >= 5 && p < 8) {
      EXPECT_FALSE(l) << "page " << p;
      continue;
    }
    ASSERT_TRUE(l) << "page " << p;
    EXPECT_EQ(*l, (GpuLeaf{kBase + p * kSZ4K, kSZ4K, Target::kSystem, 0x40000000 + p * kSZ4K, kPermWrite}));
  }
}

TEST(GpuPageTable, PartialUnmapOfA64KiBLeafLeaves4KiBLeaves) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, kSZ64K, kSZ64K, Target::kVram, kSZ64K, 0).ok());
  ASSERT_TRUE(unmap(pt, kBase, kSZ4K).ok());
  EXPECT_FALSE(pt.lookup(kBase));
  for (uint64_t p = 1; p < 16; p++) {
    auto l = pt.lookup(kBase + p * kSZ4K);
    ASSERT_TRUE(l);
    EXPECT_EQ(*l, (GpuLeaf{kBase + p * kSZ4K, kSZ4K, Target::kVram, kSZ64K + p * kSZ4K, 0}));
  }
}

TEST(GpuPageTable, MappingInsideALargerLeafReplacesOnlyThatPart) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, kSZ2M, kSZ2M, Target::kSystem, 0, 0).ok());
  auto r = map(pt, kBase + kSZ64K, kSZ64K, kSZ64K, Target::kVram, 0, kPermWrite);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r) << "replaced part of a present leaf: the caller must invalidate";
  EXPECT_EQ(pt.lookup(kBase)->size, kSZ4K);
  EXPECT_EQ(pt.lookup(kBase)->target, Target::kSystem);
  EXPECT_EQ(*pt.lookup(kBase + kSZ64K + 8), (GpuLeaf{kBase + kSZ64K, kSZ64K, Target::kVram, 0, kPermWrite}));
  EXPECT_EQ(pt.lookup(kBase + 2 * kSZ64K)->addr, 2 * kSZ64K);
  // Re-mapping the whole 2 MiB as one leaf drops the L0 table into the reservation.
  const uint64_t nodes = pt.nodes();
  ASSERT_TRUE(map(pt, kBase, kSZ2M, kSZ2M, Target::kVram, kSZ2M, 0).ok());
  EXPECT_EQ(pt.nodes(), nodes - 1);
  EXPECT_EQ(pt.lookup(kBase + 7 * kSZ4K)->size, kSZ2M);
}

TEST(GpuPageTable, CommitTakesOnlyReservedNodesAndShortReservationIsEagain) {
  GpuPageTable pt;
  auto empty = pt.reserve(kBase, kBase + kSZ4K, kSZ2M);
  ASSERT_EQ(empty.error(), -EINVAL) << "range not aligned to the leaf";
  auto res = pt.reserve(kBase, kBase + kSZ2M, kSZ2M);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->nodes(), 2u);  // L2 and L1
  // The same reservation is short for 4 KiB leaves (they need an L0 table too).
  auto r = pt.map(&*res, kBase, kBase + kSZ4K, kSZ4K, Target::kSystem, 0, 0);
  EXPECT_EQ(r.error(), -EAGAIN);
  EXPECT_FALSE(pt.lookup(kBase)) << "a refused commit changes nothing";
  EXPECT_EQ(pt.stats().commit_eagain.get(), 1u);
  const uint64_t allocated = pt.stats().nodes_allocated.get();
  ASSERT_TRUE(pt.map(&*res, kBase, kBase + kSZ2M, kSZ2M, Target::kSystem, 0, 0).ok());
  EXPECT_EQ(pt.stats().nodes_allocated.get(), allocated) << "a commit never allocates";
  EXPECT_EQ(res->nodes(), 0u);
}

TEST(GpuPageTable, ReserveFailsCleanlyUnderInjection) {
  GpuPageTable pt;
  fault_inject::ScopedArm arm("refgpu.pt_alloc", {.nth = 2});
  ASSERT_EQ(arm.status(), 0);
  auto res = pt.reserve(kBase, kBase + kSZ4K, kSZ4K);
  EXPECT_EQ(res.error(), -ENOMEM);
  EXPECT_EQ(pt.nodes(), 1u);
  EXPECT_EQ(pt.stats().nodes_allocated.get(), pt.stats().nodes_freed.get()) << "the partial reservation is freed";
}

TEST(GpuPageTable, UnmapEverythingFreesTheTables) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, 3 * kSZ2M, kSZ4K, Target::kSystem, 0, 0).ok());
  EXPECT_EQ(pt.nodes(), 1u + 2u + 3u);
  ASSERT_TRUE(unmap(pt, kBase, 3 * kSZ2M).ok());
  EXPECT_EQ(pt.nodes(), 1u);
  EXPECT_EQ(pt.stats().nodes_allocated.get(), pt.stats().nodes_freed.get());
}

TEST(GpuPageTable, ZapClearsWholeLeavesAndReportsTheExtent) {
  GpuPageTable pt;
  ASSERT_TRUE(map(pt, kBase, kSZ2M, kSZ2M, Target::kSystem, 0, 0).ok());
  ASSERT_TRUE(map(pt, kBase + kSZ2M, kSZ64K, kSZ64K, Target::kSystem, 0, 0).ok());
  ASSERT_TRUE(map(pt, kBase + kSZ2M + kSZ64K, kSZ4K, kSZ4K, Target::kSystem, 0, 0).ok());
  const uint64_t allocated = pt.stats().nodes_allocated.get();
  // One page in the 2 MiB leaf: the whole leaf goes.
  EXPECT_EQ(pt.zap(kBase + kSZ4K, kBase + 2 * kSZ4K), std::make_pair(kBase, kBase + kSZ2M));
  // One page of the 64 KiB leaf: that leaf goes, the 4 KiB leaf after it stays.
  EXPECT_EQ(pt.zap(kBase + kSZ2M + kSZ4K, kBase + kSZ2M + 2 * kSZ4K),
            std::make_pair(kBase + kSZ2M, kBase + kSZ2M + kSZ64K));
  EXPECT_TRUE(pt.lookup(kBase + kSZ2M + kSZ64K));
  EXPECT_EQ(pt.zap(kBase + 8 * kSZ2M, kBase + 9 * kSZ2M), std::make_pair(uint64_t{0}, uint64_t{0}));
  EXPECT_EQ(pt.stats().nodes_allocated.get(), allocated) << "a zap never allocates";
}

TEST(GpuPageTable, BadArgumentsAreEinval) {
  GpuPageTable pt;
  auto res = pt.reserve(kBase, kBase + kSZ2M, kSZ4K);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(pt.map(&*res, kBase, kBase, kSZ4K, Target::kSystem, 0, 0).error(), -EINVAL);
  EXPECT_EQ(pt.map(&*res, kBase + 1, kBase + kSZ4K, kSZ4K, Target::kSystem, 0, 0).error(), -EINVAL);
  EXPECT_EQ(pt.map(&*res, kBase, kBase + kSZ64K, kSZ64K, Target::kSystem, kSZ4K, 0).error(), -EINVAL);
  EXPECT_EQ(pt.map(&*res, kBase, kBase + kSZ4K, 8192, Target::kSystem, 0, 0).error(), -EINVAL);
  EXPECT_EQ(pt.map(&*res, kBase, kBase + kSZ4K, kSZ4K, Target::kSystem, 0, 0x80).error(), -EINVAL);
  EXPECT_EQ(pt.map(&*res, GpuPageTable::kVaLimit, GpuPageTable::kVaLimit + kSZ4K, kSZ4K, Target::kSystem, 0, 0)
                .error(),
            -EINVAL);
  EXPECT_EQ(pt.reserve(0, GpuPageTable::kVaLimit + kSZ4K, 0).error(), -EINVAL);
  EXPECT_EQ(pt.reserve(kBase, kBase + kSZ4K, 3).error(), -EINVAL);
  EXPECT_EQ(pt.unmap(&*res, kBase + 1, kBase + kSZ4K).error(), -EINVAL);
  EXPECT_FALSE(pt.lookup(kBase));
}

// Random maps (every leaf size, both targets), unmaps and zaps, checked page by page against
// a reference map after every step. Seeded and replayable.
TEST(GpuPageTable, RandomOperationsMatchAReferenceMap) {
  const uint64_t seed = 0x9a7ab1e;
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr uint64_t kSpan = 8 * kSZ2M;  // crosses 2 MiB slots; one 1 GiB table
  struct Page {
    Target target;
    uint64_t addr;
    uint8_t perms;
    uint64_t leaf;  // leaf size it belongs to
    uint64_t leaf_va;
  };
  std::map<uint64_t, Page> ref;  // page va -> what it translates to
  GpuPageTable pt;
  for (int step = 0; step < 400; step++) {
    const int kind = static_cast<int>(rng() % 5);
    const uint64_t leaves[] = {kSZ4K, kSZ64K, kSZ2M};
    if (kind <= 2) {
      const uint64_t leaf = leaves[rng() % 3];
      const uint64_t n = 1 + rng() % (leaf == kSZ2M ? 2 : 8);
      const uint64_t start = kBase + (rng() % (kSpan / leaf - n + 1)) * leaf;
      const Target t = rng() % 2 ? Target::kVram : Target::kSystem;
      const uint64_t addr = (rng() % 64) * kSZ2M + (rng() % (kSZ2M / leaf)) * leaf;
      const uint8_t perms = static_cast<uint8_t>(rng() % 4);
      ASSERT_TRUE(map(pt, start, n * leaf, leaf, t, addr, perms).ok()) << "step " << step;
      // A larger leaf partly replaced becomes 4 KiB leaves in the reference too.
      for (auto& [va, pg] : ref) {
        const bool overlaps = pg.leaf_va < start + n * leaf && start < pg.leaf_va + pg.leaf;
        if (overlaps && (pg.leaf_va < start || pg.leaf_va + pg.leaf > start + n * leaf)) {
          pg.leaf = kSZ4K;
          pg.leaf_va = va;
        }
      }
      for (uint64_t off = 0; off < n * leaf; off += kSZ4K)
        ref[start + off] = {t, addr + off, perms, leaf, start + (off / leaf) * leaf};
    } else if (kind == 3) {
      const uint64_t n = 1 + rng() % 40;
      const uint64_t start = kBase + (rng() % (kSpan / kSZ4K - n + 1)) * kSZ4K;
      ASSERT_TRUE(unmap(pt, start, n * kSZ4K).ok());
      for (auto& [va, pg] : ref) {
        if (pg.leaf_va < start + n * kSZ4K && start < pg.leaf_va + pg.leaf) {
          pg.leaf = kSZ4K;
          pg.leaf_va = va;
        }
      }
      for (uint64_t va = start; va < start + n * kSZ4K; va += kSZ4K) ref.erase(va);
    } else {
      const uint64_t n = 1 + rng() % 40;
      const uint64_t start = kBase + (rng() % (kSpan / kSZ4K - n + 1)) * kSZ4K;
      auto [lo, hi] = pt.zap(start, start + n * kSZ4K);
      // Exactly the leaves that intersect the range, whole.
      uint64_t want_lo = ~0ull;
      uint64_t want_hi = 0;
      for (const auto& [va, pg] : ref) {
        if (pg.leaf_va < start + n * kSZ4K && start < pg.leaf_va + pg.leaf) {
          want_lo = std::min(want_lo, pg.leaf_va);
          want_hi = std::max(want_hi, pg.leaf_va + pg.leaf);
        }
      }
      if (want_hi == 0) {
        ASSERT_EQ(hi, 0u);
      } else {
        ASSERT_EQ(lo, want_lo) << "step " << step;
        ASSERT_EQ(hi, want_hi) << "step " << step;
      }
      for (auto it = ref.begin(); it != ref.end();) {
        const Page& pg = it->second;
        if (pg.leaf_va < start + n * kSZ4K && start < pg.leaf_va + pg.leaf)
          it = ref.erase(it);
        else
          ++it;
      }
    }
    for (uint64_t va = kBase; va < kBase + kSpan; va += kSZ4K) {
      auto l = pt.lookup(va);
      auto it = ref.find(va);
      if (it == ref.end()) {
        ASSERT_FALSE(l) << "step " << step << " va " << std::hex << va;
        continue;
      }
      ASSERT_TRUE(l) << "step " << step << " va " << std::hex << va;
      const Page& pg = it->second;
      ASSERT_EQ(l->target, pg.target) << "step " << step;
      ASSERT_EQ(l->addr + (va - l->va), pg.addr) << "step " << step << " va " << std::hex << va;
      ASSERT_EQ(l->perms, pg.perms);
      ASSERT_EQ(l->size, pg.leaf) << "step " << step << " va " << std::hex << va;
      ASSERT_EQ(l->va, pg.leaf_va);
    }
  }
}

}  // namespace
}  // namespace gpusvm::refgpu
