// Races in the split paths of a migration (seed 003's ground), replayed deterministically with
// schedule points: a thread is stopped inside the window, a second thread does something legal
// there (MADV_DONTNEED of one page, a partial munmap or mprotect, the exit of the address
// space, a CPU access), then the first goes on. Each scenario checks every page's data, the
// reference and map counts (mm::check) and that no folio or device page leaked.
//
// Also here: seed 003's split during migration itself, step by step in both directions, the
// wake-up of a waiter on a tail page of a folio split under it, and the dirty state a
// migration must carry to its destination (issue 9 §6).
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <thread>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;

// How long a thread that must wait for a lock held in the window is given to (wrongly) get
// through it. It only decides whether the window was really exercised before a fix: with the
// fix the thread is blocked and the final state is checked either way.
constexpr auto kBlockedGrace = 200ms;

// Polls pred until it holds or `bound` passes.
template <typename Pred>
bool wait_until(Pred pred, std::chrono::milliseconds bound) {
  const auto deadline = std::chrono::steady_clock::now() + bound;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// A named thread running one operation; the test waits for its end with a bound.
class Op {
 public:
  Op(std::string name, std::function<void()> fn)
      : thread_([this, thread_name = std::move(name), op = std::move(fn)] {
          sched_point::set_thread_name(thread_name);
          op();
          done_.store(true, std::memory_order_release);
        }) {}
  ~Op() { join(); }
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;

  // True when the operation returned within `bound`.
  bool wait_done(std::chrono::milliseconds bound) {
    return wait_until([this] { return done(); }, bound);
  }
  bool done() const { return done_.load(std::memory_order_acquire); }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::atomic<bool> done_{false};  // declared before thread_: the thread may set it at once
  std::thread thread_;
};

// Shortens the hang timeout for a test whose failure mode is a thread that is never woken (it
// then panics naming the folio instead of holding CI for a minute).
class HangTimeout {
 public:
  explicit HangTimeout(std::chrono::milliseconds t) : old_(hang_timeout()) { set_hang_timeout(t); }
  ~HangTimeout() { set_hang_timeout(old_); }

 private:
  std::chrono::milliseconds old_;
};

class SplitRaceTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), kDevPages);
    ASSERT_TRUE(dev->ok());
    va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    ASSERT_NE(va, 0u);
    ASSERT_TRUE(pmd_aligned(va));
  }
  void TearDown() override {
    child.reset();
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), kDevPages) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }

  Va page(uint64_t i) const { return va + i * kPageSize; }

  // A PMD-mapped THP whose every word holds pattern(its address, gen).
  void make_thp(uint64_t gen) {
    std::vector<uint64_t> buf(kPageSize / sizeof(uint64_t));
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      for (uint64_t w = 0; w < buf.size(); w++) buf[w] = pattern(page(i) + w * sizeof(uint64_t), gen);
      ASSERT_EQ(cpu::copy_in(*as, page(i), buf.data(), kPageSize), 0) << i;
    }
    ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  }
  // make_device_thp, then a fork child that maps the same device folio (device-private PMDs
  // in both, read-only, the folio shared).
  void make_shared_device_thp(uint64_t gen) {
    make_device_thp(gen);
    Result<std::unique_ptr<AddressSpace>> c = as->fork();
    ASSERT_TRUE(c.ok());
    child = std::move(*c);
    ASSERT_EQ(query_page(*child, va).kind, PageKind::kSoftLeaf);
  }
  // The THP moved whole to a 2 MiB device folio mapped by a device-private PMD.
  void make_device_thp(uint64_t gen) {
    make_thp(gen);
    ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
    const PageState st = query_page(*as, va);
    ASSERT_EQ(st.kind, PageKind::kSoftLeaf);
    ASSERT_TRUE(st.large);
  }

  // Every word of the 2 MiB holds what make_thp wrote, but the pages in `zero` (all zeroes)
  // and `gone` (no longer mapped). Reading faults device pages back.
  void verify_2m(uint64_t gen, const std::set<uint64_t>& zero, const std::set<uint64_t>& gone = {},
                 AddressSpace* in = nullptr) {
    AddressSpace& target = in ? *in : *as;
    std::vector<uint64_t> buf(kPageSize / sizeof(uint64_t));
    int bad = 0;
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      const int rc = cpu::copy_out(target, page(i), buf.data(), kPageSize);
      if (gone.count(i)) {
        if (rc == 0 && bad++ < 5) ADD_FAILURE() << "page " << i << " still mapped";
        continue;
      }
      if (rc != 0) {
        if (bad++ < 5) ADD_FAILURE() << "page " << i << ": copy_out " << rc;
        continue;
      }
      for (uint64_t w = 0; w < buf.size(); w++) {
        const uint64_t want = zero.count(i) ? 0 : pattern(page(i) + w * sizeof(uint64_t), gen);
        if (buf[w] != want) {
          if (bad++ < 5) {
            ADD_FAILURE() << "page " << i << " word " << w << ": got " << std::hex << buf[w] << " want " << want;
          }
          break;
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }

  // No migration record of the 512 folios of the split 2 MiB at pfn names `dead` (an address
  // space that was destroyed) or a VA of `of` in `unmapped`.
  void expect_no_stale_records(Pfn pfn, const AddressSpace* dead, const std::set<Va>& unmapped = {},
                               const AddressSpace* of = nullptr) {
    int stale = 0;
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      for (const RmapItem& r : folio_rmap_snapshot(mem->pfn_to_page(pfn + i))) {
        if ((r.mm == dead || (r.mm == of && unmapped.count(r.va))) && stale++ < 5) {
          ADD_FAILURE() << "page " << i << " keeps a record of a gone mapping at " << std::hex << r.va;
        }
      }
    }
    EXPECT_EQ(stale, 0);
  }

  static constexpr uint64_t kDevPages = 4 * kPagesPerPmd;
  std::unique_ptr<TestDevice> dev;
  std::unique_ptr<AddressSpace> child;  // a fork child sharing the device THP
  Va va = 0;
};

