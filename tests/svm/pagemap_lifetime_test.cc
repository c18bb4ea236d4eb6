// Pagemap lifetime (destroy deferred from folio_free), the residency timeslice, and a fork
// child touching device pages.
#include <chrono>
#include <thread>

#include "gpusvm/base/lock.h"
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using Clock = std::chrono::steady_clock;

// The driver lets go of its pagemap while device pages are live: the pagemap outlives it
// until the last page is freed, and that last put (from folio_free, in a zap under
// page-table locks) defers the destroy to the worker.
TEST_F(PagemapTest, TeardownWithLiveDevicePagesDefersDestroy) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  ASSERT_EQ(migrate(va, len), 0);
  Pagemap* pm = vram->pagemap();
  EXPECT_EQ(pm->refcount(), 2);  // the driver's and the allocation's
  vram->put_pagemap();
  pagemap_flush_destroy_work();
  EXPECT_EQ(vram->destroyed.load(), 0);
  EXPECT_EQ(pm->refcount(), 1);
  // Still usable: the device pages lead to it and the data is there.
  EXPECT_EQ(page_to_pagemap(mem->pfn_to_page(pfn_at(*as, va))), pm);
  EXPECT_EQ(device_bad_words(*as, *vram, va, len, 1), 0u);
  // munmap frees the pages in the zap: the last put comes from folio_free.
  ASSERT_EQ(as->munmap(va, len), 0);
  EXPECT_TRUE(last->released());
  pagemap_flush_destroy_work();
  EXPECT_EQ(vram->destroyed.load(), 1);
  EXPECT_NE(vram->destroy_tid.load(), current_tid()) << "destroy ran in the zap, not on the worker";
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, LastPutFromTheDriverDestroysInline) {
  vram->put_pagemap();
  EXPECT_EQ(vram->destroyed.load(), 1);
  EXPECT_EQ(vram->destroy_tid.load(), current_tid());
}

TEST_F(PagemapTest, PagemapRefCountsAndReleases) {
  Pagemap* pm = vram->pagemap();
  {
    PagemapRef a = PagemapRef::get(pm);
    EXPECT_EQ(pm->refcount(), 2);
    PagemapRef b = a;
    EXPECT_EQ(pm->refcount(), 3);
    PagemapRef c = std::move(b);
    EXPECT_FALSE(b);
    EXPECT_EQ(c.get(), pm);
    EXPECT_EQ(pm->refcount(), 3);
    c.reset();
    EXPECT_EQ(pm->refcount(), 2);
  }
  EXPECT_EQ(pm->refcount(), 1);
  EXPECT_EQ(vram->destroyed.load(), 0);
  pm->get();
  PagemapRef adopted = PagemapRef::adopt(pm);
  EXPECT_EQ(pm->refcount(), 2);
}

// An address space that has exited: nothing to migrate into, the allocation is consumed.
TEST_F(PagemapTest, ExitedAddressSpaceIsEfault) {
  const Va va = map_anon(*as, 4 * kPageSize);
  fill_bytes(*as, va, 4 * kPageSize, 9);
  TestDevmem* dm = vram->alloc_devmem(as.get(), 4 * kPageSize);
  as->exit();
  EXPECT_EQ(migrate_to_devmem(dm, as.get(), va, va + 4 * kPageSize, {}), -EFAULT);
  EXPECT_TRUE(dm->released());
  EXPECT_EQ(vram->pagemap()->populate_mm(va, va + 4 * kPageSize, as.get(), 0), -EFAULT);
  EXPECT_EQ(evict_to_ram(dm), 0);  // detached: nothing left to evict
  EXPECT_EQ(vram->free_pages(), kVramPages);
}

// A CPU fault before the timeslice expires leaves the pages in device memory (upstream
// returns without migrating and the access faults again) until the time is up.
TEST_F(PagemapTest, TimesliceKeepsPagesUntilItExpires) {
  const uint64_t len = 4 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 2);
  constexpr auto kSlice = std::chrono::milliseconds(150);
  ASSERT_EQ(migrate(va, len, MigrateDetails{.timeslice_ms = 150}), 0);
  const auto t0 = Clock::now();
  const uint64_t deferred = pagemap_stats().timeslice_deferred.load();
  // Another thread looks while the CPU access is being held off: still in device memory.
  std::atomic<bool> done{false};
  std::thread cpu([&] {
    EXPECT_EQ(cpu_bad_words(*as, va, kPageSize, 2), 0u);
    done = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (!done) {
    EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kSoftLeaf);
    EXPECT_FALSE(last->released());
  }
  cpu.join();
  EXPECT_GE(Clock::now() - t0, kSlice - std::chrono::milliseconds(5));
  EXPECT_GT(pagemap_stats().timeslice_deferred.load(), deferred);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, len, 2), 0u);
  // Without a timeslice the first fault migrates.
  ASSERT_EQ(migrate(va, len), 0);
  const uint64_t deferred2 = pagemap_stats().timeslice_deferred.load();
  EXPECT_EQ(cpu_bad_words(*as, va, len, 2), 0u);
  EXPECT_EQ(pagemap_stats().timeslice_deferred.load(), deferred2);
  EXPECT_MM_CHECK_OK(*mem);
}

// Eviction is the driver's decision: the timeslice does not hold it off.
TEST_F(PagemapTest, EvictionIgnoresTheTimeslice) {
  const uint64_t len = 4 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 3);
  ASSERT_EQ(migrate(va, len, MigrateDetails{.timeslice_ms = 60000}), 0);
  const auto t0 = Clock::now();
  EXPECT_EQ(evict_to_ram(last), 0);
  EXPECT_LT(Clock::now() - t0, std::chrono::seconds(5));
  EXPECT_EQ(system_pages(*as, va, len), 4u);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 3), 0u);
}

// fork shares the device pages copy-on-write: the child reads them (bringing them back for
// both), writes its own copy, and the parent keeps its bytes.
TEST_F(PagemapTest, ForkChildTouchesDevicePages) {
  const uint64_t len = 8 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 4);
  ASSERT_EQ(migrate(va, len), 0);
  Result<std::unique_ptr<mm::AddressSpace>> child = as->fork();
  ASSERT_TRUE(child);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(device_bad_words(**child, *vram, va, len, 4), 0u);  // the child maps the same pages
  EXPECT_EQ(cpu_bad_words(**child, va, len, 4), 0u);
  EXPECT_TRUE(last->released());
  fill_bytes(**child, va, 2 * kPageSize, 5);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 4), 0u);
  EXPECT_EQ(cpu_bad_words(**child, va, 2 * kPageSize, 5), 0u);
  EXPECT_EQ(cpu_bad_words(**child, va + 2 * kPageSize, len - 2 * kPageSize, 4), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  // Pages still shared with the child move for both (the migration unmaps every mapping
  // through the reverse map, as Linux's try_to_migrate): each sees them in device memory.
  ASSERT_EQ(migrate(va + 4 * kPageSize, 4 * kPageSize), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, va + 4 * kPageSize, 4 * kPageSize, 4), 0u);
  EXPECT_EQ(device_bad_words(**child, *vram, va + 4 * kPageSize, 4 * kPageSize, 4), 0u);
  fill_bytes(**child, va + 5 * kPageSize, kPageSize, 6);  // the child's write faults and copies
  EXPECT_EQ(cpu_bad_words(*as, va, len, 4), 0u);
  EXPECT_EQ(cpu_bad_words(**child, va + 5 * kPageSize, kPageSize, 6), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  (*child)->exit();
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing
