// svm::Device: the DMA mapping record that catches leaked and unbalanced mappings, never
// allocates while mapping (get_pages maps under the notifier lock) and refuses freed pfns.
#include "gpusvm/svm/device.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"
#include "tests/mm/mm_test_util.h"
#include "tests/svm/alloc_count.h"

namespace gpusvm::svm {
namespace {

// Counts this thread's operator new calls between construction and count().
class AllocCounter {
 public:
  AllocCounter() { testing::alloc_count_begin(); }
  ~AllocCounter() { (void)testing::alloc_count_end(); }
  uint64_t count() const { return testing::alloc_count_end(); }
};

TEST(SvmDevice, MapUnmapIsCountedPerPageAndOrder) {
  Device dev("gpu0");
  const DmaAddr a = dev.dma_map_page(0x100, 0, DmaDirection::kBidirectional);
  const DmaAddr b = dev.dma_map_page(0x200, mm::kPmdOrder, DmaDirection::kToDevice);
  EXPECT_EQ(a, DmaAddr{0x100} << mm::kPageShift);
  EXPECT_EQ(b, DmaAddr{0x200} << mm::kPageShift);
  EXPECT_EQ(dev.dma_mappings(), 1u + 512u);
  // The same page mapped twice (two pages objects of one device) needs two unmaps.
  EXPECT_EQ(dev.dma_map_page(0x100, 0, DmaDirection::kBidirectional), a);
  dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
  dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
  dev.dma_unmap_page(b, mm::kPmdOrder, DmaDirection::kToDevice);
  EXPECT_EQ(dev.dma_mappings(), 0u);
}

// The rule of docs/svm.md "Locking": nothing under the notifier lock allocates, and
// get_pages maps there. 4 KiB pages, a THP, and a second order at a mapped pfn.
TEST(SvmDevice, MappingAndUnmappingNeverAllocate) {
  if (!testing::alloc_counting()) GTEST_SKIP() << "operator new is the sanitizer's in this build";
  Device dev("gpu0");
  std::vector<DmaAddr> addrs(600);  // allocated before counting
  {
    AllocCounter c;
    for (size_t i = 0; i < 512; i++) addrs[i] = dev.dma_map_page(0x1000 + 3 * i, 0, DmaDirection::kBidirectional);
    addrs[512] = dev.dma_map_page(0x4000, mm::kPmdOrder, DmaDirection::kBidirectional);
    addrs[513] = dev.dma_map_page(0x4000, 0, DmaDirection::kBidirectional);  // overflow table
    EXPECT_EQ(dev.dma_overflow_entries(), 1u);
    for (size_t i = 0; i < 512; i++) dev.dma_unmap_page(addrs[i], 0, DmaDirection::kBidirectional);
    dev.dma_unmap_page(addrs[512], mm::kPmdOrder, DmaDirection::kBidirectional);
    dev.dma_unmap_page(addrs[513], 0, DmaDirection::kBidirectional);
    EXPECT_EQ(c.count(), 0u) << "the DMA mapping record allocated while mapping";
  }
  EXPECT_EQ(dev.dma_mappings(), 0u);
  EXPECT_EQ(dev.dma_overflow_entries(), 0u);
}

// Two orders at one pfn are two keys: each unmap must name the order it was mapped with,
// whichever of the two took the slot first, and however the slot is freed and retaken.
TEST(SvmDevice, TwoOrdersAtOnePfnAreSeparateMappings) {
  Device dev("gpu0");
  const DmaAddr a = dev.dma_map_page(0x200, 3, DmaDirection::kBidirectional);  // the slot
  EXPECT_EQ(dev.dma_map_page(0x200, 0, DmaDirection::kBidirectional), a);      // the table
  EXPECT_EQ(dev.dma_mappings(), 9u);
  dev.dma_unmap_page(a, 3, DmaDirection::kBidirectional);  // frees the slot
  EXPECT_EQ(dev.dma_map_page(0x200, 0, DmaDirection::kBidirectional), a);  // order 0 takes it
  dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
  dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
  EXPECT_EQ(dev.dma_mappings(), 0u);
  EXPECT_EQ(dev.dma_overflow_entries(), 0u);
  EXPECT_DEATH(dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional), "never mapped");
}

TEST(SvmDevice, PagesOutsideTheDmaWindowFailToMap) {
  Device dev("gpu0");
  EXPECT_EQ(dev.dma_map_page(Device::kDefaultDmaPfns, 0, DmaDirection::kBidirectional), kDmaMappingError);
  EXPECT_EQ(dev.dma_map_page(Device::kDefaultDmaPfns - 1, 1, DmaDirection::kBidirectional), kDmaMappingError);
  EXPECT_EQ(dev.dma_mappings(), 0u);
}

// Many threads map and unmap overlapping keys (one pfn, two orders): the counts balance.
TEST(SvmDevice, ConcurrentMapsOfOneKeyBalance) {
  Device dev("gpu0");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&dev, t] {
      const unsigned order = t % 2 ? 0 : 2;
      for (int i = 0; i < 2000; i++) {
        const DmaAddr a = dev.dma_map_page(0x800, order, DmaDirection::kBidirectional);
        dev.dma_unmap_page(a, order, DmaDirection::kBidirectional);
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(dev.dma_mappings(), 0u);
  EXPECT_EQ(dev.dma_overflow_entries(), 0u);
}

TEST(SvmDevice, InjectedMapFailureRecordsNothing) {
  Device dev("gpu0");
  fault_inject::ScopedArm arm("svm.dma_map", {});
  ASSERT_EQ(arm.status(), 0);
  EXPECT_EQ(dev.dma_map_page(0x100, 0, DmaDirection::kBidirectional), kDmaMappingError);
  EXPECT_EQ(dev.dma_mappings(), 0u);
}

TEST(SvmDeviceDeathTest, UnmapOfAnUnmappedAddressPanics) {
  EXPECT_DEATH(
      {
        Device dev("gpu0");
        dev.dma_unmap_page(0x1000, 0, DmaDirection::kBidirectional);
      },
      "never mapped");
}

TEST(SvmDeviceDeathTest, UnmapWithAnotherOrderPanics) {
  EXPECT_DEATH(
      {
        Device dev("gpu0");
        const DmaAddr a = dev.dma_map_page(0x200, mm::kPmdOrder, DmaDirection::kBidirectional);
        dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
      },
      "never mapped");
}

TEST(SvmDeviceDeathTest, DestructionWithLiveMappingsPanics) {
  EXPECT_DEATH(
      {
        Device dev("gpu0");
        (void)dev.dma_map_page(0x100, 0, DmaDirection::kBidirectional);
      },
      "still DMA mapped");
}

// With the machine known, the window is its RAM and a freed folio cannot be mapped.
TEST(SvmDeviceDeathTest, MappingAFreedPfnPanics) {
  std::unique_ptr<mm::PhysMem> mem = mm::testing::make_mem(8ULL << 20);
  ASSERT_NE(mem, nullptr);
  Device dev("gpu0", mem.get());
  EXPECT_EQ(dev.dma_window_pfns(), mem->ram_pages());
  EXPECT_EQ(dev.dma_map_page(mem->ram_pages(), 0, DmaDirection::kBidirectional), kDmaMappingError);
  mm::Folio* f = mem->folio_alloc(0);
  ASSERT_NE(f, nullptr);
  const mm::Pfn pfn = f->pfn();
  const DmaAddr a = dev.dma_map_page(pfn, 0, DmaDirection::kBidirectional);
  EXPECT_NE(a, kDmaMappingError);
  dev.dma_unmap_page(a, 0, DmaDirection::kBidirectional);
  f->put();
  EXPECT_DEATH((void)dev.dma_map_page(pfn, 0, DmaDirection::kBidirectional), "freed pfn");
}

}  // namespace
}  // namespace gpusvm::svm
