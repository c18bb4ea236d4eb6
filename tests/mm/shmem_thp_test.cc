// shmem THPs: MADV_COLLAPSE of shared anonymous memory (collapse_file + collapse_pte_mapped_thp),
// PMD mapping of a page-cache THP (do_set_pmd), and the paths that meet one: split (a zap),
// partial munmap / mprotect (PTE-mapped large folio), fork (not copied, refaulted), mremap,
// hmm_range_fault (order 9), migrate_vma (not collected), pwrite/pread through a tail page,
// exit. The collapse's rollbacks: allocation failure, a locked page, a reference taken after
// the scan. What Linux 6.18 does in the same cases is in the differential suite (shmem_*).
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;
constexpr int kRW = PROT_READ | PROT_WRITE;
constexpr uint64_t P = kPageSize;
constexpr uint64_t M2 = kPmdSize;

class ShmemThpTest : public MmTest {
 protected:
  // A MAP_SHARED | MAP_ANONYMOUS mapping of len bytes, 2 MiB aligned (a 2 MiB hint: the model
  // aligns only private anonymous mappings by itself).
  Va map_shared(uint64_t len) {
    Result<Va> hint = as->mmap(0, len + M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
    EXPECT_TRUE(hint.ok());
    if (!hint.ok()) return 0;
    const Va va = pmd_align_up(*hint);
    EXPECT_EQ(as->munmap(*hint, len + M2), 0);
    Result<Va> r = as->mmap(va, len, kRW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED);
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : 0;
  }
  ShmemObject* object_at(Va va) {
    ReadLock g(&as->mmap_lock());
    Vma* v = as->vma_lookup(va);
    return v ? v->file.get() : nullptr;
  }
  // The cache folio holding pgoff: its order, or -1 for a hole.
  int cache_order(ShmemObject* obj, uint64_t pgoff) {
    Folio* f = obj->find_folio(pgoff);
    if (!f) return -1;
    const int order = static_cast<int>(f->order());
    f->put();
    return order;
  }
  PageKind kind(Va va) { return query_page(*as, va).kind; }
};

// 512 written small folios become one PMD-mapped 2 MiB folio in the cache; every byte
// survives; the small folios are freed (the machine uses 512 frames less one folio = equal
// frames, so count folios instead: the cache holds one).
TEST_F(ShmemThpTest, CollapseBuildsPmdMappedCacheThp) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ShmemObject* obj = object_at(va);
  ASSERT_EQ(cache_order(obj, 7), 0);
  const uint64_t free_before = mem->free_pages();
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(mem->free_pages(), free_before);  // 512 frames out, 512 frames in
  for (uint64_t i : {0ul, 7ul, 511ul}) {
    EXPECT_EQ(kind(va + i * P), PageKind::kThpPmd) << i;
    EXPECT_EQ(cache_order(obj, i), static_cast<int>(kPmdOrder)) << i;
  }
  EXPECT_EQ(query_page(*as, va).mapcount, 1);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
  fill_pages(*as, va, M2, 2);  // stores through the PMD reach the cache folio
  std::vector<uint64_t> word(1);
  ASSERT_EQ(obj->pread(word.data(), 8, 300 * P), 8);
  EXPECT_EQ(word[0], pattern(va + 300 * P, 2));
  EXPECT_MM_CHECK_OK(*mem);
  // A second collapse finds it PMD-mapped already.
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(verify_pages(*as, va, M2, 2), 0);
}

// Holes in the page cache become zero pages of the THP (shmem collapses them); pages cached
// but not mapped are copied too.
TEST_F(ShmemThpTest, CollapseFillsHolesAndTakesUnmappedCachePages) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 3 * P, 0x33), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 100 * P, 0x100), 0);
  ASSERT_EQ(as->madvise(va + 100 * P, P, MADV_DONTNEED), 0);  // cached, unmapped
  ShmemObject* obj = object_at(va);
  ASSERT_EQ(cache_order(obj, 200), -1);
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(cache_order(obj, 200), static_cast<int>(kPmdOrder));
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 3 * P), 0x33u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 100 * P), 0x100u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 200 * P), 0u);
  EXPECT_EQ(kind(va + 200 * P), PageKind::kThpPmd);
}

