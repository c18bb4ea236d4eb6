// The unified fault-and-migrate walk (seed 002): hmm_range_fault with HMM_PFN_REQ_MIGRATE,
// migrate_vma_setup with MIGRATE_VMA_FAULT, the two- and three-step paths, every error path
// restoring its migration entries (seed 000), the reverse-map unmap of pages other processes
// map, and eviction by device pfn.
#include <atomic>
#include <random>
#include <thread>

#include "gpusvm/base/fault_inject.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

// Records every invalidation with its owner.
class RecordingMirror : public MmuIntervalNotifierOps {
 public:
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& range, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock);
    n->set_seq(cur_seq);
    seen.push_back({range.event, range.owner});
    return true;
  }
  int count(MmuNotifyEvent e, const void* owner) {
    std::lock_guard<std::mutex> g(lock);
    int c = 0;
    for (auto& [ev, o] : seen) c += (ev == e && o == owner) ? 1 : 0;
    return c;
  }
  std::mutex lock;
  std::vector<std::pair<MmuNotifyEvent, const void*>> seen;
};

class MigrateWalkTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 2048);
    dev2 = std::make_unique<TestDevice>(mem.get(), 2048);
    ASSERT_TRUE(dev->ok() && dev2->ok());
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 2048u) << "device pages leaked";
    EXPECT_EQ(dev2->free_pages(), 2048u) << "device pages leaked";
    dev.reset();
    dev2.reset();
    MmTest::TearDown();
  }
  // Logical walks (passes that started at the range start) and all passes, since `before`.
  struct Walks {
    uint64_t walks, passes;
  };
  Walks walks_since(const Walks& before) {
    const uint64_t passes = as->stats().hmm_walks.get() - before.passes;
    const uint64_t restarts = as->stats().hmm_restarts.get() - before.walks;
    return {passes - restarts, passes};
  }
  Walks walk_counters() { return {as->stats().hmm_restarts.get(), as->stats().hmm_walks.get()}; }

  std::unique_ptr<TestDevice> dev, dev2;
};

TEST_F(MigrateWalkTest, MigrateVmaFault_ForeignDevicePagesFaultedAndCollectedInOneWalk) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 1);
  ASSERT_EQ(*dev2->migrate_to_device(*as, va + 8 * kPageSize, va + kPages * kPageSize), 8u);
  // Without MIGRATE_VMA_FAULT another device's pages are not ours to take.
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), 8u);
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + kPages * kPageSize), 8u);
  // With it they are faulted back (dev2's migrate_to_ram) and collected in the same walk.
  const Walks before = walk_counters();
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize, MIGRATE_VMA_FAULT), kPages);
  const Walks w = walks_since(before);
  EXPECT_EQ(dev2->cpu_faults.load(), 8);
  // One walk of ours; each of dev2's migrate_to_ram calls walks its page once.
  EXPECT_EQ(w.walks, 1u + 8);
  EXPECT_GE(w.passes, w.walks + 1);  // the pass after the faults goes on where they were
  EXPECT_EQ(dev2->free_pages(), 2048u);
  for (uint64_t p = 0; p < kPages; p++) {
    EXPECT_TRUE(dev->pgmap()->contains(query_page(*as, va + p * kPageSize).pfn)) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 1), 0);
}

// The three walk modes give the same result; only the number of walks differs.
TEST_F(MigrateWalkTest, WalkModes_SameResultDifferentWalkCounts) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 2);
  const std::pair<MigrateWalkMode, uint64_t> modes[] = {
      {MigrateWalkMode::kUnified, 1}, {MigrateWalkMode::kTwoStep, 2}, {MigrateWalkMode::kThreeStep, 3}};
  for (auto [mode, expected_walks] : modes) {
    SCOPED_TRACE(static_cast<int>(mode));
    ASSERT_EQ(*dev2->migrate_to_device(*as, va + 4 * kPageSize, va + 12 * kPageSize), 8u);
    const Walks before = walk_counters();
    ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize, MIGRATE_VMA_FAULT, mode), kPages);
    EXPECT_EQ(walks_since(before).walks, expected_walks + 8);  // + dev2's migrate_to_ram walks
    EXPECT_MM_CHECK_OK(*mem);
    ASSERT_EQ(*dev->migrate_to_system(*as, va, va + kPages * kPageSize), kPages);
    EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 2), 0);
  }
}

// A driver that mirrors through hmm_range_fault collects in one call, under exactly one
// MIGRATE invalidation carrying its owner; the holes need no fault (they get new pages).
TEST_F(MigrateWalkTest, HmmRangeFault_ReqMigrate_CollectsInOneCallHolesUnfaulted) {
  constexpr uint64_t kPages = 32;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, 16 * kPageSize, 3);  // 16..31 never touched
  RecordingMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, kPages * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns(kPages), src(kPages), dst(kPages);
  MigrateVma m{.src = src.data(), .dst = dst.data(), .pgmap_owner = dev.get()};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + kPages * kPageSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
             .dev_private_owner = dev.get(), .migrate = &m};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(hmm_range_fault(&r), 0);
    EXPECT_EQ(mirror.count(MmuNotifyEvent::kMigrate, dev.get()), 1);  // the walk's one
    for (uint64_t i = 0; i < 16; i++) {
      EXPECT_TRUE(hmm_pfn_migrate_has_source(pfns[i])) << i;
      EXPECT_TRUE(pfns[i] & HMM_PFN_WRITE) << i;
    }
    // The holes are not faulted: the migration gives them their (zeroed) page.
    for (uint64_t i = 16; i < kPages; i++) {
      EXPECT_EQ(pfns[i], HMM_PFN_VALID | HMM_PFN_MIGRATE) << i;
    }
    EXPECT_EQ(as->stats().migrate_collected.get(), 16u);
    ASSERT_EQ(migrate_hmm_range_setup(&r), 0);
    EXPECT_EQ(m.cpages, kPages);
    dev->copy_to_new_pages(src.data(), dst.data(), kPages, /*to_device=*/true);
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    migrate_vma_finalize(&m);
  }
  // ... and migrate_vma_pages' one for inserting the holes' new pages.
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kMigrate, dev.get()), 2);
  EXPECT_EQ(as->stats().hmm_faults.get(), 0u);
  for (uint64_t i = 0; i < kPages; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    EXPECT_TRUE(dev->pgmap()->contains(st.pfn)) << i;
    EXPECT_TRUE(st.writable) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 16 * kPageSize, 3), 0);
  for (uint64_t i = 16; i < kPages; i++) EXPECT_EQ(*cpu::load<uint64_t>(*as, va + i * kPageSize), 0u);
  notifier.remove();
}

TEST_F(MigrateWalkTest, ReqMigrateAcrossVmas_ErangeNothingChanged) {
  const Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 4);
  ASSERT_EQ(as->mprotect(va + 4 * kPageSize, 4 * kPageSize, PROT_READ), 0);  // two VMAs now
  RecordingMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, 8 * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns(8), src(8), dst(8);
  MigrateVma m{.src = src.data(), .dst = dst.data()};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + 8 * kPageSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE, .migrate = &m};
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(hmm_range_fault(&r), -ERANGE);
    r.migrate = nullptr;
    EXPECT_EQ(hmm_range_fault(&r), -EINVAL);  // REQ_MIGRATE needs somewhere to put the result
  }
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kMigrate, nullptr), 0);
  for (uint64_t i = 0; i < 8; i++) EXPECT_EQ(query_page(*as, va + i * kPageSize).kind, PageKind::kSmall);
  notifier.remove();
}

// Seed 000: a fault that fails after migration entries were installed must not leave one
// behind (the hang); every page maps its original folio again, unlocked.
TEST_F(MigrateWalkTest, FaultFailsAfterEntriesInstalled_RestoresAll) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 5);
  // Pages 8..15 stay shared with a child: a write request must COW them (a fault that can
  // fail); 0..7 are the parent's own again and get collected first.
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  fill_pages(*as, va, 8 * kPageSize, 5);
  RecordingMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, kPages * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns(kPages), src(kPages), dst(kPages);
  MigrateVma m{.src = src.data(), .dst = dst.data()};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + kPages * kPageSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
             .migrate = &m};
  {
    fault_inject::ScopedArm fail("mm.alloc_folio", {.nth = 1, .times = 0});
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(hmm_range_fault(&r), -EFAULT);
  }
  for (uint64_t i = 0; i < kPages; i++) EXPECT_FALSE(pfns[i] & HMM_PFN_MIGRATE) << i;
  for (uint64_t i = 0; i < 8; i++) {
    const PageState st = query_page(*as, va + i * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << i;
    EXPECT_TRUE(st.writable) << i;  // exclusivity came back with the mapping
    EXPECT_FALSE(folio_test_locked(mem->folio_of(st.pfn))) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 5), 0);
  EXPECT_EQ(verify_pages(**child, va, kPages * kPageSize, 5), 0);
  child->reset();
  // The same through migrate_vma_setup: the error comes back with src all 0.
  ASSERT_EQ(*dev2->migrate_to_device(*as, va + 8 * kPageSize, va + kPages * kPageSize), 8u);
  {
    fault_inject::ScopedArm fail("mm.alloc_folio", {.nth = 1, .times = 0});
    MigrateVma mv{.mm = as.get(), .start = va, .end = va + kPages * kPageSize, .src = src.data(),
                  .dst = dst.data(), .pgmap_owner = dev.get(),
                  .flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_FAULT};
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(migrate_vma_setup(&mv), -EFAULT);  // dev2's migrate_to_ram cannot allocate
    for (uint64_t i = 0; i < kPages; i++) EXPECT_EQ(src[i], 0u) << i;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 8 * kPageSize, 5), 0);
  EXPECT_EQ(*dev2->migrate_to_system(*as, va, va + kPages * kPageSize), 8u);
  notifier.remove();
}

// An invalidation since read_begin: -EBUSY before anything changes (the sequence is checked
// before the walk's own MIGRATE invalidation starts; after that the migration entries keep
// the collected pages stable).
TEST_F(MigrateWalkTest, ReqMigrateStaleSequence_EbusyNothingInstalled) {
  const Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 12);
  RecordingMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, 8 * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns(8), src(8), dst(8);
  MigrateVma m{.src = src.data(), .dst = dst.data(), .pgmap_owner = dev.get()};
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = va,
             .end = va + 8 * kPageSize, .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_MIGRATE,
             .dev_private_owner = dev.get(), .migrate = &m};
  ASSERT_EQ(as->mprotect(va, 8 * kPageSize, PROT_READ), 0);  // invalidates the notifier
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(hmm_range_fault(&r), -EBUSY);
  }
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kMigrate, dev.get()), 0);
  EXPECT_EQ(as->stats().migrate_collected.get(), 0u);
  for (uint64_t i = 0; i < 8; i++) EXPECT_EQ(query_page(*as, va + i * kPageSize).kind, PageKind::kSmall);
  notifier.remove();
}

// migrate_vma_setup's fault_page must be a locked device-private page (the CPU fault
// handler's): anything else is -EINVAL with nothing touched.
TEST_F(MigrateWalkTest, FaultPageMustBeLockedDevicePage) {
  const Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 13);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPageSize), 1u);
  Folio* device_page = mem->folio_of(query_page(*as, va).pfn);
  Folio* system_page = mem->folio_of(query_page(*as, va + kPageSize).pfn);
  uint64_t src[2], dst[2];
  MigrateVma m{.mm = as.get(), .start = va, .end = va + 2 * kPageSize, .src = src, .dst = dst,
               .pgmap_owner = dev.get(), .flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE};
  {
    ReadLock g(&as->mmap_lock());
    m.fault_page = device_page;  // not locked
    EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
    m.fault_page = system_page;
    EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  }
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 13), 0);
}

// The driver aborts (xe does when it cannot take every page): pages + finalize with no
// destination restore every entry - PTE and PMD, here and in a forked child - with its
// write, dirty and young bits, and free nothing.
TEST_F(MigrateWalkTest, AbortWithEmptyDst_RestoresEveryEntry) {
  const Va small = map_anon(*as, 16 * kPageSize);
  const Va thp = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, small, 16 * kPageSize, 14);
  fill_pages(*as, thp, kPmdSize, 14);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  fill_pages(*as, small, 8 * kPageSize, 14);  // 0..7 exclusive again, 8..15 shared
  ASSERT_EQ(*dev2->migrate_to_device(*as, small + 12 * kPageSize, small + 16 * kPageSize), 4u);
  const uint64_t free_before = mem->free_pages();
  for (auto [start, len] : {std::pair{small, 16 * kPageSize}, std::pair{thp, kPmdSize}}) {
    const uint64_t n = len / kPageSize;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m{.mm = as.get(), .start = start, .end = start + len, .src = src.data(),
                 .dst = dst.data(), .pgmap_owner = dev.get(),
                 .flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND | MIGRATE_VMA_FAULT};
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&m), 0);
    EXPECT_EQ(m.cpages, n);  // everything was taken (dev2's pages faulted back first)
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    EXPECT_EQ(TestDevice::count_moved(src.data(), n), 0u);
    migrate_vma_finalize(&m);
  }
  EXPECT_EQ(mem->free_pages(), free_before - 4);  // only dev2's pages came back (new frames)
  for (uint64_t p = 0; p < 8; p++) {
    const PageState st = query_page(*as, small + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << p;
    EXPECT_TRUE(st.writable && st.dirty && st.anon_exclusive) << p;
  }
  for (uint64_t p = 8; p < 12; p++) {
    const PageState mine = query_page(*as, small + p * kPageSize);
    EXPECT_FALSE(mine.writable) << p;  // still COW-shared with the child
    EXPECT_EQ(mine.pfn, query_page(**child, small + p * kPageSize).pfn) << p;
  }
  EXPECT_EQ(query_page(*as, thp).kind, PageKind::kThpPmd);
  EXPECT_FALSE(query_page(*as, thp).writable);  // COW-shared with the child, PMD in both
  EXPECT_EQ(query_page(*as, thp).pfn, query_page(**child, thp).pfn);
  EXPECT_EQ(query_page(**child, thp).kind, PageKind::kThpPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, small, 16 * kPageSize, 14), 0);
  EXPECT_EQ(verify_pages(**child, small, 12 * kPageSize, 14), 0);
  EXPECT_EQ(verify_pages(*as, thp, kPmdSize, 14), 0);
}

TEST_F(MigrateWalkTest, TrylockFailure_PageSkippedOthersMove) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 6);
  {
    fault_inject::ScopedArm busy("mm.migrate_trylock", {.nth = 4});
    EXPECT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), kPages - 1);
  }
  EXPECT_EQ(query_page(*as, va + 3 * kPageSize).kind, PageKind::kSmall);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 6), 0);
}

// A THP under a partial range is split (PMD, then folio) and only the asked pages move; a
// folio that cannot be split stays whole and mapped.
TEST_F(MigrateWalkTest, ThpSplitForPartialRange_SplitFailureLeavesItMapped) {
  const Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, kPmdSize, 7);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  {
    fault_inject::ScopedArm fail("mm.migrate_split", {.nth = 1, .times = 0});
    EXPECT_EQ(*dev->migrate_to_device(*as, va + 8 * kPageSize, va + 12 * kPageSize), 0u);
  }
  EXPECT_EQ(query_page(*as, va + 8 * kPageSize).kind, PageKind::kThpPte);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(*dev->migrate_to_device(*as, va + 8 * kPageSize, va + 12 * kPageSize), 4u);
  EXPECT_EQ(query_page(*as, va + 8 * kPageSize).kind, PageKind::kSoftLeaf);
  EXPECT_EQ(query_page(*as, va + 12 * kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 7), 0);
}

// A THP shared with a fork child (PMD in both) under a partial range is split through the
// reverse map in both processes; the asked pages move for both (read-only, still COW-shared),
// the rest stays system memory in both.
TEST_F(MigrateWalkTest, ThpSharedWithChild_SplitThroughRmapForPartialRange) {
  const Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, kPmdSize, 15);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ(query_page(**child, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(*dev->migrate_to_device(*as, va + 8 * kPageSize, va + 12 * kPageSize), 4u);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  for (AddressSpace* mm : {as.get(), child->get()}) {
    const PageState moved = query_page(*mm, va + 9 * kPageSize);
    EXPECT_EQ(moved.kind, PageKind::kSoftLeaf);
    EXPECT_FALSE(moved.writable);
    EXPECT_TRUE(dev->pgmap()->contains(moved.pfn));
    EXPECT_EQ(query_page(*mm, va + 12 * kPageSize).kind, PageKind::kSmall);  // a 4 KiB folio now
  }
  EXPECT_EQ(query_page(*as, va).pfn, query_page(**child, va).pfn);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(**child, va, kPmdSize, 15), 0);  // brings pages 8..11 back for both
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 15), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// mprotect meeting migration entries (an eviction holds them; it needs no mmap lock): a
// writable one becomes read-exclusive, as in Linux's change_pte_range, so the page comes back
// read-only in the now read-only VMA, and still anon-exclusive: a later write reuses it.
TEST_F(MigrateWalkTest, MprotectDuringEviction_MigrationEntriesLoseWrite) {
  constexpr uint64_t kPages = 4;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 16);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), kPages);
  const uint64_t n = dev->pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev->pgmap()->first_pfn(), n), 0);
  // This thread holds the collected folio locks, so whatever takes the mmap lock runs in
  // another one.
  std::thread([&] {
    EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kMigrationWrite);
    EXPECT_EQ(as->mprotect(va, kPages * kPageSize, PROT_READ), 0);
    EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kMigrationReadExclusive);
  }).join();
  dev->copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  const PageState back = query_page(*as, va);
  EXPECT_EQ(back.kind, PageKind::kSmall);
  EXPECT_FALSE(back.writable);
  EXPECT_TRUE(back.anon_exclusive);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->mprotect(va, kPages * kPageSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 8, 1), 0);
  EXPECT_EQ(query_page(*as, va).pfn, back.pfn);  // reused, not copied
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 16), 0);
}

