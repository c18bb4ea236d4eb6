// Device-exclusive entries (seed 004; docs/device-exclusive.md): make_device_exclusive, the
// CPU fault that gives the page back, and what mprotect, zap, mremap, fork, hmm_range_fault
// and migrate_vma do with the entry. Every test checks data and accounting, not only return
// codes, and ends with mm::check (MmTest::TearDown).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/migrate_internal.h"
#include "tests/base/test_util.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

// Two devices: only their addresses matter (the owner tags of the invalidations).
char kDeviceA;
char kDeviceB;
const void* const kOwnerA = &kDeviceA;
const void* const kOwnerB = &kDeviceB;

// A mirror that records every invalidation with its owner.
class RecordingMirror : public MmuIntervalNotifierOps {
 public:
  struct Event {
    MmuNotifyEvent event;
    const void* owner;
    Va start, end;
  };
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& range, uint64_t cur_seq) override {
    {
      std::lock_guard<std::mutex> g(lock_);
      n->set_seq(cur_seq);
      events_.push_back({range.event, range.owner, range.start, range.end});
    }
    on_event(range);
    return true;
  }
  std::vector<Event> take() {
    std::lock_guard<std::mutex> g(lock_);
    return std::exchange(events_, {});
  }
  int count(MmuNotifyEvent e, const void* owner) {
    std::lock_guard<std::mutex> g(lock_);
    int n = 0;
    for (const Event& ev : events_) n += ev.event == e && ev.owner == owner;
    return n;
  }
  // Called after recording, without the mirror lock (tests hook races here).
  std::function<void(const MmuNotifierRange&)> on_event = [](const MmuNotifierRange&) {};

 private:
  std::mutex lock_;
  std::vector<Event> events_;
};

class DeviceExclusiveTest : public MmTest {
 protected:
  // make_device_exclusive with the mmap lock taken here; the page is unlocked and put again
  // (the driver has "programmed its device") unless `keep` is set, then the caller must.
  Result<Folio*> make_exclusive(AddressSpace& mm, Va va, const void* owner, bool keep = false) {
    Result<Folio*> r = [&] {
      ReadLock g(&mm.mmap_lock());
      return make_device_exclusive(mm, va, owner);
    }();
    if (r && !keep) release(*r);
    return r;
  }
  static void release(Folio* page) {
    folio_unlock(page->head());
    page->head()->put();
  }
  // The PTE at va, read without its lock (tests look at a quiescent point).
  static Pte raw_pte(AddressSpace& mm, Va va) {
    PmdSlot slot = mm.page_table().pmd_lookup(va);
    if (!slot || !slot.load_lockless().is_table()) return Pte::none();
    return slot.load_lockless().table()->load_lockless(pte_index(va));
  }
  // A device-exclusive page handed back to the CPU by try_to_migrate / a split, as Linux's
  // remove_migration_pte maps it: present, read-only, old (the entry was not young), clean
  // (the dirty bit went to the folio when the entry was made), soft-dirty kept.
  static void expect_given_back(AddressSpace& mm, Va va) {
    const Pte pte = raw_pte(mm, va);
    EXPECT_TRUE(pte.present()) << std::hex << va;
    EXPECT_FALSE(pte.write());
    EXPECT_FALSE(pte.young()) << "given back young";
    EXPECT_FALSE(pte.dirty());
    EXPECT_TRUE(pte.soft_dirty()) << "soft-dirty lost";
  }
  void expect_exclusive(AddressSpace& mm, Va va, Pfn pfn, int refcount = 1) {
    PageState st = query_page(mm, va);
    EXPECT_EQ(st.kind, PageKind::kSoftLeaf) << std::hex << va;
    EXPECT_EQ(st.leaf, SoftLeafType::kDeviceExclusive) << std::hex << va;
    EXPECT_EQ(st.pfn, pfn);
    EXPECT_EQ(st.page_mapcount, 1) << "the entry keeps the page's mapcount";
    EXPECT_EQ(st.refcount, refcount) << "the entry keeps the mapping's reference";
  }
};