// The VMA rules: a range inside one block, MADV_NOHUGEPAGE, and a VMA whose aligned blocks
// are not 2 MiB aligned in the object (thp_vma_suitable_order's pgoff check).
TEST_F(ShmemThpTest, CollapseVmaRules) {
  const Va va = map_shared(2 * M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, 2 * M2, 1);
  EXPECT_EQ(as->madvise(va + P, 16 * P, MADV_COLLAPSE), -EINVAL);
  EXPECT_EQ(as->madvise(va, 16 * P, MADV_COLLAPSE), 0);  // empty after alignment
  // Moved 64 KiB off a boundary: the VMA [dst, dst + 4 MiB) holds the aligned block at
  // dst' = pmd_align_up(dst), but that is object offset 496.
  Result<Va> hole = as->mmap(0, 4 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  ASSERT_TRUE(hole.ok());
  const Va dst = pmd_align_up(*hole) + 16 * P;
  ASSERT_TRUE(as->mremap(va, 2 * M2, 2 * M2, MREMAP_MAYMOVE | MREMAP_FIXED, dst).ok());
  EXPECT_EQ(as->madvise(dst, 2 * M2, MADV_COLLAPSE), -EINVAL);
  EXPECT_EQ(kind(pmd_align_up(dst)), PageKind::kSmall);
  EXPECT_EQ(verify_pages(*as, dst, 2 * M2, 1, va), 0);
  const Va nohuge = map_shared(M2);
  ASSERT_NE(nohuge, 0u);
  fill_pages(*as, nohuge, M2, 2);
  ASSERT_EQ(as->madvise(nohuge, M2, MADV_NOHUGEPAGE), 0);
  EXPECT_EQ(as->madvise(nohuge, M2, MADV_COLLAPSE), -EINVAL);
  EXPECT_EQ(kind(nohuge), PageKind::kSmall);
}

// Rollback 1: no 2 MiB folio. Nothing changed: the small folios stay cached and mapped.
TEST_F(ShmemThpTest, CollapseAllocationFailureChangesNothing) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ShmemObject* obj = object_at(va);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio_thp", {.nth = 1});
    EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), -ENOMEM);
    EXPECT_EQ(fault_inject::failures("mm.alloc_folio_thp"), 1u);
  }
  EXPECT_EQ(cache_order(obj, 5), 0);
  EXPECT_EQ(kind(va + 5 * P), PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + 5 * P).mapcount, 1);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// Rollback 2: a page is locked (SCAN_PAGE_LOCK): -EAGAIN, the cache keeps its small folios;
// the pages unmapped before the locked one refault from the cache with their data.
TEST_F(ShmemThpTest, CollapseLockedPageRollsBack) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ShmemObject* obj = object_at(va);
  Folio* busy = obj->find_folio(40);
  ASSERT_NE(busy, nullptr);
  // Another thread holds the lock (this one may not take the mmap lock under a folio lock),
  // and no extra reference (the scan would refuse that first): the cache keeps it alive.
  std::atomic<int> stage{0};
  std::thread holder([&] {
    folio_lock(busy);
    busy->put();
    stage = 1;
    while (stage.load() != 2) std::this_thread::sleep_for(1ms);
    folio_unlock(busy);
  });
  while (stage.load() != 1) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), -EAGAIN);
  stage = 2;
  holder.join();
  EXPECT_EQ(cache_order(obj, 40), 0);
  EXPECT_EQ(cache_order(obj, 0), 0);
  EXPECT_EQ(kind(va), PageKind::kNone);          // unmapped by the attempt
  EXPECT_EQ(kind(va + 40 * P), PageKind::kSmall);  // never reached
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(kind(va + 40 * P), PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// A GUP reference (a pin here) seen by the scan: -EAGAIN before anything is unmapped.
TEST_F(ShmemThpTest, CollapsePinnedPageRefusedByScan) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  std::vector<Folio*> pages(1);
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(pin_user_pages(*as, va + 9 * P, 1, FOLL_WRITE, pages.data()), 1);
  }
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), -EAGAIN);
  EXPECT_EQ(kind(va), PageKind::kSmall);
  EXPECT_EQ(kind(va + 9 * P), PageKind::kSmall);
  unpin_user_page(pages[0]);
  EXPECT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// Rollback 3: a reference appears after the scan (a lockless lookup, a GUP-fast), while the
