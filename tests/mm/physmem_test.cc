// PhysMem, folios, the folio lock, entry encodings, page tables and the VMA tree.
#include <cstring>
#include <thread>

#include "gpusvm/mm/page_table.h"
#include "gpusvm/mm/pte.h"
#include "gpusvm/mm/vma.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

TEST(PhysMemTest, CreateValidatesSize) {
  EXPECT_EQ(PhysMem::create({.ram_bytes = 0}).error(), -EINVAL);
  EXPECT_EQ(PhysMem::create({.ram_bytes = kPmdSize + kPageSize}).error(), -EINVAL);
  auto mem = make_mem(8 * kPmdSize);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->free_pages(), 8 * kPagesPerPmd);
  EXPECT_TRUE(mem->zero_page()->test(kFolioZero));
  EXPECT_EQ(mem->huge_zero_folio()->order(), kPmdOrder);
  for (size_t i = 0; i < kPageSize; i++) ASSERT_EQ(mem->zero_page()->data()[i], std::byte{0});
}

TEST(PhysMemTest, AllocFreeSplitAndCoalesce) {
  auto mem = make_mem(4 * kPmdSize);
  const uint64_t all = mem->free_pages();
  Folio* small = mem->folio_alloc(0);
  ASSERT_NE(small, nullptr);
  EXPECT_EQ(small->refcount(), 1);
  EXPECT_EQ(small->order(), 0u);
  EXPECT_EQ(mem->free_pages(), all - 1);
  std::vector<Folio*> thps;
  while (Folio* f = mem->folio_alloc(kPmdOrder)) thps.push_back(f);
  EXPECT_EQ(thps.size(), 3u);  // one block is split for the small folio
  for (Folio* f : thps) {
    EXPECT_TRUE(pmd_aligned(f->pfn() << kPageShift));
    EXPECT_EQ(f->page(7)->head(), f);
    EXPECT_EQ(mem->folio_of(f->pfn() + 100), f);
  }
  // The data is real memory: writes stay.
  std::memset(thps[0]->data(5), 0x5a, kPageSize);
  EXPECT_EQ(thps[0]->data(5)[17], std::byte{0x5a});
  for (Folio* f : thps) f->put();
  small->put();
  EXPECT_EQ(mem->free_pages(), all);
  // The split block coalesced again: four THPs fit.
  for (int i = 0; i < 4; i++) {
    Folio* f = mem->folio_alloc(kPmdOrder);
    ASSERT_NE(f, nullptr) << i;
    thps.push_back(f);
  }
  for (size_t i = 3; i < thps.size(); i++) thps[i]->put();
  EXPECT_MM_CHECK_OK(*mem);
}

TEST(PhysMemTest, AllocationFailsWhenExhaustedOrInjected) {
  auto mem = make_mem(kPmdSize);
  std::vector<Folio*> v;
  while (Folio* f = mem->folio_alloc(0)) v.push_back(f);
  EXPECT_EQ(v.size(), kPagesPerPmd);
  EXPECT_EQ(mem->folio_alloc(kPmdOrder), nullptr);
  for (Folio* f : v) f->put();
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 2});
    Folio* a = mem->folio_alloc(0);
    EXPECT_NE(a, nullptr);
    EXPECT_EQ(mem->folio_alloc(0), nullptr);
    Folio* c = mem->folio_alloc(0);
    EXPECT_NE(c, nullptr);
    a->put();
    c->put();
  }
  EXPECT_EQ(mem->free_pages(), kPagesPerPmd);
}

