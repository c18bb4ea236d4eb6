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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
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
                        bool to_device, MigrateWalkMode mode = MigrateWalkMode::kUnified) {
  const uint64_t n = (end - start) >> kPageShift;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m{.mm = &as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
               .pgmap_owner = &dev, .flags = flags, .walk_mode = mode};
  Migration out;
  ReadLock g(&as.mmap_lock());
  out.rc = migrate_vma_setup(&m);
  out.src_after_setup = src;
  if (out.rc != 0) return out;
  out.cpages = m.cpages;
  dev.copy_to_new_pages(src.data(), dst.data(), n, to_device);
  m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
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

// ---------------------------------------------------------------------------------------
// Seed 002 v1's window at PTE level. v1 reported the PTEs in one table-lock hold
// (hmm_vma_handle_pte) and installed migration entries in another
// (hmm_vma_handle_migrate_prepare); v2, and this walk, hold the table lock from the read to
// the migration entry. What is left of the window is before the lock: whatever changes there
// is what the walk reads, reports and collects, consistently.
// ---------------------------------------------------------------------------------------

//   1. A's walk (SYSTEM) over 16 pages - 0..7 system, 8..15 B's device pages - reads the
//      PMD (a table) and stops at mm.hmm.pte_lock, before the table lock.
//   2. In the window: a CPU read brings page 8 home from B; B migrates pages 0..3 to its
//      device; MADV_DONTNEED empties page 5.
//   3. A takes the lock: pages 4, 6, 7, 8 are collected with the pfns they have now, 5 as a
//      hole; 0..3 and 9..15 (B's) are neither collected nor touched.
TEST_F(SeedRaceTest, PteLock_EntriesChangedBeforeTheLockAreCollectedAsTheyAreNow) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 4);
  ASSERT_EQ(*dev2->migrate_to_device(*as, va + 8 * kPageSize, va + kPages * kPageSize), 8u);
  Migration a;
  sched_point::Pause pause("mm.hmm.pte_lock", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPages * kPageSize, MIGRATE_VMA_SELECT_SYSTEM, /*to_device=*/true);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 8 * kPageSize), pattern(va + 8 * kPageSize, 4));
  ASSERT_EQ(*dev2->migrate_to_device(*as, va, va + 4 * kPageSize), 4u);
  ASSERT_EQ(as->madvise(va + 5 * kPageSize, kPageSize, MADV_DONTNEED), 0);       // step 2
  std::vector<PageState> before(kPages);
  for (uint64_t i = 0; i < kPages; i++) before[i] = query_page(*as, va + i * kPageSize);
  pause.release();                                                              // step 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  for (uint64_t i = 0; i < kPages; i++) {
    const uint64_t w = a.src_after_setup[i];
    const bool collected = i == 4 || i == 6 || i == 7 || i == 8;
    if (i == 5) {
      EXPECT_EQ(w, MIGRATE_PFN_MIGRATE) << "the hole";
    } else if (collected) {
      EXPECT_TRUE(w & MIGRATE_PFN_MIGRATE) << i;
      EXPECT_EQ(migrate_pfn_to_pfn(w), before[i].pfn) << i;
    } else {
      EXPECT_EQ(w, 0u) << i;  // B's: not VALID for A, not collected
      const PageState now = query_page(*as, va + i * kPageSize);
      EXPECT_EQ(now.pfn, before[i].pfn) << i;
      EXPECT_TRUE(in_dev(*dev2, va + i * kPageSize)) << i;
    }
  }
  EXPECT_EQ(a.moved, 5u);
  for (uint64_t i = 4; i <= 8; i++) EXPECT_TRUE(in_dev(*dev, va + i * kPageSize)) << i;
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, 5 * kPageSize, 4), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 5 * kPageSize, kPageSize, 0), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 6 * kPageSize, 10 * kPageSize, 4), 0);
}

