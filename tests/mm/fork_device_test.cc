// fork and non-present entries (copy_nonpresent_pte): migration entries of a migration in
// flight, device-private entries. Device-exclusive entries at fork are covered in
// device_exclusive_test.cc.
//
// fork holds the mmap lock for write, so it meets a migration entry only when the migration
// runs without the mmap lock: migrate_device_range (eviction), or a driver that dropped the
// lock between migrate_vma_setup and migrate_vma_finalize (done here on purpose). Linux copies
// the entry (a writable one becomes readable on both sides) and remove_migration_ptes finds the
// child's copy through the anon_vma chain; we give the copy a migration record instead.
#include <cstring>
#include <functional>
#include <thread>

#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

class ForkDeviceTest : public MmTest {
 protected:
  // The driver's part of a system -> system migration of one page: a new locked page with a
  // copy of the source in dst (as a driver moving memory between nodes would).
  uint64_t new_copy_of(uint64_t src) {
    Folio* page = mem->folio_alloc(0, /*zero=*/false);
    if (!page) return 0;
    folio_lock(page);
    std::memcpy(page->data(), mem->pfn_to_page(migrate_pfn_to_pfn(src))->data(), kPageSize);
    return migrate_pfn(page->pfn());
  }
  // The first half of a migration of the one page at va, with the mmap lock taken here:
  // setup, the driver's copy (when `copy`), migrate_vma_pages. The lock is dropped on return
  // while the migration is still in flight (its folios locked): from here on this thread may
  // not take an mmap lock (the folio locks rank below it), so the fork and any look at the
  // page tables happen on another thread (on_other_thread), as another process would.
  void start_migration(MigrateVma& m, Va va, uint64_t* src, uint64_t* dst, bool copy = true) {
    m = MigrateVma{.mm = as.get(), .start = va, .end = va + kPageSize, .src = src, .dst = dst,
                   .pgmap_owner = this, .flags = MIGRATE_VMA_SELECT_SYSTEM};
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&m), 0);
    ASSERT_TRUE(*src & MIGRATE_PFN_MIGRATE);
    if (copy) {
      *dst = new_copy_of(*src);
      ASSERT_NE(*dst, 0u);
    }
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
  }
  static void on_other_thread(const std::function<void()>& fn) {
    std::thread t(fn);
    t.join();
  }
  static std::unique_ptr<AddressSpace> fork_on_other_thread(AddressSpace& parent) {
    std::unique_ptr<AddressSpace> child;
    on_other_thread([&] {
      Result<std::unique_ptr<AddressSpace>> c = parent.fork();
      ASSERT_TRUE(c.ok()) << c.error();
      child = std::move(*c);
    });
    return child;
  }
  static void expect_leaf(AddressSpace& mm, Va va, SoftLeafType type) {
    PageState st = query_page(mm, va);
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf);
    EXPECT_EQ(st.leaf, type);
  }
  // Both processes map the same page read-only, shared (COW), with one reference and one
  // mapcount each.
  static void expect_cow_shared(AddressSpace& a, AddressSpace& b, Va va, Pfn pfn, int maps = 2) {
    for (AddressSpace* mm : {&a, &b}) {
      PageState st = query_page(*mm, va);
      EXPECT_EQ(st.kind, PageKind::kSmall);
      EXPECT_EQ(st.pfn, pfn);
      EXPECT_FALSE(st.writable);
      EXPECT_FALSE(st.anon_exclusive);
      EXPECT_EQ(st.refcount, maps);
      EXPECT_EQ(st.page_mapcount, maps);
    }
  }
};