TEST(PhysMemTest, FolioLockSleepsAndWakes) {
  auto mem = make_mem(kPmdSize);
  Folio* f = mem->folio_alloc(0);
  folio_lock(f);
  EXPECT_TRUE(folio_test_locked(f));
  folio_assert_locked(f);
  std::atomic<bool> got{false};
  std::thread t([&] {
    EXPECT_FALSE(folio_trylock(f));
    folio_lock(f);  // sleeps until the unlock below
    got = true;
    folio_unlock(f);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(got.load());
  folio_unlock(f);
  t.join();
  EXPECT_TRUE(got.load());
  EXPECT_TRUE(folio_wait_unlocked(f, std::chrono::milliseconds(10)));
  ASSERT_TRUE(folio_trylock(f));
  EXPECT_FALSE(folio_wait_unlocked(f, std::chrono::milliseconds(10)));  // bounded
  folio_unlock(f);
  f->put();
}

TEST(PhysMemDeathTest, RefcountBugsPanic) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  auto mem = make_mem(kPmdSize);
  Folio* f = mem->folio_alloc(0);
  f->put();
  EXPECT_DEATH(f->get(), "refcount");
  EXPECT_DEATH(f->put(), "underflow");
}

TEST(PteTest, EncodingsRoundTrip) {
  const Pte p = Pte::make_present(0x12345, true).mkdirty().mkyoung();
  EXPECT_TRUE(p.present());
  EXPECT_TRUE(p.write() && p.dirty() && p.young() && p.soft_dirty());
  EXPECT_EQ(p.pfn(), 0x12345u);
  EXPECT_FALSE(p.wrprotect().write());
  EXPECT_FALSE(p.mkclean().dirty());
  EXPECT_EQ(p.with_pfn(7).pfn(), 7u);
  const Pte z = Pte::make_zero(3);
  EXPECT_TRUE(z.present() && z.special() && !z.write());
  const SoftLeafType types[] = {SoftLeafType::kMigrationRead, SoftLeafType::kMigrationReadExclusive,
                                SoftLeafType::kMigrationWrite, SoftLeafType::kDevicePrivateRead,
                                SoftLeafType::kDevicePrivateWrite, SoftLeafType::kDeviceExclusive};
  for (SoftLeafType t : types) {
    for (bool huge : {false, true}) {
      Pte s = Pte::make_soft_leaf(t, (1ULL << 39) + 5, huge).swp_mkyoung().swp_mkdirty();
      EXPECT_FALSE(s.present());
      EXPECT_TRUE(s.is_soft_leaf());
      EXPECT_EQ(s.soft_leaf_type(), t);
      EXPECT_EQ(s.pfn(), (1ULL << 39) + 5);
      EXPECT_EQ(s.huge(), huge);
      EXPECT_TRUE(s.swp_young() && s.swp_dirty());
      EXPECT_FALSE(s.write());
      EXPECT_EQ(s.is_migration(), t <= SoftLeafType::kMigrationWrite);
      EXPECT_EQ(s.is_device_private(),
                t == SoftLeafType::kDevicePrivateRead || t == SoftLeafType::kDevicePrivateWrite);
      EXPECT_EQ(s.is_device_exclusive(), t == SoftLeafType::kDeviceExclusive);
      EXPECT_EQ(s.soft_leaf_write(),
                t == SoftLeafType::kMigrationWrite || t == SoftLeafType::kDevicePrivateWrite);
      const Pmd m = Pmd::make_leaf(s);
      EXPECT_TRUE(m.is_leaf());
      EXPECT_TRUE(m.is_huge_soft_leaf());
      EXPECT_EQ(m.leaf().soft_leaf_type(), t);
    }
  }
  EXPECT_TRUE(Pte::none().is_none());
  EXPECT_FALSE(Pte::none().is_soft_leaf());
  auto* table = new PteTable();
  const Pmd tp = Pmd::make_table(table);
  EXPECT_TRUE(tp.is_table());
  EXPECT_FALSE(tp.is_leaf());
  EXPECT_EQ(tp.table(), table);
  const Pmd huge = Pmd::make_leaf(Pte::make_present(512, false, true));
  EXPECT_TRUE(huge.is_huge_present());
  EXPECT_FALSE(huge.is_table());
  delete table;
}

TEST(PageTableTest, AllocLookupAndLocking) {
  PageTable pt;
  EXPECT_FALSE(pt.pmd_lookup(0x7f0000000000));
  Result<PmdSlot> s = pt.pmd_alloc(0x7f0000201000);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->index, pmd_index(0x7f0000201000));
  EXPECT_EQ(pt.pmd_lookup(0x7f0000201000).table, s->table);
  EXPECT_EQ(pt.pte_offset_map_lock(*s), nullptr);  // none PMD: nothing to lock
  ASSERT_EQ(pt.pte_alloc(*s), 0);
  PteTable* t = pt.pte_offset_map_lock(*s);
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(t->ptl.held_by_me());
  t->set(1, Pte::make_zero(0));
  EXPECT_EQ(t->get(1), Pte::make_zero(0));
  PageTable::pte_unmap_unlock(t);
  EXPECT_EQ(t->load_lockless(1), Pte::make_zero(0));
  {
    SpinLockGuard g(&t->ptl);
    t->set(1, Pte::none());
  }
  fault_inject::ScopedArm arm("mm.alloc_pgtable", {.nth = 1, .times = 0});
  EXPECT_EQ(pt.pmd_alloc(0x100000000).error(), -ENOMEM);
  EXPECT_EQ(pt.pte_alloc(*pt.pmd_alloc(0x7f0000401000)), -ENOMEM);
}

TEST(PageTableDeathTest, SettingAnEntryWithoutItsLockPanics) {
  ::testing::FLAGS_gtest_death_test_style = "threadsafe";
  PageTable pt;
  Result<PmdSlot> s = pt.pmd_alloc(0x10000000);
  ASSERT_EQ(pt.pte_alloc(*s), 0);
  PteTable* t = s->load_lockless().table();
  EXPECT_DEATH(t->set(0, Pte::make_zero(0)), "pte_lock.*not held");
  EXPECT_DEATH(s->table->set(s->index, Pmd()), "pmd_lock.*not held");
}

TEST(VmaTreeTest, LookupSplitMergeAndGaps) {
  VmaTree t;
  auto mk = [](Va s, Va e, uint32_t f) {
    auto v = std::make_unique<Vma>();
    v->start = s;
    v->end = e;
    v->flags = f;
    return v;
  };
  Vma* a = t.insert(mk(0x10000, 0x20000, VM_READ));
  Vma* b = t.insert(mk(0x30000, 0x40000, VM_READ));
  EXPECT_EQ(t.lookup(0x10000), a);
  EXPECT_EQ(t.lookup(0x1ffff), a);
  EXPECT_EQ(t.lookup(0x20000), nullptr);
  EXPECT_EQ(t.find(0x20000), b);
  EXPECT_EQ(t.find(0x40000), nullptr);
  Vma* upper = t.split(a, 0x18000);
  EXPECT_EQ(a->end, 0x18000u);
  EXPECT_EQ(upper->start, 0x18000u);
  EXPECT_EQ(t.size(), 3u);
  t.try_merge(upper);  // identical flags, adjacent: merges back
  EXPECT_EQ(t.size(), 2u);
  EXPECT_EQ(t.lookup(0x10000)->end, 0x20000u);
  EXPECT_EQ(t.find_gap_topdown(0x10000, 0x10000, 0x50000, kPageSize), 0x40000u);
  EXPECT_EQ(t.find_gap_topdown(0x10000, 0x10000, 0x40000, kPageSize), 0x20000u);
  EXPECT_EQ(t.find_gap_topdown(0x20000, 0x10000, 0x40000, kPageSize), 0u);
}

}  // namespace
}  // namespace gpusvm::mm::testing
