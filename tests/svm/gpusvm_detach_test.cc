// The tree-walk locking rule of for_each_range (driver lock or notifier lock), the detached
// state of a removed range (no dangling notifier or Gpusvm pointer; -ENOENT), and the
// pages_valid commit check against an invalidation between get_pages and commit.
#include <gtest/gtest.h>

#include <algorithm>
#include <thread>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/sched_point.h"
#include "tests/svm/alloc_count.h"
#include "tests/svm/svm_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using SvmDetachTest = SvmTest;

TEST_F(SvmDetachTest, ForEachRangeWithEitherLock) {
  make_gpu();
  map_at(kBase, 4 * k2M);
  fill_pages(*as, kBase, 4 * k2M, 3);
  for (int i = 0; i < 4; i++) ASSERT_EQ(gpu->fault(kBase + i * k2M, true), 0);
  Gpusvm* g = gpu->gpusvm();
  auto count = [&](mm::Va s, mm::Va e) {
    int n = 0;
    g->for_each_range(s, e, [&](Range*) { n++; });
    return n;
  };
  {
    MutexLock l(&gpu->vm_lock());
    EXPECT_EQ(count(kBase, kBase + 4 * k2M), 4);
    EXPECT_EQ(count(kBase + k2M + 1, kBase + 2 * k2M + 1), 2);
  }
  {
    ReadLock l(&g->notifier_lock());  // as a commit does
    EXPECT_EQ(count(kBase, kBase + 4 * k2M), 4);
  }
  {
    WriteLock l(&g->notifier_lock());  // as the invalidate callback does
    EXPECT_EQ(count(kBase + k2M, kBase + 3 * k2M), 2);
    Notifier* n = nullptr;
    g->for_each_range(kBase, kBase + 1, [&](Range* r) { n = r->notifier(); });
    ASSERT_NE(n, nullptr);
    int in_notifier = 0;
    g->for_each_range(n, kBase, kBase + 4 * k2M, [&](Range*) { in_notifier++; });
    EXPECT_EQ(in_notifier, 4);
  }
  // The invalidate callback of TestGpu walks with for_each_range under the write lock only.
  const uint64_t inv = gpu->invalidations.load();
  ASSERT_EQ(as->madvise(kBase + k2M, k4K, MADV_DONTNEED), 0);
  EXPECT_GT(gpu->invalidations.load(), inv);
  EXPECT_EQ(gpu->check_ptes(), 0);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 3), 0);
  EXPECT_DEATH((void)count(kBase, kBase + k2M), "without the driver lock or the notifier lock");
  gpu.reset();
  EXPECT_MM_CHECK_OK(*mem);
}

// Nothing allocates under the notifier lock (docs/svm.md "Locking"), and the invalidate
// callback walks there: for_each_range must not allocate to hold its callback. Each callback
// captures four locals (32 bytes), more than a std::function keeps inline, so a std::function
// parameter would allocate on each call.
TEST_F(SvmDetachTest, ForEachRangeUnderTheNotifierLockNeverAllocates) {
  if (!alloc_counting()) GTEST_SKIP() << "operator new is the sanitizer's in this build";
  make_gpu();
  map_at(kBase, 2 * k2M);
  fill_pages(*as, kBase, 2 * k2M, 4);
  for (int i = 0; i < 2; i++) ASSERT_EQ(gpu->fault(kBase + i * k2M, true), 0);
  Gpusvm* g = gpu->gpusvm();
  int ranges = 0, in_notifier = 0;
  mm::Va lowest = ~mm::Va{0}, highest = 0;
  Notifier* n = nullptr;
  bool all_in_n = true;
  uint64_t allocs = 0;
  {
    WriteLock l(&g->notifier_lock());  // as the invalidate callback holds it
    alloc_count_begin();
    g->for_each_range(kBase, kBase + 2 * k2M, [&](Range* r) {
      ranges++;
      lowest = std::min(lowest, r->start());
      highest = std::max(highest, r->end());
      n = r->notifier();
    });
    g->for_each_range(n, kBase, kBase + 2 * k2M, [&](Range* r) {
      in_notifier++;
      all_in_n = all_in_n && r->notifier() == n;
      highest = std::max(highest, r->end());
    });
    allocs = alloc_count_end();
  }
  EXPECT_EQ(allocs, 0u) << "for_each_range allocated under the notifier lock";
  EXPECT_EQ(ranges, 2);
  EXPECT_EQ(in_notifier, 2);
  EXPECT_TRUE(all_in_n);
  EXPECT_EQ(lowest, kBase);
  EXPECT_EQ(highest, kBase + 2 * k2M);
}

// A range the driver still holds after range_remove, and after fini, points at nothing and
// refuses work with -ENOENT instead of using a freed notifier.
TEST_F(SvmDetachTest, RemovedRangeIsDetached) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 4);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef kept = find(kBase);
  ASSERT_TRUE(kept);
  EXPECT_EQ(kept->gpusvm(), gpu->gpusvm());
  ASSERT_NE(kept->notifier(), nullptr);
  gpu->unbind_all();  // zaps the PTEs and removes every range (the driver's unbind)
  EXPECT_FALSE(kept->inserted());
  EXPECT_EQ(kept->notifier(), nullptr);
  EXPECT_EQ(kept->gpusvm(), nullptr);
  EXPECT_EQ(gpu->gpusvm()->nr_notifiers(), 0u);  // its notifier went with its last range
  {
    MutexLock l(&gpu->vm_lock());
    EXPECT_EQ(gpu->gpusvm()->range_get_pages(kept.get(), {}), -ENOENT);
  }
  EXPECT_EQ(gpu->gpusvm()->range_evict(kept.get()), -ENOENT);
  EXPECT_EQ(gpu->gpusvm()->scan_mm(kept.get(), nullptr, nullptr), ScanResult::kUnpopulated);

  kept.reset();
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 4), 0);
  gpu.reset();
  EXPECT_MM_CHECK_OK(*mem);
}

class NopOps : public GpusvmOps {
 public:
  void invalidate(Gpusvm*, Notifier*, const mm::MmuNotifierRange&) override {}
};

// fini with a live, mapped range the driver still holds: the range is detached (its
// mappings dropped, no pointer to the freed notifier or Gpusvm) and freed by its last put
// through the driver's ops, which outlive it.
TEST_F(SvmDetachTest, RangeHeldAcrossFiniIsDetached) {
  NopOps ops;
  Device dev("d", mem.get());
  Result<std::unique_ptr<Gpusvm>> g = Gpusvm::init(
      {.name = "t", .as = as.get(), .mm_start = 0, .mm_range = 1ULL << 47, .ops = &ops, .devices = {&dev}});
  ASSERT_TRUE(g.ok());
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 6);
  Result<RangeRef> r = (*g)->range_find_or_insert(kBase, 0, ~mm::Va{0}, {});
  ASSERT_TRUE(r.ok()) << r.error();
  RangeRef kept = std::move(*r);
  ASSERT_EQ((*g)->range_get_pages(kept.get(), {}), 0);
  EXPECT_GT(dev.dma_mappings(), 0u);
  EXPECT_EQ(kept->gpusvm(), g->get());
  EXPECT_NE(kept->notifier(), nullptr);
  g->reset();  // fini
  EXPECT_FALSE(kept->inserted());
  EXPECT_EQ(kept->notifier(), nullptr);
  EXPECT_EQ(kept->gpusvm(), nullptr);
  EXPECT_FALSE(kept->pages(0).has_dma_mapping());
  EXPECT_EQ(dev.dma_mappings(), 0u);
  kept.reset();
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 6), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// The commit contract: an invalidation after get_pages and before the GPU PTEs are written
// makes pages_valid false under the notifier lock; the driver retries and commits the new
// pages. Deterministic: the fault stops at the test driver's point before commit.
TEST_F(SvmDetachTest, InvalidationBeforeCommitMakesPagesInvalidAndTheDriverRetries) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 5);
  sched_point::Pause pause("svm_test.gpu.before_commit");
  ASSERT_EQ(pause.status(), 0);
  int rc = 1;
  std::thread t([&] { rc = gpu->fault(kBase, true); });
  ASSERT_TRUE(pause.wait_reached()) << "the fault never reached its commit";
  RangeRef r;
  {
    // The fault holds the driver lock; the walk here needs only the notifier lock.
    ReadLock nl(&gpu->gpusvm()->notifier_lock());
    gpu->gpusvm()->for_each_range(kBase, kBase + 1, [&](Range* x) {
      x->get();
      r = RangeRef(x);
    });
    ASSERT_TRUE(r);
    EXPECT_TRUE(gpu->gpusvm()->pages_valid(r->pages(0)));
  }
  // Drop 4 pages: the invalidate callback unmaps the range's pages.
  ASSERT_EQ(as->madvise(kBase + 8 * k4K, 4 * k4K, MADV_DONTNEED), 0);
  {
    ReadLock nl(&gpu->gpusvm()->notifier_lock());
    EXPECT_FALSE(gpu->gpusvm()->pages_valid(r->pages(0)));
  }
  pause.release();
  t.join();
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(gpu->eagain.load(), 1u) << "the commit did not see the invalidation";
  EXPECT_EQ(gpu->check_ptes(), 0);
  // Every word: the dropped pages read zero on both sides, the rest the pattern.
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(verify_pages(*as, kBase, 8 * k4K, 5), 0);
  for (mm::Va v = kBase + 8 * k4K; v < kBase + 12 * k4K; v += 8) {
    ASSERT_EQ(*mm::cpu::load<uint64_t>(*as, v), 0u);
  }
  EXPECT_EQ(verify_pages(*as, kBase + 12 * k4K, k2M - 12 * k4K, 5), 0);
  r.reset();
  gpu.reset();
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing
