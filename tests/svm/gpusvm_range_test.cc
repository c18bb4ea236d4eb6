// Gpusvm ranges: init validation, range_find_or_insert's chunk choice against the CPU VMA,
// the notifier window and the GPU VA window, its errors, and the lookups.
#include <gtest/gtest.h>

#include "gpusvm/base/errno.h"
#include "tests/svm/svm_test_util.h"

namespace gpusvm::svm::testing {
namespace {

class NopOps : public GpusvmOps {
 public:
  void invalidate(Gpusvm*, Notifier*, const mm::MmuNotifierRange&) override {}
};

using SvmRangeTest = SvmTest;

TEST_F(SvmRangeTest, InitRejectsBadConfig) {
  NopOps ops;
  Device dev("d");
  auto base = [&] {
    return GpusvmConfig{.name = "t", .as = as.get(), .mm_start = 0, .mm_range = 1ULL << 47,
                        .ops = &ops, .devices = {&dev}};
  };
  EXPECT_TRUE(Gpusvm::init(base()).ok());
  GpusvmConfig c = base();
  c.ops = nullptr;
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.devices.clear();
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.mm_range = 0;
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.notifier_size = 3ULL << 20;
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.chunk_sizes = {k64K, k2M, k4K};  // not descending
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.chunk_sizes = {k2M, k64K};  // does not end in 4 KiB
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  c = base();
  c.notifier_size = k64K;  // smaller than the largest chunk
  EXPECT_EQ(Gpusvm::init(c).error(), -EINVAL);
  // Pages-only mode needs no ops nor window.
  EXPECT_TRUE(Gpusvm::init(GpusvmConfig{.name = "p"}).ok());
  EXPECT_MM_CHECK_OK(*mem);
}

// Story: every chunk size is chosen where it fits, and no larger.
TEST_F(SvmRangeTest, ChunkSizesFollowVmaEdgesAndPresence) {
  make_gpu();
  // 1. A 4 MiB VMA: a fault anywhere gets the aligned 2 MiB around it.
  map_at(kBase, 2 * k2M);
  Result<RangeRef> r = insert(kBase + k2M + 0x5000);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ((*r)->start(), kBase + k2M);
  EXPECT_EQ((*r)->size(), k2M);
  // 2. A 96 KiB VMA starting 32 KiB into a 64 KiB block, pages present: at its first page
  // only 4 KiB fits (the 64 KiB block begins before the VMA); at +32 KiB the next 64 KiB
  // block lies inside, and the CPU has it all, so 64 KiB.
  const mm::Va v = kBase + 8 * k2M + 32 * 1024;
  map_at(v, 96 * 1024);
  fill_pages(*as, v, 96 * 1024, 1);
  r = insert(v);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->start(), v);
  EXPECT_EQ((*r)->size(), k4K);
  r = insert(v + 32 * 1024);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->start(), v + 32 * 1024);
  EXPECT_EQ((*r)->size(), k64K);
  // 3. At or below the threshold, a chunk covers only CPU-present pages: one page missing
  // in a 64 KiB block makes it 4 KiB.
  const mm::Va w = kBase + 12 * k2M;
  map_at(w, k64K);
  fill_pages(*as, w, k64K - k4K, 2);
  r = insert(w);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->size(), k4K);
  // ... with the threshold below 64 KiB the same block is taken whole.
  Ctx big;
  big.check_pages_threshold = k4K;
  r = insert(w + 5 * k4K, big);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->size(), k4K) << "must not overlap the 4 KiB range at w";
  // 4. The existing range is returned for any address inside it.
  Result<RangeRef> again = insert(kBase + 2 * k2M - k4K);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), find(kBase + k2M).get());
  EXPECT_EQ(gpu->gpusvm()->nr_ranges(), 5u);
}

TEST_F(SvmRangeTest, ChunkStopsAtNotifierAndGpuVaEdges) {
  make_gpu({.notifier_size = 4 * k2M, .chunk_sizes = {4 * k2M, k2M, k64K, k4K}});
  // A 16 MiB VMA [kBase + 4 MiB, kBase + 20 MiB), notifiers of 8 MiB. At kBase + 6 MiB the
  // 8 MiB chunk [kBase, kBase + 8 MiB) starts before the VMA; the 2 MiB one fits.
  map_at(kBase + 2 * k2M, 8 * k2M, PROT_READ | PROT_WRITE);
  Result<RangeRef> r = insert(kBase + 3 * k2M + k4K);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->size(), k2M);
  EXPECT_EQ((*r)->notifier()->start(), kBase);
  EXPECT_EQ((*r)->notifier()->end(), kBase + 4 * k2M);
  // In the next notifier window [kBase + 8 MiB, +8 MiB) the whole window fits the VMA.
  r = insert(kBase + 5 * k2M);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->start(), kBase + 4 * k2M);
  EXPECT_EQ((*r)->size(), 4 * k2M);
  EXPECT_EQ(gpu->gpusvm()->nr_notifiers(), 2u);
  // The GPU VA window [kBase + 4 MiB + 64 KiB, ...) cuts the 2 MiB chunk at kBase + 4 MiB;
  // the 64 KiB one fits but its pages are absent: 4 KiB.
  const mm::Va f = kBase + 2 * k2M + 2 * k64K;
  r = insert(f, {}, kBase + 2 * k2M + k64K, ~mm::Va{0});
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ((*r)->start(), f);
  EXPECT_EQ((*r)->size(), k4K);
  // With the pages present the 64 KiB chunk is taken (next block).
  fill_pages(*as, f + k64K, k64K, 1);
  r = insert(f + k64K + k4K, {}, kBase + 2 * k2M + k64K, ~mm::Va{0});
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ((*r)->start(), f + k64K);
  EXPECT_EQ((*r)->size(), k64K);
  // A fault outside the GPU VA window is -EINVAL.
  EXPECT_EQ(insert(f + 4 * k64K, {}, f + 5 * k64K, kBase + 3 * k2M).error(), -EINVAL);
}

