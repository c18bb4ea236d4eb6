// Forced interleavings on dmirror (issue 9 §1b, §2, §6): each test stops a thread at a named
// schedule point (gpusvm/base/sched_point.h), does something legal from another thread in
// that window, lets the stopped thread go on, then checks every byte, the device page table
// against the CPU page table, and mm::check. The comment of each test draws the interleaving.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <chrono>
#include <thread>

#include "drivers/dmirror/dmirror.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/page_state.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

using namespace std::chrono_literals;
using sched_point::Pause;

int pat(uint64_t i) { return static_cast<int>(i * 7 + 3); }
bool is_migration(mm::SoftLeafType t) {
  return t == mm::SoftLeafType::kMigrationRead || t == mm::SoftLeafType::kMigrationReadExclusive ||
         t == mm::SoftLeafType::kMigrationWrite;
}
constexpr uint64_t kIntsPerPage = kPageSize / sizeof(int);

class DmirrorRaceTest : public ::testing::Test, protected HmmMachine {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(start()); }
  void TearDown() override { stop(); }

  dmirror::Dmirror* file(int fd) { return dynamic_cast<dmirror::Dmirror*>(proc->fd_get(fd).get()); }

  std::unique_ptr<HmmBuffer> filled(uint64_t npages) {
    auto b = HmmBuffer::map(*proc, npages * kPageSize, npages * kPageSize, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS);
    EXPECT_EQ(cpu_write_ints(*proc, b->ptr, npages * kIntsPerPage, pat), 0);
    return b;
  }
  // Every int of [va, va + npages) as the CPU reads it: pat(i), except the pages in `zero`.
  void expect_cpu(devfs::Process& p, Va va, uint64_t npages, std::vector<uint64_t> zero = {}) {
    int rc;
    std::vector<int> v = cpu_read_ints(p, va, npages * kIntsPerPage, &rc);
    ASSERT_EQ(rc, 0);
    expect_ints(v.data(), npages, zero);
  }
  static void expect_ints(const int* v, uint64_t npages, const std::vector<uint64_t>& zero) {
    for (uint64_t i = 0; i < npages * kIntsPerPage; i++) {
      const bool z = std::find(zero.begin(), zero.end(), i / kIntsPerPage) != zero.end();
      ASSERT_EQ(v[i], z ? 0 : pat(i)) << "int " << i << " (page " << i / kIntsPerPage << ")";
    }
  }
  // The device-state check: every entry the device page table holds for [va, va + npages)
  // names the frame the CPU page table maps there now (a present page, or the device-private
  // or device-exclusive entry's page). A stale entry is a device access to a frame that no
  // longer backs the address.
  void expect_device_pt_matches_cpu(devfs::Process& p, int fd, Va va, uint64_t npages) {
    for (uint64_t i = 0; i < npages; i++) {
      const Va a = va + i * kPageSize;
      std::optional<dmirror::DptEntry> e = file(fd)->pt_lookup(a);
      if (!e) continue;
      const mm::PageState st = mm::query_page(p.mm(), a);
      ASSERT_NE(st.kind, mm::PageKind::kNone) << "device maps page " << i << " that the CPU does not";
      ASSERT_EQ(e->pfn, st.pfn) << "device entry of page " << i << " is stale";
    }
  }
};