// One migrate_vma of the 2 MiB at va run step by step: setup, the driver's destinations,
// pages, finalize (the caller holds the mmap lock for all of it, as a driver does).
struct Migration {
  Migration(AddressSpace& as, TestDevice& dev, Va va, unsigned select)
      : src(kPagesPerPmd), dst(kPagesPerPmd),
        m{.mm = &as, .start = va, .end = va + kPmdSize, .src = src.data(), .dst = dst.data(),
          .pgmap_owner = &dev, .flags = select | MIGRATE_VMA_SELECT_COMPOUND} {}
  std::vector<uint64_t> src, dst;
  MigrateVma m;
};

// ---- race 1: split_huge_pmd of a PMD migration entry inside split_migrating_folio ----------

// A MADV_DONTNEED of one page while migrate_vma_pages splits the source THP for 4 KiB device
// destinations:
//  1. migrate_vma_setup: the THP's PMD becomes a PMD migration entry (one PMD record).
//  2. The driver only gets 4 KiB device pages; migrate_vma_pages splits the source
//     (split_migrating_folio) and stops at mm.split.migrating_records: the records are off
//     the folio, the rmap walk lock is held for write.
//  3. Another thread: MADV_DONTNEED of page 5. zap_range splits the PMD migration entry
//     (split_huge_pmd: 512 PTE records in, the PMD record out) and zaps page 5.
//     Before the fix it did so without the walk lock, in the window: the 511 records stayed
//     on page 0 with indices 1..511 and the PMD record vanished, so finalize restored page
//     i of a 4 KiB destination folio (past its end) or left a mapped folio to be freed.
//     Now it waits for the walk lock.
//  4. The split finishes: 512 PTE migration entries, each page its own folio owning its
//     record. The DONTNEED then zaps page 5's entry and its record.
//  5. finalize: 511 device pages mapped, page 5 none (reads zero), nothing leaked.
TEST_F(SplitRaceTest, DontneedOnePageWhileMigrationSplitsThp) {
  make_thp(1);
  dev->fail_thp_alloc = true;
  Migration mig(*as, *dev, va, MIGRATE_VMA_SELECT_SYSTEM);
  sched_point::Pause split("mm.split.migrating_records", {.thread = "migration"});
  ASSERT_EQ(split.status(), 0);
  uint64_t moved = 0;
  Op migration("migration", [&] {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&mig.m), 0);
    ASSERT_EQ(mig.m.cpages, kPagesPerPmd);
    dev->copy_to_new_pages(mig.src.data(), mig.dst.data(), kPagesPerPmd, /*to_device=*/true);
    mig.m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&mig.m);
    moved = TestDevice::count_moved(mig.src.data(), kPagesPerPmd);
    migrate_vma_finalize(&mig.m);
  });
  ASSERT_TRUE(split.wait_reached());
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kMigrationWrite);  // still the PMD entry
  Op zapper("zapper", [&] { EXPECT_EQ(as->madvise(page(5), kPageSize, MADV_DONTNEED), 0); });
  EXPECT_FALSE(zapper.wait_done(kBlockedGrace))
      << "MADV_DONTNEED split the PMD migration entry while its folio's records were taken";
  split.release();
  migration.join();
  zapper.join();
  EXPECT_EQ(moved, kPagesPerPmd);
  EXPECT_EQ(mem->stat_split_migrating.get(), 1u);
  EXPECT_EQ(query_page(*as, page(5)).kind, PageKind::kNone);
  for (uint64_t i : {0ul, 4ul, 6ul, 300ul, 511ul}) {
    const PageState st = query_page(*as, page(i));
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf) << i;
    EXPECT_FALSE(st.large) << i;
    EXPECT_EQ(st.refcount, 1) << i;
    EXPECT_EQ(st.page_mapcount, 1) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(1, {5});
  EXPECT_MM_CHECK_OK(*mem);
}

