// Device-coherent memory (MEMORY_DEVICE_COHERENT): CPU-addressable device frames mapped by
// present PTEs. Migration in and out with SELECT_DEVICE_COHERENT, direct CPU access without
// faults, hmm reporting them to every mirror, fork/COW copying straight from device memory,
// eviction by pfn, FOLL_LONGTERM pins moving them out, and the system-memory-only paths
// (MADV_FREE, MADV_COLLAPSE) leaving them alone.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/hmm.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

constexpr uint64_t kDevicePages = 1024;

class DeviceCoherentTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), kDevicePages, DevMemoryType::kDeviceCoherent);
    ASSERT_TRUE(dev->ok());
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), kDevicePages) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }
  bool on_device(Va va) { return dev->pgmap()->contains(query_page(*as, va).pfn); }

  std::unique_ptr<TestDevice> dev;
};

TEST_F(DeviceCoherentTest, MigratedPagesArePresentAndAccessedInPlace) {
  constexpr uint64_t kPages = 32;
  Va va = map_anon(*as, kPages * kPageSize);
  fill_pages(*as, va, 24 * kPageSize, 1);                            // pages 0..23 written
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va + 24 * kPageSize).ok());  // page 24: zero page
  const uint64_t free_before = mem->free_pages();
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPages * kPageSize), kPages);
  EXPECT_EQ(mem->free_pages(), free_before + 24);
  for (uint64_t p = 0; p < kPages; p++) {
    const PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << p;  // a present PTE, not a device-private entry
    EXPECT_TRUE(st.writable) << p;
    EXPECT_TRUE(dev->pgmap()->contains(st.pfn)) << p;
    EXPECT_TRUE(folio_is_device_coherent(mem->folio_of(st.pfn))) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  // The device memory holds the bytes and the CPU uses it in place: no fault, no migration.
  const Va p3 = va + 3 * kPageSize;
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(dev->pgmap()->page_data(query_page(*as, p3).pfn)), pattern(p3, 1));
  EXPECT_EQ(verify_pages(*as, va, 24 * kPageSize, 1), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 30 * kPageSize, 77), 0);
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(dev->pgmap()->page_data(query_page(*as, va + 30 * kPageSize).pfn)),
            77u);
  EXPECT_EQ(dev->cpu_faults.load(), 0);
  EXPECT_TRUE(on_device(va + 30 * kPageSize));
  // Explicitly back to system memory (a coherent page never faults back).
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + kPages * kPageSize), kPages);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  for (uint64_t p = 0; p < kPages; p++) EXPECT_FALSE(on_device(va + p * kPageSize)) << p;
  EXPECT_EQ(verify_pages(*as, va, 24 * kPageSize, 1), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 30 * kPageSize), 77u);
  EXPECT_MM_CHECK_OK(*mem);
}

// SELECT_SYSTEM and SELECT_DEVICE_PRIVATE never take coherent pages; SELECT_DEVICE_COHERENT
// takes only its owner's.
TEST_F(DeviceCoherentTest, SelectFlagsAndOwnerDecideWhatIsCollected) {
  Va va = map_anon(*as, 16 * kPageSize);
  fill_pages(*as, va, 16 * kPageSize, 2);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  TestDevice other(mem.get(), 64, DevMemoryType::kDeviceCoherent);
  ASSERT_TRUE(other.ok());
  // Only the 8 system pages move to the other device.
  ASSERT_EQ(*other.migrate_to_device(*as, va, va + 16 * kPageSize), 8u);
  EXPECT_TRUE(on_device(va));
  EXPECT_TRUE(other.pgmap()->contains(query_page(*as, va + 8 * kPageSize).pfn));
  // A device-private device of the same test does not see them either.
  TestDevice priv(mem.get(), 64);
  ASSERT_TRUE(priv.ok());
  EXPECT_EQ(*priv.migrate_to_system(*as, va, va + 16 * kPageSize), 0u);
  // Each owner takes back its own pages.
  ASSERT_EQ(*other.migrate_to_system(*as, va, va + 16 * kPageSize), 8u);
  EXPECT_TRUE(on_device(va));
  ASSERT_EQ(*dev->migrate_to_system(*as, va, va + 16 * kPageSize), 8u);
  EXPECT_EQ(verify_pages(*as, va, 16 * kPageSize, 2), 0);
  EXPECT_EQ(other.free_pages(), 64u);
  EXPECT_EQ(priv.free_pages(), 64u);
  EXPECT_MM_CHECK_OK(*mem);
}

