// hugetlb: the pool, MAP_HUGETLB mappings, hugetlb faults, fork COW at PMD level, the
// syscalls' alignment rules, hmm_range_fault reporting order 9, and the refusals of
// migrate_vma_setup and make_device_exclusive. The last test runs the syscall rules against
// this machine's Linux as well (when it has free 2 MiB hugetlb pages and we are root).
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

constexpr int kRW = PROT_READ | PROT_WRITE;
constexpr int kHuge = MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB;
// <linux/mman.h>'s MAP_HUGE_2MB / MAP_HUGE_1GB: log2 of the page size in bits 26..31.
constexpr int kMapHuge2MB = 21 << MAP_HUGE_SHIFT;
constexpr int kMapHuge1GB = 30 << MAP_HUGE_SHIFT;

class HugetlbTest : public MmTest {
 protected:
  Va map_huge(uint64_t len, int prot = kRW, int extra = 0) {
    Result<Va> va = as->mmap(0, len, prot, kHuge | extra);
    EXPECT_TRUE(va.ok()) << va.error();
    return va.ok() ? *va : 0;
  }
  PhysMem::HugetlbCounts counts() const { return mem->hugetlb_counts(); }
  Folio* folio_at(Va va) { return mem->folio_of(query_page(*as, va).pfn); }
};

// The pool is a limit: nothing is taken from RAM until a mapping reserves or faults.
TEST_F(HugetlbTest, PoolStartsFullAndTakesNothing) {
  const PhysMem::HugetlbCounts c = counts();
  EXPECT_EQ(c.total, 16u);  // the oracle's nr_hugepages
  EXPECT_EQ(c.free, 16u);
  EXPECT_EQ(c.reserved, 0u);
  EXPECT_EQ(c.in_use, 0u);
  auto small = PhysMem::create({.ram_bytes = kPmdSize, .hugetlb_pages = 3});
  ASSERT_TRUE(small.ok());
  EXPECT_EQ((*small)->hugetlb_counts().total, 3u);
  EXPECT_EQ((*small)->free_pages(), kPagesPerPmd);  // the pool took no RAM
}

// mmap rounds the length up to 2 MiB, aligns the mapping, reserves one page per 2 MiB;
// munmap gives the reservations (and RAM) back.
TEST_F(HugetlbTest, MmapReservesMunmapReleases) {
  const Va va = map_huge(3 * kPmdSize / 2);  // 3 MiB -> 4 MiB
  ASSERT_NE(va, 0u);
  EXPECT_TRUE(pmd_aligned(va));
  {
    ReadLock g(&as->mmap_lock());
    const Vma* v = as->vma_lookup(va);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(v->end - v->start, 2 * kPmdSize);
    EXPECT_TRUE(v->is_hugetlb());
    EXPECT_FALSE(v->is_anonymous());
  }
  EXPECT_EQ(counts().reserved, 2u);
  EXPECT_EQ(counts().free, 16u);  // reserved pages are still free (HugePages_Free)
  EXPECT_EQ(mem->free_pages(), initial_free - 2 * kPagesPerPmd);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->munmap(va, 2 * kPmdSize), 0);
  EXPECT_EQ(counts().reserved, 0u);
  EXPECT_EQ(mem->free_pages(), initial_free);
}

// A read fault maps a zeroed pool page read-only by a PMD; a write reuses it (exclusive);
// every 4 KiB of it is the same folio; no PTE table, no split.
TEST_F(HugetlbTest, ReadThenWriteFaultPmdMapped) {
  const Va va = map_huge(2 * kPmdSize);
  ASSERT_NE(va, 0u);
  Result<uint64_t> v = cpu::load<uint64_t>(*as, va + 12345 * 8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0u);
  PageState st = query_page(*as, va + 7 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kThpPmd);
  EXPECT_FALSE(st.writable);
  EXPECT_TRUE(st.anon_exclusive);
  Folio* folio = folio_at(va);
  EXPECT_TRUE(folio->test(kFolioHugetlb));
  EXPECT_EQ(folio->order(), kPmdOrder);
  EXPECT_EQ(folio->entire_mapcount(), 1);
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(counts().reserved, 1u);  // the second page is still only reserved
  fill_pages(*as, va, kPmdSize, 1);
  EXPECT_EQ(folio_at(va), folio);  // reused in place
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(as->stats().faults_reuse.get(), 1u);
  EXPECT_EQ(as->stats().faults_hugetlb.get(), 1u);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);
  // A first write maps the page writable at once.
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize, 9), 0);
  EXPECT_TRUE(query_page(*as, va + kPmdSize + kPageSize).writable);
  EXPECT_EQ(counts().in_use, 2u);
  EXPECT_EQ(counts().reserved, 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

// fork shares the hugetlb page read-only at PMD level; the first writer copies all 2 MiB
// into a new pool page; the other then owns the old one alone and reuses it.
TEST_F(HugetlbTest, ForkCowCopiesWholeHugePage) {
  const Va va = map_huge(kPmdSize);
  fill_pages(*as, va, kPmdSize, 1);
  Folio* orig = folio_at(va);
  Result<std::unique_ptr<AddressSpace>> child_r = as->fork();
  ASSERT_TRUE(child_r.ok());
  AddressSpace& child = **child_r;
  EXPECT_EQ(orig->entire_mapcount(), 2);
  EXPECT_FALSE(query_page(*as, va).writable);
  EXPECT_FALSE(query_page(child, va).writable);
  EXPECT_EQ(query_page(child, va).pfn, orig->pfn());
  EXPECT_MM_CHECK_OK(*mem);
  // The child writes one word: it gets its own copy of the whole 2 MiB.
  ASSERT_EQ(cpu::store<uint64_t>(child, va + 5 * kPageSize, 77), 0);
  Folio* copy = mem->folio_of(query_page(child, va).pfn);
  EXPECT_NE(copy, orig);
  EXPECT_TRUE(copy->test(kFolioHugetlb));
  EXPECT_EQ(query_page(child, va + 100 * kPageSize).pfn, copy->pfn() + 100);
  EXPECT_EQ(child.stats().cow_copies.get(), kPagesPerPmd);
  EXPECT_EQ(counts().in_use, 2u);
  for (Va p = va; p < va + kPmdSize; p += kPageSize) {
    Result<uint64_t> got = cpu::load<uint64_t>(child, p);
    ASSERT_TRUE(got.ok());
    ASSERT_EQ(*got, p == va + 5 * kPageSize ? 77u : pattern(p, 1)) << std::hex << p;
  }
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 1), 0);  // the parent's data is untouched
  EXPECT_EQ(orig->entire_mapcount(), 1);
  // The parent is now the only mapper of the original: its write reuses it.
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, 5), 0);
  EXPECT_EQ(folio_at(va), orig);
  EXPECT_EQ(as->stats().cow_copies.get(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  child_r->reset();  // exit gives the child's copy back
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_MM_CHECK_OK(*mem);
}

// A fork child has no reservations: with the pool used up, its COW fails (SIGBUS), while
// the parent's data stays; after the child exits the parent reuses its page.
TEST_F(HugetlbTest, ForkChildCowFailsWhenPoolIsUsedUp) {
  auto small = PhysMem::create({.ram_bytes = 16 * kPmdSize, .hugetlb_pages = 1});
  ASSERT_TRUE(small.ok());
  PhysMem& m = **small;
  auto parent = make_as(&m);
  Result<Va> va = parent->mmap(0, kPmdSize, kRW, kHuge);
  ASSERT_TRUE(va.ok());
  ASSERT_EQ(parent->mmap(0, kPmdSize, kRW, kHuge).error(), -ENOMEM);  // the pool is reserved
  fill_pages(*parent, *va, kPmdSize, 2);
  Result<std::unique_ptr<AddressSpace>> child = parent->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(cpu::store<uint64_t>(**child, *va, 1), -EFAULT);  // SIGBUS: no page for the copy
  EXPECT_EQ(verify_pages(**child, *va, kPmdSize, 2), 0);
  EXPECT_EQ(m.hugetlb_counts().in_use, 1u);
  EXPECT_MM_CHECK_OK(m);
  child->reset();
  ASSERT_EQ(cpu::store<uint64_t>(*parent, *va, 1), 0);
  EXPECT_EQ(parent->stats().faults_reuse.get(), 1u);
  EXPECT_MM_CHECK_OK(m);
  parent.reset();
  EXPECT_EQ(m.hugetlb_counts().in_use, 0u);
  EXPECT_EQ(m.free_pages(), 16 * kPagesPerPmd);
}

// mprotect works on whole huge pages only; the PMD is write-protected, and after PROT_WRITE
// comes back stays read-only until a write fault reuses the (anon-exclusive) page, as
// hugetlb_change_protection leaves private hugetlb entries.
TEST_F(HugetlbTest, MprotectAtPmdGranularity) {
  const Va va = map_huge(2 * kPmdSize);
  fill_pages(*as, va, 2 * kPmdSize, 3);
  EXPECT_EQ(as->mprotect(va, kPageSize, PROT_READ), -EINVAL);
  EXPECT_EQ(as->mprotect(va + kPageSize, kPmdSize, PROT_READ), -EINVAL);
  EXPECT_EQ(as->mprotect(va, kPmdSize + kPageSize, PROT_READ), -EINVAL);
  EXPECT_TRUE(query_page(*as, va).writable);  // nothing changed
  ASSERT_EQ(as->mprotect(va + kPmdSize, kPmdSize, PROT_READ), 0);
  EXPECT_FALSE(query_page(*as, va + kPmdSize).writable);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize, 1), -EFAULT);
  ASSERT_EQ(as->mprotect(va, 2 * kPmdSize, kRW), 0);
  EXPECT_FALSE(query_page(*as, va + kPmdSize).writable);
  EXPECT_TRUE(query_page(*as, va).writable);  // its VMA part was writable all along
  const uint64_t reuse = as->stats().faults_reuse.get();
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize, pattern(va + kPmdSize, 3)), 0);
  EXPECT_EQ(as->stats().faults_reuse.get(), reuse + 1);
  EXPECT_TRUE(query_page(*as, va + kPmdSize).writable);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPmdSize, 3), 0);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
}