// Rule 8: the entry replaces the PTE; mapcount, rmap and refcount stay; the folio takes the
// PTE's dirty bit; the caller gets the page locked with one reference; the invalidation is
// EXCLUSIVE, tagged with the caller, over the one page.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_MapcountRefcountRmapUnchanged) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 4 * kPageSize, &mirror), 0);
  const PageState before = query_page(*as, va + kPageSize);
  ASSERT_EQ(before.kind, PageKind::kSmall);
  ASSERT_TRUE(before.dirty && before.writable);
  ASSERT_EQ(before.refcount, 1);
  const uint64_t made = as->stats().exclusive_made.get();

  Result<Folio*> page = make_exclusive(*as, va + kPageSize, kOwnerA, /*keep=*/true);
  ASSERT_TRUE(page.ok()) << page.error();
  // While the caller holds the folio lock it may not take the mmap lock (query_page would):
  // look at the descriptor directly.
  EXPECT_EQ((*page)->pfn(), before.pfn);
  EXPECT_TRUE(folio_test_locked((*page)->head()));
  EXPECT_EQ((*page)->refcount(), 2);  // the mapping's + the caller's
  EXPECT_EQ((*page)->page_mapcount(), 1);
  EXPECT_TRUE((*page)->test(kFolioDirty));
  std::vector<RmapItem> rmap = folio_rmap_snapshot(*page);
  ASSERT_EQ(rmap.size(), 1u);
  EXPECT_EQ(rmap[0].mm, as.get());
  EXPECT_EQ(rmap[0].va, va + kPageSize);
  release(*page);
  expect_exclusive(*as, va + kPageSize, before.pfn, 1);
  EXPECT_EQ(as->stats().exclusive_made.get(), made + 1);

  std::vector<RecordingMirror::Event> ev = mirror.take();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].event, MmuNotifyEvent::kExclusive);
  EXPECT_EQ(ev[0].owner, kOwnerA);
  EXPECT_EQ(ev[0].start, va + kPageSize);
  EXPECT_EQ(ev[0].end, va + 2 * kPageSize);
  // Neighbours untouched.
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + 2 * kPageSize).kind, PageKind::kSmall);
  EXPECT_MM_CHECK_OK(*mem);  // counts the entry as a mapping
}

// Rule 4: a CPU access gives the page back: CLEAR invalidation without owner, present PTE,
// writable (VM_WRITE + anon-exclusive), dirty (folio dirty), data intact; the next write
// needs no fault.
TEST_F(DeviceExclusiveTest, CpuFault_DeviceExclusive_RestoresWritable) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 7);
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPageSize, &mirror), 0);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  (void)mirror.take();
  const uint64_t restored = as->stats().exclusive_restored.get();
  const uint64_t faults = as->stats().faults.get();

  EXPECT_EQ(verify_pages(*as, va, kPageSize, 7), 0);  // the read faults the page back
  EXPECT_EQ(as->stats().faults.get(), faults + 1);
  EXPECT_EQ(as->stats().exclusive_restored.get(), restored + 1);
  PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_EQ(st.pfn, (*page)->pfn());  // same page: nothing was copied
  EXPECT_TRUE(st.writable);
  EXPECT_TRUE(st.dirty);
  EXPECT_TRUE(st.anon_exclusive);
  EXPECT_EQ(st.refcount, 1);
  EXPECT_EQ(st.page_mapcount, 1);
  std::vector<RecordingMirror::Event> ev = mirror.take();
  ASSERT_EQ(ev.size(), 1u);
  EXPECT_EQ(ev[0].event, MmuNotifyEvent::kClear);
  EXPECT_EQ(ev[0].owner, nullptr);
  EXPECT_EQ(ev[0].start, va);
  // Writable already: a store takes no fault.
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 8)), 0);
  EXPECT_EQ(as->stats().faults.get(), faults + 1);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 8), 0);
}

// A store (not a load) on the entry: restored, then the store lands on the same page.
TEST_F(DeviceExclusiveTest, CpuFault_DeviceExclusive_StoreRestoresAndWrites) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  Result<uint64_t> old = cpu::atomic_fetch_add(*as, va, 1);
  ASSERT_TRUE(old.ok());
  EXPECT_EQ(*old, pattern(va, 1));
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), pattern(va, 1) + 1);
  EXPECT_EQ(query_page(*as, va).pfn, (*page)->pfn());
}

// Rule 4 + 5: mprotect(PROT_READ) leaves the entry alone; the CPU fault then restores a
// read-only PTE (no VM_WRITE); PROT_WRITE again makes the exclusive page writable.
TEST_F(DeviceExclusiveTest, CpuFault_DeviceExclusive_AfterMprotectRead_RestoresReadOnly) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 3);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(as->mprotect(va, kPageSize, PROT_READ), 0);
  expect_exclusive(*as, va, (*page)->pfn());
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 3), 0);
  PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_FALSE(st.writable);
  EXPECT_FALSE(st.dirty) << "dirty only with write (restore_exclusive_pte)";
  EXPECT_TRUE(st.folio_dirty) << "the folio keeps the dirtiness";
  EXPECT_EQ(cpu::store<uint64_t>(*as, va, 1), -EFAULT);
  ASSERT_EQ(as->mprotect(va, kPageSize, PROT_READ | PROT_WRITE), 0);
  EXPECT_TRUE(query_page(*as, va).writable);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, pattern(va, 4)), 0);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 4), 0);
}