// Issue 9 §1b: EXCLUSIVE stored its atomic entry with no sequence check.
//  1. thread X: EXCLUSIVE of 4 pages; make_device_exclusive has replaced page 2's PTE by a
//     device-exclusive entry for frame F and returned F locked, with its GUP reference; X
//     stops at dmirror.exclusive.made, before it stores the device entry
//  2. main: MADV_DONTNEED of page 2 (mmap read lock only, no folio lock): the UNMAP
//     invalidation finds no device entry to erase, the zap drops the device-exclusive entry
//     with its rmap item and mapping reference; only X's reference keeps F
//  3. X resumes. Without the notifier protocol it stores F as page 2's ATOMIC entry, then
//     unlocks and puts F: F is freed while the device maps it, and reused by the next
//     allocation (step 4): the device reads and writes another mapping's page.
//     With it: read_retry sees the invalidation of step 2, X drops F and makes page 2
//     exclusive again (a fresh zeroed page, as the CPU now sees it).
//  4. main: a new mapping takes free frames and is written; then the device READs page 2.
TEST_F(DmirrorRaceTest, Exclusive_MadviseDontneedInWindow_NoStaleAtomicEntry) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  constexpr uint64_t n = 4;
  auto buffer = filled(n);
  const Va page2 = buffer->ptr + 2 * kPageSize;
  int x_rc = -1;
  {
    std::jthread x;  // joined after the Pause below releases it
    Pause pause("dmirror.exclusive.made", {.nth = 3, .thread = "x"});
    ASSERT_EQ(pause.status(), 0);
    x = std::jthread([&] {
      sched_point::set_thread_name("x");
      x_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), n);
    });
    ASSERT_TRUE(pause.wait_reached()) << "EXCLUSIVE never reached page 2";
    ASSERT_EQ(mm::query_page(proc->mm(), page2).leaf, mm::SoftLeafType::kDeviceExclusive);
    ASSERT_EQ(proc->mm().madvise(page2, kPageSize, MADV_DONTNEED), 0);
    ASSERT_EQ(mm::query_page(proc->mm(), page2).kind, mm::PageKind::kNone);
    pause.release();
    x.join();
  }
  ASSERT_EQ(x_rc, 0);
  EXPECT_EQ(buffer->cpages, n);
  // EXCLUSIVE's read-back: page 2 is the zeroed page the CPU maps now.
  expect_ints(buffer->mirror.data(), n, {2});
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, n));
  for (uint64_t i = 0; i < n; i++) {
    EXPECT_EQ(mm::query_page(proc->mm(), buffer->ptr + i * kPageSize).leaf, mm::SoftLeafType::kDeviceExclusive) << i;
  }
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), n), -EPERM);
  // 4. Other allocations reuse whatever was freed; the device still reads page 2 as zeroes.
  auto other = filled(64);
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), n), 0);
  expect_ints(buffer->mirror.data(), n, {2});
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, n));
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, other->ptr, 64));
  // The CPU takes the pages back (restore): same bytes.
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, n, {2}));
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), n), 0);
  EXPECT_MM_CHECK_OK(*mem);
  other.reset();
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// Issue 9 §1b: a CPU fault on a migration entry during RELEASE dereferenced a freed pagemap.
//  1. page P migrated to device page D (chunk C's pagemap)
//  2. thread R: RELEASE: migrate_device_range replaces P's device-private entry by a
//     migration entry for D; R stops at dmirror.release.collected
//  3. thread C: a CPU read of P faults on the migration entry, drops the PTE lock and looks
//     D's pfn up: pfn_to_page finds C's pagemap and drops the registry lock; C stops at
//     mm.devmap.pagemap_looked_up
//  4. main: R resumes: copies D to a system page, maps it, frees D; release_chunks destroys C
//     (its pagemap unregisters and is freed); RELEASE returns
//  5. C resumes. Before the fix it dereferenced C's freed pagemap to find D's descriptor
//     (ASan: heap-use-after-free); now the descriptor was resolved under the registry lock
//     (descriptors outlive their pagemap), C waits on it (unlocked: the migration is over),
//     retries the access and reads the system page.
TEST_F(DmirrorRaceTest, Release_CpuFaultOnMigrationEntry_PagemapFreedInWindow) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  constexpr uint64_t n = 2;
  auto buffer = filled(n);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), n), 0);
  ASSERT_EQ(buffer->cpages, n);
  ASSERT_EQ(dev[0]->chunk_count(), 1u);
  std::jthread r;  // joined after the Pause below releases it
  std::jthread c;  // joined after the Pause below releases it
  Pause collected("dmirror.release.collected", {.thread = "r"});
  Pause looked_up("mm.devmap.pagemap_looked_up", {.thread = "c"});
  ASSERT_EQ(collected.status(), 0);
  ASSERT_EQ(looked_up.status(), 0);
  int r_rc = -1;
  r = std::jthread([&] {
    sched_point::set_thread_name("r");
    HmmBuffer none;
    none.ptr = buffer->ptr;
    r_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_RELEASE, &none, 1);
  });
  ASSERT_TRUE(collected.wait_reached());
  ASSERT_EQ(mm::query_page(proc->mm(), buffer->ptr).kind, mm::PageKind::kSoftLeaf);
  ASSERT_TRUE(is_migration(mm::query_page(proc->mm(), buffer->ptr).leaf));
  Result<int> c_val = Err{-1};
  c = std::jthread([&] {
    sched_point::set_thread_name("c");
    c_val = mm::cpu::load<int>(proc->mm(), buffer->ptr + sizeof(int));
  });
  ASSERT_TRUE(looked_up.wait_reached()) << "the CPU fault never looked the device pfn up";
  collected.release();
  r.join();
  ASSERT_EQ(r_rc, 0);
  EXPECT_EQ(dev[0]->chunk_count(), 0u) << "the chunk (and its pagemap) should be gone";
  looked_up.release();
  c.join();
  ASSERT_TRUE(c_val.ok());
  EXPECT_EQ(*c_val, pat(1));
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, n));
  for (uint64_t i = 0; i < n; i++) {
    EXPECT_EQ(mm::query_page(proc->mm(), buffer->ptr + i * kPageSize).kind, mm::PageKind::kSmall) << i;
  }
  EXPECT_EQ(file(fd)->pt_entries(), 0u);
  EXPECT_EQ(dev[0]->pages_in_use(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// A third listener: a plain interval notifier that records what reaches it.
class RecordingMirror : public mm::MmuIntervalNotifierOps {
 public:
  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock);
    n->set_seq(cur_seq);
    if (range.event == mm::MmuNotifyEvent::kMigrate) migrate_owners.push_back(range.owner);
    return true;
  }
  std::mutex lock;
  std::vector<const void*> migrate_owners;
};

// Seed 001 replay: the owner-tagged MIGRATE invalidation is skipped (for erasing) only by the
// migrating file; every other listener invalidates, and the sequence moves for all of them.
// Files A (device 0) and B (device 1, another owner) mirror the same 8 pages, plus a plain
// recording notifier; A and B have mapped pages 0-3 already.
// Phase 1, the second listener:
//  1. thread FB: READ of pages 0-7 on B: the device fault of pages 4-7 samples B's sequence,
//     hmm_range_fault maps the system pages X, and FB stops at dmirror.fault.walked (before
//     read_retry)
//  2. thread M: MIGRATE_TO_DEV of pages 0-7 on A: migrate_vma_setup fires one MIGRATE
//     invalidation tagged with device 0: A's callback recognises its own migration, sets its
//     sequence and keeps its entries; B's callback and the recording notifier see a foreign
//     one: B sets its sequence and erases. M stops at dmirror.migrate_to_dev.collected
//  3. main, in the window: A still maps pages 0-3 (it unmaps them itself before the copy),
//     B maps nothing (its pages 0-3 were erased), the recording notifier saw MIGRATE with owner device 0
//  4. M resumes: the pages move to device 0 (D), X is freed; A maps D
//  5. FB resumes: read_retry is true, so it does not store X: it walks again, faults D back
//     (device 1 may not map device 0's private pages) and maps the system copies
// Phase 2, the migrating file's own sequence (nothing else runs meanwhile):
//  6. thread FA: READ of pages 4-7 on A: walk maps the system pages Y, FA stops at
//     dmirror.fault.walked
//  7. MIGRATE_TO_DEV of pages 0-7 on A again: its own MIGRATE invalidation keeps A's entries
//     but sets A's sequence; Y moves to the device and is freed
//  8. FA resumes: read_retry is true (step 7), it walks again and maps the device pages. Had
//     the skip also skipped set_seq (test_hmm), FA would store Y, a freed page.
TEST_F(DmirrorRaceTest, Seed001_MigrateInvalidation_SecondListenerInvalidates_SequenceForBoth) {
  const int fa = hmm_open(*proc, 0);
  const int fb = hmm_open(*proc, 1);
  ASSERT_GE(fa, 0);
  ASSERT_GE(fb, 0);
  constexpr uint64_t n = 8;
  auto buffer = filled(n);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fa, HMM_DMIRROR_READ, buffer.get(), 4), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fb, HMM_DMIRROR_READ, buffer.get(), 4), 0);
  ASSERT_EQ(file(fa)->pt_entries(), 4u);
  ASSERT_EQ(file(fb)->pt_entries(), 4u);
  RecordingMirror rec_ops;
  mm::MmuIntervalNotifier rec;
  ASSERT_EQ(rec.insert(&proc->mm(), buffer->ptr, n * kPageSize, &rec_ops), 0);

  // Phase 1.
  const uint64_t retries_b = dev[1]->fault_retries.get();
  HmmBuffer view_b;
  view_b.ptr = buffer->ptr;
  view_b.mirror.assign(n * kIntsPerPage, -1);
  int rc_b = -1, rc_m = -1;
  {
    std::jthread tb, tm;  // joined after the Pauses below release them
    Pause walked("dmirror.fault.walked", {.thread = "fb"});
    Pause collected("dmirror.migrate_to_dev.collected", {.thread = "m"});
    ASSERT_EQ(walked.status(), 0);
    ASSERT_EQ(collected.status(), 0);
    tb = std::jthread([&] {
      sched_point::set_thread_name("fb");
      rc_b = hmm_dmirror_cmd(*proc, fb, HMM_DMIRROR_READ, &view_b, n);
    });
    ASSERT_TRUE(walked.wait_reached());
    tm = std::jthread([&] {
      sched_point::set_thread_name("m");
      rc_m = hmm_dmirror_cmd(*proc, fa, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), n);
    });
    ASSERT_TRUE(collected.wait_reached());
    // 3. The window.
    EXPECT_EQ(file(fa)->pt_entries(), 4u) << "the migrating file keeps its entries until it unmaps them";
    EXPECT_EQ(file(fb)->pt_entries(), 0u) << "a second listener must drop its mapping";
    {
      std::lock_guard<std::mutex> g(rec_ops.lock);
      ASSERT_EQ(rec_ops.migrate_owners.size(), 1u);
      EXPECT_EQ(rec_ops.migrate_owners[0], dev[0]->owner());
    }
    collected.release();
    tm.join();
    ASSERT_EQ(rc_m, 0);
    EXPECT_EQ(buffer->cpages, n);
    expect_ints(buffer->mirror.data(), n, {});
    walked.release();
    tb.join();
  }
  ASSERT_EQ(rc_b, 0);
  EXPECT_GE(dev[1]->fault_retries.get(), retries_b + 1) << "B's fault must retry after A's migration";
  expect_ints(view_b.mirror.data(), n, {});
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fa, buffer->ptr, n));
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fb, buffer->ptr, n));
  EXPECT_MM_CHECK_OK(*mem);

  // Phase 2.
  const uint64_t retries_a = dev[0]->fault_retries.get();
  HmmBuffer view_a;
  view_a.ptr = buffer->ptr + 4 * kPageSize;
  view_a.mirror.assign(4 * kIntsPerPage, -1);
  int rc_a = -1;
  {
    std::jthread ta;  // joined after the Pause below releases it
    Pause walked("dmirror.fault.walked", {.thread = "fa"});
    ASSERT_EQ(walked.status(), 0);
    ta = std::jthread([&] {
      sched_point::set_thread_name("fa");
      rc_a = hmm_dmirror_cmd(*proc, fa, HMM_DMIRROR_READ, &view_a, 4);
    });
    ASSERT_TRUE(walked.wait_reached());
    ASSERT_EQ(hmm_dmirror_cmd(*proc, fa, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), n), 0);
    EXPECT_EQ(buffer->cpages, n);
    walked.release();
    ta.join();
  }
  ASSERT_EQ(rc_a, 0);
  EXPECT_GE(dev[0]->fault_retries.get(), retries_a + 1) << "A's fault must retry after its own migration";
  for (uint64_t i = 0; i < 4 * kIntsPerPage; i++) ASSERT_EQ(view_a.mirror[i], pat(4 * kIntsPerPage + i)) << i;
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fa, buffer->ptr, n));
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fb, buffer->ptr, n));
  for (uint64_t i = 4; i < n; i++) {
    std::optional<dmirror::DptEntry> e = file(fa)->pt_lookup(buffer->ptr + i * kPageSize);
    ASSERT_TRUE(e.has_value()) << i;
    EXPECT_TRUE(dev[0]->owns(mem->pfn_to_page(e->pfn))) << "page " << i << " should map device memory";
  }
  rec.remove();
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, n));
  EXPECT_MM_CHECK_OK(*mem);
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fa), 0);
  EXPECT_EQ(devfs::close(*proc, fb), 0);
}

// Seed 004 replay, fork: a device-exclusive entry is given back to the parent's CPU before
// fork copies it, and a later EXCLUSIVE of a page the child still shares copies it first.
//  1. EXCLUSIVE of 4 pages: the device maps them ATOMIC
//  2. fork: each device-exclusive entry is restored (the device's ATOMIC entries go with the
//     invalidation) and shared COW with the child
//  3. thread X: EXCLUSIVE of page 1 again: the write fault inside make_device_exclusive
//     COW-copies page 1 for the parent (the child keeps the original); X stops at
//     dmirror.exclusive.made (the COW's invalidation will make it retry once)
//  4. main, in the window: the child writes all 4 of its pages (its own address space: its
//     COW faults run beside X; for page 1 the original is now only the child's)
//  5. X resumes and finishes; the device reads the parent's data, the child its own.
TEST_F(DmirrorRaceTest, Seed004_ExclusiveAcrossFork_ChildWritesInWindow) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  constexpr uint64_t n = 4;
  auto buffer = filled(n);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), n), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), n), -EPERM);
  Result<std::unique_ptr<devfs::Process>> child = proc->fork();
  ASSERT_TRUE(child.ok());
  // 2. The parent's CPU has the pages back; the device lost its atomic access.
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), n), 0);
  for (uint64_t i = 0; i < n; i++) {
    const mm::PageState st = mm::query_page(proc->mm(), buffer->ptr + i * kPageSize);
    EXPECT_EQ(st.kind, mm::PageKind::kSmall) << i;
    EXPECT_FALSE(st.writable) << i;
    EXPECT_EQ(st.mapcount, 2) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  int x_rc = -1;
  HmmBuffer page1;
  page1.ptr = buffer->ptr + kPageSize;
  page1.mirror.assign(kIntsPerPage, -1);
  {
    std::jthread x;  // joined after the Pause below releases it
    Pause pause("dmirror.exclusive.made", {.thread = "x"});
    ASSERT_EQ(pause.status(), 0);
    x = std::jthread([&] {
      sched_point::set_thread_name("x");
      x_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, &page1, 1);
    });
    ASSERT_TRUE(pause.wait_reached());
    const mm::PageState st = mm::query_page(proc->mm(), page1.ptr);
    ASSERT_EQ(st.leaf, mm::SoftLeafType::kDeviceExclusive);
    ASSERT_EQ(st.mapcount, 1) << "the parent's copy, not the page shared with the child";
    ASSERT_EQ(cpu_write_ints(**child, buffer->ptr, n * kIntsPerPage, [](uint64_t i) { return -pat(i); }), 0);
    pause.release();
    x.join();
  }
  ASSERT_EQ(x_rc, 0);
  for (uint64_t i = 0; i < kIntsPerPage; i++) ASSERT_EQ(page1.mirror[i], pat(kIntsPerPage + i)) << i;
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, n));
  // The other pages too (each COW-copied for the parent now that the child wrote its own).
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), n), 0);
  expect_ints(buffer->mirror.data(), n, {});
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), n), -EPERM);
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, n));
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), n), 0);
  expect_ints(buffer->mirror.data(), n, {});
  int rc;
  std::vector<int> cv = cpu_read_ints(**child, buffer->ptr, n * kIntsPerPage, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < cv.size(); i++) ASSERT_EQ(cv[i], -pat(i)) << i;
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, n));
  EXPECT_MM_CHECK_OK(*mem);
  (*child)->exit();
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// Seed 004 replay, folio split: a device-exclusive PTE of a large folio survives the split
// of that folio as a read-only present PTE, and the device loses its atomic entry.
//  1. a 2 MiB THP, written
//  2. thread X: EXCLUSIVE of page 5: the PMD is split (the folio stays large, PTE-mapped) and
//     page 5 becomes device-exclusive; X stops at dmirror.exclusive.made
//  3. main, in the window: MADV_DONTNEED of pages 0-1 of the same folio (their PTEs go; the
//     folio is queued for deferred split); X's sequence moved, so it makes page 5 exclusive
//     again before it stores the entry
//  4. MIGRATE_TO_DEV of the 2 MiB on device 1: the walk meets the PTE-mapped large folio and
//     splits it (split_folio_exclusive): page 5's device-exclusive entry comes back as a
//     read-only PTE under a CLEAR invalidation (device 0 drops its ATOMIC entry); the small
//     folios migrate.
TEST_F(DmirrorRaceTest, Seed004_ExclusiveAcrossFolioSplit_DontneedInWindow) {
  const int fd = hmm_open(*proc, 0);
  const int fd1 = hmm_open(*proc, 1);
  ASSERT_GE(fd, 0);
  ASSERT_GE(fd1, 0);
  constexpr uint64_t n = TWOMEG >> kPageShift;
  Result<Va> raw = proc->mm().mmap(0, 2 * TWOMEG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(raw.ok());
  HmmBuffer b;
  b.ptr = align_up(*raw, TWOMEG);
  b.mirror.assign(n * kIntsPerPage, -1);
  ASSERT_EQ(proc->mm().madvise(b.ptr, TWOMEG, MADV_HUGEPAGE), 0);
  ASSERT_EQ(cpu_write_ints(*proc, b.ptr, n * kIntsPerPage, pat), 0);
  ASSERT_EQ(mm::query_page(proc->mm(), b.ptr).kind, mm::PageKind::kThpPmd);
  HmmBuffer page5;
  page5.ptr = b.ptr + 5 * kPageSize;
  page5.mirror.assign(kIntsPerPage, -1);
  int x_rc = -1;
  {
    std::jthread x;  // joined after the Pause below releases it
    Pause pause("dmirror.exclusive.made", {.thread = "x"});
    ASSERT_EQ(pause.status(), 0);
    x = std::jthread([&] {
      sched_point::set_thread_name("x");
      x_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, &page5, 1);
    });
    ASSERT_TRUE(pause.wait_reached());
    const mm::PageState st = mm::query_page(proc->mm(), page5.ptr);
    ASSERT_EQ(st.leaf, mm::SoftLeafType::kDeviceExclusive);
    ASSERT_TRUE(st.large);
    ASSERT_EQ(proc->mm().madvise(b.ptr, 2 * kPageSize, MADV_DONTNEED), 0);
    pause.release();
    x.join();
  }
  ASSERT_EQ(x_rc, 0);
  for (uint64_t i = 0; i < kIntsPerPage; i++) ASSERT_EQ(page5.mirror[i], pat(5 * kIntsPerPage + i)) << i;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, &page5, 1), -EPERM);
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, b.ptr, n));
  EXPECT_MM_CHECK_OK(*mem);
  // 4. The split during migration gives page 5 back to the CPU first.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, &b, n), 0);
  EXPECT_EQ(b.cpages, n);
  expect_ints(b.mirror.data(), n, {0, 1});
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, &b, n), 0) << "device 0 kept an atomic entry";
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, b.ptr, n));
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd1, b.ptr, n));
  EXPECT_FALSE(mm::query_page(proc->mm(), page5.ptr).large);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, b.ptr, n, {0, 1}));
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(proc->mm().munmap(*raw, 2 * TWOMEG), 0);
  EXPECT_EQ(devfs::close(*proc, fd), 0);
  EXPECT_EQ(devfs::close(*proc, fd1), 0);
}