// The split window (mm.hmm.split_folio, after the table lock is dropped): the folio to split
// is referenced under the lock, so it cannot be freed and its frames reused meanwhile.
//   1. A's walk (SYSTEM) over pages 8..15 of a THP at x: the PMD is split, page 8 is a page
//      of a large folio; the walk drops the table lock and stops before the folio split.
//   2. MADV_DONTNEED of all of x unmaps the THP; a write fault at y, another huge VMA, maps
//      a new THP.
//   3. A goes on, splits what it referenced (x's folio, unmapped now), reads pages 8..15
//      again - holes - and collects them. y's THP must be left whole: before the fix the
//      walk looked the folio up by pfn after the drop and split y's THP, which had the
//      frames x's folio freed.
TEST_F(SeedRaceTest, SplitFolio_FolioZappedAndFramesReusedInTheWindow) {
  const Va x = map_huge();
  const Va y = map_huge();
  fill_pages(*as, x, kPmdSize, 5);
  ASSERT_EQ(query_page(*as, x).kind, PageKind::kThpPmd);
  const Pfn x_pfn = query_page(*as, x).pfn;
  Migration a;
  sched_point::Pause pause("mm.hmm.split_folio", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, x + 8 * kPageSize, x + 16 * kPageSize, MIGRATE_VMA_SELECT_SYSTEM,
                      /*to_device=*/true);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  ASSERT_EQ(as->madvise(x, kPmdSize, MADV_DONTNEED), 0);
  fill_pages(*as, y, kPmdSize, 6);
  const PageState y_thp = query_page(*as, y);                                   // step 2
  ASSERT_EQ(y_thp.kind, PageKind::kThpPmd);
  pause.release();                                                              // step 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_NE(y_thp.pfn, x_pfn) << "x's folio was freed while the walk meant to split it";
  const PageState y_now = query_page(*as, y);
  EXPECT_EQ(y_now.kind, PageKind::kThpPmd) << "the walk split another mapping's THP";
  EXPECT_EQ(y_now.pfn, y_thp.pfn);
  for (uint64_t i = 0; i < 8; i++) EXPECT_EQ(a.src_after_setup[i], MIGRATE_PFN_MIGRATE) << i;  // holes
  EXPECT_EQ(a.moved, 8u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, x, kPmdSize, 0), 0);
  EXPECT_EQ(verify_every_byte(*as, y, kPmdSize, 6), 0);
}

// ---------------------------------------------------------------------------------------
// Seed 000: a migration entry left behind when the walk ends in an error (a fault that fails
// after pages were collected, a busy folio, a failed split, the three-step path, an insert
// that finds the hole filled). The walk only ever marks MIGRATE on a word in the lock hold in
// which it installed the entry, so the abort finds every entry it installed; mm::check proves
// none is left.
// ---------------------------------------------------------------------------------------