// collapse holds the page locks and has unmapped everything:
//
//   collapse (thread "collapse")              test
//   scan: refcounts ok, allocate, lock,
//   unmap all 512
//   -- mm.collapse_file.unmapped --           folio_get(page 77)  (speculative reference)
//   refcount(page 77) != cache + ours
//   -> -EAGAIN, unlock, free the new folio
//                                             folio_put
// The cache keeps its small folios; every page refaults with its data.
TEST_F(ShmemThpTest, CollapseReferenceAfterScanRollsBack) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ShmemObject* obj = object_at(va);
  Folio* page77 = obj->find_folio(77);  // the test's handle; dropped before the collapse
  ASSERT_NE(page77, nullptr);
  page77->put();
  const uint64_t free_before = mem->free_pages();
  sched_point::Pause unmapped("mm.collapse_file.unmapped", {.thread = "collapse"});
  ASSERT_EQ(unmapped.status(), 0);
  int rc = 1;
  std::thread collapse([&] {
    sched_point::set_thread_name("collapse");
    rc = as->madvise(va, M2, MADV_COLLAPSE);
  });
  ASSERT_TRUE(unmapped.wait_reached());
  EXPECT_EQ(page77->page_mapcount(), 0);  // unmapped, still cached
  page77->get();
  unmapped.release();
  collapse.join();
  EXPECT_EQ(rc, -EAGAIN);
  page77->put();
  EXPECT_EQ(mem->free_pages(), free_before);  // the new folio went back
  EXPECT_EQ(cache_order(obj, 77), 0);
  EXPECT_EQ(kind(va + 77 * P), PageKind::kNone);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// A partial munmap zaps the file PMD (no deposited table); the rest refaults by PTEs of the
// same large folio, which is not queued for deferred split and stays whole in the cache. An
// mprotect of part does the same.
TEST_F(ShmemThpTest, PartialMunmapAndMprotectPteMapTheLargeFolio) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  const Pfn head = query_page(*as, va).pfn;
  ASSERT_EQ(as->munmap(va + 4 * P, 2 * P), 0);
  EXPECT_EQ(kind(va), PageKind::kNone);
  EXPECT_EQ(kind(va + 100 * P), PageKind::kNone);
  EXPECT_EQ(verify_pages(*as, va, 4 * P, 1), 0);
  EXPECT_EQ(verify_pages(*as, va + 6 * P, M2 - 6 * P, 1), 0);
  EXPECT_EQ(kind(va + 100 * P), PageKind::kThpPte);
  EXPECT_EQ(query_page(*as, va + 100 * P).pfn, head + 100);
  EXPECT_EQ(mem->deferred_split_count(), 0u);
  ASSERT_EQ(as->mprotect(va + 200 * P, P, PROT_READ), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 200 * P), pattern(va + 200 * P, 1));
  EXPECT_EQ(cpu::store<uint64_t>(*as, va + 200 * P, 1), -EFAULT);
  EXPECT_EQ(query_page(*as, va + 200 * P).pfn, head + 200);
  EXPECT_MM_CHECK_OK(*mem);
  // Whole-VMA mprotect back and a partial DONTNEED.
  ASSERT_EQ(as->mprotect(va + 200 * P, P, kRW), 0);
  ASSERT_EQ(as->madvise(va + 300 * P, P, MADV_DONTNEED), 0);
  EXPECT_EQ(verify_pages(*as, va + 6 * P, M2 - 6 * P, 1), 0);
  // Unmapping one PTE of the partly mapped folio does not queue it for deferred split.
  ASSERT_EQ(as->munmap(va + 2 * P, P), 0);
  EXPECT_EQ(mem->deferred_split_count(), 0u);
  EXPECT_EQ(verify_pages(*as, va, 2 * P, 1), 0);
}

// fork does not copy a PMD-mapped page-cache THP: the child refaults it (PMD again, the VMA
// is aligned); stores are shared both ways.
TEST_F(ShmemThpTest, ForkChildRefaultsThePmd) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  AddressSpace& c = **child;
  EXPECT_EQ(query_page(c, va).kind, PageKind::kNone);
  EXPECT_EQ(verify_pages(c, va, M2, 1), 0);
  EXPECT_EQ(query_page(c, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(query_page(c, va).pfn, query_page(*as, va).pfn);
  EXPECT_EQ(query_page(*as, va).mapcount, 2);
  ASSERT_EQ(cpu::store<uint64_t>(c, va + 9 * P, 0x99), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 9 * P), 0x99u);
  EXPECT_MM_CHECK_OK(*mem);
  c.exit();
  child->reset();
  EXPECT_EQ(query_page(*as, va).mapcount, 1);
}

// fork copies no PTE of a shared mapping either (vma_needs_copy: no anon_vma): the child
// refaults 4 KiB pages from the cache (with fault-around) and shares them.
TEST_F(ShmemThpTest, ForkDoesNotCopySharedPtes) {
  const Va va = map_shared(64 * P);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, 64 * P, 1);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  AddressSpace& c = **child;
  EXPECT_EQ(query_page(c, va + 5 * P).kind, PageKind::kNone);
  EXPECT_EQ(*cpu::load<uint64_t>(c, va + 5 * P), pattern(va + 5 * P, 1));
  EXPECT_EQ(query_page(c, va + 15 * P).pfn, query_page(*as, va + 15 * P).pfn);  // fault-around
  EXPECT_EQ(query_page(c, va + 16 * P).kind, PageKind::kNone);
  EXPECT_EQ(query_page(*as, va + 5 * P).mapcount, 2);
  EXPECT_MM_CHECK_OK(*mem);
  c.exit();
}

// A private mapping of an object holding a THP: a read maps it by a read-only PMD, fork does
// not copy that PMD (copy_huge_pmd skips file PMDs), and a write zaps it and copies 4 KiB; the
// object keeps its bytes.
TEST_F(ShmemThpTest, PrivateMappingOfCacheThp) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  std::shared_ptr<ShmemObject> obj;
  {
    ReadLock g(&as->mmap_lock());
    obj = as->vma_lookup(va)->file;
  }
  Result<Va> hint = as->mmap(0, 2 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  ASSERT_TRUE(hint.ok());
  const Va pv = pmd_align_up(*hint);
  ASSERT_EQ(as->munmap(*hint, 2 * M2), 0);
  ASSERT_TRUE(as->mmap(pv, M2, kRW, MAP_PRIVATE | MAP_FIXED, obj, 0).ok());
  EXPECT_EQ(*cpu::load<uint64_t>(*as, pv + 8 * P), pattern(va + 8 * P, 1));
  EXPECT_EQ(kind(pv), PageKind::kThpPmd);
  EXPECT_FALSE(query_page(*as, pv).writable);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(query_page(**child, pv).kind, PageKind::kNone);
  (*child)->exit();
  child->reset();
  ASSERT_EQ(cpu::store<uint64_t>(*as, pv + 8 * P, 0x77), 0);
  EXPECT_EQ(kind(pv + 8 * P), PageKind::kSmall);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 8 * P), pattern(va + 8 * P, 1));  // not in the object
  EXPECT_EQ(*cpu::load<uint64_t>(*as, pv + 8 * P), 0x77u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, pv + 9 * P), pattern(va + 9 * P, 1));
  EXPECT_MM_CHECK_OK(*mem);
}