// munmap may only cut a hugetlb VMA at a 2 MiB boundary; an aligned cut frees that page.
TEST_F(HugetlbTest, MunmapAtPmdGranularity) {
  const Va va = map_huge(3 * kPmdSize);
  fill_pages(*as, va, 2 * kPmdSize, 4);  // pages 0 and 1 faulted, page 2 reserved
  EXPECT_EQ(as->munmap(va + kPageSize, kPageSize), -EINVAL);
  EXPECT_EQ(as->munmap(va, kPageSize), -EINVAL);
  EXPECT_EQ(as->munmap(va + kPmdSize, kPmdSize + kPageSize), -EINVAL);
  EXPECT_EQ(counts().in_use, 2u);
  ASSERT_EQ(as->munmap(va + kPmdSize, 2 * kPmdSize), 0);
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(counts().reserved, 0u);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 4), 0);
  EXPECT_EQ(cpu::load<uint64_t>(*as, va + kPmdSize).error(), -EFAULT);
  EXPECT_MM_CHECK_OK(*mem);
}

// madvise on hugetlb: DONTNEED from a huge page boundary, the end rounded down; the other
// advice that only anonymous memory takes is -EINVAL.
TEST_F(HugetlbTest, MadviseDontneedWholePagesOnly) {
  const Va va = map_huge(2 * kPmdSize);
  fill_pages(*as, va, 2 * kPmdSize, 5);
  EXPECT_EQ(as->madvise(va + kPageSize, kPageSize, MADV_DONTNEED), -EINVAL);
  EXPECT_EQ(as->madvise(va, kPageSize, MADV_DONTNEED), 0);  // rounds down to nothing
  EXPECT_EQ(counts().in_use, 2u);
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_FREE), -EINVAL);
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), -EINVAL);
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_WIPEONFORK), -EINVAL);
  EXPECT_EQ(as->madvise(va + kPageSize, kPmdSize, MADV_DONTFORK), -EINVAL);
  ASSERT_EQ(as->madvise(va, kPmdSize + kPageSize, MADV_DONTNEED), 0);  // page 0 only
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u);  // refaulted: a fresh zeroed page
  EXPECT_EQ(verify_pages(*as, va + kPmdSize, kPmdSize, 5), 0);
  EXPECT_EQ(counts().in_use, 2u);
  EXPECT_MM_CHECK_OK(*mem);
}

// mmap reserves up front, so the pool running out fails the mmap, not a later fault; with
// MAP_NORESERVE the mmap succeeds and the fault gets SIGBUS instead.
TEST_F(HugetlbTest, PoolExhaustionFailsMmap) {
  const Va all = map_huge(16 * kPmdSize);
  ASSERT_NE(all, 0u);
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, kHuge).error(), -ENOMEM);
  Result<Va> nores = as->mmap(0, kPmdSize, kRW, kHuge | MAP_NORESERVE);
  ASSERT_TRUE(nores.ok());
  EXPECT_EQ(cpu::store<uint64_t>(*as, *nores, 1), -EFAULT);
  EXPECT_EQ(counts().reserved, 16u);
  ASSERT_EQ(as->munmap(all, kPmdSize), 0);  // one reservation back
  ASSERT_EQ(cpu::store<uint64_t>(*as, *nores, 1), 0);
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, kHuge).error(), -ENOMEM);  // the limit again
  EXPECT_EQ(counts().in_use + counts().reserved, 16u);
  EXPECT_MM_CHECK_OK(*mem);
}

