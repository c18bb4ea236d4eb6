// The CPU fault's migrate_to_ram window (__drm_pagemap_migrate_to_ram): the whole device
// allocation around the fault, size-aligned, clipped to the faulting VMA, best effort. Every
// byte is checked after each step.
#include <gtest/gtest.h>

#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using PagemapFaultWindowTest = PagemapTest;

// One fault anywhere in a 64 KiB allocation brings all 16 pages back, not only the faulting
// one (nor only a part of it).
TEST_F(PagemapFaultWindowTest, OneFaultBringsBackTheWholeAllocation) {
  const uint64_t len = 16 * kPageSize;
  const Va base = map_anon(*as, 2 * kPmdSize);  // room to place the allocation 64 KiB-aligned
  ASSERT_NE(base, 0u);
  const Va va = (base + len - 1) & ~(len - 1);
  fill_bytes(*as, va, len, 3);
  ASSERT_EQ(migrate(va, len), 0);
  ASSERT_EQ(device_bad_words(*as, *vram, va, len, 3), 0u);
  const uint64_t faults = pagemap_stats().cpu_faults.load();
  Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, va + 11 * kPageSize + 24);  // a late page
  ASSERT_TRUE(w);
  EXPECT_EQ(*w, word_at(va + 11 * kPageSize + 24, 3));
  EXPECT_EQ(pagemap_stats().cpu_faults.load(), faults + 1);
  EXPECT_EQ(system_pages(*as, va, len), 16u);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, len, 3), 0u);
  EXPECT_EQ(pagemap_stats().cpu_faults.load(), faults + 1) << "reading it all took more faults";
  EXPECT_MM_CHECK_OK(*mem);
}

// The allocation's range was split into two VMAs (mprotect of its second half): a fault in
// one VMA brings back that VMA's part only, as upstream clips the window to the faulting
// VMA; the rest stays in device memory until a fault there, and the allocation is released
// with its last page.
TEST_F(PagemapFaultWindowTest, WindowIsClippedToTheFaultingVma) {
  const uint64_t len = 16 * kPageSize;
  const Va base = map_anon(*as, 2 * kPmdSize);
  ASSERT_NE(base, 0u);
  const Va va = (base + len - 1) & ~(len - 1);
  fill_bytes(*as, va, len, 4);
  ASSERT_EQ(migrate(va, len), 0);
  ASSERT_EQ(as->mprotect(va + len / 2, len / 2, PROT_READ), 0);
  ASSERT_EQ(device_bad_words(*as, *vram, va, len, 4), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va, len / 2, 4), 0u);  // first VMA: one fault, all 8 back
  EXPECT_EQ(system_pages(*as, va, len / 2), 8u);
  EXPECT_EQ(system_pages(*as, va + len / 2, len / 2), 0u);
  EXPECT_FALSE(last->released());
  EXPECT_EQ(device_bad_words(*as, *vram, va + len / 2, len / 2, 4), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va + len / 2, len / 2, 4), 0u);  // the read-only VMA
  EXPECT_EQ(system_pages(*as, va, len), 16u);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, len, 4), 0u);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing
