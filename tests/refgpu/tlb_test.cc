// The device TLB and the GPU MMU: fills and hits, exact invalidation, permission faults, the
// invalidation fence, and the fill-vs-zap window.
#include "drivers/refgpu/tlb.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "gpusvm/base/sched_point.h"
#include "refgpu_test_util.h"

namespace gpusvm::refgpu {
namespace {

using testing::kVa;
using testing::Rig;

int translate(Rig& r, uint64_t va, Access a, Translation* t, FaultType* f) {
  ReadLock g(&r.tlb.access_lock());
  return r.mmu->translate(va, a, t, f);
}

TEST(GpuMmu, TranslatesThroughTheTlbAndFaultsOnMissesAndPermissions) {
  Rig r;
  r.map_system(kVa, kSZ4K, 0);  // read-only
  r.map_vram(kVa + kSZ2M, kSZ2M, 0, kSZ2M);
  Translation t;
  FaultType f;
  ASSERT_EQ(translate(r, kVa + 8, Access::kRead, &t, &f), 0);
  EXPECT_EQ(t.len, kSZ4K - 8);
  EXPECT_EQ(t.host, r.host(kVa + 8));
  EXPECT_EQ(r.tlb.stats().misses.get(), 1u);
  ASSERT_EQ(translate(r, kVa + 16, Access::kRead, &t, &f), 0);
  EXPECT_EQ(r.tlb.stats().hits.get(), 1u) << "the second access hits the cached leaf";
  EXPECT_EQ(translate(r, kVa, Access::kWrite, &t, &f), -EFAULT);
  EXPECT_EQ(f, FaultType::kPermission);
  EXPECT_EQ(translate(r, kVa, Access::kAtomic, &t, &f), -EFAULT);
  EXPECT_EQ(f, FaultType::kPermission);
  EXPECT_EQ(translate(r, kVa + kSZ4K, Access::kRead, &t, &f), -EFAULT);
  EXPECT_EQ(f, FaultType::kNotPresent);
  ASSERT_EQ(translate(r, kVa + kSZ2M + 12345, Access::kAtomic, &t, &f), 0);
  EXPECT_EQ(t.host, r.vram->data(12345));
  EXPECT_EQ(t.len, kSZ2M - 12345);
}

TEST(GpuMmu, UnbackedTargetIsEio) {
  Rig r;
  auto res = r.pt.reserve(kVa, kVa + kSZ4K, kSZ4K);
  ASSERT_TRUE(res.ok());
  ASSERT_TRUE(r.pt.map(&*res, kVa, kVa + kSZ4K, kSZ4K, Target::kVram, 1ull << 40, 0).ok());
  Translation t;
  FaultType f;
  EXPECT_EQ(translate(r, kVa, Access::kRead, &t, &f), -EIO);
}

// Three leaves cached; an invalidation of part of the middle one drops that one only.
TEST(Tlb, InvalidationIsExact) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  r.map_vram(kVa + kSZ64K, kSZ64K, 0, kSZ64K);
  r.map_vram(kVa + kSZ2M, kSZ2M, kSZ2M, kSZ2M);
  Translation t;
  FaultType f;
  for (uint64_t va : {kVa, kVa + kSZ64K, kVa + kSZ2M}) ASSERT_EQ(translate(r, va, Access::kRead, &t, &f), 0);
  ASSERT_EQ(r.tlb.entries(), 3u);
  const uint64_t inv = r.tlb.stats().invalidations.get();
  EXPECT_EQ(r.tlb.invalidate(kVa + kSZ64K + 3 * kSZ4K, kVa + kSZ64K + 4 * kSZ4K), 1u);
  EXPECT_EQ(r.tlb.stats().invalidations.get(), inv + 1);
  EXPECT_FALSE(r.tlb.lookup(kVa + kSZ64K));
  EXPECT_TRUE(r.tlb.lookup(kVa));
  EXPECT_TRUE(r.tlb.lookup(kVa + kSZ2M + kSZ2M - 1));
  // A range touching nothing cached drops nothing; the boundary is exclusive.
  EXPECT_EQ(r.tlb.invalidate(kVa + kSZ4K, kVa + kSZ64K), 0u);
  EXPECT_EQ(r.tlb.invalidate(kVa + 2 * kSZ2M, kVa + 3 * kSZ2M), 0u);
  EXPECT_EQ(r.tlb.entries(), 2u);
  EXPECT_EQ(r.tlb.invalidate_all(), 2u);
}

TEST(Tlb, CapacityEvictsTheLowestEntry) {
  Tlb tlb(2);
  GpuPageTable pt;
  ReadLock g(&pt.lock());
  tlb.fill(pt, {kVa, kSZ4K, Target::kSystem, 0, 0});
  tlb.fill(pt, {kVa + kSZ4K, kSZ4K, Target::kSystem, 0, 0});
  tlb.fill(pt, {kVa + 2 * kSZ4K, kSZ4K, Target::kSystem, 0, 0});
  EXPECT_EQ(tlb.entries(), 2u);
  EXPECT_FALSE(tlb.lookup(kVa));
  EXPECT_EQ(tlb.stats().capacity_evictions.get(), 1u);
}

// The invalidation fence: invalidate() does not return while an access that translated
// before it is still in flight.
//   1. the "engine" (this thread) translates and holds the access lock, as during an access;
//   2. another thread invalidates: it must still be waiting;
//   3. the access ends: the invalidation returns.
TEST(Tlb, InvalidationWaitsForAccessesInFlight) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  std::atomic<bool> returned{false};
  std::thread inv;
  {
    ReadLock access(&r.tlb.access_lock());
    Translation t;
    FaultType f;
    ASSERT_EQ(r.mmu->translate(kVa, Access::kWrite, &t, &f), 0);
    inv = std::thread([&] {
      r.tlb.invalidate(kVa, kVa + kSZ4K);
      returned.store(true);
    });
    // The entry is dropped at once, the call waits for the fence.
    for (int i = 0; i < 1000 && r.tlb.entries() != 0; i++) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    EXPECT_EQ(r.tlb.entries(), 0u);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_FALSE(returned.load()) << "invalidate() returned while an access was in flight";
  }
  inv.join();
  EXPECT_TRUE(returned.load());
}