// Rule 4: dirty iff the folio is dirty. MADV_FREE cleans PTE and folio; the entry made from
// the clean PTE leaves the folio clean, and the restored PTE is clean (and writable).
TEST_F(DeviceExclusiveTest, CpuFault_DeviceExclusive_FolioDirty_RestoresDirty) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 5);
  ASSERT_EQ(as->madvise(va + kPageSize, kPageSize, MADV_FREE), 0);
  ASSERT_FALSE(query_page(*as, va + kPageSize).dirty);
  ASSERT_FALSE(query_page(*as, va + kPageSize).folio_dirty);
  // Page 0: dirty PTE -> dirty folio -> dirty restored PTE.
  ASSERT_TRUE(make_exclusive(*as, va, kOwnerA).ok());
  EXPECT_TRUE(query_page(*as, va).folio_dirty);
  // Page 1: clean PTE -> clean folio -> clean restored PTE.
  ASSERT_TRUE(make_exclusive(*as, va + kPageSize, kOwnerA).ok());
  EXPECT_FALSE(query_page(*as, va + kPageSize).folio_dirty);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 5), 0);
  PageState d = query_page(*as, va), c = query_page(*as, va + kPageSize);
  EXPECT_TRUE(d.writable && d.dirty);
  EXPECT_TRUE(c.writable);
  EXPECT_FALSE(c.dirty);
}

// Rule 5: one entry type; mprotect in either direction leaves it as it is.
TEST_F(DeviceExclusiveTest, Mprotect_DeviceExclusiveEntry_Unchanged) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 2);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPageSize, &mirror), 0);
  for (int prot : {PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE}) {
    ASSERT_EQ(as->mprotect(va, 2 * kPageSize, prot), 0);
    expect_exclusive(*as, va, (*page)->pfn());
    EXPECT_MM_CHECK_OK(*mem);
  }
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kProtectionVma, nullptr), 3);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 2), 0);
}

// Rule 7: zapping the entry drops its rmap item, mapcount and reference like a present PTE.
TEST_F(DeviceExclusiveTest, Zap_DeviceExclusive_DropsRmapAndRef) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  Result<Folio*> p0 = make_exclusive(*as, va, kOwnerA, /*keep=*/true);
  ASSERT_TRUE(p0.ok());
  Folio* page = *p0;
  folio_unlock(page);  // keep our reference: the page must outlive the zap
  ASSERT_TRUE(make_exclusive(*as, va + kPageSize, kOwnerA).ok());
  const uint64_t free_before = mem->free_pages();
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  EXPECT_EQ(page->refcount(), 1) << "only our reference is left";
  EXPECT_EQ(page->page_mapcount(), 0);
  EXPECT_TRUE(folio_rmap_snapshot(page).empty());
  EXPECT_EQ(mem->free_pages(), free_before);
  page->put();
  EXPECT_EQ(mem->free_pages(), free_before + 1);
  // munmap of the other entry frees its page at once.
  ASSERT_EQ(as->munmap(va + kPageSize, kPageSize), 0);
  EXPECT_EQ(mem->free_pages(), free_before + 2);
  EXPECT_EQ(verify_pages(*as, va + 2 * kPageSize, 2 * kPageSize, 1), 0);
}

// mremap moves the entry with its rmap item; the CPU fault at the new address restores it.
TEST_F(DeviceExclusiveTest, Mremap_DeviceExclusive_MovesEntry) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 9);
  Result<Folio*> page = make_exclusive(*as, va + 2 * kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  Result<Va> to = as->mremap(va, 4 * kPageSize, 4 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED,
                             0x500000000);
  ASSERT_TRUE(to.ok());
  expect_exclusive(*as, *to + 2 * kPageSize, (*page)->pfn());
  std::vector<RmapItem> rmap = folio_rmap_snapshot(*page);
  ASSERT_EQ(rmap.size(), 1u);
  EXPECT_EQ(rmap[0].va, *to + 2 * kPageSize);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, *to, 4 * kPageSize, 9, va), 0);
  EXPECT_EQ(query_page(*as, *to + 2 * kPageSize).kind, PageKind::kSmall);
}

// Rule 9: fork gives the page back to the parent first, then shares it copy-on-write; the
// device learns of it through fork's PROTECTION_PAGE invalidation.
TEST_F(DeviceExclusiveTest, Fork_DeviceExclusive_RestoredThenCowShared) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPageSize, &mirror), 0);
  const uint64_t restored = as->stats().exclusive_restored.get();
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  EXPECT_EQ(as->stats().exclusive_restored.get(), restored + 1);
  EXPECT_GE(mirror.count(MmuNotifyEvent::kProtectionPage, nullptr), 1);
  for (AddressSpace* mm : {as.get(), child->get()}) {
    PageState st = query_page(*mm, va);
    EXPECT_EQ(st.kind, PageKind::kSmall);
    EXPECT_EQ(st.pfn, (*page)->pfn());
    EXPECT_FALSE(st.writable) << "COW: both sides write-protected";
    EXPECT_FALSE(st.anon_exclusive);
    EXPECT_EQ(st.refcount, 2);
    EXPECT_EQ(st.page_mapcount, 2);
  }
  // Rule 4 (patch 5): restore_exclusive_pte maps the page old, soft-dirty kept; no CPU access
  // touched the parent's PTE since (fork only write-protects it).
  EXPECT_FALSE(raw_pte(*as, va).young()) << "restored young";
  EXPECT_TRUE(raw_pte(*as, va).soft_dirty());
  EXPECT_MM_CHECK_OK(*mem);
  // Both see the data; a write by the parent copies, the child keeps the old bytes.
  EXPECT_EQ(verify_pages(**child, va, 2 * kPageSize, 1), 0);
  fill_pages(*as, va, kPageSize, 2);
  EXPECT_NE(query_page(*as, va).pfn, (*page)->pfn());
  EXPECT_EQ(verify_pages(**child, va, kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 2), 0);
  // The device may take the child's page now (it is the only mapping left: reused first).
  ASSERT_TRUE(make_exclusive(**child, va, kOwnerA).ok());
  expect_exclusive(**child, va, (*page)->pfn());
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
}

// Rule 9, busy folio: fork meets the entry while the device still holds the folio locked;
// it drops its locks, waits for the unlock and copies then.
TEST_F(DeviceExclusiveTest, Fork_DeviceExclusive_BusyFolio_WaitsAndRetries) {
  Va va = map_anon(*as, 3 * kPageSize);
  fill_pages(*as, va, 3 * kPageSize, 1);
  Result<Folio*> page = make_exclusive(*as, va + kPageSize, kOwnerA, /*keep=*/true);
  ASSERT_TRUE(page.ok());
  std::atomic<bool> forked{false};
  std::unique_ptr<AddressSpace> child;
  std::thread t([&] {
    Result<std::unique_ptr<AddressSpace>> c = as->fork();
    if (c) child = std::move(*c);
    forked = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(forked.load()) << "fork must wait for the device to unlock the page";
  release(*page);
  t.join();
  ASSERT_NE(child, nullptr);
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*child, va + kPageSize).pfn, (*page)->pfn());
  EXPECT_EQ(verify_pages(*child, va, 3 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, 3 * kPageSize, 1), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// The same retry path, driven by fault injection at the trylock.
TEST_F(DeviceExclusiveTest, Fork_DeviceExclusive_InjectedTrylockFailure_Retries) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  ASSERT_TRUE(make_exclusive(*as, va, kOwnerA).ok());
  ASSERT_TRUE(make_exclusive(*as, va + kPageSize, kOwnerA).ok());
  fault_inject::ScopedArm arm("mm.fork.exclusive_trylock", {.nth = 1, .times = 3});
  ASSERT_EQ(arm.status(), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(fault_inject::failures("mm.fork.exclusive_trylock"), 3u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(verify_pages(**child, va, 2 * kPageSize, 1), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// An allocation failure while fork copies: the child goes away, the parent keeps working
// (its entries may have been restored already, which only costs the device a re-fault).
TEST_F(DeviceExclusiveTest, Fork_DeviceExclusive_AllocFailure_ParentIntact) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  Va far = map_anon(*as, kPageSize);  // another PMD region: another child table
  fill_pages(*as, far, kPageSize, 1);
  ASSERT_TRUE(make_exclusive(*as, va, kOwnerA).ok());
  for (uint64_t nth = 1; nth <= 4; nth++) {
    fault_inject::ScopedArm arm("mm.alloc_pgtable", {.nth = nth});
    Result<std::unique_ptr<AddressSpace>> child = as->fork();
    if (!child.ok()) {
      EXPECT_EQ(child.error(), -ENOMEM);
    }
    EXPECT_MM_CHECK_OK(*mem);
  }
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, far, kPageSize, 1), 0);
}

// Rule 10: a second device's request faults the first device's entry back (the first device
// sees the CLEAR), then converts the page for the second one.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_SecondDevice_RevokesFirst) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 6);
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPageSize, &mirror), 0);
  Result<Folio*> a = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(a.ok());
  Result<Folio*> b = make_exclusive(*as, va, kOwnerB);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*a, *b) << "the same page: nothing was copied";
  expect_exclusive(*as, va, (*b)->pfn());
  std::vector<RecordingMirror::Event> ev = mirror.take();
  ASSERT_EQ(ev.size(), 3u);
  EXPECT_EQ(ev[0].event, MmuNotifyEvent::kExclusive);
  EXPECT_EQ(ev[0].owner, kOwnerA);
  EXPECT_EQ(ev[1].event, MmuNotifyEvent::kClear);  // A loses the page
  EXPECT_EQ(ev[1].owner, nullptr);
  EXPECT_EQ(ev[2].event, MmuNotifyEvent::kExclusive);
  EXPECT_EQ(ev[2].owner, kOwnerB);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 6), 0);
}

// Rule 11: migrate_vma never collects a device-exclusive entry (src = 0), and it stays.
TEST_F(DeviceExclusiveTest, MigrateVmaSetup_DeviceExclusivePage_NotCollected) {
  TestDevice dev(mem.get(), 16);
  ASSERT_TRUE(dev.ok());
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 4);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  Result<uint64_t> moved = dev.migrate_to_device(*as, va, va + 2 * kPageSize);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 1u) << "only the present page moves";
  expect_exclusive(*as, va, (*page)->pfn());
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 4), 0);
  as->exit();  // device pages go before the device
  EXPECT_EQ(dev.free_pages(), 16u);
}

