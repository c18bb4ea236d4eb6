// migrate_vma: system <-> device-private migration through the collect-walk path, CPU faults
// on device pages (migrate_to_ram), and the pages that must not move.
#include <atomic>
#include <thread>

#include "tests/base/test_util.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

class MigrateTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 1024);
    ASSERT_TRUE(dev->ok());
  }
  void TearDown() override {
    // Device pages must be gone before the device: unmap everything first.
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 1024u) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }
  std::unique_ptr<TestDevice> dev;
};

TEST_F(MigrateTest, ToDeviceAndBackByCpuFaults) {
  constexpr uint64_t kPages = 64;
  Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, 48 * kPageSize, 1);                      // pages 0..47 written
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va + 50 * kPageSize).ok());  // page 50: zero page
  const uint64_t free_before = mem->free_pages();
  Result<uint64_t> moved = dev->migrate_to_device(*as, va, va + kPages * kPageSize);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, kPages);  // written pages, the zero page and the holes
  EXPECT_EQ(dev->free_pages(), 1024u - kPages);
  EXPECT_EQ(mem->free_pages(), free_before + 48);  // the system pages were freed
  for (uint64_t p = 0; p < kPages; p++) {
    PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf) << p;
    EXPECT_TRUE(dev->pgmap()->contains(st.pfn));
  }
  EXPECT_MM_CHECK_OK(*mem);
  // The device holds the bytes.
  const PageState st3 = query_page(*as, va + 3 * kPageSize);
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(dev->pgmap()->page_data(st3.pfn)),
            pattern(va + 3 * kPageSize, 1));
  // Every CPU access faults its page back.
  EXPECT_EQ(verify_pages(*as, va, 48 * kPageSize, 1), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 60 * kPageSize), 0u);
  EXPECT_EQ(dev->cpu_faults.load(), 49);
  EXPECT_EQ(query_page(*as, va + 3 * kPageSize).kind, PageKind::kSmall);
  EXPECT_TRUE(query_page(*as, va + 3 * kPageSize).writable);  // exclusivity survived
  EXPECT_EQ(query_page(*as, va + 61 * kPageSize).kind, PageKind::kSoftLeaf);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 61 * kPageSize, 7), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 61 * kPageSize), 7u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(MigrateTest, ToSystemMovesOnlyThisOwnersPages) {
  Va va = map_anon(*as, 16 * kPageSize);
  fill_pages(*as, va, 16 * kPageSize, 2);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  TestDevice other(mem.get(), 16);
  ASSERT_TRUE(other.ok());
  ASSERT_EQ(*other.migrate_to_device(*as, va + 8 * kPageSize, va + 16 * kPageSize), 8u);
  // dev collects only its own device pages.
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + 16 * kPageSize), 8u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + 8 * kPageSize).kind, PageKind::kSoftLeaf);
  ASSERT_EQ(*other.migrate_to_system(*as, va, va + 16 * kPageSize), 8u);
  EXPECT_EQ(verify_pages(*as, va, 16 * kPageSize, 2), 0);
  EXPECT_EQ(dev->cpu_faults.load() + other.cpu_faults.load(), 0);
  EXPECT_EQ(other.free_pages(), 16u);
}