// Real threads: a fork child reads the shared regions in a loop (its faults wait on the
// object lock, its PTE tables are retracted under it) while the parent collapses them one by
// one; a collapse that meets one of the child's fault references fails -EAGAIN and is
// retried. Every byte stays, in both processes, and the checker agrees at the end.
TEST_F(ShmemThpTest, CollapseRacesAnotherProcessFaults) {
  constexpr int kRegions = 6;
  std::vector<Va> regions;
  for (int r = 0; r < kRegions; r++) {
    regions.push_back(map_shared(M2));
    ASSERT_NE(regions.back(), 0u);
    fill_pages(*as, regions.back(), M2, r + 1);
  }
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  AddressSpace& c = **child;
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread reader([&] {
    for (uint64_t i = 0; !stop.load(); i++) {
      const int r = static_cast<int>(i % kRegions);
      const Va a = regions[r] + ((i * 37) % kPagesPerPmd) * P;
      Result<uint64_t> v = cpu::load<uint64_t>(c, a);
      if (!v || *v != pattern(a, r + 1)) bad++;
    }
  });
  for (int r = 0; r < kRegions; r++) {
    int rc = -EAGAIN;
    for (int tries = 0; tries < 1000 && rc == -EAGAIN; tries++) {
      rc = as->madvise(regions[r], M2, MADV_COLLAPSE);
    }
    EXPECT_EQ(rc, 0) << r;
  }
  std::this_thread::sleep_for(20ms);
  stop = true;
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  for (int r = 0; r < kRegions; r++) {
    EXPECT_EQ(kind(regions[r]), PageKind::kThpPmd) << r;
    EXPECT_EQ(verify_pages(*as, regions[r], M2, r + 1), 0) << r;
    EXPECT_EQ(verify_pages(c, regions[r], M2, r + 1), 0) << r;
  }
  c.exit();
}

// mremap: an aligned move keeps the PMD; an unaligned one zaps it and the pages refault by
// PTEs at the new place.
TEST_F(ShmemThpTest, MremapAlignedKeepsPmdUnalignedRefaults) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  Result<Va> hole = as->mmap(0, 4 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  ASSERT_TRUE(hole.ok());
  const Va a = pmd_align_up(*hole);
  ASSERT_TRUE(as->mremap(va, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, a).ok());
  EXPECT_EQ(kind(a), PageKind::kThpPmd);
  EXPECT_MM_CHECK_OK(*mem);
  const Va b = a + M2 + 16 * P;
  ASSERT_TRUE(as->mremap(a, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, b).ok());
  EXPECT_EQ(query_page(*as, b).kind, PageKind::kNone);
  EXPECT_EQ(verify_pages(*as, b, M2, 1, va), 0);
  EXPECT_EQ(kind(b), PageKind::kThpPte);
}

