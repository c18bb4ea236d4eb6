// Deterministic replays of the seed races, step by step, with schedule points
// (gpusvm/base/sched_point.h): a migrating walk is stopped in a window where it has read an
// entry and has not acted on it yet, the test changes the entry from its own thread by a
// legal operation (another owner's migration, a CPU fault, MADV_DONTNEED, a refault), then
// lets the walk go on. Each test checks what the walk collected (src / HMM_PFN_MIGRATE), the
// entry left behind, every byte and mm::check.
//
//  - issue 9 §1, seed 002 v1's window at PMD level: the walk decided on a huge PMD in one
//    PMD-lock hold and acted in another, so it collected pages it never selected;
//  - seed 002 v1's window at PTE level, which the PTE loop closes by holding the table lock
//    from the read to the migration entry;
//  - seed 000: the leftover migration entry, on each error path of the walk.
#include <gtest/gtest.h>

#include <cstring>
#include <thread>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

constexpr const char* kVictim = "victim";

// Every word of every page of [start, start + len): the first word pattern(va, gen) (or 0
// when gen == 0: never written), the rest zero. Returns the number of bad pages.
int verify_every_byte(AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  std::vector<uint64_t> buf(kPageSize / sizeof(uint64_t));
  int bad = 0;
  for (Va va = start; va < start + len; va += kPageSize) {
    if (cpu::copy_out(as, va, buf.data(), kPageSize) != 0) {
      if (bad++ < 5) ADD_FAILURE() << "page " << std::hex << va << " unreadable";
      continue;
    }
    bool ok = buf[0] == (gen ? pattern(va, gen) : 0);
    for (size_t w = 1; w < buf.size() && ok; w++) ok = buf[w] == 0;
    if (!ok && bad++ < 5) ADD_FAILURE() << "page " << std::hex << va << ": word 0 is " << buf[0];
  }
  return bad;
}

// One migration of [start, end) as a driver does it, split so that a test can look at what
// the collection walk took (src after migrate_vma_setup) before it is committed.
struct Migration {
  int rc = 0;
  uint64_t cpages = 0;
  uint64_t moved = 0;
  std::vector<uint64_t> src_after_setup;
};

Migration run_migration(TestDevice& dev, AddressSpace& as, Va start, Va end, unsigned flags,
                        bool to_device) {
  const uint64_t n = (end - start) >> kPageShift;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m{.mm = &as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
               .pgmap_owner = &dev, .flags = flags};
  Migration out;
  ReadLock g(&as.mmap_lock());
  out.rc = migrate_vma_setup(&m);
  out.src_after_setup = src;
  if (out.rc != 0) return out;
  out.cpages = m.cpages;
  dev.copy_to_new_pages(src.data(), dst.data(), n, to_device);
  migrate_vma_pages(&m);
  out.moved = TestDevice::count_moved(src.data(), n);
  migrate_vma_finalize(&m);
  return out;
}

// Runs `fn` on a thread named kVictim (the one the test's Pause stops).
template <typename Fn>
std::thread victim_thread(Fn fn) {
  return std::thread([fn] {
    sched_point::set_thread_name(kVictim);
    fn();
    sched_point::set_thread_name("");
  });
}

class SeedRaceTest : public MmTest {
 protected:
  static constexpr uint64_t kDevPages = 4 * kPagesPerPmd;
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), kDevPages);
    dev2 = std::make_unique<TestDevice>(mem.get(), kDevPages);
    ASSERT_TRUE(dev->ok() && dev2->ok());
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), kDevPages) << "device pages leaked";
    EXPECT_EQ(dev2->free_pages(), kDevPages) << "device pages leaked";
    dev.reset();
    dev2.reset();
    MmTest::TearDown();
  }
  Va map_huge(uint64_t len = kPmdSize) {
    const Va va = map_anon(*as, len, PROT_READ | PROT_WRITE, /*huge=*/true);
    EXPECT_TRUE(va && pmd_aligned(va));
    return va;
  }
  bool in_dev(TestDevice& d, Va va) { return d.pgmap()->contains(query_page(*as, va).pfn); }

  std::unique_ptr<TestDevice> dev, dev2;  // owners A and B
};

// ---------------------------------------------------------------------------------------
// Issue 9 §1 (seed 002 v1's window at PMD level): a huge PMD replaced between the read and
// the hold in which the walk decides and acts.
// ---------------------------------------------------------------------------------------