// hmm_range_fault reports a coherent page VALID to every mirror, whatever its owner, without
// faulting it anywhere.
TEST_F(DeviceCoherentTest, HmmReportsCoherentPagesToEveryMirror) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 3);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  ASSERT_EQ(notifier.insert(as.get(), va, 8 * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns;
  int foreign_owner = 0;
  for (const void* owner : {static_cast<const void*>(nullptr), static_cast<const void*>(&foreign_owner),
                            static_cast<const void*>(dev.get())}) {
    ASSERT_EQ(mirror_range(*as, notifier, va, va + 8 * kPageSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE,
                           pfns, owner), 0);
    for (uint64_t p = 0; p < 8; p++) {
      EXPECT_EQ(pfns[p] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID | HMM_PFN_WRITE) << p;
      EXPECT_EQ(hmm_pfn_to_pfn(pfns[p]), query_page(*as, va + p * kPageSize).pfn) << p;
      EXPECT_TRUE(dev->pgmap()->contains(hmm_pfn_to_pfn(pfns[p]))) << p;
    }
  }
  EXPECT_EQ(as->stats().hmm_faults.get(), 0u);
  EXPECT_EQ(dev->cpu_faults.load(), 0);
  notifier.remove();
  EXPECT_MM_CHECK_OK(*mem);
}

// fork shares a coherent page read-only; a write in either process copies it straight from
// device memory into a new system page; the other keeps the device page.
TEST_F(DeviceCoherentTest, ForkSharesAndCowCopiesFromDeviceMemory) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 4);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 4 * kPageSize), 4u);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  for (uint64_t p = 0; p < 4; p++) {
    const PageState mine = query_page(*as, va + p * kPageSize);
    const PageState theirs = query_page(**child, va + p * kPageSize);
    EXPECT_EQ(mine.pfn, theirs.pfn) << p;
    EXPECT_FALSE(mine.writable) << p;
    EXPECT_FALSE(theirs.writable) << p;
    EXPECT_EQ(mine.mapcount, 2) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  const Pfn dev_pfn = query_page(*as, va).pfn;
  ASSERT_EQ(cpu::store<uint64_t>(**child, va + 8, 5), 0);  // COW in the child
  const PageState copied = query_page(**child, va);
  EXPECT_FALSE(dev->pgmap()->contains(copied.pfn));
  EXPECT_TRUE(copied.writable);
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va), pattern(va, 4));  // copied from the device
  EXPECT_EQ(*cpu::load<uint64_t>(**child, va + 8), 5u);
  EXPECT_EQ(query_page(*as, va).pfn, dev_pfn);  // the parent still maps device memory
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 8), 0u);  // not the child's store
  EXPECT_EQ(verify_pages(**child, va + kPageSize, 3 * kPageSize, 4), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 4), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// Eviction by device pfn (the driver loses its memory) moves a page mapped by two processes
// to one system page mapped by both.
TEST_F(DeviceCoherentTest, EvictionRemapsEveryProcess) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 6);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 8 * kPageSize), 8u);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ(*dev->evict_all(), 8u);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  for (uint64_t p = 0; p < 8; p++) {
    const PageState mine = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(mine.kind, PageKind::kSmall) << p;
    EXPECT_FALSE(dev->pgmap()->contains(mine.pfn)) << p;
    EXPECT_EQ(mine.pfn, query_page(**child, va + p * kPageSize).pfn) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 8 * kPageSize, 6), 0);
  EXPECT_EQ(verify_pages(**child, va, 8 * kPageSize, 6), 0);
  child->reset();
}