// A walk that read a leaf before a zap must not cache it after the zap's invalidation:
//   1. engine: walks the table (shared lock), stops at refgpu.mmu.walked before the fill;
//   2. invalidator: zaps the page and invalidates the TLB (the zap waits for the table lock);
//   3. engine: goes on, fills, finishes its access;
//   4. the TLB holds no entry for the page and a new translation faults.
// If the fill happened after the table lock was dropped, step 2 would complete inside the
// window and step 3 would cache the zapped leaf.
TEST(Tlb, FillCannotOvertakeAZap) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  sched_point::Pause pause("refgpu.mmu.walked");
  ASSERT_EQ(pause.status(), 0);
  std::thread engine([&] {
    Translation t;
    FaultType f;
    EXPECT_EQ(translate(r, kVa, Access::kRead, &t, &f), 0);
  });
  ASSERT_TRUE(pause.wait_reached());
  std::thread invalidator([&] {
    auto [lo, hi] = r.pt.zap(kVa, kVa + kSZ4K);
    EXPECT_EQ(lo, kVa);
    r.tlb.invalidate(lo, hi);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  pause.release();
  engine.join();
  invalidator.join();
  EXPECT_FALSE(r.tlb.lookup(kVa)) << "a stale translation survived the zap's invalidation";
  Translation t;
  FaultType f;
  EXPECT_EQ(translate(r, kVa, Access::kRead, &t, &f), -EFAULT);
}

}  // namespace
}  // namespace gpusvm::refgpu