// Issue 9 §6: the "an invalidation hit this chunk" record of MIGRATE_TO_DEV.
//  1. thread M: MIGRATE_TO_DEV of pages 0-1: migrate_vma_setup installs migration entries
//     for both; M stops at dmirror.migrate_to_dev.collected
//  2. main, in the window: MADV_DONTNEED of page 1: the zap removes its migration entry under
//     an UNMAP invalidation that M's calls did not raise - it marks M's record
//  3. M resumes: copies, migrate_vma_pages, finalize (page 1's destination D1 has no entry to
//     go to and is freed). Because the record was hit, M maps nothing: the next access
//     faults. Without the check M would map D1, a freed device page, for page 1.
//  4. the device READs both pages: page 0 the pattern, page 1 zeroes (as the CPU sees it).
TEST_F(DmirrorRaceTest, MigrateToDev_InvalidationHitsChunk_NothingMapped) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  constexpr uint64_t n = 2;
  auto buffer = filled(n);
  int m_rc = -1;
  {
    std::jthread m;  // joined after the Pause below releases it
    Pause pause("dmirror.migrate_to_dev.collected", {.thread = "m"});
    ASSERT_EQ(pause.status(), 0);
    m = std::jthread([&] {
      sched_point::set_thread_name("m");
      m_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), n);
    });
    ASSERT_TRUE(pause.wait_reached());
    ASSERT_TRUE(is_migration(mm::query_page(proc->mm(), buffer->ptr + kPageSize).leaf));
    ASSERT_EQ(proc->mm().madvise(buffer->ptr + kPageSize, kPageSize, MADV_DONTNEED), 0);
    pause.release();
    m.join();
  }
  // MIGRATE_TO_DEV reads the range back through the device page table: nothing was mapped.
  EXPECT_EQ(m_rc, -ENOENT);
  EXPECT_EQ(file(fd)->pt_entries(), 0u) << "mapped a chunk an invalidation hit";
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), n), 0);
  EXPECT_EQ(buffer->faults, 1u);
  expect_ints(buffer->mirror.data(), n, {1});
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, n));
  EXPECT_EQ(dev[0]->pages_in_use(), 1u);
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, n, {1}));
  EXPECT_MM_CHECK_OK(*mem);
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// The other side of the record: an invalidation outside the chunk does not hit it.
//  1. thread M: MIGRATE_TO_DEV of pages 0-1 of a 4-page buffer stops as above
//  2. main: MADV_DONTNEED of page 3 (outside the chunk)
//  3. M resumes and maps both migrated pages: the READ-back needs no fault.
TEST_F(DmirrorRaceTest, MigrateToDev_InvalidationOutsideChunk_Mapped) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  auto buffer = filled(4);
  int m_rc = -1;
  {
    std::jthread m;  // joined after the Pause below releases it
    Pause pause("dmirror.migrate_to_dev.collected", {.thread = "m"});
    ASSERT_EQ(pause.status(), 0);
    m = std::jthread([&] {
      sched_point::set_thread_name("m");
      m_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 2);
    });
    ASSERT_TRUE(pause.wait_reached());
    ASSERT_EQ(proc->mm().madvise(buffer->ptr + 3 * kPageSize, kPageSize, MADV_DONTNEED), 0);
    pause.release();
    m.join();
  }
  ASSERT_EQ(m_rc, 0);
  EXPECT_EQ(buffer->cpages, 2u);
  expect_ints(buffer->mirror.data(), 2, {});
  EXPECT_EQ(file(fd)->pt_entries(), 2u);
  ASSERT_NO_FATAL_FAILURE(expect_device_pt_matches_cpu(*proc, fd, buffer->ptr, 4));
  ASSERT_NO_FATAL_FAILURE(expect_cpu(*proc, buffer->ptr, 4, {3}));
  EXPECT_MM_CHECK_OK(*mem);
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
