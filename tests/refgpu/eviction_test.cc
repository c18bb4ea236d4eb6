// VRAM eviction: oversubscription (3x VRAM) with every byte surviving, the LRU order (with the
// devmem_fn bump), an allocation in flight never evicted, eviction racing migrations and CPU
// faults from several threads (TSan, no deadlock: every wait is bounded), a bounded failure
// when everything is busy, and an injected failure at every point of a migration that has to
// evict, rolling back cleanly.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "drivers/refgpu/vram_pagemap.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "tests/refgpu/vram_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

class EvictionTest : public VramTest {
 protected:
  uint64_t vram_bytes() const override { return 8ULL << 20; }  // four 2 MiB blocks
  VramPagemap::Config vram_config() const override {
    VramPagemap::Config c;
    c.evict_budget = std::chrono::milliseconds(2000);
    return c;
  }
  mm::Va range_va(int i) const { return kBase + static_cast<uint64_t>(i) * 2 * k2M; }
  void map_ranges(int n) {
    for (int i = 0; i < n; i++) {
      map_at(range_va(i), k2M, /*huge=*/true);
      fill_bytes(*as, range_va(i), k2M, 10 + i);
    }
  }
  svm::ScanResult where(int i) {
    svm::Notifier* n;
    svm::Range* r;
    {
      MutexLock g(&svm->lock());
      n = svm->gpusvm()->notifier_find(range_va(i), range_va(i) + 1);
      r = n ? svm->gpusvm()->range_find(n, range_va(i), range_va(i) + 1) : nullptr;
      if (r) r->get();
    }
    if (!r) return svm::ScanResult::kUnpopulated;
    svm::RangeRef ref(r);
    return svm->gpusvm()->scan_mm(r, vram->pagemap()->owner(), vram->pagemap());
  }
  // Bytes of every range as written (reads fault everything back to system memory).
  void expect_all_bytes(int n) {
    for (int i = 0; i < n; i++) EXPECT_EQ(bad_bytes(*as, range_va(i), k2M, 10 + i), 0) << "range " << i;
  }
  // VRAM in use is exactly what the linked allocations hold (nothing leaked or double-freed).
  void expect_accounting() {
    EXPECT_EQ(region->buddy().used_bytes(), vram->lru().linked_bytes());
    EXPECT_EQ(region->buddy().check(), "");
  }
};