// An injected allocation failure of an unreserved page is SIGBUS too, with nothing leaked.
TEST_F(HugetlbTest, InjectedAllocationFailureIsSigbus) {
  Result<Va> va = as->mmap(0, kPmdSize, kRW, kHuge | MAP_NORESERVE);
  ASSERT_TRUE(va.ok());
  ASSERT_EQ(fault_inject::arm("mm.alloc_hugetlb", {.nth = 1}), 0);
  EXPECT_EQ(cpu::store<uint64_t>(*as, *va, 1), -EFAULT);
  fault_inject::disarm_all();
  ASSERT_EQ(cpu::store<uint64_t>(*as, *va, 1), 0);
  EXPECT_EQ(counts().in_use, 1u);
}

TEST_F(HugetlbTest, BadInput) {
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0x40000000 + kPageSize, kPmdSize, kRW, kHuge | MAP_FIXED).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, kHuge | kMapHuge1GB).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, MAP_PRIVATE | MAP_ANONYMOUS | kMapHuge2MB).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, 1ULL << 62, kRW, kHuge).error(), -ENOMEM);
  EXPECT_TRUE(as->mmap(0, kPmdSize, kRW, kHuge | kMapHuge2MB).ok());
  auto obj = ShmemObject::create(mem.get(), kPmdSize, "f");
  ASSERT_TRUE(obj.ok());
  EXPECT_EQ(as->mmap(0, kPmdSize, kRW, MAP_PRIVATE | MAP_HUGETLB, *obj).error(), -EINVAL);
  const Va va = map_huge(2 * kPmdSize);
  EXPECT_EQ(as->mremap(va, kPmdSize, 2 * kPmdSize, MREMAP_MAYMOVE).error(), -EINVAL);
  // MAP_FIXED over part of it: only at a huge page boundary.
  EXPECT_EQ(as->mmap(va + kPageSize, kPageSize, kRW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).error(),
            -EINVAL);
  EXPECT_EQ(as->mmap(va, kPmdSize, kRW, kHuge | MAP_FIXED_NOREPLACE).error(), -EEXIST);
  Result<Va> over = as->mmap(va + kPmdSize, kPmdSize, kRW, kHuge | MAP_FIXED);
  ASSERT_TRUE(over.ok());
  EXPECT_EQ(*over, va + kPmdSize);
  EXPECT_EQ(counts().reserved, 3u);
  EXPECT_MM_CHECK_OK(*mem);
}

// Faults of several threads on one huge page: one of them maps the slot's reserved page,
// the others find it mapped (or lose the race and give the reservation back).
TEST_F(HugetlbTest, ConcurrentFirstFaultsMapOnePage) {
  const Va va = map_huge(kPmdSize);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      const Va p = va + static_cast<Va>(t) * 64 * kPageSize;
      if (cpu::store<uint64_t>(*as, p, pattern(p, 6)) != 0) failures++;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(counts().reserved, 0u);
  for (int t = 0; t < 4; t++) {
    const Va p = va + static_cast<Va>(t) * 64 * kPageSize;
    EXPECT_EQ(*cpu::load<uint64_t>(*as, p), pattern(p, 6));
  }
}

// exit returns the pages and the unconsumed reservations of every hugetlb VMA.
TEST_F(HugetlbTest, ExitReturnsPagesAndReservations) {
  auto other = make_as(mem.get());
  Result<Va> va = other->mmap(0, 4 * kPmdSize, kRW, kHuge);
  ASSERT_TRUE(va.ok());
  fill_pages(*other, *va, kPmdSize, 7);
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(counts().reserved, 3u);
  other.reset();
  EXPECT_EQ(counts().in_use, 0u);
  EXPECT_EQ(counts().reserved, 0u);
  EXPECT_EQ(mem->free_pages(), initial_free);
}

