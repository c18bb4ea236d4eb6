// Invalidation: every CPU page-table change under a committed range zaps the GPU PTEs and
// unmaps the pages before it completes; UNMAP queues the range to the garbage collector;
// a get_pages whose window an invalidation hits retries; fini with ranges alive.
#include <gtest/gtest.h>

#include <thread>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "tests/svm/svm_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using SvmInvalidateTest = SvmTest;

// Story: munmap of one page in the middle of a 2 MiB range.
TEST_F(SvmInvalidateTest, PartialMunmapZapsAndQueuesToTheGarbageCollector) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 1);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  const uint64_t inv = gpu->invalidations.load();
  // 1. munmap [kBase + 1 MiB, +4 KiB): the whole range is zapped and unmapped at once.
  ASSERT_EQ(as->munmap(kBase + k2M / 2, k4K), 0);
  EXPECT_GT(gpu->invalidations.load(), inv);
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  EXPECT_EQ(gpu->device()->dma_mappings(), 0u);
  EXPECT_TRUE(r->unmapped());
  EXPECT_TRUE(r->partial_unmap());
  EXPECT_TRUE(r->inserted()) << "removed by the garbage collector, not the notifier";
  EXPECT_GE(r->stats().invalidations.get(), 1u);
  // 2. The next fault runs the garbage collector first: the range goes; the fault builds a
  // new, smaller range in what is still mapped (the VMA now ends at kBase + 1 MiB).
  ASSERT_EQ(gpu->fault(kBase + k4K, true), 0);
  EXPECT_EQ(gpu->gc_removed.load(), 1u);
  EXPECT_FALSE(r->inserted());
  RangeRef n = find(kBase + k4K);
  ASSERT_TRUE(n);
  EXPECT_NE(n.get(), r.get());
  EXPECT_LE(n->end(), kBase + k2M / 2);
  EXPECT_EQ(gpu_matches_cpu(n->start(), n->size()), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
  // 3. A fault in the hole: no VMA.
  EXPECT_EQ(gpu->fault(kBase + k2M / 2, true), -ENOENT);
}

// Non-UNMAP events zap and unmap, the range stays, the next fault rebuilds it.
TEST_F(SvmInvalidateTest, MprotectDontneedForkAndMremapInvalidate) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 2);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  // mprotect read-only: zapped, not unmapped; a read fault maps it again read-only.
  ASSERT_EQ(as->mprotect(kBase, k2M, PROT_READ), 0);
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  EXPECT_FALSE(r->unmapped());
  EXPECT_EQ(gpu->fault(kBase, true), -EPERM);
  ASSERT_EQ(gpu->fault(kBase, false), 0);
  EXPECT_EQ(gpu->gpu_store(kBase, 1), -EFAULT);
  ASSERT_EQ(as->mprotect(kBase, k2M, PROT_READ | PROT_WRITE), 0);
  // MADV_DONTNEED: the pages go; the GPU must not keep the old frames; refault reads zero.
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  ASSERT_EQ(as->madvise(kBase, k64K, MADV_DONTNEED), 0);
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_EQ(gpu->gpu_load(kBase).value(), 0u);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  // fork: the parent's pages become COW; the GPU mapping was writable, so it is zapped, and
  // the parent's next write (a COW copy) is what the GPU sees after its refault.
  Result<std::unique_ptr<mm::AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kBase + k64K, 1234), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_EQ(gpu->gpu_load(kBase + k64K).value(), 1234u);
  ASSERT_EQ(gpu->gpu_store(kBase + 2 * k64K, 99), 0);
  EXPECT_EQ(mm::cpu::load<uint64_t>(**child, kBase + 2 * k64K).value(), pattern(kBase + 2 * k64K, 2))
      << "the child keeps its copy";
  EXPECT_EQ(mm::cpu::load<uint64_t>(*as, kBase + 2 * k64K).value(), 99u);
  EXPECT_EQ(gpu->check_ptes(), 0);
  (*child)->exit();
  child->reset();
  // mremap away: UNMAP of the source; the GC removes the range; the new place faults in.
  Result<mm::Va> moved = as->mremap(kBase, k2M, k2M, MREMAP_MAYMOVE | MREMAP_FIXED, kBase + 8 * k2M);
  ASSERT_TRUE(moved.ok()) << moved.error();
  EXPECT_TRUE(r->unmapped());
  EXPECT_FALSE(r->partial_unmap());
  ASSERT_EQ(gpu->fault(*moved, true), 0);
  EXPECT_FALSE(r->inserted());
  EXPECT_EQ(gpu->gpu_load(*moved + 2 * k64K).value(), 99u);
  EXPECT_EQ(gpu_matches_cpu(*moved, k2M), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// An invalidation in get_pages' window (after hmm_range_fault, before the notifier lock):
//   1. fault thread: read_begin, hmm_range_fault maps the old pages, stops at
//      svm.get_pages.faulted (no lock held but the driver's VM lock)
//   2. test thread: MADV_DONTNEED frees those pages (invalidation: sequence bumped)
//   3. fault thread: notifier lock, read_retry(seq) is true: retry, faults new pages
// Without the read_retry check the GPU would map freed frames.
TEST_F(SvmInvalidateTest, InvalidationInTheGetPagesWindowRetries) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 3);
  sched_point::Pause pause("svm.get_pages.faulted");
  ASSERT_EQ(pause.status(), 0);
  int rc = -1;
  std::thread t([&] { rc = gpu->fault(kBase, true); });
  ASSERT_TRUE(pause.wait_reached());
  ASSERT_EQ(as->madvise(kBase, k2M, MADV_DONTNEED), 0);
  fill_pages(*as, kBase, k2M, 4);
  pause.release();
  t.join();
  ASSERT_EQ(rc, 0);
  RangeRef r = find(kBase);
  EXPECT_GE(r->stats().get_pages_retries.get(), 1u);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// fini with ranges alive: notifiers are unregistered, ranges removed and unmapped; a range
// the driver still holds stays readable until its last put.
TEST_F(SvmInvalidateTest, FiniWithLiveRanges) {
  Device dev("d");
  class Ops : public GpusvmOps {
   public:
    void invalidate(Gpusvm* g, Notifier* n, const mm::MmuNotifierRange& r) override {
      for (auto& [s, range] : n->ranges()) {
        if (range->end() > r.start && range->start() < r.end) {
          Ctx c;
          c.in_notifier = true;
          g->range_unmap_pages(range, c);
        }
      }
    }
  } ops;
  Mutex lock(&kGpusvmDriverLockClass);
  Result<std::unique_ptr<Gpusvm>> g = Gpusvm::init(
      {.name = "f", .as = as.get(), .mm_range = 1ULL << 47, .ops = &ops, .devices = {&dev},
       .driver_lock = &lock});
  ASSERT_TRUE(g.ok());
  map_at(kBase, 4 * k2M);
  fill_pages(*as, kBase, 4 * k2M, 5);
  RangeRef held;
  {
    MutexLock l(&lock);
    for (mm::Va va = kBase; va < kBase + 4 * k2M; va += k2M) {
      Result<RangeRef> r = (*g)->range_find_or_insert(va, 0, ~mm::Va{0}, {});
      ASSERT_TRUE(r.ok());
      ASSERT_EQ((*g)->range_get_pages(r->get(), {}), 0);
      if (va == kBase) held = *r;
    }
  }
  EXPECT_EQ(dev.dma_mappings(), 4 * k2M / k4K);
  EXPECT_EQ(as->notifier_subscriptions().interval_count(), 1u);
  g->reset();
  EXPECT_EQ(as->notifier_subscriptions().interval_count(), 0u);
  EXPECT_EQ(dev.dma_mappings(), 0u);
  EXPECT_FALSE(held->inserted());
  EXPECT_EQ(held->start(), kBase);
  // No callback after fini: a munmap reaches no one.
  ASSERT_EQ(as->munmap(kBase, k2M), 0);
  held.reset();
}

}  // namespace
}  // namespace gpusvm::svm::testing