// The other order, a regression guard for the lock the fix takes:
//  1. A migration has run setup (a PMD migration entry) and holds 4 KiB destinations.
//  2. MADV_DONTNEED of page 5 stops in split_huge_pmd (mm.split.huge_pmd_records), about to
//     split that PMD migration entry.
//  3. migrate_vma_pages must not split the folio meanwhile: it waits for the walk lock.
//  4. Released, split_huge_pmd turns the PMD entry into 512 PTE entries with their records
//     and zaps page 5; then the migration splits the folio and finalize maps 511 pages.
TEST_F(SplitRaceTest, MigrationSplitWaitsForHugePmdSplit) {
  make_thp(2);
  dev->fail_thp_alloc = true;
  Migration mig(*as, *dev, va, MIGRATE_VMA_SELECT_SYSTEM);
  sched_point::Pause pmd_split("mm.split.huge_pmd_records", {.thread = "zapper"});
  ASSERT_EQ(pmd_split.status(), 0);
  std::atomic<int> stage{0};  // 1: setup done, 2: go on with migrate_vma_pages
  Op migration("migration", [&] {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&mig.m), 0);  // 1.
    dev->copy_to_new_pages(mig.src.data(), mig.dst.data(), kPagesPerPmd, /*to_device=*/true);
    stage = 1;
    ASSERT_TRUE(wait_until([&] { return stage.load() == 2; }, 10s));
    mig.m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&mig.m);  // 3.
    migrate_vma_finalize(&mig.m);
  });
  ASSERT_TRUE(wait_until([&] { return stage.load() == 1; }, 10s));
  Op zapper("zapper", [&] { EXPECT_EQ(as->madvise(page(5), kPageSize, MADV_DONTNEED), 0); });
  ASSERT_TRUE(pmd_split.wait_reached());  // 2.
  stage = 2;
  EXPECT_FALSE(migration.wait_done(kBlockedGrace)) << "the folio was split during split_huge_pmd";
  pmd_split.release();  // 4.
  zapper.join();
  migration.join();
  EXPECT_EQ(query_page(*as, page(5)).kind, PageKind::kNone);
  EXPECT_EQ(query_page(*as, page(6)).kind, PageKind::kSoftLeaf);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(2, {5});
}

// A migration back to RAM of a device THP that a fork child maps too, racing a partial munmap
// or mprotect in the child (the migrating thread holds only the parent's mmap lock, so the
// child's own operations run while it is stopped). An eviction by pfn does not split a
// compound source for small destinations (seed 003, as Linux: the page stays), so this is how
// the split during migration meets another address space's changes:
//  1. The parent's migrate_vma_setup collects the 2 MiB device folio: its device-private PMD
//     becomes a PMD migration entry, and try_to_migrate makes the child's one too.
//  2. Only 4 KiB system pages: migrate_vma_pages splits the device folio and stops at
//     mm.split.migrating_records, the records of both address spaces taken.
//  3. The child unmaps (or write-protects) page 0: split_huge_pmd of its PMD migration entry.
//     Before the fix it ran in the window and rewrote records the split held in hand; now it
//     waits for the walk lock.
//  4. The split finishes, then the munmap/mprotect acts on the child's PTE migration entries.
//  5. finalize: pages 0..511 back in RAM in the parent with their data, 1..511 in the child
//     (page 0 read-only after mprotect, gone after munmap), the 512 device pages free.
void migrate_back_racing_child(AddressSpace& as, TestDevice& dev, Va va, const std::function<void()>& op) {
  dev.fail_thp_alloc = true;
  sched_point::Pause split("mm.split.migrating_records", {.thread = "migration"});
  ASSERT_EQ(split.status(), 0);
  Op migration("migration", [&] {  // 1., 2., 4., 5.
    EXPECT_EQ(*dev.migrate_to_system(as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  });
  ASSERT_TRUE(split.wait_reached());
  EXPECT_EQ(query_page(as, va).leaf, SoftLeafType::kMigrationRead);
  Op process("child", op);  // 3.
  EXPECT_FALSE(process.wait_done(kBlockedGrace)) << "the PMD migration entry was split in the window";
  split.release();
  migration.join();
  process.join();
}

TEST_F(SplitRaceTest, MigrationSplitRacesPartialMunmapInForkChild) {
  make_shared_device_thp(3);
  migrate_back_racing_child(*as, *dev, va, [&] { EXPECT_EQ(child->munmap(va, kPageSize), 0); });
  EXPECT_EQ(dev->free_pages(), kDevPages);
  EXPECT_EQ(query_page(*child, page(1)).kind, PageKind::kSmall);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(3, {});
  verify_2m(3, {}, {0}, child.get());
}

TEST_F(SplitRaceTest, MigrationSplitRacesPartialMprotectInForkChild) {
  make_shared_device_thp(4);
  migrate_back_racing_child(*as, *dev, va, [&] { EXPECT_EQ(child->mprotect(va, kPageSize, PROT_READ), 0); });
  EXPECT_EQ(dev->free_pages(), kDevPages);
  const PageState first = query_page(*child, va);
  EXPECT_EQ(first.kind, PageKind::kSmall);
  EXPECT_FALSE(first.writable);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(4, {});
  verify_2m(4, {}, {}, child.get());
  EXPECT_EQ(cpu::store<uint64_t>(*child, va, 1), -EFAULT);  // PROT_READ: a write is refused
  EXPECT_EQ(cpu::store<uint64_t>(*child, page(1), 1), 0);   // COW: the child gets its copy
  verify_2m(4, {});                                         // the parent keeps its data
}

// An eviction by pfn with only 4 KiB system destinations leaves a compound device folio where
// it is (seed 003: migrate_device_pages has no VMA to split in; MIGRATE and COMPOUND cleared),
// so nothing splits and a munmap at the same time meets no window.
TEST_F(SplitRaceTest, EvictionWithSmallDestinationsLeavesDeviceThp) {
  make_device_thp(5);
  const uint64_t n = dev->pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  dev->fail_thp_alloc = true;
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev->pgmap()->first_pfn(), n), 0);
  dev->copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  EXPECT_EQ(TestDevice::count_moved(src.data(), n), 0u);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  const PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSoftLeaf);
  EXPECT_TRUE(st.large);
  EXPECT_EQ(dev->free_pages(), kDevPages - kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(5, {});
}

// ---- race 2: split_folio_exclusive's restore after a failed freeze -------------------------

// A migration of one 4 KiB page of a PTE-mapped THP splits the THP first
// (split_folio_exclusive); one of its pages is pinned, so the freeze fails:
//  1. The THP is PTE-mapped (the PMD was split by MADV_DONTNEED of page 511); page 10 is
//     pinned (FOLL_PIN).
//  2. migrate_vma_setup of page 100: the walk meets a large folio and calls
//     split_folio_exclusive, which turns its 511 PTEs into migration entries and stops at
//     mm.split.exclusive_unmapped (the freeze not tried yet).
//  3. Another thread: MADV_DONTNEED of page 200 zaps its migration entry (legal: the zap waits
//     for nothing, a migration entry holds no reference).
//  4. The freeze fails (the pin): every mapping still a migration entry is restored; the one
//     that was zapped must give back the reference step 1 kept for it. Before the fix the
//     restore loop skipped it: the THP stayed one reference too high and leaked.
//  5. The migration skips the unsplittable folio (0 pages move). After unpinning, every page
//     but 200 and 511 holds its data and the THP is freed at exit.
TEST_F(SplitRaceTest, ExclusiveSplitFreezeFailsAfterZap) {
  make_thp(5);
  ASSERT_EQ(as->madvise(page(511), kPageSize, MADV_DONTNEED), 0);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPte);
  Folio* pinned = nullptr;
  ASSERT_EQ(pin_user_pages_fast(*as, page(10), 1, FOLL_WRITE, &pinned), 1);
  Folio* thp = pinned->head();
  sched_point::Pause unmapped("mm.split.exclusive_unmapped", {.thread = "migration"});
  ASSERT_EQ(unmapped.status(), 0);
  Result<uint64_t> moved = Err{-1};
  Op migration("migration", [&] { moved = dev->migrate_to_device(*as, page(100), page(101)); });
  ASSERT_TRUE(unmapped.wait_reached());
  EXPECT_EQ(query_page(*as, page(200)).leaf, SoftLeafType::kMigrationWrite);
  ASSERT_EQ(as->madvise(page(200), kPageSize, MADV_DONTNEED), 0);  // 3.
  unmapped.release();
  migration.join();
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 0u);
  EXPECT_EQ(thp->order(), kPmdOrder);  // not split
  EXPECT_EQ(thp->total_mapcount(), 510);
  EXPECT_EQ(thp->refcount(), 510 + 1) << "510 mappings and one pin";
  EXPECT_MM_CHECK_OK(*mem);
  unpin_user_page(pinned);
  EXPECT_EQ(thp->refcount(), 510);
  verify_2m(5, {200, 511});
  EXPECT_MM_CHECK_OK(*mem);
}

