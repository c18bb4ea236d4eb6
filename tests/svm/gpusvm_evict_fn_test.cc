// range_evict's -ETIME budget (a device page that cannot be migrated back keeps every walk
// colliding) and devmem_fn (called under the notifier lock once per contiguous run of pages
// of one device allocation).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/devmem.h"
#include "tests/svm/pagemap_test_util.h"
#include "tests/svm/svm_test_util.h"
#include "tests/svm/test_vram.h"

namespace gpusvm::svm::testing {
namespace {

class SvmEvictFnTest : public SvmTest {
 protected:
  void SetUp() override {
    SvmTest::SetUp();
    vram = std::make_unique<TestVram>(mem.get(), 8 * mm::kPagesPerPmd, "vram0");
    ASSERT_TRUE(vram->ok());
    make_gpu({.owner = vram->pagemap()->owner(), .use_devices = {vram->device()}});
  }
  void TearDown() override {
    gpu->unbind_all();
    EXPECT_EQ(gpu->device()->dma_mappings(), 0u);
    gpu.reset();
    EXPECT_EQ(vram->live_device_maps.load(), 0);
    if (as) as->exit();
    vram.reset();
    SvmTest::TearDown();
  }
  int migrate(mm::Va va, uint64_t len) {
    TestDevmem* dm = vram->alloc_devmem(as.get(), len);
    if (!dm) return -ENOMEM;
    return migrate_to_devmem(dm, as.get(), va, va + len, {});
  }
  std::unique_ptr<TestVram> vram;
};

// range_evict's budget: a device page whose folio lock another thread holds makes the CPU
// fault of the eviction walk wait; the holder lets go only after the 1 s budget, the page
// then moves, its MIGRATE invalidation makes the walk collide (-EBUSY), and range_evict
// finds its deadline passed: -ETIME, deterministically. The data is intact either way, and a
// second call succeeds.
TEST_F(SvmEvictFnTest, RangeEvictTimesOutWhileAPageCannotMove) {
  const uint64_t len = 16 * k4K;
  map_at(kBase, len);
  fill_bytes(*as, kBase, len, 1);
  ASSERT_EQ(migrate(kBase, len), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  ASSERT_TRUE(r);
  ASSERT_EQ(r->size(), len) << "the re-fault of device pages kept the 64 KiB chunk";
  mm::Folio* busy = mem->pfn_to_page(pfn_at(*as, kBase + 5 * k4K))->head();
  ASSERT_TRUE(vram->dev_pagemap()->contains(busy->pfn()));
  using Clock = std::chrono::steady_clock;
  const auto budget = std::chrono::milliseconds(kHmmRangeDefaultTimeoutMs);
  // The holder is another thread: the evicting one must not hold a folio lock (the mmap lock
  // ranks above it).
  std::atomic<bool> held{false};
  std::atomic<Clock::rep> t0{0};
  std::thread holder([&] {
    mm::folio_lock(busy);
    held = true;
    const auto limit = Clock::now() + std::chrono::seconds(10);
    while (Clock::now() < limit &&
           (t0.load() == 0 || Clock::now() < Clock::time_point(Clock::duration(t0.load())) + budget + budget / 5)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    mm::folio_unlock(busy);
  });
  const auto wait_limit = Clock::now() + std::chrono::seconds(10);
  while (!held && Clock::now() < wait_limit) std::this_thread::yield();
  ASSERT_TRUE(held) << "the holder never locked the folio";
  const auto start = Clock::now();
  t0 = start.time_since_epoch().count();
  const int rc = gpu->gpusvm()->range_evict(r.get());
  const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  holder.join();
  EXPECT_EQ(rc, -ETIME);
  EXPECT_GE(took, budget);
  EXPECT_LT(took, std::chrono::seconds(5));
  EXPECT_GE(r->stats().evictions.get(), 1u);
  EXPECT_EQ(cpu_bad_words(*as, kBase, len, 1), 0u);
  ASSERT_EQ(gpu->gpusvm()->range_evict(r.get()), 0);
  EXPECT_EQ(system_pages(*as, kBase, len), 16u);
  EXPECT_EQ(cpu_bad_words(*as, kBase, len, 1), 0u);
  EXPECT_EQ(vram->free_pages(), 8 * mm::kPagesPerPmd);
  r.reset();
  EXPECT_MM_CHECK_OK(*mem);
}

struct FnRun {
  Pagemap* pagemap;
  mm::Pfn first;
  uint64_t npages;
  const void* allocation;  // the pages' zone_device_data
};

// devmem_fn runs once per contiguous run of one allocation, under the notifier lock; a run
// never spans two allocations nor a pfn gap.
TEST_F(SvmEvictFnTest, DevmemFnOncePerContiguousRunOfOneAllocation) {
  const uint64_t len = 16 * k4K;
  map_at(kBase, len);
  fill_bytes(*as, kBase, len, 2);
  ASSERT_EQ(migrate(kBase, len / 2), 0);             // allocation A: 8 contiguous pages
  vram->fragmented = true;
  ASSERT_EQ(migrate(kBase + len / 2, len / 2), 0);  // allocation B: 8 scattered pages
  std::vector<FnRun> runs;
  runs.reserve(64);  // nothing allocates under the notifier lock
  bool locked = true;
  Ctx ctx;
  ctx.devmem_fn = [&](Pagemap* pm, mm::Folio* first, uint64_t n) {
    locked = locked && gpu->gpusvm()->notifier_lock().held_by_me();
    runs.push_back({pm, first->pfn(), n, first->zone_device_data});
  };
  ASSERT_EQ(gpu->fault(kBase, true, ctx), 0);
  EXPECT_TRUE(locked) << "devmem_fn ran without the notifier lock";
  // A: one run of 8. B: its pages are not pfn-contiguous, so one run per page (8).
  ASSERT_EQ(runs.size(), 9u);
  EXPECT_EQ(runs[0].npages, 8u);
  EXPECT_EQ(runs[0].first, pfn_at(*as, kBase));
  uint64_t total = 0;
  for (size_t i = 0; i < runs.size(); i++) {
    const FnRun& run = runs[i];
    EXPECT_EQ(run.pagemap, vram->pagemap());
    total += run.npages;
    // Every page of a run: contiguous and of the run's allocation.
    for (uint64_t j = 0; j < run.npages; j++) {
      EXPECT_EQ(mem->pfn_to_page(run.first + j)->zone_device_data, run.allocation) << i;
    }
    if (i > 0) {
      EXPECT_EQ(runs[i].npages, 1u) << i;
    }
    if (i > 1) {
      EXPECT_NE(runs[i].first, runs[i - 1].first + 1) << i;
    }
  }
  EXPECT_EQ(total, 16u);
  EXPECT_NE(runs[0].allocation, runs[1].allocation);
  EXPECT_EQ(gpu->check_ptes(), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, kBase, len, 2), 0u);
  // A fault that finds the pages still valid calls it again with the same runs (why it must
  // be safe to repeat: an LRU bump per GPU fault).
  const std::vector<FnRun> first = runs;
  runs.clear();
  ASSERT_EQ(gpu->fault(kBase, true, ctx), 0);
  ASSERT_EQ(runs.size(), first.size());
  for (size_t i = 0; i < runs.size(); i++) {
    EXPECT_EQ(runs[i].first, first[i].first) << i;
    EXPECT_EQ(runs[i].npages, first[i].npages) << i;
  }
  runs.clear();
  // System pages get no call: after eviction the next fault maps system memory only.
  RangeRef r = find(kBase);
  ASSERT_EQ(gpu->gpusvm()->range_evict(r.get()), 0);
  r.reset();
  ASSERT_EQ(gpu->fault(kBase, true, ctx), 0);
  EXPECT_TRUE(runs.empty());
  EXPECT_EQ(cpu_bad_words(*as, kBase, len, 2), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing
