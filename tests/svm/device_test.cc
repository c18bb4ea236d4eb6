// svm::Device: the DMA mapping record that catches leaked and unbalanced mappings.
#include "gpusvm/svm/device.h"

#include <gtest/gtest.h>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::svm {
namespace {

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

TEST(SvmDeviceDeathTest, DestructionWithLiveMappingsPanics) {
  EXPECT_DEATH(
      {
        Device dev("gpu0");
        (void)dev.dma_map_page(0x100, 0, DmaDirection::kBidirectional);
      },
      "still DMA mapped");
}

}  // namespace
}  // namespace gpusvm::svm