// ---- race 3: split_migrating_folio's records vs a zap in its window ------------------------

// The migration back to RAM (4 KiB system pages) of the device THP at va, which a fork child
// maps too, run by a thread that stops at mm.split.migrating_records (records taken) and at
// mm.split.migrating_split (split done, finalize not run): `op` runs in the first window from
// another thread, `check` in the second after op returned.
void migrate_back_split_window(AddressSpace& as, TestDevice& dev, Va va, const std::function<void()>& op,
                               const std::function<void()>& check) {
  dev.fail_thp_alloc = true;
  sched_point::Pause records("mm.split.migrating_records", {.thread = "migration"});
  sched_point::Pause split("mm.split.migrating_split", {.thread = "migration"});
  ASSERT_EQ(records.status() | split.status(), 0);
  Op migration("migration", [&] {
    EXPECT_EQ(*dev.migrate_to_system(as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  });
  ASSERT_TRUE(records.wait_reached());
  Op process("child", op);
  EXPECT_FALSE(process.wait_done(kBlockedGrace)) << "a zap ran while the split held the folio's records";
  records.release();
  ASSERT_TRUE(split.wait_reached());
  EXPECT_TRUE(process.wait_done(10s)) << "the zap did not finish once the split was done";
  check();
  split.release();
  migration.join();
  process.join();
}

// A device THP that a fork child maps too (by PTEs: a partial munmap split the child's device
// PMD) goes back to RAM for 4 KiB pages while the child exits:
//  1. The parent's migration collects the folio: a PMD migration entry in the parent, 511
//     PTE migration entries in the child, one record each.
//  2. migrate_vma_pages splits the folio and stops at mm.split.migrating_records, the
//     records of both address spaces in its hands.
//  3. The child exits (exit zaps every entry, then it is freed). Before the fix the zap found
//     no record to remove: the stale records went to the new folios and finalize followed
//     them into the freed address space. Now the zap waits.
//  4. The split finishes (mm.split.migrating_split); the exit then removes each entry's
//     record from its new folio and the child is freed: no record names it.
//  5. finalize restores the parent's 512 pages and frees every device page.
TEST_F(SplitRaceTest, MigrationSplitRacesForkChildExit) {
  make_shared_device_thp(6);
  ASSERT_EQ(child->munmap(page(511), kPageSize), 0);
  const Pfn dpfn = query_page(*as, va).pfn;
  ASSERT_TRUE(dev->pgmap()->contains(dpfn));
  const AddressSpace* dead = child.get();
  migrate_back_split_window(*as, *dev, va, [&] { child.reset(); },
                            [&] { expect_no_stale_records(dpfn, dead); });
  EXPECT_EQ(dev->free_pages(), kDevPages);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(6, {});
}

// The same window with a munmap of half the range in the child (which lives on):
//  1. The child's device PMD is whole: one PMD migration entry, split by the migration
//     after the window (split_pmd_migration_entry).
//  2. munmap of pages 0..255 in the window: before the fix it split the PMD entry itself and
//     zapped 256 entries there, so the records of the other 256 stayed on page 0 and finalize
//     restored them onto a 4 KiB folio's nonexistent pages. Now it waits for the split.
//  3. finalize: the parent's 512 pages and the child's 256..511 back in RAM with their data,
//     no record of the child's 0..255 left, every record on page 0 of its own folio.
TEST_F(SplitRaceTest, MigrationSplitRacesHalfMunmapInForkChild) {
  make_shared_device_thp(7);
  const Pfn dpfn = query_page(*as, va).pfn;
  std::set<Va> unmapped;
  for (uint64_t i = 0; i < kPagesPerPmd / 2; i++) unmapped.insert(page(i));
  migrate_back_split_window(*as, *dev, va, [&] { EXPECT_EQ(child->munmap(va, kPmdSize / 2), 0); },
                            [&] {
                              expect_no_stale_records(dpfn, nullptr, unmapped, child.get());
                              for (uint64_t i = 0; i < kPagesPerPmd; i++) {
                                for (const RmapItem& r : folio_rmap_snapshot(mem->pfn_to_page(dpfn + i))) {
                                  EXPECT_EQ(r.page, 0u) << i;
                                  EXPECT_EQ(r.va, page(i)) << i;
                                }
                              }
                            });
  EXPECT_EQ(dev->free_pages(), kDevPages);
  EXPECT_MM_CHECK_OK(*mem);
  std::set<uint64_t> gone;
  for (uint64_t i = 0; i < kPagesPerPmd / 2; i++) gone.insert(i);
  verify_2m(7, {});
  verify_2m(7, {}, gone, child.get());
}

// ---- seed 003 step by step -----------------------------------------------------------------

// Seed 003's split during migration, each step stopped and looked at, with a CPU reader of
// page 300 that meets the migration entry and must wake when the migration finishes:
//  1. setup: the 2 MiB (a system THP, or a device THP going back) becomes a PMD migration
//     entry; the folio is locked by the migration.
//  2. The driver gets only 4 KiB destinations; migrate_vma_pages stops at
//     mm.split.migrating_records (records taken, nothing split yet).
//  3. The reader faults on page 300, finds the PMD migration entry, stops at
//     mm.fault.migration_wait before it picks the folio to wait on.
//  4. The split runs and stops at mm.split.migrating_split: 512 PTE migration entries, 512
//     locked order-0 folios.
//  5. The reader goes on: it waits on the folio of the entry's page (a PMD entry names the
//     THP's first page, its own folio now).
//  6. finalize maps each page at its destination and unlocks each folio, which must wake
//     the reader: it returns with the page's data within a bound.
void replay_seed003(AddressSpace& as, TestDevice& dev, PhysMem* mem, Va va, bool to_device, uint64_t gen) {
  HangTimeout hang(10s);
  dev.fail_thp_alloc = true;
  Migration mig(as, dev, va, to_device ? MIGRATE_VMA_SELECT_SYSTEM : MIGRATE_VMA_SELECT_DEVICE_PRIVATE);
  sched_point::Pause records("mm.split.migrating_records", {.thread = "migration"});
  sched_point::Pause split("mm.split.migrating_split", {.thread = "migration"});
  sched_point::Pause wait("mm.fault.migration_wait", {.thread = "reader"});
  ASSERT_EQ(records.status() | split.status() | wait.status(), 0);
  Op migration("migration", [&] {
    ReadLock g(&as.mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&mig.m), 0);  // 1.
    dev.copy_to_new_pages(mig.src.data(), mig.dst.data(), kPagesPerPmd, to_device);
    mig.m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&mig.m);  // 2., 4.
    migrate_vma_finalize(&mig.m);  // 6.
  });
  ASSERT_TRUE(records.wait_reached());
  const PageState pmd = query_page(as, va);
  EXPECT_EQ(pmd.leaf, SoftLeafType::kMigrationWrite);
  const Pfn spfn = pmd.pfn;
  Folio* thp = mem->pfn_to_page(spfn);
  EXPECT_EQ(thp->order(), kPmdOrder);
  EXPECT_TRUE(folio_test_locked(thp));
  const Va addr = va + 300 * kPageSize;
  Result<uint64_t> got = Err{-1};
  Op reader("reader", [&] { got = cpu::load<uint64_t>(as, addr); });
  ASSERT_TRUE(wait.wait_reached());  // 3.
  records.release();
  ASSERT_TRUE(split.wait_reached());  // 4.
  for (uint64_t i : {0ul, 1ul, 300ul, 511ul}) {
    const PageState st = query_page(as, va + i * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf) << i;
    EXPECT_EQ(st.leaf, SoftLeafType::kMigrationWrite) << i;
    Folio* p = mem->pfn_to_page(spfn + i);
    EXPECT_EQ(p->head(), p) << i;
    EXPECT_EQ(p->order(), 0u) << i;
    EXPECT_TRUE(folio_test_locked(p)) << i;
  }
  EXPECT_EQ(mem->stat_split_migrating.get(), 1u);
  wait.release();  // 5.
  EXPECT_FALSE(reader.wait_done(kBlockedGrace)) << "the reader did not wait for the migration";
  split.release();  // 6.
  migration.join();
  EXPECT_TRUE(reader.wait_done(5s)) << "the reader was not woken when the migration finished";
  reader.join();
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, pattern(addr, gen));
}