// hmm_range_fault reports a PMD-mapped shmem THP with map order 9; a migration collects none
// of it and leaves it mapped (page-cache pages are not migrated to device memory).
TEST_F(ShmemThpTest, HmmReportsOrderNineMigrationSkips) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  const Pfn head = query_page(*as, va).pfn;
  TestMirror ops;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, M2, &ops), 0);
  std::vector<uint64_t> pfns;
  ASSERT_EQ(mirror_range(*as, n, va, va + M2, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  for (uint64_t i : {0ul, 1ul, 511ul}) {
    EXPECT_EQ(pfns[i] & ~HMM_PFN_FLAGS, head + i) << i;
    EXPECT_EQ(hmm_pfn_to_map_order(pfns[i]), kPmdOrder) << i;
    EXPECT_TRUE(pfns[i] & HMM_PFN_WRITE) << i;
  }
  n.remove();
  std::vector<uint64_t> src(kPagesPerPmd), dst(kPagesPerPmd);
  MigrateVma m{.mm = as.get(), .start = va, .end = va + M2, .src = src.data(), .dst = dst.data(),
               .flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&m), 0);
    EXPECT_EQ(m.cpages, 0u);
    m.mm->mmap_assert_locked();  // held through as, named through the MigrateVma
    migrate_vma_pages(&m);
    migrate_vma_finalize(&m);
  }
  EXPECT_EQ(kind(va + 3 * P), PageKind::kThpPmd);
  // A part of it: not split for a page-by-page collection either.
  MigrateVma part{.mm = as.get(), .start = va, .end = va + 16 * P, .src = src.data(),
                  .dst = dst.data(), .flags = MIGRATE_VMA_SELECT_SYSTEM};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(migrate_vma_setup(&part), 0);
    EXPECT_EQ(part.cpages, 0u);
    part.mm->mmap_assert_locked();  // held through as, named through the MigrateVma
    migrate_vma_pages(&part);
    migrate_vma_finalize(&part);
  }
  EXPECT_EQ(kind(va + 3 * P), PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// make_device_exclusive refuses a page-cache page; on a PMD-mapped shmem THP its
// FOLL_SPLIT_PMD zaps the PMD and puts an empty table in (follow_pmd_mask), so the write
// fault maps one page by a PTE instead of the PMD again (which would loop until the deadline).
TEST_F(ShmemThpTest, DeviceExclusiveRefusesPageCacheThp) {
  const Va va = map_shared(M2);
  ASSERT_NE(va, 0u);
  fill_pages(*as, va, M2, 1);
  ASSERT_EQ(as->madvise(va, M2, MADV_COLLAPSE), 0);
  const Pfn head = query_page(*as, va).pfn;
  const auto t0 = std::chrono::steady_clock::now();
  {
    ReadLock g(&as->mmap_lock());
    Result<Folio*> r = make_device_exclusive(*as, va + 5 * P, this);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error(), -EOPNOTSUPP);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
  EXPECT_EQ(kind(va + 5 * P), PageKind::kThpPte);
  EXPECT_EQ(query_page(*as, va + 5 * P).pfn, head + 5);
  EXPECT_EQ(verify_pages(*as, va, M2, 1), 0);
}

// pwrite / pread of a page-cache THP reach the page of the offset (a tail page), and the
// object's last reference frees the 2 MiB folio (exit first, then the object).
TEST_F(ShmemThpTest, PwritePreadTailPagesAndTeardown) {
  Result<std::shared_ptr<ShmemObject>> file = ShmemObject::create(mem.get(), 2 * M2, "tmpfile");
  ASSERT_TRUE(file.ok());
  std::vector<uint8_t> buf(3 * P, 0xab);
  ASSERT_EQ((*file)->pwrite(buf.data(), buf.size(), 10 * P + 5), static_cast<int64_t>(buf.size()));
  Result<Va> hint = as->mmap(0, 3 * M2, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE);
  ASSERT_TRUE(hint.ok());
  const Va va = pmd_align_up(*hint);
  ASSERT_EQ(as->munmap(*hint, 3 * M2), 0);
  ASSERT_TRUE(as->mmap(va, 2 * M2, kRW, MAP_SHARED | MAP_FIXED, *file, 0).ok());
  // The first block is collapsed; the second has nothing cached: -EINVAL (as Linux 6.18).
  EXPECT_EQ(as->madvise(va, 2 * M2, MADV_COLLAPSE), -EINVAL);
  EXPECT_EQ(cache_order(file->get(), 12), static_cast<int>(kPmdOrder));
  EXPECT_EQ(cache_order(file->get(), 600), -1);
  EXPECT_EQ(kind(va + 12 * P), PageKind::kThpPmd);
  std::vector<uint8_t> out(3 * P, 0);
  ASSERT_EQ((*file)->pread(out.data(), out.size(), 10 * P + 5), static_cast<int64_t>(out.size()));
  EXPECT_EQ(out, buf);
  const uint8_t x = 0x42;
  ASSERT_EQ((*file)->pwrite(&x, 1, 300 * P + 1), 1);
  EXPECT_EQ(*cpu::load<uint8_t>(*as, va + 300 * P + 1), 0x42);
  ASSERT_EQ((*file)->pwrite(&x, 1, 700 * P), 1);  // a 4 KiB folio in the second block
  EXPECT_EQ(*cpu::load<uint8_t>(*as, va + 700 * P), 0x42);
  EXPECT_EQ(kind(va + 700 * P), PageKind::kSmall);
  EXPECT_EQ(*cpu::load<uint8_t>(*as, va + 10 * P + 5), 0xab);
  EXPECT_MM_CHECK_OK(*mem);
  as->exit();
  file->reset();  // the cache's references go: the 2 MiB folio and the 4 KiB one are freed
  EXPECT_EQ(mem->free_pages(), initial_free);
}

}  // namespace
}  // namespace gpusvm::mm::testing
