// Pagemap lifetime (destroy deferred from folio_free), the residency timeslice, and a fork
// child touching device pages.
#include <atomic>
#include <chrono>
#include <thread>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"
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

// The timeslice clock of these tests: it moves only when a test advances it, so a test
// decides when a timeslice expires (set_timeslice_clock, devmem.h).
std::atomic<Clock::rep> g_fake_now{0};
Clock::time_point fake_now() { return Clock::time_point(Clock::duration(g_fake_now.load())); }

class FakeTimesliceClock {
 public:
  FakeTimesliceClock() : prev_(set_timeslice_clock(&fake_now)) { g_fake_now = Clock::now().time_since_epoch().count(); }
  ~FakeTimesliceClock() { (void)set_timeslice_clock(prev_); }
  void advance(Clock::duration d) { g_fake_now += d.count(); }

 private:
  TimesliceClock prev_;
};

// A CPU fault before the timeslice expires leaves the pages in device memory (upstream
// returns without migrating and the access faults again) until the time is up. The clock is
// the test's, and the CPU thread is stopped at each deferral, so no sleep decides anything:
//  1. the clock stands at T; migrate with a 150 ms timeslice (expiry T + 150 ms)
//  2. a CPU thread reads the first page: its fault is deferred, it stops there -> the pages
//     are still device pages
//  3. the clock moves to T + 149 ms; the thread retries and is deferred again
//  4. the clock moves to T + 150 ms: the next retry migrates, the read returns the data
TEST_F(PagemapTest, TimesliceKeepsPagesUntilItExpires) {
  FakeTimesliceClock clock;
  const uint64_t len = 4 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 2);
  ASSERT_EQ(migrate(va, len, MigrateDetails{.timeslice_ms = 150}), 0);
  const uint64_t deferred = pagemap_stats().timeslice_deferred.load();
  std::atomic<bool> done{false};
  std::thread cpu;
  // On a failed ASSERT: expire the timeslice so the thread's access ends, and join it.
  struct Finish {
    FakeTimesliceClock& clock;
    std::thread& t;
    ~Finish() {
      if (!t.joinable()) return;
      clock.advance(std::chrono::hours(1));
      t.join();
    }
  } finish{clock, cpu};
  {
    sched_point::Pause at_t("svm.migrate_to_ram.timeslice_deferred");
    ASSERT_EQ(at_t.status(), 0);
    cpu = std::thread([&] {
      EXPECT_EQ(cpu_bad_words(*as, va, kPageSize, 2), 0u);
      done = true;
    });
    ASSERT_TRUE(at_t.wait_reached()) << "the CPU fault at T was not deferred";
    EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kSoftLeaf);
    EXPECT_FALSE(last->released());
    EXPECT_GT(pagemap_stats().timeslice_deferred.load(), deferred);
    clock.advance(std::chrono::milliseconds(149));
  }  // released: the thread retries at T + 149 ms
  {
    sched_point::Pause at_149("svm.migrate_to_ram.timeslice_deferred");
    ASSERT_TRUE(at_149.wait_reached()) << "the CPU fault 1 ms before expiry was not deferred";
    EXPECT_FALSE(done.load());
    EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kSoftLeaf);
    EXPECT_FALSE(last->released());
    clock.advance(std::chrono::milliseconds(1));
  }  // released at T + 150 ms: the retry migrates
  cpu.join();
  EXPECT_TRUE(done.load());
  EXPECT_TRUE(last->released());
  EXPECT_EQ(system_pages(*as, va, len), 4u);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 2), 0u);
  // Without a timeslice the first fault migrates (the clock has not moved since).
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