// Between setup and finalize the parent forks:
//   1. setup replaces the writable PTE by a writable migration entry (page locked); the
//      driver copies, migrate_vma_pages commits, the mmap lock is dropped;
//   2. fork (another thread) copies the entry: both sides now hold a read migration entry,
//      the child's with a migration record and no reference;
//   3. finalize maps the new page in both, read-only (COW-shared), and unlocks;
//   4. a write by either side copies; the other keeps the migrated bytes.
TEST_F(ForkDeviceTest, Fork_MigrationEntryBetweenSetupAndFinalize_BothSeeNewPage) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  const Va p = va + kPageSize;
  uint64_t src = 0, dst = 0;
  MigrateVma m;
  start_migration(m, p, &src, &dst);
  Folio* src_page = mem->pfn_to_page(migrate_pfn_to_pfn(src));
  std::unique_ptr<AddressSpace> child;
  on_other_thread([&] {
    expect_leaf(*as, p, SoftLeafType::kMigrationWrite);
    child = fork_on_other_thread(*as);
    ASSERT_NE(child, nullptr);
    expect_leaf(*as, p, SoftLeafType::kMigrationRead);
    expect_leaf(*child, p, SoftLeafType::kMigrationRead);
  });
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(src_page->page_mapcount(), 0) << "migration entries hold no mapcount";
  EXPECT_EQ(src_page->refcount(), 1) << "only the migration's reference";
  migrate_vma_finalize(&m);

  const Pfn new_pfn = migrate_pfn_to_pfn(dst);
  expect_cow_shared(*as, *child, p, new_pfn);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*child, va, 4 * kPageSize, 1), 0);

  fill_pages(*child, p, kPageSize, 2);  // the child copies
  EXPECT_NE(query_page(*child, p).pfn, new_pfn);
  EXPECT_EQ(verify_pages(*as, p, kPageSize, 1), 0);
  fill_pages(*as, p, kPageSize, 3);  // the parent is the only user now: reused in place
  EXPECT_EQ(query_page(*as, p).pfn, new_pfn);
  EXPECT_EQ(verify_pages(*child, p, kPageSize, 2), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// The driver provides no destination: finalize restores the source in both processes,
// read-only and shared.
TEST_F(ForkDeviceTest, Fork_MigrationEntry_MigrationFails_BothRestoredToSource) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  uint64_t src = 0, dst = 0;
  MigrateVma m;
  start_migration(m, va, &src, &dst, /*copy=*/false);
  std::unique_ptr<AddressSpace> child = fork_on_other_thread(*as);
  ASSERT_NE(child, nullptr);
  migrate_vma_finalize(&m);  // dst == 0: nothing moved
  expect_cow_shared(*as, *child, va, migrate_pfn_to_pfn(src));
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*child, va, 2 * kPageSize, 1), 0);
  fill_pages(*as, va, kPageSize, 2);
  EXPECT_EQ(verify_pages(*child, va, kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 2), 0);
}

// The child exits before the migration ends: its zap removes the migration record, so
// finalize never looks into the dead address space; the parent ends up the only user.
TEST_F(ForkDeviceTest, Fork_MigrationEntry_ChildExitsBeforeFinalize_Clean) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  uint64_t src = 0, dst = 0;
  MigrateVma m;
  start_migration(m, va, &src, &dst);
  on_other_thread([&] {
    std::unique_ptr<AddressSpace> child = fork_on_other_thread(*as);
    ASSERT_NE(child, nullptr);
    expect_leaf(*child, va, SoftLeafType::kMigrationRead);
  });  // the child exits here
  migrate_vma_finalize(&m);
  PageState st = query_page(*as, va);
  EXPECT_EQ(st.pfn, migrate_pfn_to_pfn(dst));
  EXPECT_FALSE(st.writable) << "fork made the entry a read entry";
  EXPECT_EQ(st.refcount, 1);
  EXPECT_MM_CHECK_OK(*mem);
  const uint64_t cow = as->stats().cow_copies.get();
  fill_pages(*as, va, kPageSize, 2);  // sole user: reuse, no copy
  EXPECT_EQ(as->stats().cow_copies.get(), cow);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 2), 0);
}

// The child moves its copy with mremap before the migration ends: the record moves with it.
TEST_F(ForkDeviceTest, Fork_MigrationEntry_ChildMremapsBeforeFinalize_RestoredAtNewAddress) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  uint64_t src = 0, dst = 0;
  MigrateVma m;
  start_migration(m, va, &src, &dst);
  std::unique_ptr<AddressSpace> child;
  Va moved = 0;
  on_other_thread([&] {
    child = fork_on_other_thread(*as);
    ASSERT_NE(child, nullptr);
    Result<Va> r = child->mremap(va, 2 * kPageSize, 2 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED,
                                 0x700000000);
    ASSERT_TRUE(r.ok());
    moved = *r;
    expect_leaf(*child, moved, SoftLeafType::kMigrationRead);
  });
  ASSERT_NE(moved, 0u);
  migrate_vma_finalize(&m);
  const Pfn new_pfn = migrate_pfn_to_pfn(dst);
  EXPECT_EQ(query_page(*child, moved).pfn, new_pfn);
  EXPECT_EQ(query_page(*as, va).pfn, new_pfn);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*child, moved, 2 * kPageSize, 1, va), 0);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 1), 0);
}