TEST_F(SplitRaceTest, Seed003SystemThpSplitForSmallDevicePages) {
  make_thp(8);
  replay_seed003(*as, *dev, mem.get(), va, /*to_device=*/true, 8);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_GE(dev->cpu_faults.load(), 1);  // the reader's page came back (retried while finalize ran)
  verify_2m(8, {});
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(SplitRaceTest, Seed003DeviceThpSplitForSmallSystemPages) {
  make_device_thp(9);
  replay_seed003(*as, *dev, mem.get(), va, /*to_device=*/false, 9);
  EXPECT_EQ(dev->splits.load(), 1);
  EXPECT_EQ(dev->free_pages(), kDevPages);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(9, {});
  EXPECT_EQ(dev->cpu_faults.load(), 0);
}

// ---- §6: a waiter on a tail page of a folio split under it ---------------------------------

// A CPU reader of a tail page of a PTE-mapped THP that a migration splits
// (split_folio_exclusive, from the migration's walk) must be woken by the split itself:
//  1. The THP is PTE-mapped (MADV_DONTNEED of page 511). A migration of page 1 splits it:
//     split_folio_exclusive turns every PTE into a migration entry and stops at
//     mm.split.exclusive_unmapped.
//  2. The reader loads page 300, meets the migration entry, stops at mm.fault.migration_wait.
//  3. The split goes on (freeze, 512 new locked folios, mapped back) and stops at
//     mm.split.exclusive_remapped, before step 5 unlocks the new folios.
//  4. The reader goes on: it waits on page 300's own folio, now locked.
//  5. The split unlocks and wakes every new folio: the reader must return within a bound.
//     (Page 300's wait queue is shared by no other page this scenario unlocks: 300 % 64
//     differs from the THP's first pages 0 and 1 and from the device page's pfn.)
TEST_F(SplitRaceTest, TailPageWaiterWokenBySplit) {
  HangTimeout hang(10s);
  make_thp(10);
  ASSERT_EQ(as->madvise(page(511), kPageSize, MADV_DONTNEED), 0);
  const Pfn thp_pfn = query_page(*as, va).pfn;
  const Pfn dev_top = dev->pgmap()->first_pfn() + kDevPages - 1;  // TestDevice hands out from the top
  ASSERT_NE((thp_pfn + 300) % 64, dev_top % 64);
  ASSERT_NE(300 % 64, 0);
  ASSERT_NE(300 % 64, 1);
  sched_point::Pause unmapped("mm.split.exclusive_unmapped", {.thread = "migration"});
  sched_point::Pause remapped("mm.split.exclusive_remapped", {.thread = "migration"});
  sched_point::Pause wait("mm.fault.migration_wait", {.thread = "reader"});
  ASSERT_EQ(unmapped.status() | remapped.status() | wait.status(), 0);
  Result<uint64_t> moved = Err{-1};
  Op migration("migration", [&] { moved = dev->migrate_to_device(*as, page(1), page(2)); });
  ASSERT_TRUE(unmapped.wait_reached());  // 1.
  Result<uint64_t> got = Err{-1};
  Op reader("reader", [&] { got = cpu::load<uint64_t>(*as, page(300)); });
  ASSERT_TRUE(wait.wait_reached());  // 2.
  unmapped.release();
  ASSERT_TRUE(remapped.wait_reached());  // 3.
  Folio* tail = mem->pfn_to_page(thp_pfn + 300);
  EXPECT_EQ(tail->head(), tail);
  EXPECT_TRUE(folio_test_locked(tail));
  wait.release();  // 4.
  EXPECT_FALSE(reader.wait_done(kBlockedGrace)) << "the reader did not wait on the locked folio";
  remapped.release();  // 5.
  EXPECT_TRUE(reader.wait_done(5s)) << "the reader on a tail page was not woken by the split";
  migration.join();
  reader.join();
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, pattern(page(300), 10));
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 1u);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(10, {511});
}

