// Forced interleavings in gpusvm/mm (issue 9 §1b, §6): a thread is stopped at a named schedule
// point inside a window where it dropped a lock, another thread does something legal there,
// then every byte, the page state and mm::check are verified. Each test draws its
// interleaving as numbered steps.
#include <chrono>
#include <thread>

#include "gpusvm/base/sched_point.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;
using sched_point::Pause;

class RaceWindowTest : public MmTest {};

// A free range of `len` bytes (mapped once, then unmapped).
Va free_range(AddressSpace& as, uint64_t len) {
  const Va va = map_anon(as, len);
  if (va && as.munmap(va, len) != 0) return 0;
  return va;
}

// Issue 9 §1b: mremap held the rmap walk lock only shared, beside an eviction's finalize.
//  1. four pages are migrated to device memory (device-private entries)
//  2. thread E: evict_all (migrate_device_range by pfn, no mmap lock): the entries become
//     migration entries, the data is copied; in migrate_device_finalize,
//     remove_migration_ptes takes the first folio's migration record (mm, va) and stops at
//     mm.migrate.records_taken, holding the rmap walk lock shared
//  3. thread M: mremap of the four pages to another address (mmap write lock). Before the
//     fix it took the walk lock shared too and moved the migration entry whose record E
//     holds: folio_move_rmap found no record ("no rmap item" panic) and, without the panic,
//     E restores nothing at va while the entry at the new address stays a migration entry
//     forever (seed 000's hang for the next fault). Now M takes the walk lock exclusive: it
//     cannot reach mm.mremap.records_moving while E holds the records.
//  4. E resumes and restores the entry at va; then M moves the restored, present PTEs.
TEST_F(RaceWindowTest, Mremap_WhileFinalizeHoldsMigrationRecords_WaitsForIt) {
  TestDevice dev(mem.get(), 64);
  ASSERT_TRUE(dev.ok());
  constexpr uint64_t kLen = 4 * kPageSize;
  const Va va = map_anon(*as, kLen);
  const Va dst = free_range(*as, kLen);
  ASSERT_NE(dst, 0u);
  ASSERT_NE(va, 0u);
  ASSERT_NO_FATAL_FAILURE(fill_pages(*as, va, kLen, 1));
  Result<uint64_t> moved = dev.migrate_to_device(*as, va, va + kLen);
  ASSERT_TRUE(moved.ok());
  ASSERT_EQ(*moved, 4u);
  Result<uint64_t> evicted = Err{-1};
  Result<Va> remapped = Err{-1};
  std::jthread e, m;  // joined after the Pauses below release them
  Pause taken("mm.migrate.records_taken", {.thread = "e"});
  Pause moving("mm.mremap.records_moving", {.thread = "m"});
  ASSERT_EQ(taken.status(), 0);
  ASSERT_EQ(moving.status(), 0);
  e = std::jthread([&] {
    sched_point::set_thread_name("e");
    evicted = dev.evict_all();
  });
  ASSERT_TRUE(taken.wait_reached()) << "the eviction's finalize never took its records";
  m = std::jthread([&] {
    sched_point::set_thread_name("m");
    remapped = as->mremap(va, kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
  });
  // The fixed mremap blocks on the walk lock; the old one walked in beside the finalize.
  const bool entered = moving.wait_reached(500ms);
  EXPECT_FALSE(entered) << "mremap moved entries while a finalize held their migration records";
  taken.release();
  if (!entered) {
    ASSERT_TRUE(moving.wait_reached()) << "mremap never got the walk lock";
  }
  moving.release();
  e.join();
  m.join();
  ASSERT_TRUE(evicted.ok());
  EXPECT_EQ(*evicted, 4u);
  ASSERT_TRUE(remapped.ok()) << remapped.error();
  EXPECT_EQ(*remapped, dst);
  for (Va a = dst; a < dst + kLen; a += kPageSize) {
    const PageState st = query_page(*as, a);
    EXPECT_EQ(st.kind, PageKind::kSmall) << std::hex << a;
    EXPECT_EQ(st.mapcount, 1) << std::hex << a;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, dst, kLen, 1, va), 0);
  EXPECT_EQ(dev.free_pages(), 64u);
  EXPECT_EQ(as->munmap(dst, kLen), 0);
}

