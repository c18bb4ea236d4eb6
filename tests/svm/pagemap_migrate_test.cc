// migrate_to_devmem, the CPU-fault migrate_to_ram and evict_to_ram: 4 KiB, 64 KiB and 2 MiB
// ranges, every byte checked in device memory and after it came back.
#include <chrono>
#include <thread>

#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/hmm.h"
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

TEST(SvmPagemap, CreateRejectsBadInput) {
  auto mem = mm::testing::make_mem();
  ASSERT_NE(mem, nullptr);
  TestVram vram(mem.get(), kPagesPerPmd, "vram");
  ASSERT_TRUE(vram.ok());
  EXPECT_EQ(Pagemap::create(nullptr, vram.dev_pagemap(), &vram).error(), -EINVAL);
  EXPECT_EQ(Pagemap::create(vram.device(), nullptr, &vram).error(), -EINVAL);
  EXPECT_EQ(Pagemap::create(vram.device(), vram.dev_pagemap(), nullptr).error(), -EINVAL);
  // A dev_pagemap with some other driver's ops is not ours to manage.
  struct OtherOps : mm::DevPagemapOps {
    void folio_free(mm::Folio*) override {}
    mm::VmFault migrate_to_ram(const mm::VmFaultInfo&) override { return mm::VmFault::kSigbus; }
  } other;
  auto foreign = mm::DevPagemap::create(mem.get(), kPagesPerPmd, &other, &other, true);
  ASSERT_TRUE(foreign);
  EXPECT_EQ(Pagemap::create(vram.device(), foreign->get(), &vram).error(), -EINVAL);
  // A system page has no svm pagemap.
  mm::Folio* f = mem->folio_alloc(0);
  EXPECT_EQ(page_to_pagemap(f), nullptr);
  f->put();
  EXPECT_EQ(vram.pagemap()->refcount(), 1);
}

TEST_F(PagemapTest, Migrate4KiBAndCpuFaultBack) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(migrate(va, kPageSize), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPageSize, 1), 0u);
  mm::Folio* page = mem->pfn_to_page(pfn_at(*as, va));
  EXPECT_EQ(page_to_pagemap(page), vram->pagemap());
  EXPECT_EQ(vram->free_pages(), kVramPages - 1);
  EXPECT_FALSE(last->released());
  EXPECT_MM_CHECK_OK(*mem);
  // The CPU touches it: the allocation comes back whole, and is released.
  EXPECT_EQ(cpu_bad_words(*as, va, kPageSize, 1), 0u);
  EXPECT_EQ(system_pages(*as, va, kPageSize), 1u);
  EXPECT_TRUE(last->released());
  EXPECT_TRUE(last->detached().signaled());
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_EQ(vram->pagemap()->refcount(), 1);  // the allocation's reference went with it
}

TEST_F(PagemapTest, Migrate64KiBAndOneFaultBringsTheAllocationBack) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 2);
  ASSERT_EQ(migrate(va, len), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, va, len, 2), 0u);
  EXPECT_EQ(vram->copies_to_devmem.load(), 1);  // one copy for the whole range
  const uint64_t faults = pagemap_stats().cpu_faults.load();
  Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, va + 5 * kPageSize + 8);
  ASSERT_TRUE(w);
  EXPECT_EQ(*w, word_at(va + 5 * kPageSize + 8, 2));
  EXPECT_EQ(pagemap_stats().cpu_faults.load(), faults + 1);
  EXPECT_EQ(system_pages(*as, va, len), 16u);  // drm_pagemap moves the whole allocation
  EXPECT_TRUE(last->released());
  EXPECT_EQ(cpu_bad_words(*as, va, len, 2), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, Migrate2MiBThpGetsACompoundDestination) {
  const Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_TRUE(mm::pmd_aligned(va));
  fill_bytes(*as, va, kPmdSize, 3);
  ASSERT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
  ASSERT_EQ(migrate(va, kPmdSize), 0);
  const mm::PageState st = mm::query_page(*as, va);
  EXPECT_EQ(st.kind, mm::PageKind::kSoftLeaf);
  EXPECT_TRUE(st.large);  // one 2 MiB device folio, mapped by a device-private PMD
  EXPECT_EQ(mem->folio_of(pfn_at(*as, va))->order(), mm::kPmdOrder);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize, 3), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  // Back by one CPU fault, as a THP again.
  EXPECT_EQ(cpu_bad_words(*as, va + kPmdSize / 2, kPageSize, 3), 0u);
  EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
  EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize, 3), 0u);
  EXPECT_TRUE(last->released());
  EXPECT_MM_CHECK_OK(*mem);
}