TEST_F(SvmRangeTest, FindOrInsertErrors) {
  make_gpu({.mm_start = kBase, .mm_range = 64 * k2M});
  map_at(kBase, k2M);
  map_at(kBase + 4 * k2M, k2M, PROT_READ);
  // Outside the mirrored window.
  EXPECT_EQ(insert(kBase - k4K).error(), -EINVAL);
  EXPECT_EQ(insert(kBase + 64 * k2M).error(), -EINVAL);
  // No VMA.
  EXPECT_EQ(insert(kBase + 2 * k2M).error(), -ENOENT);
  // Write to a read-only VMA; a read-only context is fine.
  EXPECT_EQ(insert(kBase + 4 * k2M).error(), -EPERM);
  Ctx ro;
  ro.read_only = true;
  EXPECT_TRUE(insert(kBase + 4 * k2M, ro).ok());
  // VM_IO.
  Result<mm::Va> io = as->mmap_device(kBase + 8 * k2M, k2M, PROT_READ | PROT_WRITE, MAP_SHARED,
                                      this, [](mm::Vma& vma) {
                                        vma.flags |= mm::VM_IO;
                                        return 0;
                                      });
  ASSERT_TRUE(io.ok()) << io.error();
  EXPECT_EQ(insert(*io).error(), -EIO);
  // Nothing half-made stays behind: one notifier, one range (the read-only one).
  EXPECT_EQ(gpu->gpusvm()->nr_ranges(), 1u);
  EXPECT_EQ(gpu->gpusvm()->nr_notifiers(), 1u);
  // The address space exited.
  gpu->unbind_all();
  as->exit();
  EXPECT_EQ(insert(kBase).error(), -EFAULT);
}

TEST_F(SvmRangeTest, InjectedAllocationFailuresInsertNothing) {
  make_gpu();
  map_at(kBase, k2M);
  for (const char* point : {"svm.notifier_alloc", "svm.range_alloc"}) {
    fault_inject::ScopedArm arm(point, {});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(insert(kBase).error(), -ENOMEM) << point;
    EXPECT_EQ(gpu->gpusvm()->nr_ranges(), 0u) << point;
    EXPECT_EQ(gpu->gpusvm()->nr_notifiers(), 0u) << point;
    EXPECT_EQ(as->notifier_subscriptions().interval_count(), 0u) << point;
  }
  // A failing presence check (its pfn array) makes the small chunk fall back to 4 KiB.
  const mm::Va v = kBase + 4 * k2M;
  map_at(v, k64K);
  fill_pages(*as, v, k64K, 3);
  {
    fault_inject::ScopedArm arm("svm.check_pages_alloc", {});
    Result<RangeRef> r = insert(v);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)->size(), k4K);
  }
  Result<RangeRef> r = insert(v + k4K);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ((*r)->size(), k4K) << "the 64 KiB block overlaps the 4 KiB range";
}

TEST_F(SvmRangeTest, LookupsAndIteration) {
  make_gpu();
  map_at(kBase, 4 * k2M);
  ASSERT_TRUE(insert(kBase).ok());
  ASSERT_TRUE(insert(kBase + 2 * k2M).ok());
  MutexLock g(&gpu->vm_lock());
  Gpusvm* s = gpu->gpusvm();
  EXPECT_TRUE(s->has_mapping(kBase, kBase + 1));
  EXPECT_FALSE(s->has_mapping(kBase + k2M, kBase + 2 * k2M));
  EXPECT_TRUE(s->has_mapping(kBase + k2M, kBase + 2 * k2M + 1));
  std::vector<mm::Va> starts;
  s->for_each_range(0, ~mm::Va{0}, [&](Range* r) { starts.push_back(r->start()); });
  EXPECT_EQ(starts, (std::vector<mm::Va>{kBase, kBase + 2 * k2M}));
  starts.clear();
  s->for_each_range(kBase + k2M - 1, kBase + 2 * k2M, [&](Range* r) { starts.push_back(r->start()); });
  EXPECT_EQ(starts, (std::vector<mm::Va>{kBase}));
  Notifier* n = s->notifier_find(kBase, kBase + 1);
  ASSERT_NE(n, nullptr);
  EXPECT_EQ(s->range_find(n, kBase + k2M, kBase + k2M + 1), nullptr);
  EXPECT_EQ(s->range_find(n, kBase + k2M, kBase + 3 * k2M)->start(), kBase + 2 * k2M);
  EXPECT_EQ(s->find_vma_start(kBase - k2M, kBase + 1), kBase);
  EXPECT_EQ(s->find_vma_start(kBase + 4 * k2M, kBase + 5 * k2M), ~mm::Va{0});
}

TEST_F(SvmRangeTest, DriverLockIsAsserted) {
  make_gpu();
  map_at(kBase, k2M);
  EXPECT_DEATH((void)gpu->gpusvm()->range_find_or_insert(kBase, 0, ~mm::Va{0}, {}),
               "without the driver lock");
}

}  // namespace
}  // namespace gpusvm::svm::testing