// hmm_range_fault on hugetlb: a snapshot sees nothing before the fault, faults go through
// the hugetlb fault path, and every 4 KiB is reported with map order 9 and the PMD's WRITE.
TEST_F(HugetlbTest, HmmReportsOrder9AndFaults) {
  const Va va = map_huge(kPmdSize);
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPmdSize, &mirror), 0);
  std::vector<uint64_t> pfns;
  ASSERT_EQ(mirror_range(*as, n, va, va + kPmdSize, 0, pfns), 0);
  for (uint64_t p : pfns) ASSERT_EQ(p, 0u);
  ASSERT_EQ(mirror_range(*as, n, va + kPageSize, va + 9 * kPageSize, HMM_PFN_REQ_FAULT, pfns), 0);
  const Pfn head = folio_at(va)->pfn();
  for (size_t i = 0; i < pfns.size(); i++) {
    EXPECT_EQ(pfns[i] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID) << i;
    EXPECT_EQ(hmm_pfn_to_map_order(pfns[i]), kPmdOrder) << i;
    EXPECT_EQ(hmm_pfn_to_pfn(pfns[i]), head + 1 + i) << i;
  }
  ASSERT_EQ(mirror_range(*as, n, va, va + kPmdSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  for (size_t i = 0; i < pfns.size(); i++) {
    ASSERT_EQ(pfns[i] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID | HMM_PFN_WRITE) << i;
    ASSERT_EQ(hmm_pfn_to_map_order(pfns[i]), kPmdOrder) << i;
    ASSERT_EQ(hmm_pfn_to_pfn(pfns[i]), head + i) << i;  // reused, not copied
  }
  EXPECT_EQ(counts().in_use, 1u);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
  // A read-only VMA: a write request is -EPERM, a snapshot reports READ with order 9.
  ASSERT_EQ(as->mprotect(va, kPmdSize, PROT_READ), 0);
  EXPECT_EQ(mirror_range(*as, n, va, va + kPmdSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), -EPERM);
  ASSERT_EQ(mirror_range(*as, n, va, va + kPmdSize, 0, pfns), 0);
  EXPECT_EQ(pfns[0] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID);
  EXPECT_EQ(hmm_pfn_to_map_order(pfns[0]), kPmdOrder);
  n.remove();
}

// Migration never touches hugetlb: migrate_vma_setup refuses the VMA, and a migrating hmm
// walk reports the pages without collecting them (and faults holes normally).
TEST_F(HugetlbTest, MigrationRefusesHugetlb) {
  const Va va = map_huge(2 * kPmdSize);
  fill_pages(*as, va, kPmdSize, 8);  // page 1 stays a hole
  std::vector<uint64_t> src(2 * kPagesPerPmd), dst(2 * kPagesPerPmd);
  int owner;
  {
    ReadLock g(&as->mmap_lock());
    MigrateVma m{.mm = as.get(), .start = va, .end = va + kPmdSize, .src = src.data(),
                 .dst = dst.data(), .pgmap_owner = &owner,
                 .flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_COMPOUND};
    EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  }
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPmdSize, &mirror), 0);
  std::vector<uint64_t> pfns(2 * kPagesPerPmd);
  MigrateVma m{.src = src.data(), .dst = dst.data(), .pgmap_owner = &owner,
               .flags = MIGRATE_VMA_SELECT_COMPOUND};
  HmmRange r{.notifier = &n, .notifier_seq = n.read_begin(), .start = va, .end = va + 2 * kPmdSize,
             .hmm_pfns = pfns.data(),
             .default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE | HMM_PFN_REQ_MIGRATE,
             .dev_private_owner = &owner, .migrate = &m};
  {
    ReadLock g(&as->mmap_lock());
    ASSERT_EQ(hmm_range_fault(&r), 0);
  }
  for (size_t i = 0; i < pfns.size(); i++) {
    ASSERT_EQ(pfns[i] & (HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_MIGRATE),
              HMM_PFN_VALID | HMM_PFN_WRITE) << i;
    ASSERT_EQ(hmm_pfn_to_map_order(pfns[i]), kPmdOrder) << i;
  }
  EXPECT_EQ(as->stats().migrate_collected.get(), 0u);
  EXPECT_EQ(counts().in_use, 2u);  // the hole was faulted through the hugetlb path
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 8), 0);
  n.remove();
}

// Seed 004 patch 1: GUP refuses FOLL_SPLIT_PMD on a hugetlb VMA in check_vma_flags, before
// the write check and before anything is faulted: make_device_exclusive on hugetlb returns
// -EOPNOTSUPP whether the VMA is writable or not, and no pool page is consumed.
TEST_F(HugetlbTest, MakeDeviceExclusiveRefusesHugetlbBeforeFaulting) {
  const Va va = map_huge(2 * kPmdSize);
  const PhysMem::HugetlbCounts before = counts();
  int owner;
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(make_device_exclusive(*as, va + 3 * kPageSize, &owner).error(), -EOPNOTSUPP);
  }
  // 1. Nothing was faulted: the PMD is still empty and the pool unchanged.
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  EXPECT_EQ(counts().in_use, before.in_use);
  EXPECT_EQ(counts().free, before.free);
  // 2. A page already mapped is refused too, and stays PMD-mapped and writable.
  ASSERT_EQ(cpu::store<uint8_t>(*as, va + kPmdSize, 0x77), 0);
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(make_device_exclusive(*as, va + kPmdSize, &owner).error(), -EOPNOTSUPP);
  }
  PageState st = query_page(*as, va + kPmdSize);
  EXPECT_EQ(st.kind, PageKind::kThpPmd);
  EXPECT_TRUE(st.writable);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 0u);
  // 3. Read-only hugetlb: still -EOPNOTSUPP (the hugetlb check precedes the write check), not
  // -EFAULT, and still nothing faulted.
  ASSERT_EQ(as->mprotect(va, 2 * kPmdSize, PROT_READ), 0);
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(make_device_exclusive(*as, va, &owner).error(), -EOPNOTSUPP);
  }
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  EXPECT_EQ(counts().in_use, before.in_use + 1);
  EXPECT_EQ(*cpu::load<uint8_t>(*as, va + kPmdSize), 0x77);
}

// ---- the same syscall rules on this machine's Linux ----

// One address space behind the calls: the model's, or this process's.
class Sys {
 public:
  virtual ~Sys() = default;
  // mmap's address, or -errno.
  virtual long mmap(Va addr, uint64_t len, int prot, int flags) = 0;
  virtual int munmap(Va va, uint64_t len) = 0;
  virtual int mprotect(Va va, uint64_t len, int prot) = 0;
  virtual int madvise(Va va, uint64_t len, int advice) = 0;
  virtual long mremap(Va va, uint64_t old_len, uint64_t new_len, int flags) = 0;
  virtual int store(Va va, uint8_t b) = 0;
  virtual int load(Va va) = 0;  // the byte, or -errno
};

class ModelSys : public Sys {
 public:
  explicit ModelSys(AddressSpace& as) : as_(as) {}
  long mmap(Va a, uint64_t l, int p, int f) override {
    Result<Va> r = as_.mmap(a, l, p, f);
    return r.ok() ? static_cast<long>(*r) : r.error();
  }
  int munmap(Va v, uint64_t l) override { return as_.munmap(v, l); }
  int mprotect(Va v, uint64_t l, int p) override { return as_.mprotect(v, l, p); }
  int madvise(Va v, uint64_t l, int a) override { return as_.madvise(v, l, a); }
  long mremap(Va v, uint64_t o, uint64_t n, int f) override {
    Result<Va> r = as_.mremap(v, o, n, f);
    return r.ok() ? static_cast<long>(*r) : r.error();
  }
  int store(Va v, uint8_t b) override { return cpu::store<uint8_t>(as_, v, b); }
  int load(Va v) override {
    Result<uint8_t> r = cpu::load<uint8_t>(as_, v);
    return r.ok() ? *r : r.error();
  }

 private:
  AddressSpace& as_;
};

class LinuxSys : public Sys {
 public:
  long mmap(Va a, uint64_t l, int p, int f) override {
    void* r = ::mmap(reinterpret_cast<void*>(a), l, p, f, -1, 0);
    return r == MAP_FAILED ? -errno : reinterpret_cast<long>(r);
  }
  int munmap(Va v, uint64_t l) override { return ::munmap(reinterpret_cast<void*>(v), l) ? -errno : 0; }
  int mprotect(Va v, uint64_t l, int p) override {
    return ::mprotect(reinterpret_cast<void*>(v), l, p) ? -errno : 0;
  }
  int madvise(Va v, uint64_t l, int a) override {
    return ::madvise(reinterpret_cast<void*>(v), l, a) ? -errno : 0;
  }
  long mremap(Va v, uint64_t o, uint64_t n, int f) override {
    void* r = ::mremap(reinterpret_cast<void*>(v), o, n, f);
    return r == MAP_FAILED ? -errno : reinterpret_cast<long>(r);
  }
  int store(Va v, uint8_t b) override {
    *reinterpret_cast<volatile uint8_t*>(v) = b;
    return 0;
  }
  int load(Va v) override { return *reinterpret_cast<volatile uint8_t*>(v); }
};

// The scenario: every result as a number (mmap: 1 for an aligned address, else -errno).
// `pool` is the number of free huge pages both sides start with. Leaves nothing mapped.
std::vector<long> hugetlb_rules(Sys& s, uint64_t pool) {
  std::vector<long> out;
  auto mapped = [](long r) { return r < 0 ? r : (pmd_aligned(static_cast<Va>(r)) ? 1L : 2L); };
  const long a_r = s.mmap(0, 3 * kPmdSize / 2, kRW, kHuge);
  out.push_back(mapped(a_r));
  if (a_r < 0) return out;
  const Va a = static_cast<Va>(a_r);
  out.push_back(s.mprotect(a, 2 * kPmdSize, kRW));  // the length was rounded up to 4 MiB
  out.push_back(s.munmap(a + kPageSize, kPageSize));
  out.push_back(s.munmap(a, kPageSize));
  out.push_back(s.mprotect(a, kPageSize, PROT_READ));
  out.push_back(s.mprotect(a + kPageSize, kPmdSize, PROT_READ));
  out.push_back(s.madvise(a + kPageSize, kPageSize, MADV_DONTNEED));
  out.push_back(s.madvise(a, kPageSize, MADV_DONTNEED));
  out.push_back(s.madvise(a, kPmdSize, MADV_FREE));
  out.push_back(s.madvise(a + kPageSize, kPmdSize, MADV_DONTFORK));
  out.push_back(mapped(s.mmap(a + kPageSize, kPageSize, kRW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED)));
  out.push_back(mapped(s.mmap(a + kPageSize, kPmdSize, kRW, kHuge | MAP_FIXED)));
  // Data: write both huge pages, DONTNEED of the second drops exactly it. (Ranges that reach
  // past the mapping would depend on this process's neighbouring mappings: -ENOMEM or not.)
  out.push_back(s.store(a + kPmdSize + 100, 0x5a));
  out.push_back(s.store(a + 100, 0x11));
  out.push_back(s.load(a + kPmdSize + 100));
  out.push_back(s.madvise(a + kPmdSize, kPmdSize, MADV_DONTNEED));
  out.push_back(s.load(a + kPmdSize + 100));
  out.push_back(s.load(a + 100));
  // Inside the VMA the end is rounded down: only the first huge page goes.
  out.push_back(s.store(a + kPmdSize + 100, 0x5b));
  out.push_back(s.madvise(a, kPmdSize + kPageSize, MADV_DONTNEED));
  out.push_back(s.load(a + 100));
  out.push_back(s.load(a + kPmdSize + 100));
  out.push_back(s.store(a + 100, 0x11));
  out.push_back(s.mprotect(a + kPmdSize, kPmdSize, PROT_READ));
  out.push_back(s.load(a + kPmdSize + 100));
  out.push_back(s.munmap(a + kPmdSize, kPmdSize));
  out.push_back(s.mprotect(a + kPmdSize, kPmdSize, PROT_READ));  // gone: -ENOMEM
  out.push_back(s.load(a + 100));
  // The pool: one page is in use by `a`, so `pool` more pages cannot be reserved.
  const long big = s.mmap(0, pool * kPmdSize, kRW, kHuge);
  out.push_back(mapped(big));
  if (big >= 0) (void)s.munmap(static_cast<Va>(big), pool * kPmdSize);
  const long fits = s.mmap(0, (pool - 1) * kPmdSize, kRW, kHuge);
  out.push_back(mapped(fits));
  if (fits >= 0) (void)s.munmap(static_cast<Va>(fits), (pool - 1) * kPmdSize);
  out.push_back(s.munmap(a, kPmdSize));
  return out;
}

uint64_t meminfo(const char* key) {
  std::ifstream f("/proc/meminfo");
  std::string k;
  uint64_t v;
  while (f >> k >> v) {
    if (k == key) return v;
    f.ignore(1 << 10, '\n');
  }
  return 0;
}