// A THP source whose allocation is 4 KiB pages (not a 2 MiB block): the source is split in
// the migration and every page moves on its own.
TEST_F(PagemapTest, ThpSourceWithSmallDestinations) {
  const Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_bytes(*as, va, kPmdSize, 4);
  ASSERT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
  vram->fragmented = true;
  TestDevmem* dm = vram->alloc_devmem(as.get(), kPmdSize);
  ASSERT_NE(dm, nullptr);
  ASSERT_EQ(migrate_to_devmem(dm, as.get(), va, va + kPmdSize, {}), 0);
  EXPECT_FALSE(mm::query_page(*as, va).large);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize, 4), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(cpu_bad_words(*as, va, kPmdSize, 4), 0u);
  EXPECT_TRUE(dm->released());
}

// A migration of part of a 2 MiB device folio: the walk splits the folio first (folio_split
// gives each small folio its own reference on the allocation), finds every page already in
// this pagemap and has nothing to do. The allocation then lives on in 512 small folios until
// the last of them goes.
TEST_F(PagemapTest, PartOfA2MiBDeviceFolioIsSplitAndStays) {
  const Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_bytes(*as, va, kPmdSize, 12);
  ASSERT_EQ(migrate(va, kPmdSize), 0);
  TestDevmem* old = last;
  ASSERT_EQ(mem->folio_of(pfn_at(*as, va))->order(), mm::kPmdOrder);
  const Va part = va + 32 * kPageSize;
  ASSERT_EQ(migrate(part, 16 * kPageSize, MigrateDetails{.can_migrate_same_pagemap = true}), 0);
  EXPECT_TRUE(last->released());  // not needed: consumed
  EXPECT_EQ(mem->folio_of(pfn_at(*as, va))->order(), 0u);
  EXPECT_EQ(device_bad_words(*as, *vram, va, kPmdSize, 12), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  // Each small folio holds the allocation: freeing some of them does not release it.
  ASSERT_EQ(as->munmap(part, 16 * kPageSize), 0);
  EXPECT_FALSE(old->released());
  EXPECT_EQ(device_bad_words(*as, *vram, va, 32 * kPageSize, 12), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va, 32 * kPageSize, 12), 0u);  // the fault takes the allocation back
  EXPECT_EQ(evict_to_ram(old), 0);
  EXPECT_TRUE(old->released());
  EXPECT_EQ(cpu_bad_words(*as, part + 16 * kPageSize, kPmdSize - 48 * kPageSize, 12), 0u);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, HolesAreZeroFilled) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, va + 3 * kPageSize, 7), 0);  // one page present
  ASSERT_EQ(migrate(va, len), 0);
  EXPECT_EQ(device_bad_words(*as, *vram, va, 3 * kPageSize, 0), 0u);
  std::vector<uint64_t> buf(len / 8);
  ASSERT_EQ(mm::cpu::copy_out(*as, va, buf.data(), len), 0);
  for (uint64_t i = 0; i < buf.size(); i++) EXPECT_EQ(buf[i], i == 3 * kPageSize / 8 ? 7u : 0u) << i;
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, AlreadyInThisPagemap) {
  const uint64_t len = 4 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 5);
  ASSERT_EQ(migrate(va, len), 0);
  TestDevmem* first = last;
  // All there: nothing to do, the new allocation is consumed.
  EXPECT_EQ(migrate(va, len), 0);
  EXPECT_TRUE(last->released());
  EXPECT_FALSE(first->released());
  // Partly there: all or nothing.
  const Va big = map_anon(*as, 2 * len);
  fill_bytes(*as, big, 2 * len, 6);
  ASSERT_EQ(migrate(big, len), 0);
  TestDevmem* old = last;
  EXPECT_EQ(migrate(big, 2 * len), -EBUSY);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(device_bad_words(*as, *vram, big, len, 6), 0u);
  EXPECT_EQ(system_pages(*as, big + len, len), 4u);
  // can_migrate_same_pagemap: the pages move into the new allocation.
  ASSERT_EQ(migrate(big, 2 * len, MigrateDetails{.can_migrate_same_pagemap = true}), 0);
  EXPECT_TRUE(old->released());
  EXPECT_EQ(device_bad_words(*as, *vram, big, 2 * len, 6), 0u);
  EXPECT_EQ(cpu_bad_words(*as, big, 2 * len, 6), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 5), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, BadInputConsumesTheAllocationAndChangesNothing) {
  const Va va = map_anon(*as, 4 * kPageSize);
  fill_bytes(*as, va, 4 * kPageSize, 7);
  EXPECT_EQ(migrate_to_devmem(nullptr, as.get(), va, va + kPageSize, {}), -EINVAL);
  struct Case {
    Va start, end;
    int err;
  } cases[] = {
      {va + 1, va + kPageSize, -EINVAL},              // unaligned
      {va, va, -EINVAL},                              // empty
      {va, va + 8 * kPageSize, -EINVAL},              // larger than the allocation
      {va + 4 * kPageSize, va + 5 * kPageSize, -ENOENT},  // no VMA
  };
  for (const Case& c : cases) {
    TestDevmem* dm = vram->alloc_devmem(as.get(), 4 * kPageSize);
    ASSERT_NE(dm, nullptr);
    EXPECT_EQ(migrate_to_devmem(dm, as.get(), c.start, c.end, {}), c.err) << std::hex << c.start;
    EXPECT_TRUE(dm->released());
  }
  // Straddling two VMAs.
  const Va two = map_anon(*as, 2 * kPageSize);
  ASSERT_EQ(as->mprotect(two + kPageSize, kPageSize, PROT_READ), 0);
  TestDevmem* dm = vram->alloc_devmem(as.get(), 2 * kPageSize);
  EXPECT_EQ(migrate_to_devmem(dm, as.get(), two, two + 2 * kPageSize, {}), -EINVAL);
  EXPECT_TRUE(dm->released());
  EXPECT_EQ(cpu_bad_words(*as, va, 4 * kPageSize, 7), 0u);
  EXPECT_EQ(system_pages(*as, va, 4 * kPageSize), 4u);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapTest, EvictToRam) {
  const uint64_t len = kPmdSize + 8 * kPageSize;
  const Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_bytes(*as, va, len, 8);
  ASSERT_EQ(migrate(va, kPmdSize), 0);  // a 2 MiB folio
  TestDevmem* huge = last;
  ASSERT_EQ(migrate(va + kPmdSize, 8 * kPageSize), 0);  // small pages
  TestDevmem* small = last;
  EXPECT_EQ(evict_to_ram(huge), 0);
  EXPECT_TRUE(huge->released());
  EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
  EXPECT_EQ(evict_to_ram(small), 0);
  EXPECT_TRUE(small->released());
  EXPECT_EQ(system_pages(*as, va, len), len / kPageSize);
  EXPECT_EQ(evict_to_ram(small), 0);  // nothing left: done
  EXPECT_EQ(cpu_bad_words(*as, va, len, 8), 0u);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
}

