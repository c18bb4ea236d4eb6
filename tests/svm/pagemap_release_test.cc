// Drivers free their allocation object in devmem_release (Xe's devmem_release drops the bo
// that embeds the drm_pagemap_devmem): this layer must not touch a Devmem after calling it.
// Every path that ends an allocation is run with a VRAM that deletes the TestDevmem in its
// release op; the asan build turns any later access into a failure.
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

class PagemapReleaseTest : public PagemapTest {
 protected:
  void SetUp() override {
    PagemapTest::SetUp();
    vram->free_on_release = true;
  }
};

TEST_F(PagemapReleaseTest, FailedMigrationsFreeTheAllocationInRelease) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  // Bad input: consumed before any work.
  TestDevmem* dm = vram->alloc_devmem(as.get(), len);
  ASSERT_NE(dm, nullptr);
  EXPECT_EQ(migrate_to_devmem(dm, as.get(), va + 1, va + len, {}), -EINVAL);
  EXPECT_EQ(vram->released.load(), 1);
  // populate_devmem_pfn fails: released by the migration's own zdd put.
  vram->fail_populate.arm(1);
  EXPECT_EQ(migrate(va, len), -ENOMEM);
  EXPECT_EQ(vram->released.load(), 2);
  // The copy fails after the destinations hold zdd references: rolled back, released.
  vram->fail_copy_to_devmem.arm(1);
  EXPECT_NE(migrate(va, len), 0);
  EXPECT_EQ(vram->released.load(), 3);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 1), 0u);
  EXPECT_EQ(system_pages(*as, va, len), len / kPageSize);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapReleaseTest, CpuFaultMunmapAndExitFreeTheAllocationInRelease) {
  // A 2 MiB THP allocation brought back by one CPU fault: the last folio_free releases.
  const Va thp = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(thp, 0u);
  fill_bytes(*as, thp, kPmdSize, 2);
  ASSERT_EQ(migrate(thp, kPmdSize), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, thp, kPmdSize, 2), 0u);
  EXPECT_EQ(cpu_bad_words(*as, thp, kPmdSize, 2), 0u);  // faults it all back
  EXPECT_EQ(vram->released.load(), 1);
  // 4 KiB pages freed by munmap (folio_free in the zap, under page-table locks).
  const uint64_t len = 8 * kPageSize;
  const Va small = map_anon(*as, len);
  fill_bytes(*as, small, len, 3);
  ASSERT_EQ(migrate(small, len), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, small, len, 3), 0u);
  ASSERT_EQ(as->munmap(small, len / 2), 0);
  EXPECT_EQ(vram->released.load(), 1);  // half the pages still hold the allocation
  EXPECT_EQ(device_bad_words(*as, *vram, small + len / 2, len / 2, 3), 0u);
  ASSERT_EQ(as->munmap(small + len / 2, len / 2), 0);
  EXPECT_EQ(vram->released.load(), 2);
  // evict_to_ram: the caller keeps the Devmem alive across the call (a bo reference), so
  // here the release only marks it; freeing is left to the VRAM teardown.
  const Va ev = map_anon(*as, len);
  fill_bytes(*as, ev, len, 4);
  vram->free_on_release = false;
  ASSERT_EQ(migrate(ev, len), 0);
  ASSERT_EQ(evict_to_ram(last), 0);
  EXPECT_TRUE(last->released());
  vram->free_on_release = true;
  EXPECT_EQ(cpu_bad_words(*as, ev, len, 4), 0u);
  EXPECT_EQ(vram->released.load(), 3);
  // One left in device memory for the exit at teardown (the last puts from exit's zap).
  const Va ex = map_anon(*as, len);
  fill_bytes(*as, ex, len, 5);
  ASSERT_EQ(migrate(ex, len), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, ex, len, 5), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  as->exit();
  EXPECT_EQ(vram->released.load(), 4);
  EXPECT_EQ(vram->free_pages(), kVramPages);
}

}  // namespace
}  // namespace gpusvm::svm::testing