// Eviction by device pfn reaches every process mapping a device page through the reverse map.
TEST_F(MigrateWalkTest, EvictByDevicePfn_ReachesParentAndChild) {
  constexpr uint64_t kPages = 16;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 8);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), kPages);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(*dev->evict_all(), kPages);
  EXPECT_EQ(dev->free_pages(), 2048u);
  for (uint64_t p = 0; p < kPages; p++) {
    const PageState mine = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(mine.kind, PageKind::kSmall) << p;
    EXPECT_EQ(mine.pfn, query_page(**child, va + p * kPageSize).pfn) << p;  // still COW-shared
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(**child, va, kPages * kPageSize, 8), 0);
  fill_pages(**child, va, kPages * kPageSize, 9);  // COW: the child's own copies
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 8), 0);
  EXPECT_EQ(verify_pages(**child, va, kPages * kPageSize, 9), 0);
}

// Between collection and finalize (no mmap lock held by an evicting driver) the process may
// unmap or move the range: finalize restores what is left, where it now is.
TEST_F(MigrateWalkTest, EvictionRacesMunmapAndMremap) {
  constexpr uint64_t kPages = 8;
  const Va va = map_anon(*as, 2 * kPmdSize);
  fill_pages(*as, va, kPages * kPageSize, 10);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), kPages);
  const uint64_t n = dev->pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev->pgmap()->first_pfn(), n), 0);
  // The process runs on (another thread: this one holds the collected folio locks, which
  // rank after the mmap lock).
  Result<Va> moved = Err{-EINVAL};
  std::thread process([&] {
    EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kMigrationWrite);
    EXPECT_EQ(as->munmap(va, 2 * kPageSize), 0);  // pages 0, 1 gone
    moved = as->mremap(va + 2 * kPageSize, 6 * kPageSize, 6 * kPageSize,
                       MREMAP_MAYMOVE | MREMAP_FIXED, va + kPmdSize + 16 * kPageSize);
  });
  process.join();
  ASSERT_TRUE(moved.ok());
  dev->copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  EXPECT_EQ(dev->free_pages(), 2048u);
  EXPECT_MM_CHECK_OK(*mem);
  for (uint64_t p = 0; p < 6; p++) {
    const Va a = *moved + p * kPageSize;
    EXPECT_EQ(query_page(*as, a).kind, PageKind::kSmall) << p;
    EXPECT_EQ(*cpu::load<uint64_t>(*as, a), pattern(va + (p + 2) * kPageSize, 10)) << p;
  }
}

// Two devices migrate overlapping ranges back and forth (faulting each other's pages) while a
// CPU thread reads and writes them: every byte survives, no walk waits on another's entries.
TEST_F(MigrateWalkTest, TwoMigratorsAndCpuRace_DataIntact) {
  constexpr uint64_t kPages = 64;
  const Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, kPages * kPageSize, 11);
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::thread cpu_thread([&] {
    std::mt19937_64 rng(1);
    while (!stop.load(std::memory_order_relaxed)) {
      const Va a = va + (rng() % kPages) * kPageSize;
      Result<uint64_t> v = cpu::load<uint64_t>(*as, a);
      if (!v || *v != pattern(a, 11)) errors++;
      if (cpu::store<uint64_t>(*as, a + 8, rng())) errors++;
    }
  });
  auto migrator = [&](TestDevice* d, Va start, Va end, MigrateWalkMode mode) {
    for (int round = 0; round < 30; round++) {
      if (!d->migrate_to_device(*as, start, end, MIGRATE_VMA_FAULT, mode).ok()) errors++;
      if (!d->migrate_to_system(*as, start, end).ok()) errors++;
    }
  };
  std::thread a(migrator, dev.get(), va, va + 48 * kPageSize, MigrateWalkMode::kUnified);
  std::thread b(migrator, dev2.get(), va + 16 * kPageSize, va + kPages * kPageSize,
                MigrateWalkMode::kThreeStep);
  a.join();
  b.join();
  stop = true;
  cpu_thread.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPages * kPageSize, 11), 0);
}

}  // namespace
}  // namespace gpusvm::mm::testing