// Issue 9 §6: the COW fault re-reads the PTE after copying without the PTL (pte_same).
//  1. a page is shared copy-on-write with a child (fork): read-only in both
//  2. thread A: store to word 2 -> write fault -> do_wp_page copies the page into a new page
//     C without the PTL and stops at mm.fault.cow_copied
//  3. main: store to word 3 -> its own write fault completes the COW first: the parent's PTE
//     maps a new page P with word 3 written
//  4. A resumes: the PTE is not the one it copied from, so it drops C and retries; the retry
//     finds P writable and stores word 2 there. Without the re-check A would map C over P:
//     main's store lost, and the rmap/refcount of the old page dropped twice.
TEST_F(RaceWindowTest, CowFault_ConcurrentWriteCompletesCowInWindow_Retries) {
  const Va va = map_anon(*as, kPageSize);
  ASSERT_NE(va, 0u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 1)), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_FALSE(query_page(*as, va).writable);
  int a_rc = -1;
  {
    std::jthread a;  // joined after the Pause below releases it
    Pause pause("mm.fault.cow_copied", {.thread = "a"});
    ASSERT_EQ(pause.status(), 0);
    a = std::jthread([&] {
      sched_point::set_thread_name("a");
      a_rc = cpu::store<uint64_t>(*as, va + 16, 0xA2);
    });
    ASSERT_TRUE(pause.wait_reached()) << "the write fault never copied";
    ASSERT_EQ(cpu::store<uint64_t>(*as, va + 24, 0xB3), 0);
    ASSERT_TRUE(query_page(*as, va).writable);
    pause.release();
    a.join();
  }
  ASSERT_EQ(a_rc, 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), pattern(va, 1));
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 16), 0xA2u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 24), 0xB3u) << "the other thread's store was lost";
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va), pattern(va, 1));
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va + 16), 0u);
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va + 24), 0u);
  const PageState st = query_page(*as, va);
  EXPECT_EQ(st.mapcount, 1);
  EXPECT_EQ(st.refcount, 1);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
}

// Issue 9 §6, the same window with the entry zapped:
//  1. a page is shared copy-on-write with a child
//  2. thread A: store to word 2 -> write fault copies the page and stops at
//     mm.fault.cow_copied
//  3. main: MADV_DONTNEED of the page (mmap read lock): the parent's PTE becomes none
//  4. A resumes: the PTE changed, it drops its copy and retries: a fresh zeroed page with
//     word 2 written. Without the re-check A would map the stale copy (the zapped data
//     comes back) and remove the zapped mapping's rmap and reference a second time.
TEST_F(RaceWindowTest, CowFault_MadviseDontneedInWindow_Retries) {
  const Va va = map_anon(*as, kPageSize);
  ASSERT_NE(va, 0u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 1)), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  int a_rc = -1;
  {
    std::jthread a;  // joined after the Pause below releases it
    Pause pause("mm.fault.cow_copied", {.thread = "a"});
    ASSERT_EQ(pause.status(), 0);
    a = std::jthread([&] {
      sched_point::set_thread_name("a");
      a_rc = cpu::store<uint64_t>(*as, va + 16, 0xA2);
    });
    ASSERT_TRUE(pause.wait_reached()) << "the write fault never copied";
    ASSERT_EQ(as->madvise(va, kPageSize, MADV_DONTNEED), 0);
    ASSERT_EQ(query_page(*as, va).kind, PageKind::kNone);
    pause.release();
    a.join();
  }
  ASSERT_EQ(a_rc, 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u) << "zapped data came back";
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 16), 0xA2u);
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va), pattern(va, 1));
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va + 16), 0u);
  const PageState cst = query_page(**child, va);
  EXPECT_EQ(cst.mapcount, 1);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::mm::testing
