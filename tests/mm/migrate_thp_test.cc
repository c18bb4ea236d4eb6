// Compound (2 MiB) migration: THPs and device-private PMDs moving whole, holes and the huge
// zero folio receiving 2 MiB destinations, and the split during migration when only 4 KiB
// destinations can be had (seed 003), in both directions.
#include <atomic>
#include <thread>

#include "gpusvm/mm/migrate_internal.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

class MigrateThpTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 4 * kPagesPerPmd);
    ASSERT_TRUE(dev->ok());
    va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    ASSERT_NE(va, 0u);
    ASSERT_TRUE(pmd_aligned(va));
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }
  Result<uint64_t> to_device() { return dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND); }
  Result<uint64_t> to_system() { return dev->migrate_to_system(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND); }
  // Every page of the range maps page i of one 2 MiB device folio through a PMD.
  void expect_device_pmd() {
    const PageState first = query_page(*as, va);
    EXPECT_EQ(first.kind, PageKind::kSoftLeaf);
    EXPECT_TRUE(first.large);
    ASSERT_TRUE(dev->pgmap()->contains(first.pfn));
    EXPECT_EQ(mem->folio_of(first.pfn)->order(), kPmdOrder);
    EXPECT_EQ(mem->folio_of(first.pfn)->entire_mapcount(), 1);
    EXPECT_EQ(mem->folio_of(first.pfn)->pfn(), first.pfn);
    // Each subpage has its own pfn (head + index), as hmm reports a device-private PMD.
    for (uint64_t i = 1; i < kPagesPerPmd; i++) {
      const PageState st = query_page(*as, va + i * kPageSize);
      ASSERT_EQ(st.kind, PageKind::kSoftLeaf) << "page " << i;
      ASSERT_EQ(st.pfn, first.pfn + i) << "page " << i;
      ASSERT_TRUE(st.large) << "page " << i;
    }
  }

  std::unique_ptr<TestDevice> dev;
  Va va = 0;
};

TEST_F(MigrateThpTest, ThpMovesWholeBothWays) {
  fill_pages(*as, va, kPmdSize, 1);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  const uint64_t free_before = mem->free_pages();
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  expect_device_pmd();
  EXPECT_EQ(mem->free_pages(), free_before + kPagesPerPmd);  // the THP was freed
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(*to_system(), kPagesPerPmd);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
}

// A CPU access to a device-private PMD brings the whole folio back in one fault.
TEST_F(MigrateThpTest, CpuFaultOnDevicePmdMigratesWholeFolio) {
  fill_pages(*as, va, kPmdSize, 2);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 100 * kPageSize), pattern(va + 100 * kPageSize, 2));
  EXPECT_EQ(dev->cpu_faults.load(), 1);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 2), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 1);
}

// Seed 003, system -> device: the driver could only get 4 KiB device pages, so the unmapped
// source THP is split inside migrate_vma_pages and each page moves on its own.
TEST_F(MigrateThpTest, SmallDeviceDestinationsSplitSourceThp) {
  fill_pages(*as, va, kPmdSize, 3);
  dev->fail_thp_alloc = true;
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  EXPECT_EQ(mem->stat_split_migrating.get(), 1u);
  for (uint64_t p = 0; p < kPagesPerPmd; p += 97) {
    const PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf) << p;
    EXPECT_FALSE(st.large) << p;
    EXPECT_TRUE(st.writable) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 3), 0);  // 512 CPU faults, one page each
  EXPECT_EQ(dev->cpu_faults.load(), static_cast<int>(kPagesPerPmd));
}

// Seed 003, device -> system from a CPU fault: only 4 KiB system pages, so the device folio
// (the fault page, locked by the fault handler) is split; the handler's lock and reference
// stay on the first page.
TEST_F(MigrateThpTest, SmallSystemDestinationsSplitDeviceFolioOnFault) {
  fill_pages(*as, va, kPmdSize, 4);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  dev->fail_thp_alloc = true;
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 7 * kPageSize), pattern(va + 7 * kPageSize, 4));
  EXPECT_EQ(dev->cpu_faults.load(), 1);
  EXPECT_EQ(dev->splits.load(), 1);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + kPmdSize - kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);  // 512 small device folios freed
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 4), 0);
}

// An untouched 2 MiB and the huge zero folio are compound holes: one device THP each, or 512
// small device pages when no 2 MiB device folio can be had.
TEST_F(MigrateThpTest, HoleAndHugeZeroGetCompoundDestinations) {
  ASSERT_EQ(*to_device(), kPagesPerPmd);  // untouched: a hole
  expect_device_pmd();
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 5 * kPageSize), 0u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);  // came back whole
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  ASSERT_EQ(*cpu::load<uint64_t>(*as, va), 0u);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  expect_device_pmd();
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(*to_system(), kPagesPerPmd);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  ASSERT_EQ(*cpu::load<uint64_t>(*as, va), 0u);  // huge zero again
  dev->fail_thp_alloc = true;
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  EXPECT_EQ(query_page(*as, va + 3 * kPageSize).kind, PageKind::kSoftLeaf);
  EXPECT_FALSE(query_page(*as, va + 3 * kPageSize).large);
  EXPECT_MM_CHECK_OK(*mem);
  fill_pages(*as, va, kPmdSize, 5);  // CPU writes fault every page back
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 5), 0);
}

// Eviction by device pfn collects the 2 MiB device folio whole; a partial munmap racing the
// eviction splits its PMD migration entry, and finalize restores what is left.
TEST_F(MigrateThpTest, EvictionOfDeviceThpRacesPartialMunmap) {
  fill_pages(*as, va, kPmdSize, 6);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  const uint64_t n = dev->pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev->pgmap()->first_pfn(), n), 0);
  EXPECT_EQ(TestDevice::count_moved(src.data(), n), kPagesPerPmd);
  std::thread process([&] { EXPECT_EQ(as->munmap(va, kPmdSize / 2), 0); });
  process.join();
  dev->copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  EXPECT_EQ(query_page(*as, va + kPmdSize / 2).kind, PageKind::kThpPte);  // a PTE-mapped THP
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va + kPmdSize / 2, kPmdSize / 2, 6), 0);
}

// Seed 003 rule 6: without a VMA (migrate_device_pages) a compound source with 4 KiB
// destinations is not split: it stays on the device, its src word loses MIGRATE and COMPOUND,
// and the small destinations are released by finalize. A later eviction with a compound
// destination moves it whole.
TEST_F(MigrateThpTest, MigrateDevicePages_CompoundSourceSmallDest_NotMigrated) {
  fill_pages(*as, va, kPmdSize, 12);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  expect_device_pmd();
  const Pfn dpfn = query_page(*as, va).pfn;
  const uint64_t n = dev->pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev->pgmap()->first_pfn(), n), 0);
  const uint64_t i = dpfn - dev->pgmap()->first_pfn();
  ASSERT_EQ(src[i] & (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND),
            MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND);
  dev->fail_thp_alloc = true;  // 512 small system destinations
  const uint64_t free_before = mem->free_pages();
  dev->copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  EXPECT_EQ(src[i] & (MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND), 0u);
  EXPECT_EQ(TestDevice::count_moved(src.data(), n), 0u);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  // Unmigrated, unsplit: the same device folio, still PMD-mapped, no split callback.
  expect_device_pmd();
  EXPECT_EQ(query_page(*as, va).pfn, dpfn);
  EXPECT_EQ(mem->folio_of(dpfn)->order(), kPmdOrder);
  EXPECT_EQ(dev->splits.load(), 0);
  EXPECT_EQ(mem->free_pages(), free_before);  // the small destinations went back
  EXPECT_MM_CHECK_OK(*mem);
  // With a 2 MiB destination the eviction moves it whole.
  dev->fail_thp_alloc = false;
  EXPECT_EQ(*dev->evict_all(), kPagesPerPmd);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(dev->splits.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 12), 0);
}

// Seed 003 rule 8 (Brost: a freed large device folio reused as 4 KiB): once a 2 MiB device
// folio is freed, any of its frames can be handed out again as a 4 KiB folio, without a split.
TEST_F(MigrateThpTest, DevPagemap_FreedThpFramesReusedAsSmall_Works) {
  fill_pages(*as, va, kPmdSize, 15);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  const Pfn block = query_page(*as, va).pfn;
  ASSERT_EQ(mem->folio_of(block)->order(), kPmdOrder);
  ASSERT_EQ(*to_system(), kPagesPerPmd);
  ASSERT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  DevPagemap* pgmap = dev->pgmap();
  for (Pfn pfn : {block, block + 5, block + kPagesPerPmd - 1}) {
    Folio* f = pgmap->folio_init(pfn, 0);
    ASSERT_NE(f, nullptr) << pfn - block;
    EXPECT_EQ(f->order(), 0u);
    EXPECT_EQ(f->refcount(), 1);
    EXPECT_EQ(pgmap->folio_init(pfn, 0), nullptr) << "a frame in use is not handed out twice";
    f->put();
  }
  EXPECT_EQ(dev->splits.load(), 0);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 15), 0);
}

// Seed 003 rule 1 (Zi Yan: no "isolated" flag on the generic split): the split for folios in
// migration refuses a folio that is still mapped, so it cannot be misused as a split of a
// mapped folio: -EBUSY and nothing changes.
TEST_F(MigrateThpTest, SplitMigratingFolio_MappedFolio_Ebusy) {
  fill_pages(*as, va, kPmdSize, 13);
  Folio* folio = mem->folio_of(query_page(*as, va).pfn);
  ASSERT_EQ(folio->order(), kPmdOrder);
  folio->get();
  folio_lock(folio);
  EXPECT_EQ(split_migrating_folio(folio, 1), -EBUSY);
  folio_unlock(folio);
  folio->put();
  EXPECT_EQ(folio->order(), kPmdOrder);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(mem->stat_split_migrating.get(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 13), 0);
}

// Seed 003 rule 5: a small source with a compound destination is not supported: the source
// loses MIGRATE, stays mapped, and the destination goes back to the driver.
TEST_F(MigrateThpTest, MigrateVmaPages_SmallSourceCompoundDest_NotMigrated) {
  const Va small = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, small, 4 * kPageSize, 14);
  std::vector<uint64_t> src(4), dst(4);
  MigrateVma m{.mm = as.get(), .start = small, .end = small + 4 * kPageSize, .src = src.data(),
               .dst = dst.data(), .pgmap_owner = dev.get(), .flags = MIGRATE_VMA_SELECT_SYSTEM};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&m), 0);
    ASSERT_EQ(m.cpages, 4u);
    Folio* huge = dev->alloc_device_page(kPmdOrder);
    ASSERT_NE(huge, nullptr);
    folio_lock(huge);
    dst[0] = migrate_pfn(huge->pfn()) | MIGRATE_PFN_COMPOUND;
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    EXPECT_EQ(src[0] & MIGRATE_PFN_MIGRATE, 0u);
    migrate_vma_finalize(&m);
  }
  const PageState st = query_page(*as, small);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_TRUE(st.writable);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);  // the 2 MiB destination was freed
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, small, 4 * kPageSize, 14), 0);
}

// A partial munmap splits the device-private PMD: the rest of the device folio is mapped by
// PTEs. A CPU fault on one of them splits the folio (it is the fault page, locked by the
// fault handler) and brings that page back; a migration brings back the rest.
TEST_F(MigrateThpTest, PartialUnmapOfDevicePmdThenFaultAndMigrateBack) {
  fill_pages(*as, va, kPmdSize, 8);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  ASSERT_EQ(as->munmap(va, kPmdSize / 4), 0);
  const Va rest = va + kPmdSize / 4;
  const PageState st = query_page(*as, rest);
  EXPECT_EQ(st.kind, PageKind::kSoftLeaf);
  EXPECT_TRUE(st.large);  // still one device folio, now PTE-mapped
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, rest + 10 * kPageSize), pattern(rest + 10 * kPageSize, 8));
  EXPECT_EQ(dev->cpu_faults.load(), 1);
  EXPECT_EQ(dev->splits.load(), 1);
  EXPECT_EQ(query_page(*as, rest + 10 * kPageSize).kind, PageKind::kSmall);
  EXPECT_FALSE(query_page(*as, rest + 11 * kPageSize).large);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(*dev->migrate_to_system(*as, rest, va + kPmdSize), 3 * kPagesPerPmd / 4 - 1);
  EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, rest, 3 * kPmdSize / 4, 8), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 1);
}

// A CPU thread reads and writes while the 2 MiB migrates back and forth, whole or split
// (every third round only 4 KiB destinations): every access sees the data.
TEST_F(MigrateThpTest, CompoundMigrationRacesCpu) {
  fill_pages(*as, va, kPmdSize, 9);
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::thread cpu_thread([&] {
    uint64_t n = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const Va a = va + ((n++ * 131) % kPagesPerPmd) * kPageSize;
      Result<uint64_t> v = cpu::load<uint64_t>(*as, a);
      if (!v || *v != pattern(a, 9)) errors++;
      if (cpu::store<uint64_t>(*as, a + 8, n)) errors++;
    }
  });
  for (int round = 0; round < 24; round++) {
    dev->fail_thp_alloc = round % 3 == 2;
    if (!to_device().ok()) errors++;
    if (!to_system().ok()) errors++;
  }
  stop = true;
  cpu_thread.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 9), 0);
}

// Without SELECT_COMPOUND, a THP is split first and moves as 512 small pages.
TEST_F(MigrateThpTest, WithoutCompoundThpIsSplitFirst) {
  fill_pages(*as, va, kPmdSize, 7);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize), kPagesPerPmd);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 1u);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  EXPECT_FALSE(query_page(*as, va).large);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 7), 0);
}

// mprotect makes a writable device-private PMD read-only (Linux's change_huge_pmd): the
// folio comes back read-only in the read-only VMA, and writable again only by a write fault
// after PROT_WRITE returns.
TEST_F(MigrateThpTest, MprotectMakesDevicePmdReadOnly) {
  fill_pages(*as, va, kPmdSize, 17);
  ASSERT_EQ(*to_device(), kPagesPerPmd);
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  ASSERT_EQ(as->mprotect(va, kPmdSize, PROT_READ), 0);
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateRead);
  EXPECT_TRUE(query_page(*as, va).large);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 17), 0);  // faults the folio back, read-only
  EXPECT_FALSE(query_page(*as, va).writable);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->mprotect(va, kPmdSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 8, 1), 0);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 17), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::mm::testing