// hmm_range_fault sees the entry as not present: a snapshot reports 0, a fault request
// gives the page back to the CPU (CLEAR) and reports it VALID|WRITE.
TEST_F(DeviceExclusiveTest, HmmRangeFault_DeviceExclusive_SnapshotZeroFaultRestores) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  TestMirror tm;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPageSize, &tm), 0);
  std::vector<uint64_t> pfns;
  ASSERT_EQ(mirror_range(*as, n, va, va + 2 * kPageSize, 0, pfns), 0);
  EXPECT_EQ(pfns[0] & (HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_ERROR), 0u);
  EXPECT_TRUE(pfns[1] & HMM_PFN_VALID);
  expect_exclusive(*as, va, (*page)->pfn());
  ASSERT_EQ(mirror_range(*as, n, va, va + 2 * kPageSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  EXPECT_EQ(pfns[0] & ~HMM_PFN_FLAGS, (*page)->pfn());
  EXPECT_TRUE((pfns[0] & HMM_PFN_VALID) && (pfns[0] & HMM_PFN_WRITE));
  EXPECT_TRUE(tm.saw(MmuNotifyEvent::kClear));
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 1), 0);
}

// Rule 3: a PMD-mapped THP has its PMD split; the folio stays large, only the one page is
// exclusive, every page keeps its data and mapcount.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_ThpPmd_SplitsPmdFolioStaysLarge) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, kPmdSize, 3);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  const Pfn head_pfn = query_page(*as, va).pfn;
  Result<Folio*> page = make_exclusive(*as, va + 5 * kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  EXPECT_EQ((*page)->pfn(), head_pfn + 5);
  EXPECT_TRUE((*page)->head()->large());
  PageState st = query_page(*as, va + 5 * kPageSize);
  EXPECT_EQ(st.leaf, SoftLeafType::kDeviceExclusive);
  EXPECT_TRUE(st.large);
  EXPECT_EQ(st.page_mapcount, 1);
  EXPECT_EQ(st.refcount, static_cast<int>(kPagesPerPmd));
  EXPECT_EQ(query_page(*as, va + 4 * kPageSize).kind, PageKind::kThpPte);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 1u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 3), 0);
  PageState back = query_page(*as, va + 5 * kPageSize);
  EXPECT_EQ(back.kind, PageKind::kThpPte);
  EXPECT_TRUE(back.writable);
}

// Several pages of one THP exclusive at once, then a fork: each is restored and shared.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_ThpManyPages_ForkAndCpuAccess) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, va, kPmdSize, 1);
  for (uint64_t p = 0; p < kPagesPerPmd; p += 37) {
    ASSERT_TRUE(make_exclusive(*as, va + p * kPageSize, kOwnerA).ok());
  }
  EXPECT_MM_CHECK_OK(*mem);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(**child, va, kPmdSize, 1), 0);
  fill_pages(*as, va, kPmdSize, 2);
  EXPECT_EQ(verify_pages(**child, va, kPmdSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 2), 0);
}

// MADV_FREE over part of a PTE-mapped THP splits the folio when only this process maps it,
// also when a device holds one of its pages exclusively: the split takes that page from the
// device (CLEAR) and maps it back present, read-only, as Linux's try_to_migrate would.
TEST_F(DeviceExclusiveTest, MadviseFree_ThpWithDeviceExclusivePte_SplitGivesPageBack) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, va, kPmdSize, 1);
  Result<Folio*> page = make_exclusive(*as, va + 100 * kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  ASSERT_EQ(as->madvise(va, 4 * kPageSize, MADV_FREE), 0);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  const PageState st = query_page(*as, va + 100 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_EQ(st.pfn, (*page)->pfn());
  EXPECT_FALSE(st.writable);
  expect_given_back(*as, va + 100 * kPageSize);
  EXPECT_FALSE(query_page(*as, va + 200 * kPageSize).large);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va + 4 * kPageSize, kPmdSize - 4 * kPageSize, 1, va + 4 * kPageSize), 0);
}

// Seed 004 patch 11 (rule 7): try_to_migrate turns a device-exclusive entry into a migration
// entry like a present PTE's, but never a writable one (read-exclusive for an anon-exclusive
// page), without young or dirty, soft-dirty kept; the device loses the page (CLEAR). The rmap
// walk reaches such an entry only through try_to_migrate (a folio split through the reverse
// map, eviction), never through migrate_vma's collect (rule 11), so the test calls it directly.
// remove_migration_ptes then maps the page read-only, old and soft-dirty; a write reuses it.
TEST_F(DeviceExclusiveTest, TryToMigrate_DeviceExclusive_ConvertsAndRestores) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPageSize, &mirror), 0);
  Result<Folio*> page = make_exclusive(*as, va + kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  Folio* folio = (*page)->head();
  // 1. try_to_migrate with the migration's reference and the folio lock, as migrate_unmap.
  folio->get();
  folio_lock(folio);
  const int clears = mirror.count(MmuNotifyEvent::kClear, nullptr);
  EXPECT_TRUE(try_to_migrate(folio)) << "the device-exclusive mapping was not unmapped";
  EXPECT_FALSE(folio->mapped());
  const Pte mig = raw_pte(*as, va + kPageSize);
  EXPECT_EQ(mig.soft_leaf_type(), SoftLeafType::kMigrationReadExclusive);
  EXPECT_FALSE(mig.swp_young());
  EXPECT_FALSE(mig.swp_dirty());
  EXPECT_TRUE(mig.soft_dirty());
  EXPECT_GT(mirror.count(MmuNotifyEvent::kClear, nullptr), clears);
  // 2. Restore onto the same folio (a migration that failed, or a split's remap).
  remove_migration_ptes(folio, folio);
  folio_unlock(folio);
  folio->put();
  expect_given_back(*as, va + kPageSize);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 1), 0);
  // 3. Still anon-exclusive: a write reuses the page in place.
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPageSize, 7), 0);
  EXPECT_EQ(query_page(*as, va + kPageSize).pfn, folio->pfn());
  n.remove();
}

