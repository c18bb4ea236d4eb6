// get_pages on system memory: present, absent, read-only and PROT_NONE pages, the address
// array's shape (per folio, folded), the commit contract's data, several devices per range,
// fault injection at every allocation and mapping point, and pages-only mode.
#include <gtest/gtest.h>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "tests/svm/svm_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using SvmGetPagesTest = SvmTest;

// Story: the CPU wrote every page; a GPU write fault maps them; the GPU reads what the CPU
// wrote and the CPU reads what the GPU writes.
TEST_F(SvmGetPagesTest, PresentPagesAreSharedBothWays) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 1);
  ASSERT_EQ(gpu->fault(kBase + 0x3000, /*write=*/true), 0);
  RangeRef r = find(kBase);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->size(), k2M);
  EXPECT_TRUE(r->pages().has_dma_mapping());
  EXPECT_EQ(gpu->device()->dma_mappings(), k2M / k4K);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  for (mm::Va va = kBase; va < kBase + k2M; va += k4K) ASSERT_EQ(gpu->gpu_store(va, pattern(va, 2)), 0);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 2), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
  EXPECT_EQ(r->stats().get_pages.get(), 1u);
}

// Absent pages are faulted in by get_pages (zero-filled, writable).
TEST_F(SvmGetPagesTest, AbsentPagesAreFaultedIn) {
  make_gpu();
  map_at(kBase, k64K);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->size(), k4K) << "absent pages below the threshold: 4 KiB range";
  EXPECT_EQ(gpu->gpu_load(kBase).value(), 0u);
  ASSERT_EQ(gpu->gpu_store(kBase, 77), 0);
  EXPECT_EQ(mm::cpu::load<uint64_t>(*as, kBase).value(), 77u);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

TEST_F(SvmGetPagesTest, ReadOnlyAndProtNone) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 3);
  ASSERT_EQ(as->mprotect(kBase, k2M, PROT_READ), 0);
  // A read fault maps it read-only; the GPU cannot write; a write fault is -EPERM.
  ASSERT_EQ(gpu->fault(kBase, false), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(gpu->gpu_store(kBase, 1), -EFAULT);
  EXPECT_EQ(gpu->fault(kBase, true), -EPERM);
  EXPECT_EQ(gpu->check_ptes(), 0);
  // PROT_NONE: hmm cannot fault it.
  map_at(kBase + 2 * k2M, k2M, PROT_NONE);
  EXPECT_EQ(gpu->fault(kBase + 2 * k2M, false), -EFAULT);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 3), 0);
}

// A read-only mapping of a writable VMA is mapped again for writing on a write fault.
TEST_F(SvmGetPagesTest, ReadMappingUpgradesOnWrite) {
  make_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 4);
  ASSERT_EQ(gpu->fault(kBase, false), 0);
  EXPECT_EQ(gpu->gpu_store(kBase, 9), -EFAULT);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  ASSERT_EQ(gpu->gpu_store(kBase, 9), 0);
  EXPECT_EQ(mm::cpu::load<uint64_t>(*as, kBase).value(), 9u);
  EXPECT_EQ(gpu->device()->dma_mappings(), k2M / k4K) << "the read-only mapping was dropped";
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// The address array: one entry for a PMD-mapped THP, one folded entry for contiguous 4 KiB
// pages, one per page otherwise.
TEST_F(SvmGetPagesTest, AddressArrayIsPerFolioOrFolded) {
  make_gpu();
  // THP.
  map_at(kBase, k2M, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, kBase, k2M, 5);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  {
    RangeRef r = find(kBase);
    ReadLock g(&gpu->gpusvm()->notifier_lock());
    ASSERT_EQ(r->pages().nr_addrs(), 1u);
    EXPECT_EQ(r->pages().addr(0).order, mm::kPmdOrder);
  }
  // 4 KiB pages faulted in backwards, with another mapping's page between each: no two are
  // contiguous, so 512 entries.
  const mm::Va v = kBase + 2 * k2M;
  map_at(v, k2M);
  const mm::Va spacer = map_at(kBase + 8 * k2M, k2M);
  for (uint64_t i = 512; i-- > 0;) {
    ASSERT_EQ(mm::cpu::store<uint64_t>(*as, v + i * k4K, pattern(v + i * k4K, 6)), 0);
    ASSERT_EQ(mm::cpu::store<uint64_t>(*as, spacer + i * k4K, 1), 0);
  }
  ASSERT_EQ(gpu->fault(v, true), 0);
  uint64_t scattered_bytes = 0;
  {
    RangeRef r = find(v);
    ReadLock g(&gpu->gpusvm()->notifier_lock());
    EXPECT_EQ(r->pages().nr_addrs(), 512u);
    EXPECT_EQ(r->pages().addr(0).order, 0);
    scattered_bytes = r->metadata_bytes();
  }
  EXPECT_EQ(gpu_matches_cpu(v, k2M), 0);
  // Contiguous 4 KiB pages of a 64 KiB range fold into one order-4 entry.
  const mm::Va c = kBase + 4 * k2M;
  map_at(c, k64K);
  fill_pages(*as, c, k64K, 7);
  ASSERT_EQ(gpu->fault(c, true), 0);
  RangeRef thp = find(kBase);
  {
    RangeRef r = find(c);
    ASSERT_EQ(r->size(), k64K);
    ReadLock g(&gpu->gpusvm()->notifier_lock());
    bool contiguous = true;
    for (uint64_t i = 1; i < 16; i++) {
      contiguous &= r->pages().addr_of(i) == r->pages().addr_of(0) + i * k4K;
    }
    if (contiguous) {
      EXPECT_EQ(r->pages().nr_addrs(), 1u);
      EXPECT_EQ(r->pages().addr(0).order, 4);
    } else {
      EXPECT_EQ(r->pages().nr_addrs(), 16u);
    }
    EXPECT_LT(thp->metadata_bytes() * 20, scattered_bytes);
  }
  EXPECT_EQ(gpu_matches_cpu(c, k64K), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// Two devices in one Gpusvm: each range has a Pages object per device, each DMA-mapped for
// its own device.
TEST_F(SvmGetPagesTest, EveryDeviceOfTheRangeIsMapped) {
  make_gpu({.devices = 2});
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 8);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  ASSERT_EQ(r->nr_pages_objects(), 2u);
  EXPECT_EQ(&r->pages(0).device()[0], gpu->device(0));
  EXPECT_EQ(r->pages(1).device(), gpu->device(1));
  EXPECT_EQ(gpu->device(0)->dma_mappings(), k2M / k4K);
  EXPECT_EQ(gpu->device(1)->dma_mappings(), k2M / k4K);
  // An invalidation unmaps both.
  ASSERT_EQ(as->madvise(kBase, k4K, MADV_DONTNEED), 0);
  EXPECT_EQ(gpu->device(0)->dma_mappings(), 0u);
  EXPECT_EQ(gpu->device(1)->dma_mappings(), 0u);
}

// Every allocation and mapping point of get_pages fails cleanly: the errno, nothing mapped,
// and the next fault succeeds.
TEST_F(SvmGetPagesTest, InjectedFailuresLeaveNothingMapped) {
  make_gpu({.devices = 2});
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 9);
  struct Case {
    const char* point;
    fault_inject::Spec spec;
    int want;
  };
  const Case cases[] = {
      {"svm.pfns_alloc", {}, -ENOMEM},
      {"svm.pages_alloc", {}, -ENOMEM},
      {"svm.pages_alloc", {.nth = 2}, -ENOMEM},      // second device's array
      {"svm.dma_map", {}, -EFAULT},                   // first mapping
      {"svm.dma_map", {.nth = 2}, -EFAULT},           // a later one (rolls back the first)
  };
  for (const Case& c : cases) {
    fault_inject::ScopedArm arm(c.point, c.spec);
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(gpu->fault(kBase, true), c.want) << c.point << " nth " << c.spec.nth;
    EXPECT_EQ(fault_inject::failures(c.point), 1u) << c.point;
    EXPECT_EQ(gpu->device(0)->dma_mappings(), 0u) << c.point;
    EXPECT_EQ(gpu->device(1)->dma_mappings(), 0u) << c.point;
    RangeRef r = find(kBase);
    ASSERT_TRUE(r);
    EXPECT_FALSE(r->pages(0).has_dma_mapping());
    EXPECT_FALSE(r->pages(1).has_dma_mapping());
    EXPECT_EQ(gpu->valid_ptes(), 0u);
  }
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 9), 0);
}

// Pages-only mode (userptr): no ranges; the user's own interval notifier, whose callback
// takes the Gpusvm notifier lock, bumps the sequence and unmaps.
class Userptr : public mm::MmuIntervalNotifierOps {
 public:
  Userptr(Gpusvm* g, Pages* p) : g_(g), p_(p) {}
  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange&, uint64_t seq) override {
    WriteLock l(&g_->notifier_lock());
    n->set_seq(seq);
    Ctx c;
    c.in_notifier = true;
    g_->unmap_pages(p_, c);
    return true;
  }
  Gpusvm* g_;
  Pages* p_;
};

TEST_F(SvmGetPagesTest, PagesOnlyModeMapsWithTheCallersNotifier) {
  Result<std::unique_ptr<Gpusvm>> g = Gpusvm::init({.name = "userptr"});
  ASSERT_TRUE(g.ok());
  Device dev("uptr", mem.get());
  Pages pages(&dev);
  Userptr ops(g->get(), &pages);
  const mm::Va v = map_at(kBase, 16 * k4K);
  fill_pages(*as, v, 16 * k4K, 10);
  mm::MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), v, 16 * k4K, &ops), 0);
  Pages* arr[] = {&pages};
  EXPECT_EQ((*g)->get_pages(arr, 1, as.get(), &n, v, v + 16 * k4K, {}), 0);
  std::vector<DmaAddr> addrs;
  {
    ReadLock l(&(*g)->notifier_lock());
    EXPECT_TRUE((*g)->pages_valid(pages));
    for (uint64_t i = 0; i < 16; i++) addrs.push_back(pages.addr_of(i));
  }
  for (uint64_t i = 0; i < 16; i++) {
    const mm::PageState st = mm::query_page(*as, v + i * k4K);
    EXPECT_EQ(addrs[i], DmaAddr{st.pfn} << mm::kPageShift);
  }
  EXPECT_EQ(dev.dma_mappings(), 16u);
  // Bad arguments: outside the notifier.
  EXPECT_EQ((*g)->get_pages(arr, 1, as.get(), &n, v, v + 32 * k4K, {}), -EINVAL);
  ASSERT_EQ(as->munmap(v, k4K), 0);
  EXPECT_FALSE(pages.has_dma_mapping());
  EXPECT_EQ(dev.dma_mappings(), 0u);
  // The first page is gone: the fault fails; the rest maps.
  EXPECT_EQ((*g)->get_pages(arr, 1, as.get(), &n, v, v + 16 * k4K, {}), -EFAULT);
  EXPECT_EQ((*g)->get_pages(arr, 1, as.get(), &n, v + k4K, v + 16 * k4K, {}), 0);
  EXPECT_EQ(dev.dma_mappings(), 15u);
  (*g)->free_pages(&pages);
  EXPECT_EQ(dev.dma_mappings(), 0u);
  n.remove();
}

}  // namespace
}  // namespace gpusvm::svm::testing