// Fault failure at PTE level, after pages that changed in the window were collected.
//   1. A's hmm_range_fault (REQ_FAULT | REQ_WRITE | REQ_MIGRATE) over 16 pages - 0..7 on B's
//      device, 8..15 COW-shared with a child - stops at mm.hmm.pte_lock.
//   2. CPU reads bring pages 0..7 home from B (seed 000's racing CPU access); every
//      allocation is made to fail from now on.
//   3. A takes the lock and collects 0..7 (present, writable now); page 8 needs a COW fault,
//      which fails: -EFAULT, and the abort restores 0..7 (v1 had reported them 0 in its first
//      hold and installed entries in its second, which the abort then skipped).
TEST_F(SeedRaceTest, Seed000_FaultFailsAfterPagesChangedInTheWindow_PteLevel) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 7);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  fill_pages(*as, va, 8 * kPageSize, 7);  // 0..7 the parent's own again
  ASSERT_EQ(*dev2->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, kPages * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns(kPages), src(kPages), dst(kPages);
  MigrateVma m{.src = src.data(), .dst = dst.data(), .pgmap_owner = dev.get()};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + kPages * kPageSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
             .dev_private_owner = dev.get(), .migrate = &m};
  int rc = 0;
  sched_point::Pause pause("mm.hmm.pte_lock", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    ReadLock g(&as->mmap_lock());
    rc = hmm_range_fault(&r);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  for (uint64_t i = 0; i < 8; i++) {
    EXPECT_EQ(*cpu::load<uint64_t>(*as, va + i * kPageSize), pattern(va + i * kPageSize, 7)) << i;
  }
  std::vector<PageState> home(8);
  for (uint64_t i = 0; i < 8; i++) home[i] = query_page(*as, va + i * kPageSize);
  {
    fault_inject::ScopedArm fail("mm.alloc_folio", {.nth = 1, .times = 0});      // step 2
    ASSERT_EQ(fail.status(), 0);
    pause.release();                                                            // step 3
    t.join();
    EXPECT_GT(fault_inject::failures("mm.alloc_folio"), 0u);
  }
  EXPECT_EQ(rc, -EFAULT);
  for (uint64_t i = 0; i < kPages; i++) EXPECT_FALSE(pfns[i] & HMM_PFN_MIGRATE) << i;
  for (uint64_t i = 0; i < 8; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << i;
    EXPECT_EQ(st.pfn, home[i].pfn) << i;
    EXPECT_TRUE(st.writable) << i;
    EXPECT_FALSE(folio_test_locked(mem->folio_of(st.pfn))) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPages * kPageSize, 7), 0);
  EXPECT_EQ(verify_every_byte(**child, va, kPages * kPageSize, 7), 0);
  notifier.remove();
}

// Fault failure at PMD level, after a PMD that changed in the window was collected whole.
//   1. A's hmm_range_fault (REQ_FAULT | REQ_MIGRATE, COMPOUND) over 4 MiB, both PMDs B's
//      device-private PMDs, reads the first and stops at mm.hmm.pmd_read.
//   2. A CPU read brings the first home from B (a system THP); allocations fail from now on.
//   3. A collects the THP as a PMD migration entry (one hold); the second PMD needs a fault,
//      B's migrate_to_ram cannot allocate: -EFAULT, and the abort maps the THP again.
TEST_F(SeedRaceTest, Seed000_FaultFailsAfterPmdChangedInTheWindow_PmdLevel) {
  const Va va = map_huge(2 * kPmdSize);
  fill_pages(*as, va, 2 * kPmdSize, 8);
  ASSERT_EQ(*dev2->migrate_to_device(*as, va, va + 2 * kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), 2 * kPagesPerPmd);
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, 2 * kPmdSize, &mirror), 0);
  const uint64_t n = 2 * kPagesPerPmd;
  std::vector<uint64_t> pfns(n), src(n), dst(n);
  MigrateVma m{.src = src.data(), .dst = dst.data(), .pgmap_owner = dev.get(), .flags = MIGRATE_VMA_SELECT_COMPOUND};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + 2 * kPmdSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE,
             .dev_private_owner = dev.get(), .migrate = &m};
  int rc = 0;
  sched_point::Pause pause("mm.hmm.pmd_read", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    ReadLock g(&as->mmap_lock());
    rc = hmm_range_fault(&r);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 3 * kPageSize), pattern(va + 3 * kPageSize, 8));
  const PageState thp = query_page(*as, va);
  ASSERT_EQ(thp.kind, PageKind::kThpPmd);
  const Pfn b_second = query_page(*as, va + kPmdSize).pfn;
  {
    fault_inject::ScopedArm fail("mm.alloc_folio", {.nth = 1, .times = 0});      // step 2
    fault_inject::ScopedArm fail_thp("mm.alloc_folio_thp", {.nth = 1, .times = 0});
    ASSERT_EQ(fail.status(), 0);
    ASSERT_EQ(fail_thp.status(), 0);
    pause.release();                                                            // step 3
    t.join();
  }
  EXPECT_EQ(rc, -EFAULT);
  for (uint64_t i = 0; i < n; i++) {
    if (pfns[i] & HMM_PFN_MIGRATE) {
      ADD_FAILURE() << "word " << i << " still MIGRATE";
      break;
    }
  }
  const PageState now = query_page(*as, va);
  EXPECT_EQ(now.kind, PageKind::kThpPmd);
  EXPECT_EQ(now.pfn, thp.pfn);
  EXPECT_TRUE(now.writable);
  EXPECT_FALSE(folio_test_locked(mem->folio_of(now.pfn)));
  EXPECT_EQ(query_page(*as, va + kPmdSize).pfn, b_second);  // still B's
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, 2 * kPmdSize, 8), 0);
  notifier.remove();
}