// Seed 004 rule 7 (TryToMigrate_DeviceExclusive_ConvertsAndRestores / SplitThp_With-
// ExclusivePtes_DataIntact): migrating other pages of a PTE-mapped THP splits the folio, and
// the split must take the device-exclusive page like try_to_migrate does: a read migration
// entry, then a present PTE, the device told by CLEAR.
TEST_F(DeviceExclusiveTest, MigrateVma_ThpWithDeviceExclusivePage_SplitConvertsEntry) {
  TestDevice dev(mem.get(), 64);
  ASSERT_TRUE(dev.ok());
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, va, kPmdSize, 1);
  Result<Folio*> page = make_exclusive(*as, va + 100 * kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  RecordingMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPmdSize, &mirror), 0);
  Result<uint64_t> moved = dev.migrate_to_device(*as, va, va + 4 * kPageSize);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 4u);
  PageState st = query_page(*as, va + 100 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kSmall) << "the split gave the page back to the CPU";
  EXPECT_EQ(st.pfn, (*page)->pfn());
  expect_given_back(*as, va + 100 * kPageSize);
  EXPECT_GE(mirror.count(MmuNotifyEvent::kClear, nullptr), 1);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  as->exit();
}

// FOLL_SPLIT_PMD on the huge zero folio: the PMD splits into zero PTEs and the write fault
// allocates one small page.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_HugeZeroPmd_SplitsThenSmallPage) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va).ok());
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);
  Result<Folio*> page = make_exclusive(*as, va + 3 * kPageSize, kOwnerA);
  ASSERT_TRUE(page.ok());
  EXPECT_FALSE((*page)->head()->large());
  EXPECT_EQ(query_page(*as, va + 3 * kPageSize).leaf, SoftLeafType::kDeviceExclusive);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kZeroPage);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 3 * kPageSize), 0u);
}

// Rule 2: a none PTE is faulted in writable first (GUP FOLL_WRITE).
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_Hole_FaultsInZeroedPage) {
  Va va = map_anon(*as, kPageSize);
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  expect_exclusive(*as, va, (*page)->pfn());
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u);
  // The zero page is replaced the same way.
  Va z = map_anon(*as, kPageSize);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, z).ok());
  ASSERT_EQ(query_page(*as, z).kind, PageKind::kZeroPage);
  Result<Folio*> zp = make_exclusive(*as, z, kOwnerA);
  ASSERT_TRUE(zp.ok());
  expect_exclusive(*as, z, (*zp)->pfn());
}

// Rule 2: a COW-shared page (after fork) is copied before it becomes exclusive; the other
// process keeps the original.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_CowSharedPage_CopiedFirst) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  const Pfn shared = query_page(*as, va).pfn;
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok());
  EXPECT_NE((*page)->pfn(), shared);
  expect_exclusive(*as, va, (*page)->pfn());
  EXPECT_EQ(query_page(**child, va).pfn, shared);
  EXPECT_EQ(verify_pages(**child, va, kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
}

// Rule 2: a private file page is COWed into an anonymous page first.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_PrivateFilePage_CowsThenExclusive) {
  Result<std::shared_ptr<ShmemObject>> obj = ShmemObject::create(mem.get(), kPageSize);
  ASSERT_TRUE(obj.ok());
  Result<Va> shared = as->mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, *obj);
  ASSERT_TRUE(shared.ok());
  fill_pages(*as, *shared, kPageSize, 5);
  Result<Va> priv = as->mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, *obj);
  ASSERT_TRUE(priv.ok());
  ASSERT_EQ(verify_pages(*as, *priv, kPageSize, 5, *shared), 0);  // maps the cache page
  const Pfn cache_pfn = query_page(*as, *priv).pfn;
  Result<Folio*> page = make_exclusive(*as, *priv, kOwnerA);
  ASSERT_TRUE(page.ok()) << page.error();
  EXPECT_NE((*page)->pfn(), cache_pfn);
  EXPECT_TRUE((*page)->head()->test(kFolioAnon));
  expect_exclusive(*as, *priv, (*page)->pfn());
  EXPECT_EQ(query_page(*as, *shared).pfn, cache_pfn);
  EXPECT_EQ(verify_pages(*as, *priv, kPageSize, 5, *shared), 0);
  EXPECT_EQ(verify_pages(*as, *shared, kPageSize, 5), 0);
}