// get/pin without FOLL_LONGTERM return the device page itself; a FOLL_LONGTERM pin first
// moves the page to system memory (migrate_device_coherent_folio) and pins that.
TEST_F(DeviceCoherentTest, LongtermPinMovesThePageToSystemMemory) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 7);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 4 * kPageSize), 4u);
  Folio* pages[2] = {};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(get_user_pages(*as, va, 1, FOLL_WRITE, pages), 1);
    ASSERT_EQ(pin_user_pages(*as, va + kPageSize, 1, FOLL_WRITE, pages + 1), 1);
  }
  EXPECT_TRUE(dev->pgmap()->contains(pages[0]->pfn()));
  EXPECT_TRUE(dev->pgmap()->contains(pages[1]->pfn()));
  put_page(pages[0]);
  unpin_user_page(pages[1]);
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(pin_user_pages(*as, va + 2 * kPageSize, 2, FOLL_WRITE | FOLL_LONGTERM, pages), 2);
  }
  for (int i = 0; i < 2; i++) {
    EXPECT_FALSE(dev->pgmap()->contains(pages[i]->pfn())) << i;
    EXPECT_EQ(pages[i]->head()->pincount(), 1) << i;
    EXPECT_EQ(query_page(*as, va + (2 + i) * kPageSize).pfn, pages[i]->pfn()) << i;
  }
  EXPECT_EQ(dev->free_pages(), kDevicePages - 2);
  EXPECT_MM_CHECK_OK(*mem);  // the pins are accounted for
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 7), 0);
  unpin_user_pages(pages, 2);
  EXPECT_MM_CHECK_OK(*mem);
}

// migrate_device_coherent_folio's refusals: a pinned page stays (-EBUSY), anything but a
// coherent page is -EINVAL; the caller's reference is consumed every time.
TEST_F(DeviceCoherentTest, MigrateDeviceCoherentFolioRefusals) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 8);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + kPageSize), 1u);
  Folio* pinned = nullptr;
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(pin_user_pages(*as, va, 1, FOLL_WRITE, &pinned), 1);
  }
  Folio* folio = pinned->head();
  folio->get();
  EXPECT_EQ(migrate_device_coherent_folio(folio), -EBUSY);
  EXPECT_TRUE(on_device(va));
  EXPECT_EQ(folio->refcount(), 2);  // the mapping and the pin: ours was consumed
  // A longterm pin of that page fails at once, as in Linux: it cannot be moved out.
  Folio* longterm = nullptr;
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(pin_user_pages(*as, va, 1, FOLL_WRITE | FOLL_LONGTERM, &longterm), -EBUSY);
  }
  EXPECT_TRUE(on_device(va));
  EXPECT_EQ(folio->refcount(), 2);
  unpin_user_page(pinned);
  Folio* sys = mem->folio_of(query_page(*as, va + kPageSize).pfn);
  sys->get();
  EXPECT_EQ(migrate_device_coherent_folio(sys), -EINVAL);
  EXPECT_EQ(sys->refcount(), 1);
  EXPECT_EQ(migrate_device_coherent_folio(nullptr), -EINVAL);
  // Not pinned any more: it moves.
  folio->get();
  EXPECT_EQ(migrate_device_coherent_folio(folio), 0);
  EXPECT_FALSE(on_device(va));
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 8), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// MADV_FREE and MADV_COLLAPSE are for system memory: device pages keep their data and their
// mapping; a device-exclusive entry on a coherent page is restored by the CPU as usual.
TEST_F(DeviceCoherentTest, SystemMemoryOnlyPathsLeaveDevicePagesAlone) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/false);
  ASSERT_NE(va, 0u);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_NOHUGEPAGE), 0);
  fill_pages(*as, va, kPmdSize, 9);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 4 * kPageSize), 4u);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_HUGEPAGE), 0);
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), -EINVAL);
  EXPECT_TRUE(on_device(va));
  ASSERT_EQ(as->madvise(va, 4 * kPageSize, MADV_FREE), 0);
  EXPECT_TRUE(on_device(va));
  EXPECT_FALSE(mem->folio_of(query_page(*as, va).pfn)->test(kFolioLazyfree));
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 9), 0);
  {
    ReadLock g(&as->mmap_lock());
    int owner = 0;
    Result<Folio*> page = make_device_exclusive(*as, va + kPageSize, &owner);
    ASSERT_TRUE(page.ok()) << page.error();
    EXPECT_TRUE(dev->pgmap()->contains((*page)->pfn()));
    folio_unlock((*page)->head());
    (*page)->head()->put();
  }
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kSoftLeaf);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPageSize, 1), 0);  // restores the present PTE
  EXPECT_TRUE(on_device(va + kPageSize));
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPageSize), 1u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(DeviceCoherentTest, CoherentMemoryNeedsStorage) {
  TestDevice ops(mem.get(), 1);
  EXPECT_EQ(DevPagemap::create(mem.get(), 16, this, &ops, /*storage=*/false, DevMemoryType::kDeviceCoherent)
                .error(),
            -EINVAL);
  EXPECT_EQ(dev->pgmap()->type(), DevMemoryType::kDeviceCoherent);
}

// A THP moves whole into a 2 MiB coherent folio mapped by a present PMD, which the CPU uses in
// place, fork shares, a COW write splits and copies from, a partial munmap splits, and a
// longterm pin moves back whole.
TEST_F(DeviceCoherentTest, CoherentThpIsMappedByAPresentPmd) {
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(va, 0u);
  ASSERT_TRUE(pmd_aligned(va));
  fill_pages(*as, va, 2 * kPmdSize, 10);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 2 * kPmdSize, MIGRATE_VMA_SELECT_COMPOUND), 2 * kPagesPerPmd);
  for (Va h : {va, va + kPmdSize}) {
    const PageState st = query_page(*as, h);
    EXPECT_EQ(st.kind, PageKind::kThpPmd);
    ASSERT_TRUE(dev->pgmap()->contains(st.pfn));
    EXPECT_EQ(mem->folio_of(st.pfn)->order(), kPmdOrder);
  }
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPmdSize, 10), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 0);
  // MADV_FREE leaves the device folio as it is.
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_FREE), 0);
  EXPECT_FALSE(mem->folio_of(query_page(*as, va).pfn)->test(kFolioLazyfree));
  // fork shares it; the child's write splits the child's PMD and copies one page from device
  // memory; the parent keeps its PMD mapping.
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ(cpu::store<uint64_t>(**child, va + 5 * kPageSize + 8, 3), 0);
  EXPECT_FALSE(dev->pgmap()->contains(query_page(**child, va + 5 * kPageSize).pfn));
  EXPECT_TRUE(dev->pgmap()->contains(query_page(**child, va + 6 * kPageSize).pfn));
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(**child, va, 2 * kPmdSize, 10), 0);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  // A partial munmap of the second folio splits its PMD; the rest stays on the device.
  ASSERT_EQ(as->munmap(va + kPmdSize, kPmdSize / 2), 0);
  EXPECT_EQ(query_page(*as, va + kPmdSize + kPmdSize / 2).kind, PageKind::kThpPte);
  EXPECT_TRUE(on_device(va + kPmdSize + kPmdSize / 2));
  EXPECT_EQ(verify_pages(*as, va + kPmdSize + kPmdSize / 2, kPmdSize / 2, 10), 0);
  EXPECT_MM_CHECK_OK(*mem);
  // A longterm pin of one page moves the whole first folio back into a THP.
  Folio* page = nullptr;
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(pin_user_pages(*as, va + 7 * kPageSize, 1, FOLL_WRITE | FOLL_LONGTERM, &page), 1);
  }
  EXPECT_FALSE(dev->pgmap()->contains(page->pfn()));
  EXPECT_EQ(page->head()->order(), kPmdOrder);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_MM_CHECK_OK(*mem);
  unpin_user_page(page);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 10), 0);
  // The rest goes back with SELECT_DEVICE_COHERENT.
  ASSERT_EQ(*dev->migrate_to_system(*as, va + kPmdSize + kPmdSize / 2, va + 2 * kPmdSize), kPmdSize / 2 / kPageSize);
  EXPECT_EQ(dev->free_pages(), kDevicePages);
  EXPECT_EQ(verify_pages(*as, va + kPmdSize + kPmdSize / 2, kPmdSize / 2, 10), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// Concurrency: a migrator moving a range to coherent memory and back (whole THPs and single
// pages), CPU threads storing into the same pages, a thread forking and reading through the
// child, a longterm pinner and a thread unmapping and re-mapping part of the range. Every
// word a CPU stored holds its value at the end. Seeded (GPUSVM_SEED replays the choices).
TEST_F(DeviceCoherentTest, MigrationRacesCpuForkPinsAndMunmap) {
#if defined(GPUSVM_TSAN)
  constexpr int kRounds = 12;
  constexpr int kStores = 600;
#else
  constexpr int kRounds = 60;
  constexpr int kStores = 4000;
#endif
  const char* env = std::getenv("GPUSVM_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 0) : std::random_device{}();
  std::printf("seed=%llu (GPUSVM_SEED to replay)\n", static_cast<unsigned long long>(seed));
  constexpr uint64_t kStable = kPagesPerPmd;  // one THP-able 2 MiB, never unmapped
  constexpr uint64_t kChurn = 16;             // unmapped and mapped again
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(va, 0u);
  const Va churn = va + kPmdSize;
  ASSERT_EQ(as->munmap(churn + kChurn * kPageSize, kPmdSize - kChurn * kPageSize), 0);
  auto value = [](Va a) { return (1ULL << 63) | a; };
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::atomic<bool> written[2][kStable] = {};
  uint64_t moved = 0;  // migrator thread only

  std::thread migrator([&] {
    std::mt19937_64 rng(seed);
    // At least kRounds, and on until something moved: a folio that a child maps by PMD cannot
    // be split for a partial migration, and a short burst of rounds may all meet that.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (int r = 0; r < kRounds || (moved == 0 && std::chrono::steady_clock::now() < deadline); r++) {
      const bool whole = rng() % 2;
      const Va s = whole ? va : va + (rng() % kStable) * kPageSize;
      const Va e = whole ? va + kPmdSize : std::min(va + kPmdSize, s + (1 + rng() % 64) * kPageSize);
      Result<uint64_t> n = dev->migrate_to_device(*as, s, e, whole ? MIGRATE_VMA_SELECT_COMPOUND : 0u);
      if (!n) bad++;
      moved += n.ok() ? *n : 0;
      (void)dev->migrate_to_device(*as, churn, churn + kChurn * kPageSize);  // -EINVAL while unmapped
      if (rng() % 3 == 0) (void)dev->migrate_to_system(*as, va, va + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND);
    }
    stop = true;
  });
  std::vector<std::thread> cpus;
  for (int t = 0; t < 2; t++) {
    cpus.emplace_back([&, t] {
      std::mt19937_64 rng(seed + 1 + t);
      for (int i = 0; i < kStores; i++) {
        const uint64_t p = rng() % kStable;
        const Va a = va + p * kPageSize + 8 * t;  // each thread its own word of every page
        if (cpu::store<uint64_t>(*as, a, value(a)) != 0) bad++;
        written[t][p] = true;
        const Va other = va + (rng() % kStable) * kPageSize + 8 * (1 - t);
        Result<uint64_t> v = cpu::load<uint64_t>(*as, other);
        if (!v || (*v != 0 && *v != value(other))) bad++;
      }
    });
  }
  std::thread forker([&] {
    std::mt19937_64 rng(seed + 7);
    while (!stop) {
      Result<std::unique_ptr<AddressSpace>> child = as->fork();
      if (!child) {
        bad++;
        return;
      }
      for (int i = 0; i < 32; i++) {
        const Va a = va + (rng() % kStable) * kPageSize;
        Result<uint64_t> v = cpu::load<uint64_t>(**child, a);
        if (!v || (*v != 0 && *v != value(a))) bad++;
      }
      child->reset();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::thread pinner([&] {
    std::mt19937_64 rng(seed + 9);
    while (!stop) {
      const Va a = va + (rng() % kStable) * kPageSize;
      Folio* page = nullptr;
      long n;
      {
        ReadLock g(&as->mmap_lock());
        n = pin_user_pages(*as, a, 1, FOLL_LONGTERM, &page);
      }
      if (n == -EBUSY) continue;  // a COW copy or a fork held the coherent page just then
      if (n != 1) {
        bad++;
        continue;
      }
      if (folio_is_zone_device(page->head())) bad++;  // a longterm pin never holds device memory
      unpin_user_page(page);
      // A pinned page cannot move (nor can its THP be split): leave the migrator room.
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::thread churner([&] {
    do {  // at least once, so that the region is filled at the end
      if (as->munmap(churn, kChurn * kPageSize) != 0) bad++;
      Result<Va> m = as->mmap(churn, kChurn * kPageSize, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED);
      if (!m) bad++;
      for (Va a = churn; a < churn + kChurn * kPageSize; a += kPageSize) {
        if (int rc = cpu::store<uint64_t>(*as, a, pattern(a, 12))) {
          std::printf("churn store at %#llx: %d\n", static_cast<unsigned long long>(a), rc);
          bad++;
        }
      }
    } while (!stop);
  });
  migrator.join();
  for (auto& th : cpus) th.join();
  forker.join();
  pinner.join();
  churner.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(moved, 0u);
  for (int t = 0; t < 2; t++) {
    for (uint64_t p = 0; p < kStable; p++) {
      if (!written[t][p]) continue;
      const Va a = va + p * kPageSize + 8 * t;
      EXPECT_EQ(*cpu::load<uint64_t>(*as, a), value(a)) << "page " << p << " word " << t;
    }
  }
  EXPECT_EQ(verify_pages(*as, churn, kChurn * kPageSize, 12), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::mm::testing