// A busy folio at PMD level is reported, not taken, and keeps no reference of the walk.
//   1. A's walk (SYSTEM | COMPOUND) reads the THP and stops at mm.hmm.pmd_read.
//   2. Someone else locks the folio (another migration, reclaim).
//   3. A's trylock fails in the one hold: nothing collected; the folio is unlocked after.
// Then the same with the trylock failure injected (mm.migrate_trylock), with no window.
TEST_F(SeedRaceTest, Seed000_BusyThpIsReportedNotTaken) {
  const Va va = map_huge();
  fill_pages(*as, va, kPmdSize, 9);
  const PageState thp = query_page(*as, va);
  ASSERT_EQ(thp.kind, PageKind::kThpPmd);
  Folio* folio = mem->folio_of(thp.pfn);
  const unsigned flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND;
  Migration a;
  {
    sched_point::Pause pause("mm.hmm.pmd_read", {.thread = kVictim});
    ASSERT_EQ(pause.status(), 0);
    std::thread t = victim_thread([&] { a = run_migration(*dev, *as, va, va + kPmdSize, flags, true); });
    ASSERT_TRUE(pause.wait_reached());                                          // step 1
    folio_lock(folio);                                                          // step 2
    pause.release();                                                            // step 3
    t.join();
    folio_unlock(folio);
  }
  ASSERT_EQ(a.rc, 0);
  EXPECT_FALSE(a.src_after_setup[0] & MIGRATE_PFN_MIGRATE);
  EXPECT_EQ(a.moved, 0u);
  PageState now = query_page(*as, va);
  EXPECT_EQ(now.kind, PageKind::kThpPmd);
  EXPECT_EQ(now.pfn, thp.pfn);
  EXPECT_EQ(now.refcount, 1);  // the mapping's: the walk dropped its own
  EXPECT_MM_CHECK_OK(*mem);
  {
    fault_inject::ScopedArm busy("mm.migrate_trylock", {.nth = 1});
    ASSERT_EQ(busy.status(), 0);
    a = run_migration(*dev, *as, va, va + kPmdSize, flags, true);
    EXPECT_EQ(fault_inject::failures("mm.migrate_trylock"), 1u);
  }
  ASSERT_EQ(a.rc, 0);
  EXPECT_EQ(a.moved, 0u);
  now = query_page(*as, va);
  EXPECT_EQ(now.kind, PageKind::kThpPmd);
  EXPECT_EQ(now.refcount, 1);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPmdSize, 9), 0);
}

// A failed folio split, after a zap in the split window.
//   1. A's walk (SYSTEM) over pages 8..15 of a THP splits the PMD, finds page 8 of a large
//      folio, drops the table lock and stops at mm.hmm.split_folio.
//   2. MADV_DONTNEED of pages 8 and 9; every folio split fails from now on
//      (mm.migrate_split).
//   3. The split fails: the folio stays whole and in place; the walk reads 8..15 again:
//      8, 9 are holes (collected), 10..15 pages of the unsplittable folio (reported, left).
TEST_F(SeedRaceTest, Seed000_SplitFailsAfterZapInTheWindow) {
  const Va va = map_huge();
  fill_pages(*as, va, kPmdSize, 10);
  const Pfn pfn = query_page(*as, va).pfn;
  Migration a;
  sched_point::Pause pause("mm.hmm.split_folio", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va + 8 * kPageSize, va + 16 * kPageSize, MIGRATE_VMA_SELECT_SYSTEM, true);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  ASSERT_EQ(as->madvise(va + 8 * kPageSize, 2 * kPageSize, MADV_DONTNEED), 0);
  {
    fault_inject::ScopedArm no_split("mm.migrate_split", {.nth = 1, .times = 0}); // step 2
    ASSERT_EQ(no_split.status(), 0);
    pause.release();                                                            // step 3
    t.join();
    EXPECT_GT(fault_inject::failures("mm.migrate_split"), 0u);
  }
  ASSERT_EQ(a.rc, 0);
  EXPECT_EQ(a.src_after_setup[0], MIGRATE_PFN_MIGRATE);
  EXPECT_EQ(a.src_after_setup[1], MIGRATE_PFN_MIGRATE);
  for (uint64_t i = 2; i < 8; i++) EXPECT_EQ(a.src_after_setup[i], 0u) << i;
  EXPECT_EQ(a.moved, 2u);
  for (uint64_t i = 10; i < 16; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kThpPte) << i;
    EXPECT_EQ(st.pfn, pfn + i) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, 8 * kPageSize, 10), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 8 * kPageSize, 2 * kPageSize, 0), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 10 * kPageSize, kPmdSize - 10 * kPageSize, 10), 0);
}

// The three-step path (collect, fault, collect) failing in its fault step, after a zap of a
// page its first step had collected.
//   1. A's migrate_vma_setup (SYSTEM | FAULT, kThreeStep) over 16 pages - 0..7 system, 8..15
//      B's - collects 0..7 and stops at mm.migrate.three_step (their folio locks held).
//   2. MADV_DONTNEED of page 3 zaps its migration entry; allocations fail from now on.
//   3. The fault step cannot bring B's pages home: -EFAULT. The pages of step 1 are given
//      back; page 3's entry is gone, so its folio is only released (freed), not mapped.
TEST_F(SeedRaceTest, Seed000_ThreeStepFaultFailsAfterZapOfCollectedPage) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 11);
  ASSERT_EQ(*dev2->migrate_to_device(*as, va + 8 * kPageSize, va + kPages * kPageSize), 8u);
  Migration a;
  sched_point::Pause pause("mm.migrate.three_step", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPages * kPageSize, MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_FAULT,
                      true, MigrateWalkMode::kThreeStep);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kMigrationWrite);  // collected by step 1
  ASSERT_EQ(as->madvise(va + 3 * kPageSize, kPageSize, MADV_DONTNEED), 0);
  {
    fault_inject::ScopedArm fail("mm.alloc_folio", {.nth = 1, .times = 0});      // step 2
    ASSERT_EQ(fail.status(), 0);
    pause.release();                                                            // step 3
    t.join();
  }
  EXPECT_EQ(a.rc, -EFAULT);
  for (uint64_t i = 0; i < kPages; i++) EXPECT_EQ(a.src_after_setup[i], 0u) << i;
  for (uint64_t i = 0; i < 8; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    if (i == 3) {
      EXPECT_EQ(st.kind, PageKind::kNone);
      continue;
    }
    EXPECT_EQ(st.kind, PageKind::kSmall) << i;
    EXPECT_FALSE(folio_test_locked(mem->folio_of(st.pfn))) << i;
  }
  for (uint64_t i = 8; i < kPages; i++) EXPECT_TRUE(in_dev(*dev2, va + i * kPageSize)) << i;
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, 3 * kPageSize, 11), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 3 * kPageSize, kPageSize, 0), 0);
  EXPECT_EQ(verify_every_byte(*as, va + 4 * kPageSize, 12 * kPageSize, 11), 0);
}