// A pinned page cannot move: nothing of the range moves, every byte stays.
TEST_F(PagemapTest, AllOrNothingWithAPinnedPage) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 9);
  mm::Folio* pinned = nullptr;
  ASSERT_EQ(mm::pin_user_pages_fast(*as, va + 7 * kPageSize, 1, mm::FOLL_WRITE, &pinned), 1);
  EXPECT_EQ(migrate(va, len), -EBUSY);
  EXPECT_TRUE(last->released());
  EXPECT_EQ(system_pages(*as, va, len), 16u);
  EXPECT_EQ(vram->free_pages(), kVramPages);
  EXPECT_MM_CHECK_OK(*mem);
  mm::unpin_user_page(pinned);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 9), 0u);
  EXPECT_EQ(migrate(va, len), 0);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 9), 0u);
}

TEST_F(PagemapTest, PreMigrateFenceOrdersTheCopy) {
  const uint64_t len = 4 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 10);
  auto fence = std::make_shared<Fence>();
  // Signalled only once the copy is waiting for it (bounded), so the order is certain.
  std::thread signaller([&] {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (vram->copies_before_fence.load() == 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_EQ(vram->copies_to_devmem.load(), 0) << "copied before the fence signalled";
    fence->signal();
  });
  EXPECT_EQ(migrate(va, len, {}, nullptr, fence), 0);
  signaller.join();
  EXPECT_EQ(vram->copies_before_fence.load(), 1);
  EXPECT_EQ(last->pre_migrate_fence(), nullptr);  // dropped once the copy is ordered after it
  EXPECT_EQ(device_bad_words(*as, *vram, va, len, 10), 0u);
  // A fence that never signals fails the copy (bounded) and rolls back.
  const std::chrono::milliseconds saved = hang_timeout();
  set_hang_timeout(std::chrono::milliseconds(50));
  auto never = std::make_shared<Fence>();
  const Va vb = map_anon(*as, len);
  fill_bytes(*as, vb, len, 11);
  EXPECT_EQ(migrate(vb, len, {}, nullptr, never), -ETIME);
  set_hang_timeout(saved);
  EXPECT_EQ(system_pages(*as, vb, len), 4u);
  EXPECT_EQ(cpu_bad_words(*as, vb, len, 11), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing
