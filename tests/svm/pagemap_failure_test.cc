// Failures injected at every point of the provider's migrations roll back: the range stays
// where it was, every byte intact, the allocation released, mm::check clean.
#include "gpusvm/base/fault_inject.h"
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

// The range a failure test migrates: a THP (compound destination), 16 small pages and a
// hole, so that the copy runs over every kind of source.
class PagemapFailureTest : public PagemapTest {
 protected:
  static constexpr uint64_t kLen = 2 * kPmdSize;
  void SetUp() override {
    PagemapTest::SetUp();
    va = map_anon(*as, kLen, PROT_READ | PROT_WRITE, /*huge=*/true);
    ASSERT_NE(va, 0u);
    fill_bytes(*as, va, kPmdSize, 1);                 // a THP
    mem->set_thp_mode(mm::ThpMode::kNever);  // small pages in the same VMA, then holes
    fill_bytes(*as, va + kPmdSize, 16 * kPageSize, 1);
    mem->set_thp_mode(mm::ThpMode::kMadvise);
  }
  // Everything as it was before the failed migration.
  void expect_untouched() {
    EXPECT_TRUE(last->released());
    EXPECT_EQ(vram->free_pages(), kVramPages);
    EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
    EXPECT_EQ(system_pages(*as, va, kLen), kPagesPerPmd + 16);
    EXPECT_EQ(vram->device()->dma_mappings(), 0u);
    EXPECT_EQ(vram->live_device_maps.load(), 0);
    EXPECT_MM_CHECK_OK(*mem);
    EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize + 16 * kPageSize, 1), 0u);
    EXPECT_EQ(cpu_bad_words(*as, va + kPmdSize + 16 * kPageSize, kPmdSize - 16 * kPageSize, 0), 0u);
  }
  // The migration works once the failures are gone.
  void expect_then_works() {
    ASSERT_EQ(migrate(va, kLen), 0);
    EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize + 16 * kPageSize, 1), 0u);
    EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize + 16 * kPageSize, 1), 0u);
  }
  Va va = 0;
};

TEST_F(PagemapFailureTest, ZddAllocationFails) {
  fault_inject::ScopedArm arm("svm.zdd_alloc", {});
  ASSERT_EQ(arm.status(), 0);
  EXPECT_EQ(migrate(va, kLen), -ENOMEM);
  expect_untouched();
}

TEST_F(PagemapFailureTest, PopulateDevmemPfnFails) {
  vram->fail_populate.arm(1);
  EXPECT_EQ(migrate(va, kLen), -ENOMEM);
  expect_untouched();
  expect_then_works();
}

TEST_F(PagemapFailureTest, CopyToDevmemFails) {
  vram->fail_copy_to_devmem.arm(1);
  EXPECT_EQ(migrate(va, kLen), -EIO);
  expect_untouched();
  expect_then_works();
}

// Every DMA map of a source folio: the THP, then each small page (holes map nothing).
TEST_F(PagemapFailureTest, DmaMapFailsAtEveryPage) {
  for (uint64_t nth = 1; nth <= 17; nth++) {
    SCOPED_TRACE(nth);
    {
      fault_inject::ScopedArm arm("svm.dma_map", {.nth = nth});
      ASSERT_EQ(arm.status(), 0);
      EXPECT_EQ(migrate(va, kLen), -EFAULT);
      EXPECT_EQ(fault_inject::failures("svm.dma_map"), 1u);
    }
    expect_untouched();
  }
  expect_then_works();
}

// Device memory allocation itself fails (the driver has none): nothing to undo.
TEST_F(PagemapFailureTest, DeviceMemoryExhausted) {
  std::vector<TestDevmem*> all;
  while (TestDevmem* d = vram->alloc_devmem(as.get(), kPmdSize)) all.push_back(d);
  EXPECT_EQ(vram->alloc_devmem(as.get(), kLen), nullptr);
  EXPECT_EQ(vram->pagemap()->populate_mm(va, va + kLen, as.get(), 0), -ENOMEM);
  for (TestDevmem* d : all) EXPECT_EQ(migrate_to_devmem(d, as.get(), va, va, {}), -EINVAL);  // consumed
  last = all.back();
  expect_untouched();
  EXPECT_EQ(vram->pagemap()->populate_mm(va, va + kLen, as.get(), 0), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize + 16 * kPageSize, 1), 0u);
}

// The CPU fault's copy fails: SIGBUS, as upstream; the pages stay in device memory intact and
// come back by eviction.
TEST_F(PagemapFailureTest, CopyToRamFailureIsSigbus) {
  ASSERT_EQ(migrate(va, kLen), 0);
  vram->fail_copy_to_ram.arm(1);
  Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, va + kPmdSize);
  EXPECT_FALSE(w);
  EXPECT_EQ(w.error(), -EFAULT);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize + 16 * kPageSize, 1), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  // Eviction's copy fails too: the pages stay; the next eviction brings them back.
  vram->fail_copy_to_ram.arm(1);
  EXPECT_EQ(evict_to_ram(last), 0);  // the retry loop gets them on the second attempt
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize + 16 * kPageSize, 1), 0u);
  EXPECT_EQ(vram->device()->dma_mappings(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapFailureTest, EvictionOutOfSystemMemoryRetriesThenReports) {
  ASSERT_EQ(migrate(va, kLen), 0);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio_thp", {.nth = 1, .times = 0});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(evict_to_ram(last), -ENOMEM);
  }
  EXPECT_FALSE(last->released());
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize + 16 * kPageSize, 1), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(evict_to_ram(last), 0);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize + 16 * kPageSize, 1), 0u);
}

}  // namespace
}  // namespace gpusvm::svm::testing