// A hole filled between the walk and migrate_vma_pages: the insertion checks again, under
// the lock it inserts under, and gives the destination up.
//   1. A's migration (SYSTEM) of 16 untouched pages collects 16 holes; migrate_vma_pages
//      stops at mm.migrate.insert_hole before the first insertion.
//   2. CPU writes fault pages 0 and 5 in.
//   3. The insertions at 0 and 5 find a page and fail (not migrated, the destination is
//      released); the other 14 get their device page.
TEST_F(SeedRaceTest, Seed000_HoleFilledBeforeInsertKeepsTheCpuPage) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  Migration a;
  sched_point::Pause pause("mm.migrate.insert_hole", {.thread = kVictim});
  ASSERT_EQ(pause.status(), 0);
  std::thread t = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPages * kPageSize, MIGRATE_VMA_SELECT_SYSTEM, true);
  });
  ASSERT_TRUE(pause.wait_reached());                                            // step 1
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 12)), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 5 * kPageSize, pattern(va + 5 * kPageSize, 12)), 0);
  pause.release();                                                              // steps 2, 3
  t.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_EQ(a.cpages, kPages);
  EXPECT_EQ(a.moved, kPages - 2);
  for (uint64_t i = 0; i < kPages; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    if (i == 0 || i == 5) {
      EXPECT_EQ(st.kind, PageKind::kSmall) << i;
      EXPECT_EQ(verify_every_byte(*as, va + i * kPageSize, kPageSize, 12), 0) << i;
    } else {
      EXPECT_TRUE(dev->pgmap()->contains(st.pfn)) << i;
    }
  }
  EXPECT_MM_CHECK_OK(*mem);
  for (uint64_t i = 0; i < kPages; i++) {
    if (i != 0 && i != 5) {
      EXPECT_EQ(verify_every_byte(*as, va + i * kPageSize, kPageSize, 0), 0) << i;
    }
  }
}

// ---------------------------------------------------------------------------------------
// The windows themselves: every point is registered and reached, and the wait window
// replays a fault walk meeting a migration in flight.
// ---------------------------------------------------------------------------------------

constexpr const char* kWalkPoints[] = {
    "mm.hmm.pmd_read",  "mm.hmm.pte_lock",       "mm.hmm.split_pmd",     "mm.hmm.split_folio",
    "mm.hmm.fault",     "mm.hmm.wait_migration", "mm.migrate.collected", "mm.migrate.three_step",
    "mm.migrate.insert_hole"};

// A point nobody reaches would make a replay (or the window explorer) vacuous.
TEST_F(SeedRaceTest, EveryWindowPointIsRegisteredAndReached) {
  const std::vector<std::string> names = sched_point::points();
  for (const char* p : kWalkPoints) {
    EXPECT_TRUE(std::binary_search(names.begin(), names.end(), p)) << p;
  }
  std::vector<std::unique_ptr<sched_point::Pause>> counters;
  for (const char* p : kWalkPoints) {
    if (std::string_view(p) == "mm.hmm.wait_migration") continue;  // WaitMigration_* below
    counters.push_back(std::make_unique<sched_point::Pause>(p, sched_point::Spec{.stop = false}));
    ASSERT_EQ(counters.back()->status(), 0) << p;
  }
  const Va thp = map_huge();
  const Va small = map_anon(*as, 16 * kPageSize);
  fill_pages(*as, thp, kPmdSize, 13);
  fill_pages(*as, small, 8 * kPageSize, 13);  // 8..15: holes
  ASSERT_EQ(*dev2->migrate_to_device(*as, small, small + 4 * kPageSize), 4u);
  EXPECT_EQ(*dev->migrate_to_device(*as, thp + 8 * kPageSize, thp + 16 * kPageSize), 8u);  // split
  EXPECT_EQ(*dev->migrate_to_device(*as, small, small + 16 * kPageSize, MIGRATE_VMA_FAULT,
                                    MigrateWalkMode::kThreeStep), 16u);  // fault, holes
  EXPECT_EQ(*dev->migrate_to_system(*as, small, small + 16 * kPageSize), 16u);
  const Va thp2 = map_huge();
  fill_pages(*as, thp2, kPmdSize, 13);
  EXPECT_EQ(*dev->migrate_to_device(*as, thp2, thp2 + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  size_t i = 0;
  for (const char* p : kWalkPoints) {
    if (std::string_view(p) == "mm.hmm.wait_migration") continue;
    EXPECT_GT(counters[i++]->hits(), 0u) << p << " never reached";
  }
  counters.clear();
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, thp, kPmdSize, 13), 0);
  EXPECT_EQ(verify_every_byte(*as, thp2, kPmdSize, 13), 0);
  EXPECT_EQ(verify_every_byte(*as, small, 8 * kPageSize, 13), 0);
  EXPECT_EQ(verify_every_byte(*as, small + 8 * kPageSize, 8 * kPageSize, 0), 0);
}