// A busy page stays; a page shared with a child after fork moves for both processes (the
// reverse map unmaps the child's mapping too); a THP is split and moves page by page.
TEST_F(MigrateTest, BusyPageStaysSharedAndLargePagesMove) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 3);
  // Page 1 is locked by another thread (holding a folio lock while taking the mmap lock
  // would invert the lock order): skipped, not waited for.
  Folio* busy = mem->folio_of(query_page(*as, va + kPageSize).pfn);
  std::atomic<int> phase{0};
  std::thread holder([&] {
    folio_lock(busy);
    phase = 1;
    // Bounded: a test that fails before phase 2 must not keep the lock (and this thread).
    if (!testing_util::wait_until([&] { return phase.load() == 2; }, std::chrono::seconds(30))) {
      ADD_FAILURE() << "holder: never told to unlock folio pfn " << busy->pfn();
    }
    folio_unlock(busy);
  });
  if (!testing_util::wait_until([&] { return phase.load() == 1; })) {
    phase = 2;
    holder.join();
    FAIL() << "holder thread did not lock folio pfn " << busy->pfn();
  }
  // Pages 1..7 are shared with a child after fork; page 0 is written again (exclusive).
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 3)), 0);
  Result<uint64_t> moved = dev->migrate_to_device(*as, va, va + 8 * kPageSize);
  phase = 2;
  holder.join();
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 7u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSoftLeaf);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kSmall);
  for (uint64_t p = 2; p < 8; p++) {
    // One device page, mapped read-only by both processes.
    const PageState mine = query_page(*as, va + p * kPageSize);
    const PageState theirs = query_page(**child, va + p * kPageSize);
    EXPECT_EQ(mine.kind, PageKind::kSoftLeaf) << p;
    EXPECT_EQ(theirs.kind, PageKind::kSoftLeaf) << p;
    EXPECT_EQ(mine.pfn, theirs.pfn) << p;
    EXPECT_FALSE(mine.writable) << p;
    EXPECT_TRUE(dev->pgmap()->contains(mine.pfn)) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  // The child's reads fault the shared pages back for both processes.
  EXPECT_EQ(verify_pages(**child, va + kPageSize, 7 * kPageSize, 3), 0);
  EXPECT_EQ(query_page(*as, va + 2 * kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + 2 * kPageSize).pfn, query_page(**child, va + 2 * kPageSize).pfn);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  EXPECT_EQ(verify_pages(*as, va, 8 * kPageSize, 3), 0);
  // A THP is split and collected page by page.
  Va huge = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, huge, kPmdSize, 4);
  ASSERT_EQ(query_page(*as, huge).kind, PageKind::kThpPmd);
  ASSERT_EQ(*dev->migrate_to_device(*as, huge, huge + kPmdSize), kPagesPerPmd);
  EXPECT_EQ(query_page(*as, huge + 5 * kPageSize).kind, PageKind::kSoftLeaf);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, huge, kPmdSize, 4), 0);
}

TEST_F(MigrateTest, UnmapFreesDevicePagesAndBadArgumentsAreRejected) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 5);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  ASSERT_EQ(as->munmap(va, 4 * kPageSize), 0);
  EXPECT_EQ(dev->free_pages(), 1024u - 4);
  EXPECT_EQ(dev->freed.load(), 4);
  uint64_t src[2], dst[2];
  ReadLock g(&as->mmap_lock());
  MigrateVma ok{.mm = as.get(), .start = va + 4 * kPageSize, .end = va + 6 * kPageSize,
                .src = src, .dst = dst, .flags = MIGRATE_VMA_SELECT_SYSTEM};
  MigrateVma m = ok;
  m.start += 1;
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  m = ok;
  m.flags = 0;
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  m = ok;
  m.flags = 0x80;
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  m = ok;
  m.start = va;  // unmapped
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  m = ok;
  m.end = m.start;
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  m = ok;
  m.src = nullptr;
  EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
}

// CPU threads read and write while the range migrates back and forth: every access sees the
// data, through whichever memory holds it.
TEST_F(MigrateTest, CpuAccessRacesMigration) {
  constexpr uint64_t kPages = 32;
  Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 6);
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::thread cpu_thread([&] {
    uint64_t n = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const Va a = va + (n++ % kPages) * kPageSize;
      Result<uint64_t> v = cpu::load<uint64_t>(*as, a);
      if (!v || *v != pattern(a, 6)) errors++;
      if (cpu::store<uint64_t>(*as, a + 8, n)) errors++;
    }
  });
  for (int round = 0; round < 40; round++) {
    EXPECT_TRUE(dev->migrate_to_device(*as, va, va + kPages * kPageSize).ok());
    EXPECT_TRUE(dev->migrate_to_system(*as, va, va + kPages * kPageSize).ok());
  }
  stop = true;
  cpu_thread.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 6), 0);
}

}  // namespace
}  // namespace gpusvm::mm::testing