// Makes sure this machine has at least `want` free 2 MiB hugetlb pages for the duration of a
// test and gives back what it added. As root it raises /proc/sys/vm/nr_hugepages by the
// shortfall and, in the destructor, writes the old value back (the kernel frees the pages it
// added once nothing uses them: the scenario unmaps everything first). Several test processes
// may run at once (ctest -j, other worktrees), so the raise-run-restore sequence holds an
// exclusive flock on a file in /tmp: without it two fixtures could each read the other's
// raised value as "old" and leave pages allocated.
class HugetlbPoolGuard {
 public:
  explicit HugetlbPoolGuard(uint64_t want) {
    if (geteuid() != 0) {
      why_not_ = "needs root (hugetlb pages of this machine, /proc/sys/vm/nr_hugepages)";
      return;
    }
    if (meminfo("Hugepagesize:") != 2048) {
      why_not_ = "the default hugetlb page size is not 2 MiB";
      return;
    }
    lock_fd_ = ::open("/tmp/gpusvm-hugetlb-differential.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (lock_fd_ < 0 || ::flock(lock_fd_, LOCK_EX) != 0) {
      why_not_ = std::string("cannot lock /tmp/gpusvm-hugetlb-differential.lock: ") +
                 std::strerror(errno);
      return;
    }
    const uint64_t free_pages = meminfo("HugePages_Free:");
    if (free_pages < want) {
      if (!read_nr(&old_nr_)) {
        why_not_ = "cannot read /proc/sys/vm/nr_hugepages";
        return;
      }
      const uint64_t target = old_nr_ + (want - free_pages);
      if (!write_nr(target)) {
        why_not_ = "cannot write /proc/sys/vm/nr_hugepages: " + std::string(std::strerror(errno));
        return;
      }
      raised_ = true;
    }
    pool_ = meminfo("HugePages_Free:");
    if (pool_ < want) {
      why_not_ = "the kernel could not allocate " + std::to_string(want) +
                 " free 2 MiB hugetlb pages (" + std::to_string(pool_) +
                 " free after raising nr_hugepages; memory too fragmented?)";
    }
  }
  ~HugetlbPoolGuard() {
    if (raised_ && !write_nr(old_nr_))
      ADD_FAILURE() << "could not restore /proc/sys/vm/nr_hugepages to " << old_nr_;
    if (raised_) {
      uint64_t now = 0;
      EXPECT_TRUE(read_nr(&now) && now == old_nr_)
          << "nr_hugepages is " << now << " after restoring " << old_nr_;
    }
    if (lock_fd_ >= 0) ::close(lock_fd_);  // drops the flock
  }
  HugetlbPoolGuard(const HugetlbPoolGuard&) = delete;
  HugetlbPoolGuard& operator=(const HugetlbPoolGuard&) = delete;

  const std::string& why_not() const { return why_not_; }
  uint64_t pool() const { return pool_; }  // free pages now
  bool raised() const { return raised_; }

 private:
  static bool read_nr(uint64_t* out) {
    std::ifstream f("/proc/sys/vm/nr_hugepages");
    return static_cast<bool>(f >> *out);
  }
  static bool write_nr(uint64_t n) {
    std::ofstream f("/proc/sys/vm/nr_hugepages");
    f << n << "\n";
    f.flush();
    return static_cast<bool>(f);
  }
  std::string why_not_;
  int lock_fd_ = -1;
  uint64_t old_nr_ = 0;
  uint64_t pool_ = 0;
  bool raised_ = false;
};

// The scenario needs 4 pages (two for `a`, then pool-exhaustion mappings sized from the free
// count); more are used when the machine already has them free.
TEST(HugetlbDifferential, SyscallRulesMatchLinux) {
  HugetlbPoolGuard guard(4);
  if (!guard.why_not().empty()) GTEST_SKIP() << guard.why_not();
  const uint64_t pool = guard.pool();
  std::printf("hugetlb pool: %llu free 2 MiB pages%s\n", static_cast<unsigned long long>(pool),
              guard.raised() ? " (nr_hugepages raised for this test, restored after)" : "");
  LinuxSys real;
  const std::vector<long> lx = hugetlb_rules(real, pool);
  auto mem = PhysMem::create({.ram_bytes = (pool + 8) * kPmdSize, .hugetlb_pages = pool});
  ASSERT_TRUE(mem.ok());
  auto as = make_as(mem->get());
  ModelSys model(*as);
  const std::vector<long> md = hugetlb_rules(model, pool);
  ASSERT_EQ(md.size(), lx.size());
  for (size_t i = 0; i < lx.size(); i++) EXPECT_EQ(md[i], lx[i]) << "step " << i;
  EXPECT_MM_CHECK_OK(**mem);
  as.reset();
  EXPECT_EQ((*mem)->hugetlb_counts().in_use, 0u);
  EXPECT_EQ((*mem)->hugetlb_counts().reserved, 0u);
}

}  // namespace
}  // namespace gpusvm::mm::testing