// ---- §6: dirty state carried to the destination --------------------------------------------

// A migrate_vma of [start, end) to new system pages (the driver may hand out system memory as
// destinations; mm copies the flags, as for any destination). compound: one 2 MiB folio.
uint64_t migrate_to_system_pages(AddressSpace& as, PhysMem* mem, Va start, Va end, bool compound) {
  const uint64_t n = (end - start) >> kPageShift;
  std::vector<uint64_t> src(n), dst(n);
  MigrateVma m{.mm = &as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
               .flags = MIGRATE_VMA_SELECT_SYSTEM | (compound ? MIGRATE_VMA_SELECT_COMPOUND : 0u)};
  ReadLock g(&as.mmap_lock());
  if (migrate_vma_setup(&m) != 0) return 0;
  for (uint64_t i = 0; i < n; i++) {
    if (!(src[i] & MIGRATE_PFN_MIGRATE) || !(src[i] & MIGRATE_PFN_VALID)) continue;
    const bool huge = src[i] & MIGRATE_PFN_COMPOUND;
    Folio* f = mem->folio_alloc(huge ? kPmdOrder : 0, /*zero=*/false);
    if (!f) continue;
    folio_lock(f);
    Folio* s = mem->pfn_to_page(migrate_pfn_to_pfn(src[i]));
    for (uint64_t j = 0; j < f->nr_pages(); j++) std::memcpy(f->data(j), s->data(j), kPageSize);
    dst[i] = migrate_pfn(f->pfn()) | (huge ? MIGRATE_PFN_COMPOUND : 0);
    if (huge) i += kPagesPerPmd - 1;
  }
  m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
  migrate_vma_pages(&m);
  const uint64_t moved = TestDevice::count_moved(src.data(), n);
  migrate_vma_finalize(&m);
  return moved;
}