// (a) Owner A's SELECT_SYSTEM walk must not collect owner B's device-private PMD.
//   1. A's walk (migrate_vma_setup, SYSTEM | COMPOUND) reads the system THP at va;
//      it stops at mm.hmm.pmd_read (mmap read lock, A's MIGRATE invalidation open).
//   2. B migrates the THP to its device: va is now B's device-private PMD, B's folio.
//   3. A goes on. It must see B's PMD (not A's: not VALID, not selected) and leave it: the
//      bug collected it, moved it to A's device and freed B's folio, without B's notifier
//      hearing of it (A's invalidation had begun before B mapped the page).
TEST_F(SeedRaceTest, PmdRead_SystemWalkLeavesOtherOwnersDevicePmd) {
  const Va va = map_huge();
  fill_pages(*as, va, kPmdSize, 1);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  TestMirror b_mirror;  // B's driver mirror of the range
  MmuIntervalNotifier b_notifier;
  ASSERT_EQ(b_notifier.insert(as.get(), va, kPmdSize, &b_mirror), 0);

  Migration a;
  sched_point::Pause pause("mm.hmm.pmd_read", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPmdSize, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND,
                      /*to_device=*/true);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  ASSERT_EQ(*dev2->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  const PageState b_page = query_page(*as, va);                                 // step 2
  ASSERT_EQ(b_page.kind, PageKind::kSoftLeaf);
  ASSERT_TRUE(dev2->pgmap()->contains(b_page.pfn));
  const int b_freed = dev2->freed.load();
  const int b_invalidations = b_mirror.invalidations;
  pause.release();                                                              // step 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_FALSE(a.src_after_setup[0] & MIGRATE_PFN_MIGRATE) << "A collected B's device PMD";
  EXPECT_EQ(a.moved, 0u);
  const PageState now = query_page(*as, va);
  EXPECT_EQ(now.kind, PageKind::kSoftLeaf);
  EXPECT_EQ(now.pfn, b_page.pfn) << "B's folio no longer backs va";
  EXPECT_EQ(dev2->freed.load(), b_freed);
  // B's mapping is still valid, so B needed no invalidation; the bug freed the folio
  // without one.
  EXPECT_EQ(b_mirror.invalidations, b_invalidations);
  EXPECT_EQ(dev->free_pages(), kDevPages);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPmdSize, 1), 0);  // CPU faults bring it home from B
  b_notifier.remove();
}

// (b) A SELECT_DEVICE_PRIVATE walk must not collect the system THP that a CPU fault put back.
//   1. A's walk (DEVICE_PRIVATE | COMPOUND) reads A's device-private PMD at va; stops.
//   2. A CPU read faults on it: A's migrate_to_ram moves the folio home, a system THP.
//   3. A's walk goes on: system memory is not selected; the bug collected the THP and moved
//      it system -> system.
TEST_F(SeedRaceTest, PmdRead_DevicePrivateWalkLeavesSystemThpOfCpuFault) {
  const Va va = map_huge();
  fill_pages(*as, va, kPmdSize, 2);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  Migration a;
  sched_point::Pause pause("mm.hmm.pmd_read", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPmdSize,
                      MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_COMPOUND, /*to_device=*/false);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 100 * kPageSize), pattern(va + 100 * kPageSize, 2));
  ASSERT_EQ(dev->cpu_faults.load(), 1);                                         // step 2
  const PageState thp = query_page(*as, va);
  ASSERT_EQ(thp.kind, PageKind::kThpPmd);
  pause.release();                                                              // step 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_FALSE(a.src_after_setup[0] & MIGRATE_PFN_MIGRATE) << "a system THP collected without SELECT_SYSTEM";
  EXPECT_EQ(a.moved, 0u);
  const PageState now = query_page(*as, va);
  EXPECT_EQ(now.kind, PageKind::kThpPmd);
  EXPECT_EQ(now.pfn, thp.pfn) << "the THP was moved";
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPmdSize, 2), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 1);
}

// (c) A SELECT_DEVICE_PRIVATE walk must not take the huge zero folio as a compound hole.
//   1. A's walk (DEVICE_PRIVATE | COMPOUND) reads A's device-private PMD; stops.
//   2. A CPU read brings the folio home; MADV_DONTNEED drops it; a CPU read maps the huge
//      zero folio.
//   3. A's walk goes on: a hole receives a page only with SELECT_SYSTEM; the bug marked it
//      VALID|MIGRATE|COMPOUND and a fresh THP replaced the huge zero folio.
TEST_F(SeedRaceTest, PmdRead_DevicePrivateWalkLeavesHugeZeroOfRefault) {
  const Va va = map_huge();
  fill_pages(*as, va, kPmdSize, 3);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  Migration a;
  sched_point::Pause pause("mm.hmm.pmd_read", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPmdSize,
                      MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_COMPOUND, /*to_device=*/false);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), pattern(va, 3));
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 9 * kPageSize), 0u);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);                     // step 2
  const uint64_t free_before = mem->free_pages();
  pause.release();                                                              // step 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_FALSE(a.src_after_setup[0] & MIGRATE_PFN_MIGRATE) << "a hole collected without SELECT_SYSTEM";
  EXPECT_EQ(a.moved, 0u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);
  EXPECT_EQ(mem->free_pages(), free_before);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPmdSize, 0), 0);
}

}  // namespace
}  // namespace gpusvm::mm::testing
