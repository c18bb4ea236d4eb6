// VramPagemap: VRAM as an svm device pagemap. A THP and 4 KiB pages of a process range move
// into VRAM through an svm::Gpusvm range (populate_mm, get_pages mapping them in place) and
// back by CPU faults; every byte checked in system memory and in VRAM; statistics; failure
// injection at each point of the migration rolls back (bytes where they were, VRAM free).
#include <gtest/gtest.h>

#include "drivers/refgpu/vram_pagemap.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "tests/refgpu/vram_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

using VramPagemapTest = VramTest;

TEST_F(VramPagemapTest, ThpAndSmallPagesMigrateToVramAndBackByCpuFault) {
  const mm::Va thp = kBase, small = kBase + 4 * k2M;
  map_at(thp, k2M, /*huge=*/true);
  map_at(small, 16 * k4K);
  fill_bytes(*as, thp, k2M, 1);
  fill_bytes(*as, small, 16 * k4K, 2);

  int mrc = -1;
  Result<svm::RangeRef> r = svm->fault(thp, true, &mrc);
  ASSERT_TRUE(r.ok()) << r.error();
  ASSERT_EQ(mrc, 0);
  ASSERT_EQ((*r)->size(), k2M);
  {
    ReadLock g(&svm->gpusvm()->notifier_lock());
    const svm::Pages& p = (*r)->pages(0);
    ASSERT_TRUE(p.has_devmem_pages());
    // A THP got a 2 MiB block: one compound device folio, mapped as one 2 MiB entry.
    ASSERT_EQ(p.addr(0).proto, svm::PagemapAddrProto::kDeviceLocal);
    EXPECT_EQ(p.addr(0).order, mm::kPmdOrder);
    EXPECT_EQ(p.addr(0).addr % k2M, 0u);
    EXPECT_EQ(bad_vram_bytes(region->arena(), p.addr(0).addr, thp, k2M, 1), 0);
  }
  EXPECT_EQ(vram_pages(r->get()), k2M / k4K);
  EXPECT_EQ(dev->dma_mappings(), 0u) << "VRAM pages need no system DMA mapping";

  Result<svm::RangeRef> r2 = svm->fault(small, true, &mrc);
  ASSERT_TRUE(r2.ok()) << r2.error();
  ASSERT_EQ(mrc, 0);
  ASSERT_EQ((*r2)->size(), 16 * k4K);
  EXPECT_EQ(vram_pages(r2->get()), 16u);
  {
    ReadLock g(&svm->gpusvm()->notifier_lock());
    const svm::Pages& p = (*r2)->pages(0);
    uint64_t page = 0;
    for (uint32_t e = 0; e < p.nr_addrs(); e++) {
      const svm::PagemapAddr& a = p.addr(e);
      ASSERT_EQ(a.proto, svm::PagemapAddrProto::kDeviceLocal);
      const uint64_t len = k4K << a.order;
      EXPECT_EQ(bad_vram_bytes(region->arena(), a.addr, small + page * k4K, len, 2), 0) << "entry " << e;
      page += 1ULL << a.order;
    }
  }
  EXPECT_EQ(region->buddy().used_bytes(), k2M + 16 * k4K);
  EXPECT_EQ(vram->lru().linked_count(), 2u);
  EXPECT_EQ(vram->stats().allocations.get(), 2u);
  EXPECT_EQ(vram->stats().migrations_to_vram.get(), 2u);
  EXPECT_EQ(vram->stats().bytes_to_vram.get(), k2M + 16 * k4K);
  EXPECT_EQ(copy->stats().bytes_to_vram.get(), k2M + 16 * k4K);
  EXPECT_GT(vram->live_device_maps(), 0);

  // The CPU reads every byte: device-private entries fault, migrate_to_ram copies them back.
  EXPECT_EQ(bad_bytes(*as, thp, k2M, 1), 0);
  EXPECT_EQ(bad_bytes(*as, small, 16 * k4K, 2), 0);
  EXPECT_GE(vram->stats().migrations_to_ram.get(), 2u);
  EXPECT_EQ(vram->stats().bytes_to_ram.get(), k2M + 16 * k4K);
  // Every page went back: both allocations released, VRAM free, nothing left on the LRU, the
  // GPU mappings were invalidated on the way.
  EXPECT_EQ(region->buddy().used_bytes(), 0u);
  EXPECT_EQ(vram->lru().linked_count(), 0u);
  EXPECT_EQ(vram->live_device_maps(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  // And the CPU can write again (the pages are ordinary system pages).
  fill_bytes(*as, thp, k2M, 3);
  EXPECT_EQ(bad_bytes(*as, thp, k2M, 3), 0);
}

TEST_F(VramPagemapTest, HolesMigrateAsZeroesAndDevmemFnBumpsTheLru) {
  const mm::Va a = kBase, b = kBase + 2 * k2M;
  map_at(a, 16 * k4K);
  map_at(b, 16 * k4K);
  fill_bytes(*as, a, 8 * k4K, 4);  // the upper half is never touched: holes
  fill_bytes(*as, b, 16 * k4K, 5);
  int mrc = -1;
  ASSERT_TRUE(svm->fault(a, true, &mrc).ok());
  ASSERT_EQ(mrc, 0);
  ASSERT_TRUE(svm->fault(b, true, &mrc).ok());
  ASSERT_EQ(mrc, 0);
  std::vector<VramLruEntry*> order = vram->lru().snapshot();
  ASSERT_EQ(order.size(), 2u);
  VramLruEntry* lru_a = order[0];  // migrated first: the least recently used
  // Map a's pages again (unmap, then get_pages): devmem_fn moves a to the most-recent end.
  const uint64_t touches = vram->stats().lru_touches.get();
  {
    Result<svm::RangeRef> r = svm->fault(a, false);
    ASSERT_TRUE(r.ok());
    MutexLock g(&svm->lock());
    svm->gpusvm()->range_unmap_pages(r->get(), svm::Ctx{});
    ASSERT_EQ(svm->gpusvm()->range_get_pages(r->get(), svm->ctx()), 0);
    EXPECT_EQ(vram_pages(r->get()), 16u);
  }
  EXPECT_GT(vram->stats().lru_touches.get(), touches);
  order = vram->lru().snapshot();
  ASSERT_EQ(order.size(), 2u);
  EXPECT_EQ(order[1], lru_a) << "the range just mapped is the most recently used";
  // Holes read as zeroes, data as written.
  std::vector<uint8_t> zero(8 * k4K, 0), got(8 * k4K);
  ASSERT_EQ(mm::cpu::copy_out(*as, a + 8 * k4K, got.data(), got.size()), 0);
  EXPECT_EQ(got, zero);
  EXPECT_EQ(bad_bytes(*as, a, 8 * k4K, 4), 0);
  EXPECT_EQ(bad_bytes(*as, b, 16 * k4K, 5), 0);
}

// Each failure point of the migration into VRAM: the migration fails, every byte stays in
// system memory, the VRAM is free again and nothing is linked.
TEST_F(VramPagemapTest, InjectedFailuresRollBack) {
  const char* points[] = {"refgpu.vram_alloc", "refgpu.vram_populate_pfn", "refgpu.copy"};
  mm::Va va = kBase;
  for (const char* point : points) {
    SCOPED_TRACE(point);
    map_at(va, k2M, true);
    fill_bytes(*as, va, k2M, 6);
    ASSERT_EQ(fault_inject::arm(point, {.nth = 1}), 0);
    int mrc = 0;
    Result<svm::RangeRef> r = svm->fault(va, true, &mrc);
    fault_inject::disarm_all();
    EXPECT_NE(mrc, 0);
    ASSERT_TRUE(r.ok()) << r.error();  // get_pages maps the system pages instead
    EXPECT_EQ(vram_pages(r->get()), 0u);
    EXPECT_EQ(region->buddy().used_bytes(), 0u);
    EXPECT_EQ(vram->lru().linked_count(), 0u);
    EXPECT_EQ(bad_bytes(*as, va, k2M, 6), 0);
    EXPECT_MM_CHECK_OK(*mem);
    // The next attempt succeeds.
    ASSERT_TRUE(svm->fault(va, true, &mrc).ok());
    EXPECT_EQ(mrc, 0);
    EXPECT_EQ(region->buddy().used_bytes(), k2M);
    EXPECT_EQ(bad_bytes(*as, va, k2M, 6), 0);
    EXPECT_EQ(region->buddy().used_bytes(), 0u);
    va += 2 * k2M;
  }
  EXPECT_GE(vram->stats().allocation_failures.get(), 1u);
}

TEST_F(VramPagemapTest, CreateValidatesArguments) {
  EXPECT_EQ(VramPagemap::create(nullptr, dev.get(), region.get(), copy.get(), {}).error(), -EINVAL);
  EXPECT_EQ(VramPagemap::create(mem.get(), nullptr, region.get(), copy.get(), {}).error(), -EINVAL);
  Result<std::unique_ptr<VramRegion>> other = VramRegion::create(2, k2M);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(VramPagemap::create(mem.get(), dev.get(), other->get(), copy.get(), {}).error(), -EINVAL)
      << "a copy engine over another region's arena";
  EXPECT_EQ(vram->alloc_vram(0).error(), -EINVAL);
  EXPECT_EQ(vram->alloc_vram(k4K + 1).error(), -EINVAL);
  EXPECT_EQ(vram->alloc_vram(k4K, k64K).error(), -EINVAL);
  EXPECT_EQ(vram->alloc(as.get(), 0).error(), -EINVAL);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