// A fault walk meets a migration in flight and waits for it (seed 000's hang, when the
// migration never ends; here it does).
//   1. A's migration (SYSTEM) of 8 pages stops at mm.migrate.collected: the pages are
//      migration entries, their folios locked by A.
//   2. C's hmm_range_fault (REQ_FAULT, owner A) reads a migration entry, drops the table lock
//      and stops at mm.hmm.wait_migration.
//   3. C is let go: it waits for A's folio lock (A is still stopped), so it cannot finish.
//   4. A is let go: its pages move to A's device, finalize unlocks them; C wakes, reads the
//      entries again and reports A's device pages (its own owner's: VALID, not faulted).
TEST_F(SeedRaceTest, WaitMigration_FaultWalkWaitsForTheMigrationThenSeesItsResult) {
  constexpr uint64_t kPages = 8;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 14);
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, kPages * kPageSize, &mirror), 0);
  Migration a;
  sched_point::Pause pause_a("mm.migrate.collected", {.thread = kVictim});
  sched_point::Pause pause_c("mm.hmm.wait_migration", {.thread = "waiter"});
  ASSERT_EQ(pause_a.status(), 0);
  ASSERT_EQ(pause_c.status(), 0);
  std::thread ta = victim_thread([&] {
    a = run_migration(*dev, *as, va, va + kPages * kPageSize, MIGRATE_VMA_SELECT_SYSTEM, true);
  });
  ASSERT_TRUE(pause_a.wait_reached());                                          // step 1
  std::vector<uint64_t> pfns;
  int rc_c = 1;
  std::atomic<bool> c_done{false};
  std::thread tc([&] {
    sched_point::set_thread_name("waiter");
    rc_c = mirror_range(*as, notifier, va, va + kPages * kPageSize, HMM_PFN_REQ_FAULT, pfns, dev.get());
    c_done = true;
    sched_point::set_thread_name("");
  });
  ASSERT_TRUE(pause_c.wait_reached());                                          // step 2
  pause_c.release();                                                            // step 3
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(c_done.load()) << "the fault walk went past a migration entry";
  pause_a.release();                                                            // step 4
  ta.join();
  tc.join();

  ASSERT_EQ(a.rc, 0);
  EXPECT_EQ(a.moved, kPages);
  ASSERT_EQ(rc_c, 0);
  for (uint64_t i = 0; i < kPages; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    EXPECT_TRUE(dev->pgmap()->contains(st.pfn)) << i;
    EXPECT_EQ(pfns[i] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID | HMM_PFN_WRITE) << i;
    EXPECT_EQ(hmm_pfn_to_pfn(pfns[i]), st.pfn) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_every_byte(*as, va, kPages * kPageSize, 14), 0);
  notifier.remove();
}

}  // namespace
}  // namespace gpusvm::mm::testing