TEST_F(EvictionTest, ThreeTimesOversubscribedKeepsEveryByteAndTheLruOrder) {
  const int n = 12;  // 24 MiB of ranges over 8 MiB of VRAM
  map_ranges(n);
  for (int i = 0; i < n; i++) {
    int mrc = -1;
    Result<svm::RangeRef> r = svm->fault(range_va(i), true, &mrc);
    ASSERT_TRUE(r.ok()) << r.error();
    ASSERT_EQ(mrc, 0) << "range " << i;
    EXPECT_EQ(vram_pages(r->get()), k2M / k4K) << "range " << i;
    expect_accounting();
  }
  // The four most recently migrated stayed, the rest was evicted, oldest first.
  for (int i = 0; i < n; i++) {
    EXPECT_EQ(where(i), i >= n - 4 ? svm::ScanResult::kEqual : svm::ScanResult::kSystem) << "range " << i;
  }
  EXPECT_EQ(vram->stats().evictions.get(), static_cast<uint64_t>(n - 4));
  EXPECT_EQ(vram->stats().evicted_bytes.get(), static_cast<uint64_t>(n - 4) * k2M);
  EXPECT_GE(vram->stats().allocation_retries.get(), static_cast<uint64_t>(n - 4));
  EXPECT_EQ(vram->stats().allocation_failures.get(), 0u);
  {
    const VramStats& st = vram->stats();
    auto gbps = [](uint64_t bytes, uint64_t ns) { return ns ? static_cast<double>(bytes) / static_cast<double>(ns) : 0.0; };
    std::printf("vram: %llu migrations to VRAM %.2f GB/s, %llu to RAM %.2f GB/s, %llu evictions\n",
                static_cast<unsigned long long>(st.migrations_to_vram.get()), gbps(st.bytes_to_vram.get(), st.ns_to_vram.get()),
                static_cast<unsigned long long>(st.migrations_to_ram.get()), gbps(st.bytes_to_ram.get(), st.ns_to_ram.get()),
                static_cast<unsigned long long>(st.evictions.get()));
  }

  // Use range 8 (the LRU head) again: get_pages' devmem_fn bumps it, so range 9 goes next.
  {
    Result<svm::RangeRef> r = svm->fault(range_va(8), false);
    ASSERT_TRUE(r.ok());
    MutexLock g(&svm->lock());
    svm->gpusvm()->range_unmap_pages(r->get(), svm::Ctx{});
    ASSERT_EQ(svm->gpusvm()->range_get_pages(r->get(), svm->ctx()), 0);
  }
  int mrc = -1;
  ASSERT_TRUE(svm->fault(range_va(0), true, &mrc).ok());
  ASSERT_EQ(mrc, 0);
  EXPECT_EQ(where(0), svm::ScanResult::kEqual);
  EXPECT_EQ(where(8), svm::ScanResult::kEqual) << "the bumped range survived";
  EXPECT_EQ(where(9), svm::ScanResult::kSystem) << "the least recently used went";
  expect_accounting();
  expect_all_bytes(n);
  EXPECT_EQ(region->buddy().used_bytes(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

// An allocation whose migration is in flight is not on the LRU: another migration that needs
// room evicts the others around it, and the paused one completes afterwards.
TEST_F(EvictionTest, AnAllocationBeingMigratedIntoIsNeverEvicted) {
  map_ranges(6);
  ASSERT_TRUE(svm->fault(range_va(3), false).ok());  // the range exists (system pages)
  // The oldest allocation is the one whose migration is paused (allocated, not migrated).
  sched_point::Pause pause("refgpu.vram.allocated");
  int paused_rc = -1;
  std::thread t([&] { paused_rc = vram->migrate_to_vram(as.get(), range_va(3), range_va(3) + k2M, 0); });
  ASSERT_TRUE(pause.wait_reached());
  EXPECT_EQ(vram->lru().linked_count(), 0u) << "an allocation being migrated into is not evictable";
  for (int i = 0; i < 3; i++) {  // VRAM full: 1 in flight + 3
    int mrc = -1;
    ASSERT_TRUE(svm->fault(range_va(i), true, &mrc).ok());
    ASSERT_EQ(mrc, 0);
  }
  // Two more need room twice over: only linked entries can go, oldest first.
  for (int i = 4; i < 6; i++) {
    int mrc = -1;
    ASSERT_TRUE(svm->fault(range_va(i), true, &mrc).ok());
    ASSERT_EQ(mrc, 0) << "range " << i;
  }
  EXPECT_EQ(vram->lru().linked_count(), 3u);
  EXPECT_EQ(vram->stats().eviction_skips.get(), 0u) << "the in-flight allocation was never even tried";
  pause.release();
  t.join();
  EXPECT_EQ(paused_rc, 0);
  EXPECT_EQ(where(3), svm::ScanResult::kEqual);
  EXPECT_EQ(where(0), svm::ScanResult::kSystem);
  EXPECT_EQ(where(1), svm::ScanResult::kSystem);
  EXPECT_EQ(where(2), svm::ScanResult::kEqual);
  expect_accounting();
  expect_all_bytes(6);
}

// An evictor that outlives the allocation's release (found by ASan in
// EvictionRacesMigrationsAndCpuFaults: touch_pages read a deleted allocation). Replayed:
//
//   evictor (thread E)                         CPU (test thread)
//   lru.evict: A taken, ref +1
//   evict_to_ram: not detached
//   -- stop at svm.evict_to_ram.populate --
//                                              reads every page: CPU faults migrate the
//                                              range home, the last device page goes,
//                                              devmem_release(A): creator's ref -1
//   populate_devmem_pfn(A): A's frames again
//   nothing to collect; detached: return 0
//   put: A's last reference
//
// The owner table must not name A afterwards, and A's frames go back to the buddy only with
// that last reference: before the fix the release cleared the table and freed the frames,
// the evictor's populate set the entries again, and the next get_pages over those frames
// touched a deleted allocation (with the frames possibly already another allocation's).
TEST_F(EvictionTest, EvictorOutlivingTheReleaseLeavesNoStaleOwner) {
  map_ranges(1);
  int mrc = -1;
  ASSERT_TRUE(svm->fault(range_va(0), true, &mrc).ok());
  ASSERT_EQ(mrc, 0);
  std::vector<VramLruEntry*> entries = vram->lru().snapshot();
  ASSERT_EQ(entries.size(), 1u);
  auto* a = static_cast<VramAllocation*>(entries[0]);
  const mm::Pfn pfn0 = vram->dev_pagemap()->first_pfn() + (a->blocks().at(0).offset >> mm::kPageShift);
  ASSERT_EQ(vram->frame_owner(pfn0), a);

  sched_point::Pause pause("svm.evict_to_ram.populate");
  uint64_t freed = 0;
  std::thread evictor([&] { freed = vram->lru().evict(k2M); });
  ASSERT_TRUE(pause.wait_reached());
  EXPECT_EQ(bad_bytes(*as, range_va(0), k2M, 10), 0);  // CPU faults: the range comes home
  EXPECT_TRUE(a->released()) << "every device page went";
  EXPECT_EQ(region->buddy().used_bytes(), k2M) << "the evictor's reference keeps the frames";
  pause.release();
  evictor.join();
  EXPECT_EQ(freed, k2M);
  EXPECT_EQ(vram->frame_owner(pfn0), nullptr) << "no stale owner once the last reference went";
  EXPECT_EQ(region->buddy().used_bytes(), 0u);

  // The frames are reused: a new migration and its get_pages (touch_pages) over them.
  ASSERT_TRUE(svm->fault(range_va(0), true, &mrc).ok());
  ASSERT_EQ(mrc, 0);
  EXPECT_EQ(where(0), svm::ScanResult::kEqual);
  expect_accounting();
  expect_all_bytes(1);
  EXPECT_MM_CHECK_OK(*mem);
}

// Everything busy: the allocator gives up within its bounds with -ENOSPC, changes nothing.
TEST_F(EvictionTest, AllocationFailsBoundedWhenEveryEntryIsBusy) {
  map_ranges(5);
  for (int i = 0; i < 4; i++) {
    int mrc = -1;
    ASSERT_TRUE(svm->fault(range_va(i), true, &mrc).ok());
    ASSERT_EQ(mrc, 0);
  }
  std::vector<VramLruEntry*> entries = vram->lru().snapshot();
  ASSERT_EQ(entries.size(), 4u);
  for (VramLruEntry* e : entries) e->begin_busy();
  const auto t0 = std::chrono::steady_clock::now();
  int mrc = 0;
  ASSERT_TRUE(svm->fault(range_va(4), true, &mrc).ok());  // get_pages maps system pages
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(mrc, -ENOSPC);
  EXPECT_LT(took, std::chrono::seconds(10)) << "bounded by the eviction budget";
  EXPECT_EQ(vram->stats().allocation_failures.get(), 1u);
  EXPECT_EQ(vram->stats().evictions.get(), 0u);
  for (VramLruEntry* e : entries) e->end_busy();
  expect_accounting();
  expect_all_bytes(5);
}

// Several threads fault ranges into VRAM (3x oversubscribed) while others read them back by
// CPU faults: evictions race migrations and CPU faults. Nothing deadlocks (bounded: every
// lock wait and every sched point panics past hang_timeout), every byte survives.
TEST_F(EvictionTest, EvictionRacesMigrationsAndCpuFaults) {
  const int n = 12;
  map_ranges(n);
  std::atomic<bool> stop{false};
  std::atomic<int> migrated{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; t++) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 6; round++) {
        for (int i = t; i < n; i += 3) {
          int mrc = -1;
          Result<svm::RangeRef> r = svm->fault(range_va((i + round) % n), true, &mrc);
          if (!r.ok()) failed.fetch_add(1);
          if (mrc == 0) migrated.fetch_add(1);
        }
      }
    });
  }
  threads.emplace_back([&] {
    uint64_t v;
    while (!stop.load()) {
      for (int i = 0; i < n && !stop.load(); i++) {
        // A CPU read of one word per 64 KiB: device pages fault back, data must be intact.
        for (uint64_t off = 0; off < k2M; off += k64K) {
          Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, range_va(i) + off);
          ASSERT_TRUE(w.ok());
          v = pattern(range_va(i) + off, 10 + i);
          ASSERT_EQ(*w, v) << "range " << i << " offset " << off;
        }
      }
    }
  });
  for (int t = 0; t < 3; t++) threads[t].join();
  stop.store(true);
  threads.back().join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(migrated.load(), 0);
  EXPECT_GT(vram->stats().evictions.get(), 0u);
  expect_accounting();
  expect_all_bytes(n);
  EXPECT_EQ(region->buddy().used_bytes(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

// A migration that must evict, with a failure injected at each hit of each point on the way
// (the allocation, the buddy, the pfn population, the copies of the eviction and of the
// migration, the DMA maps, the eviction's 2 MiB system folios): whatever fails, every byte is where it can be
// read, the VRAM accounting matches the LRU, and mm::check is clean.
TEST_F(EvictionTest, InjectedFailureAtEveryPointRollsBack) {
  map_ranges(5);
  const char* points[] = {"refgpu.vram_alloc", "refgpu.buddy_alloc", "refgpu.vram_populate_pfn", "refgpu.copy",
                          "svm.dma_map", "mm.alloc_folio_thp"};
  for (const char* point : points) {
    bool first_hit_failed = false;
    for (uint64_t nth = 1; nth <= 3; nth++) {
      SCOPED_TRACE(std::string(point) + " nth " + std::to_string(nth));
      for (int i = 0; i < 4; i++) {  // VRAM full
        int mrc = -1;
        ASSERT_TRUE(svm->fault(range_va(i), true, &mrc).ok());
        ASSERT_EQ(mrc, 0);
      }
      ASSERT_EQ(fault_inject::arm(point, {.nth = nth}), 0);
      int mrc = 0;
      Result<svm::RangeRef> r = svm->fault(range_va(4), true, &mrc);
      const uint64_t injected = fault_inject::failures(point);
      fault_inject::disarm_all();
      if (nth == 1) first_hit_failed = injected > 0;
      if (r.ok()) {
        // Migrated, or left in system memory: either way the range reads right.
        EXPECT_EQ(vram_pages(r->get()) == k2M / k4K, mrc == 0);
      }
      expect_accounting();
      expect_all_bytes(5);  // everything back in system memory
      EXPECT_EQ(region->buddy().used_bytes(), 0u);
      EXPECT_EQ(vram->lru().linked_count(), 0u);
      EXPECT_MM_CHECK_OK(*mem);
    }
    EXPECT_TRUE(first_hit_failed) << point << " is on the path and was failed";
  }
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