// Rule 1: shared memory (shmem, MAP_SHARED) is refused, with nothing held afterwards.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_SharedMapping_Eopnotsupp) {
  Result<Va> va = as->mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(va.ok());
  fill_pages(*as, *va, kPageSize, 1);
  const PageState before = query_page(*as, *va);
  Result<Folio*> r = make_exclusive(*as, *va, kOwnerA);
  EXPECT_EQ(r.error(), -EOPNOTSUPP);
  const PageState after = query_page(*as, *va);
  EXPECT_EQ(after.kind, PageKind::kSmall);
  EXPECT_EQ(after.refcount, before.refcount);
  EXPECT_EQ(verify_pages(*as, *va, kPageSize, 1), 0);
}

// Rule 2: GUP's errors. A read-only VMA fails (FOLL_WRITE without FOLL_FORCE), as do holes
// in the address space and PROT_NONE; bad arguments are -EINVAL.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_ReadOnlyVma_Fails) {
  Va ro = map_anon(*as, kPageSize, PROT_READ);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, ro).ok());
  EXPECT_EQ(make_exclusive(*as, ro, kOwnerA).error(), -EFAULT);
  EXPECT_EQ(query_page(*as, ro).kind, PageKind::kZeroPage);
  Va none = map_anon(*as, kPageSize, PROT_NONE);
  EXPECT_EQ(make_exclusive(*as, none, kOwnerA).error(), -EFAULT);
  EXPECT_EQ(make_exclusive(*as, 0x10000, kOwnerA).error(), -EFAULT);  // no VMA
  Va rw = map_anon(*as, kPageSize);
  EXPECT_EQ(make_exclusive(*as, kTaskSize, kOwnerA).error(), -EINVAL);
  EXPECT_EQ(query_page(*as, rw).kind, PageKind::kNone) << "bad arguments change nothing";
}

// A null owner is allowed (test_hmm passes NULL): the EXCLUSIVE invalidation carries no owner,
// so every mirror, the caller's too, drops the page.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_NullOwner_EveryMirrorInvalidates) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 3);
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, kPageSize, &mirror), 0);
  const Pfn pfn = query_page(*as, va).pfn;
  ASSERT_TRUE(make_exclusive(*as, va, nullptr).ok());
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kExclusive));
  expect_exclusive(*as, va, pfn);
  notifier.remove();
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 3), 0);  // the CPU gets it back
  EXPECT_MM_CHECK_OK(*mem);
}

// An allocation failure in the fault: -ENOMEM, nothing held, nothing changed.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_AllocFailure_Enomem) {
  Va va = map_anon(*as, kPageSize);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 1});
    EXPECT_EQ(make_exclusive(*as, va, kOwnerA).error(), -ENOMEM);
  }
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  ASSERT_TRUE(make_exclusive(*as, va, kOwnerA).ok());
}

// Rule 2, patch 17: the page changes between the fault and the PTE lock - here the EXCLUSIVE
// invalidation callback itself runs MADV_DONTNEED on it from another thread:
//   1. make_device_exclusive faults the page in, locks it, starts the invalidation;
//   2. the callback zaps the page (the caller's reference keeps it alive);
//   3. the re-check under the PTE lock finds none: unlock, put, retry (not -EBUSY);
//   4. the retry faults in a new zeroed page and converts it.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_RaceWithPteChange_RetriesSucceeds) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  const Pfn old_pfn = query_page(*as, va).pfn;
  RecordingMirror mirror;
  std::atomic<int> zaps{0};
  mirror.on_event = [&](const MmuNotifierRange& r) {
    if (r.event != MmuNotifyEvent::kExclusive || zaps.fetch_add(1) != 0) return;
    std::thread t([&] { EXPECT_EQ(as->madvise(va, kPageSize, MADV_DONTNEED), 0); });
    t.join();
  };
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPageSize, &mirror), 0);
  const uint64_t retries = as->stats().exclusive_retries.get();
  Result<Folio*> page = make_exclusive(*as, va, kOwnerA);
  ASSERT_TRUE(page.ok()) << page.error();
  EXPECT_EQ(as->stats().exclusive_retries.get(), retries + 1);
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kExclusive, kOwnerA), 2);
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kClear, nullptr), 1);  // the zap
  expect_exclusive(*as, va, (*page)->pfn());
  (void)old_pfn;  // the old frame was freed and may be reused
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u) << "DONTNEED won: the page reads as zero";
}

// The retry path again, forced by fault injection at the re-check.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_InjectedRecheckFailure_Retries) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  const uint64_t retries = as->stats().exclusive_retries.get();
  {
    fault_inject::ScopedArm arm("mm.device_exclusive.recheck", {.nth = 1, .times = 2});
    ASSERT_TRUE(make_exclusive(*as, va, kOwnerA).ok());
  }
  EXPECT_EQ(as->stats().exclusive_retries.get(), retries + 2);
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDeviceExclusive);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
}