// The child forks again before the migration ends: the grandchild's copy gets its own record
// and all three processes share the migrated page.
TEST_F(ForkDeviceTest, Fork_MigrationEntry_Grandchild_AllThreeShareNewPage) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  uint64_t src = 0, dst = 0;
  MigrateVma m;
  start_migration(m, va, &src, &dst);
  std::unique_ptr<AddressSpace> child = fork_on_other_thread(*as);
  ASSERT_NE(child, nullptr);
  std::unique_ptr<AddressSpace> grandchild = fork_on_other_thread(*child);
  ASSERT_NE(grandchild, nullptr);
  migrate_vma_finalize(&m);
  const Pfn new_pfn = migrate_pfn_to_pfn(dst);
  expect_cow_shared(*as, *grandchild, va, new_pfn, 3);
  EXPECT_EQ(query_page(*child, va).pfn, new_pfn);
  EXPECT_MM_CHECK_OK(*mem);
  for (AddressSpace* mm : {as.get(), child.get(), grandchild.get()}) {
    EXPECT_EQ(verify_pages(*mm, va, kPageSize, 1), 0);
  }
}

// The same with a PMD migration entry (a compound migration of a whole THP): fork copies it
// as a read entry with a PMD migration record; finalize maps the new 2 MiB folio by PMD in
// both processes, read-only; a write by the child splits its PMD and copies 4 KiB.
TEST_F(ForkDeviceTest, Fork_PmdMigrationEntryBetweenSetupAndFinalize_BothMapNewThp) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_TRUE(pmd_aligned(va));
  fill_pages(*as, va, kPmdSize, 1);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  std::vector<uint64_t> src(kPagesPerPmd), dst(kPagesPerPmd);
  MigrateVma m{.mm = as.get(), .start = va, .end = va + kPmdSize, .src = src.data(),
               .dst = dst.data(), .pgmap_owner = this,
               .flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND};
  Folio* new_thp = nullptr;
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&m), 0);
    ASSERT_TRUE((src[0] & MIGRATE_PFN_MIGRATE) && (src[0] & MIGRATE_PFN_COMPOUND));
    new_thp = mem->folio_alloc(kPmdOrder, /*zero=*/false);
    ASSERT_NE(new_thp, nullptr);
    folio_lock(new_thp);
    std::memcpy(new_thp->data(), mem->pfn_to_page(migrate_pfn_to_pfn(src[0]))->data(), kPmdSize);
    dst[0] = migrate_pfn(new_thp->pfn()) | MIGRATE_PFN_COMPOUND;
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    ASSERT_TRUE(src[0] & MIGRATE_PFN_MIGRATE);
  }
  std::unique_ptr<AddressSpace> child;
  on_other_thread([&] {
    expect_leaf(*as, va, SoftLeafType::kMigrationWrite);
    child = fork_on_other_thread(*as);
    ASSERT_NE(child, nullptr);
    expect_leaf(*as, va + 7 * kPageSize, SoftLeafType::kMigrationRead);
    expect_leaf(*child, va + 7 * kPageSize, SoftLeafType::kMigrationRead);
  });
  ASSERT_NE(child, nullptr);
  migrate_vma_finalize(&m);
  for (AddressSpace* mm : {as.get(), child.get()}) {
    PageState st = query_page(*mm, va + 3 * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kThpPmd);
    EXPECT_EQ(st.pfn, new_thp->pfn() + 3);
    EXPECT_FALSE(st.writable);
    EXPECT_FALSE(st.anon_exclusive);
    EXPECT_EQ(st.mapcount, 2);
    EXPECT_EQ(st.refcount, 2);
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  EXPECT_EQ(verify_pages(*child, va, kPmdSize, 1), 0);
  fill_pages(*child, va + 5 * kPageSize, kPageSize, 2);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  EXPECT_EQ(verify_pages(*child, va + 5 * kPageSize, kPageSize, 2), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// A device-private PMD (a THP migrated to the device whole) is shared read-only by fork like
// a device-private PTE: one reference and one entire mapcount for each process.
TEST_F(ForkDeviceTest, Fork_DevicePrivatePmd_SharedReadOnly) {
  TestDevice dev(mem.get(), 2 * kPagesPerPmd);
  ASSERT_TRUE(dev.ok());
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, va, kPmdSize, 1);
  Result<uint64_t> moved = dev.migrate_to_device(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND);
  ASSERT_TRUE(moved.ok());
  ASSERT_EQ(*moved, kPagesPerPmd);
  PageState before = query_page(*as, va);
  ASSERT_EQ(before.leaf, SoftLeafType::kDevicePrivateWrite);
  ASSERT_TRUE(before.large);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  for (AddressSpace* mm : {as.get(), child->get()}) {
    PageState st = query_page(*mm, va + 9 * kPageSize);
    EXPECT_EQ(st.leaf, SoftLeafType::kDevicePrivateRead);
    EXPECT_EQ(st.pfn, before.pfn + 9);  // page 9 of the one device folio both share
    EXPECT_EQ(st.refcount, 2);
    EXPECT_EQ(st.mapcount, 2);
    EXPECT_FALSE(st.anon_exclusive);
  }
  EXPECT_MM_CHECK_OK(*mem);
  // A CPU access of either process brings the data back for both.
  EXPECT_EQ(verify_pages(**child, va, kPmdSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  EXPECT_FALSE(dev.pgmap()->contains(query_page(*as, va).pfn));
  EXPECT_MM_CHECK_OK(*mem);
  fill_pages(*as, va, kPageSize, 2);  // COW: the child keeps its bytes
  EXPECT_EQ(verify_pages(**child, va, kPmdSize, 1), 0);
  child->reset();
  as->exit();
  EXPECT_EQ(dev.free_pages(), 2 * kPagesPerPmd);
}

// Seed notes §8 item 10: eviction (migrate_device_range, no mmap lock) installs migration
// entries; a fork between collection and finalize copies them; both processes end up with
// the evicted data in system memory, shared read-only.
TEST_F(ForkDeviceTest, Fork_DuringMigrateDeviceRange_EntriesCopiedDataIntact) {
  TestDevice dev(mem.get(), 8);
  ASSERT_TRUE(dev.ok());
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  Result<uint64_t> to_dev = dev.migrate_to_device(*as, va, va + 4 * kPageSize);
  ASSERT_TRUE(to_dev.ok());
  ASSERT_EQ(*to_dev, 4u);

  const uint64_t n = dev.pgmap()->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  ASSERT_EQ(migrate_device_range(mem.get(), src.data(), dev.pgmap()->first_pfn(), n), 0);
  std::unique_ptr<AddressSpace> child;
  on_other_thread([&] {  // this thread holds the device folio locks now
    for (uint64_t p = 0; p < 4; p++) expect_leaf(*as, va + p * kPageSize, SoftLeafType::kMigrationWrite);
    child = fork_on_other_thread(*as);
    ASSERT_NE(child, nullptr);
    for (uint64_t p = 0; p < 4; p++) {
      expect_leaf(*as, va + p * kPageSize, SoftLeafType::kMigrationRead);
      expect_leaf(*child, va + p * kPageSize, SoftLeafType::kMigrationRead);
    }
  });
  ASSERT_NE(child, nullptr);
  uint64_t collected = 0;
  for (uint64_t i = 0; i < n; i++) {
    if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
    collected++;
    dst[i] = new_copy_of(src[i]);  // device storage -> system page
  }
  EXPECT_EQ(collected, 4u);
  migrate_device_pages(mem.get(), src.data(), dst.data(), n);
  migrate_device_finalize(mem.get(), src.data(), dst.data(), n);
  for (uint64_t p = 0; p < 4; p++) {
    const Va a = va + p * kPageSize;
    expect_cow_shared(*as, *child, a, query_page(*as, a).pfn);
    EXPECT_FALSE(dev.pgmap()->contains(query_page(*as, a).pfn));
  }
  EXPECT_EQ(dev.free_pages(), 8u) << "every device page came back";
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*child, va, 4 * kPageSize, 1), 0);
  fill_pages(*child, va, 4 * kPageSize, 2);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
  child.reset();
  as->exit();
}

// Device-private entries are shared read-only after fork (already the rule); the CPU fault of
// either side brings the page back for both.
TEST_F(ForkDeviceTest, Fork_DevicePrivateEntry_SharedReadOnly) {
  TestDevice dev(mem.get(), 8);
  ASSERT_TRUE(dev.ok());
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  ASSERT_EQ(*dev.migrate_to_device(*as, va, va + 2 * kPageSize), 2u);
  expect_leaf(*as, va, SoftLeafType::kDevicePrivateWrite);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  for (AddressSpace* mm : {as.get(), child->get()}) {
    PageState st = query_page(*mm, va);
    EXPECT_EQ(st.leaf, SoftLeafType::kDevicePrivateRead);
    EXPECT_EQ(st.refcount, 2);
    EXPECT_EQ(st.page_mapcount, 2);
    EXPECT_FALSE(st.anon_exclusive);
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(**child, va, 2 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 1), 0);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  as->exit();
  EXPECT_EQ(dev.free_pages(), 8u);
}

}  // namespace
}  // namespace gpusvm::mm::testing