// Dirty (written) pages keep their dirty state through every kind of migration: the folio
// flag at a device destination and back, the PTE / PMD dirty bit at a system destination.
// A clean page (MADV_FREE made it so) stays clean.
TEST_F(SplitRaceTest, DirtyStateCarriedToDestinationPte) {
  const Va small = map_anon(*as, 4 * kPageSize);
  ASSERT_NE(small, 0u);
  fill_pages(*as, small, 4 * kPageSize, 11);
  ASSERT_TRUE(query_page(*as, small).dirty);
  ASSERT_EQ(as->madvise(small + 3 * kPageSize, kPageSize, MADV_FREE), 0);  // page 3: clean
  ASSERT_FALSE(query_page(*as, small + 3 * kPageSize).dirty);
  ASSERT_FALSE(query_page(*as, small + 3 * kPageSize).folio_dirty);
  // System -> device: the device folio is dirty.
  ASSERT_EQ(*dev->migrate_to_device(*as, small, small + 4 * kPageSize), 4u);
  for (uint64_t i = 0; i < 3; i++) EXPECT_TRUE(query_page(*as, small + i * kPageSize).folio_dirty) << i;
  EXPECT_FALSE(query_page(*as, small + 3 * kPageSize).folio_dirty);
  // Device -> system: the system folio is dirty.
  ASSERT_EQ(*dev->migrate_to_system(*as, small, small + 4 * kPageSize), 4u);
  for (uint64_t i = 0; i < 3; i++) EXPECT_TRUE(query_page(*as, small + i * kPageSize).folio_dirty) << i;
  // System -> system: the new PTE carries the dirty bit (written again: an entry restored from
  // a device-private one is clean, as in Linux, only the folio is dirty).
  fill_pages(*as, small, 3 * kPageSize, 11);
  for (uint64_t i = 0; i < 3; i++) ASSERT_TRUE(query_page(*as, small + i * kPageSize).dirty) << i;
  ASSERT_EQ(migrate_to_system_pages(*as, mem.get(), small, small + 3 * kPageSize, false), 3u);
  for (uint64_t i = 0; i < 3; i++) {
    const PageState st = query_page(*as, small + i * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << i;
    EXPECT_TRUE(st.dirty) << i;
    EXPECT_TRUE(st.folio_dirty) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, small, 3 * kPageSize, 11), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, small + 3 * kPageSize), pattern(small + 3 * kPageSize, 11));
}

TEST_F(SplitRaceTest, DirtyStateCarriedToDestinationPmd) {
  make_thp(12);
  ASSERT_TRUE(query_page(*as, va).dirty);
  // System THP -> device THP: the device folio is dirty.
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  EXPECT_TRUE(query_page(*as, va).large);
  EXPECT_TRUE(query_page(*as, va).folio_dirty);
  // Device THP -> system THP: the THP is dirty.
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_TRUE(query_page(*as, va).folio_dirty);
  // Write again (a dirty PMD), then THP -> THP: the new PMD carries the dirty bit.
  make_thp(13);
  ASSERT_TRUE(query_page(*as, va).dirty);
  ASSERT_EQ(migrate_to_system_pages(*as, mem.get(), va, va + kPmdSize, true), kPagesPerPmd);
  const PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kThpPmd);
  EXPECT_TRUE(st.dirty);
  EXPECT_TRUE(st.folio_dirty);
  // Seed 003's split in both directions keeps it too (4 KiB destinations of a dirty THP).
  dev->fail_thp_alloc = true;
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  for (uint64_t i : {0ul, 7ul, 511ul}) EXPECT_TRUE(query_page(*as, page(i)).folio_dirty) << i;
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), kPagesPerPmd);
  for (uint64_t i : {0ul, 7ul, 511ul}) EXPECT_TRUE(query_page(*as, page(i)).folio_dirty) << i;
  EXPECT_MM_CHECK_OK(*mem);
  verify_2m(13, {});
}

}  // namespace
}  // namespace gpusvm::mm::testing