// A re-check that never succeeds ends with -EBUSY after hang_timeout(), nothing held.
TEST_F(DeviceExclusiveTest, MakeDeviceExclusive_EndlessRace_EbusyBounded) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 1);
  const auto saved = hang_timeout();
  set_hang_timeout(std::chrono::milliseconds(100));
  {
    fault_inject::ScopedArm arm("mm.device_exclusive.recheck", {.nth = 1, .times = 0});
    EXPECT_EQ(make_exclusive(*as, va, kOwnerA).error(), -EBUSY);
  }
  set_hang_timeout(saved);
  PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_EQ(st.refcount, 1);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
}

// CPU threads hammer pages with atomics and stores while a device thread keeps taking them
// exclusive and updating them itself under exclusivity. Every page's shared counter must
// equal the sum of all increments (a lost update means the CPU and the device both had the
// page), every thread's private word its last value. Seeded; TSan checks the hand-offs.
TEST_F(DeviceExclusiveTest, Concurrency_CpuAtomicsVsMakeDeviceExclusive_NoLostUpdates) {
  const char* env = std::getenv("GPUSVM_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 0) : 0x5eed0004;
  std::printf("seed %#lx (GPUSVM_TEST_SEED)\n", static_cast<unsigned long>(seed));
  constexpr uint64_t kPages = 8;
  constexpr int kCpuThreads = 3;
  constexpr int kCpuOps = 4000;
  Va va = map_anon(*as, kPages * kPageSize);
  ASSERT_NE(va, 0u);
  for (uint64_t p = 0; p < kPages; p++) ASSERT_EQ(cpu::store<uint64_t>(*as, va + p * kPageSize, 0), 0);
  constexpr int kDeviceOps = 3000;
  std::atomic<bool> go{false};
  std::atomic<int> cpu_done{0};
  std::atomic<uint64_t> device_incs[kPages] = {};
  std::vector<std::thread> threads;
  std::vector<std::vector<uint64_t>> cpu_incs(kCpuThreads, std::vector<uint64_t>(kPages, 0));
  for (int t = 0; t < kCpuThreads; t++) {
    threads.emplace_back([&, t] {
      if (!testing_util::wait_until([&] { return go.load(); })) {
        ADD_FAILURE() << "CPU thread " << t << ": never started";
        return;
      }
      std::mt19937_64 rng(seed + t);
      for (int i = 0; i < kCpuOps; i++) {
        const uint64_t p = rng() % kPages;
        const Va page = va + p * kPageSize;
        if (!cpu::atomic_fetch_add(*as, page, 1).ok()) ADD_FAILURE() << "atomic at page " << p;
        cpu_incs[t][p]++;
        // The thread's own word: stores and loads must always see its last value.
        const Va mine = page + 8 * (t + 1);
        if (cpu::store<uint64_t>(*as, mine, pattern(mine, i)) != 0) ADD_FAILURE();
        Result<uint64_t> back = cpu::load<uint64_t>(*as, mine);
        if (!back || *back != pattern(mine, i)) ADD_FAILURE() << "stale word at page " << p;
      }
      cpu_done++;
    });
  }
  threads.emplace_back([&] {
    if (!testing_util::wait_until([&] { return go.load(); })) {
      ADD_FAILURE() << "device thread: never started";
      return;
    }
    std::mt19937_64 rng(seed ^ 0xdead);
    // A fixed number of rounds (so the run is bounded), and at least until the CPU is done.
    for (int i = 0; i < kDeviceOps || (cpu_done.load() < kCpuThreads && i < 50 * kDeviceOps); i++) {
      const uint64_t p = rng() % kPages;
      Result<Folio*> page = make_exclusive(*as, va + p * kPageSize, kOwnerA, /*keep=*/true);
      if (!page) {
        ADD_FAILURE() << "make_device_exclusive: " << page.error();
        break;
      }
      // The device's atomic: a plain read-modify-write, safe only because it is exclusive.
      auto* word = reinterpret_cast<uint64_t*>((*page)->data());
      *word = *word + 1;
      device_incs[p]++;
      release(*page);
    }
  });
  go = true;
  for (std::thread& t : threads) t.join();
  uint64_t device_total = 0;
  for (uint64_t p = 0; p < kPages; p++) device_total += device_incs[p].load();
  std::printf("device updates %lu, restores %lu\n", static_cast<unsigned long>(device_total),
              static_cast<unsigned long>(as->stats().exclusive_restored.get()));
  EXPECT_GT(device_total, 0u) << "the device never got a page: the test proves nothing";
  for (uint64_t p = 0; p < kPages; p++) {
    uint64_t want = device_incs[p].load();
    for (int t = 0; t < kCpuThreads; t++) want += cpu_incs[t][p];
    EXPECT_EQ(*cpu::load<uint64_t>(*as, va + p * kPageSize), want) << "page " << p;
    for (int t = 0; t < kCpuThreads; t++) {
      const Va mine = va + p * kPageSize + 8 * (t + 1);
      Result<uint64_t> v = cpu::load<uint64_t>(*as, mine);
      ASSERT_TRUE(v.ok());
      if (cpu_incs[t][p] == 0) {
        EXPECT_EQ(*v, 0u);
      }
    }
  }
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::mm::testing
