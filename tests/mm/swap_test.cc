// Reclaim and swap (docs/reclaim.md): MADV_PAGEOUT/MADV_COLD, the LRU and shrink_lru, swap
// entries through zap, fork, mremap, mprotect, hmm_range_fault and migration, do_swap_page and
// the swap cache, direct reclaim under a memory limit, fault injection, and the seed 004
// rules for device-exclusive entries on the reclaim path. Every byte written is checked after
// the round trip; every test ends with mm::check and a leak check.
#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/swap.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

// Every byte of a page: a function of (va, generation, offset), so stale or misplaced bytes
// show.
void page_bytes(Va va, uint64_t gen, uint64_t* words) {
  for (unsigned w = 0; w < kPageSize / 8; w++) words[w] = pattern(va + w * 8, gen);
}

void fill_bytes(AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  std::vector<uint64_t> buf(kPageSize / 8);
  for (Va va = start; va < start + len; va += kPageSize) {
    page_bytes(va, gen, buf.data());
    ASSERT_EQ(cpu::copy_in(as, va, buf.data(), kPageSize), 0) << std::hex << va;
  }
}

// Returns the number of pages with a wrong byte.
int verify_bytes(AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  std::vector<uint64_t> want(kPageSize / 8), got(kPageSize / 8);
  int bad = 0;
  for (Va va = start; va < start + len; va += kPageSize) {
    page_bytes(va, gen, want.data());
    const int rc = cpu::copy_out(as, va, got.data(), kPageSize);
    if (rc != 0 || std::memcmp(want.data(), got.data(), kPageSize) != 0) {
      if (bad++ < 5) ADD_FAILURE() << "page " << std::hex << va << " rc " << std::dec << rc;
    }
  }
  return bad;
}

bool is_swap(AddressSpace& as, Va va) {
  const PageState st = query_page(as, va);
  return st.kind == PageKind::kSoftLeaf && st.leaf == SoftLeafType::kSwap;
}

int count_swap(AddressSpace& as, Va start, uint64_t len) {
  int n = 0;
  for (Va va = start; va < start + len; va += kPageSize) n += is_swap(as, va);
  return n;
}

class SwapTest : public MmTest {
 protected:
  void SetUp() override { make(PhysMem::Config{.ram_bytes = 64ULL << 20, .swap_slots = 4096}); }
  void make(PhysMem::Config c) {
    as.reset();
    mem.reset();
    Result<std::unique_ptr<PhysMem>> m = PhysMem::create(c);
    ASSERT_TRUE(m);
    mem = std::move(*m);
    as = make_as(mem.get());
    ASSERT_NE(as, nullptr);
    initial_free = mem->free_pages();
  }
  void TearDown() override {
    MmTest::TearDown();
    // Exit freed every slot too.
    EXPECT_EQ(mem->swap().nr_used(), 0u);
  }
};

constexpr uint64_t kLen = 64 * kPageSize;

// PAGEOUT writes every private page to swap (the PTEs become swap entries, the frames go back),
// a read faults each back in from its slot, byte for byte.
TEST_F(SwapTest, Pageout_ThenRead_EveryByteBack) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  const uint64_t free_before = mem->free_pages();
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 64);
  EXPECT_EQ(mem->stat_pswpout.get(), 64u);
  EXPECT_EQ(mem->swap().nr_used(), 64u);
  EXPECT_EQ(mem->free_pages(), free_before + 64);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
  EXPECT_EQ(mem->stat_pswpin.get(), 64u);
  EXPECT_EQ(as->stats().faults_swapin.get(), 64u);
  EXPECT_EQ(count_swap(*as, va, kLen), 0);
}

// A read fault maps the page read-only and keeps it in the swap cache with its slot: a second
// PAGEOUT drops it without writing (clean), a write makes it dirty and the next PAGEOUT writes.
TEST_F(SwapTest, SwapCache_CleanPageDroppedWithoutWrite_DirtyPageWritten) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  ASSERT_EQ(verify_bytes(*as, va, kLen, 1), 0);
  const PageState st = query_page(*as, va);
  EXPECT_FALSE(st.writable) << "a read swap-in maps read-only";
  EXPECT_TRUE(st.anon_exclusive);
  EXPECT_EQ(st.refcount, 2) << "mapping + swap cache";
  EXPECT_EQ(mem->swap().nr_used(), 64u) << "slots kept for the cached pages";
  EXPECT_MM_CHECK_OK(*mem);

  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 64);
  EXPECT_EQ(mem->stat_pswpout.get(), 64u) << "clean swap-cache pages are not written again";
  EXPECT_EQ(mem->stat_reclaim_clean.get(), 64u);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);

  // Write half the pages (reuse in place: exclusive), PAGEOUT: only those are written.
  fill_bytes(*as, va, kLen / 2, 2);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(mem->stat_pswpout.get(), 64u + 32u);
  EXPECT_EQ(verify_bytes(*as, va, kLen / 2, 2), 0);
  EXPECT_EQ(verify_bytes(*as, va + kLen / 2, kLen / 2, 1), 0);
}

// A write fault on a swap entry that only this mapping names takes the page exclusively and
// writable, and frees the slot (its bytes would go stale).
TEST_F(SwapTest, WriteFault_LastEntry_WritableAndSlotFreed) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  ASSERT_TRUE(is_swap(*as, va));
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 8, 77), 0);
  const PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_TRUE(st.writable);
  EXPECT_EQ(st.refcount, 1) << "out of the swap cache";
  EXPECT_EQ(mem->swap().nr_used(), 0u);
  std::vector<uint64_t> want(kPageSize / 8), got(kPageSize / 8);
  page_bytes(va, 1, want.data());
  want[1] = 77;
  ASSERT_EQ(cpu::copy_out(*as, va, got.data(), kPageSize), 0);
  EXPECT_EQ(std::memcmp(want.data(), got.data(), kPageSize), 0);
}

// fork duplicates swap entries (slot count 2, checked by mm::check); the first swap-in reads
// the slot, the other process finds the folio in the swap cache and shares it read-only; a
// write then copies (COW); exit of either side frees its entries.
TEST_F(SwapTest, Fork_SwapEntriesShared_OneReadCowOnWrite) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child);
  EXPECT_EQ(count_swap(**child, va, kLen), 64);
  EXPECT_MM_CHECK_OK(*mem);  // counts 2 per slot
  EXPECT_EQ(verify_bytes(**child, va, kLen, 1), 0);
  EXPECT_EQ(mem->stat_pswpin.get(), 64u);
  EXPECT_FALSE(query_page(**child, va).anon_exclusive) << "a shared slot is not exclusive";
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
  EXPECT_EQ(mem->stat_pswpin.get(), 64u) << "the parent found the child's folios in the swap cache";
  EXPECT_EQ(query_page(*as, va).pfn, query_page(**child, va).pfn);
  EXPECT_MM_CHECK_OK(*mem);
  fill_bytes(**child, va, kLen, 2);  // COW: the parent keeps generation 1
  EXPECT_NE(query_page(*as, va).pfn, query_page(**child, va).pfn);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
  EXPECT_EQ(verify_bytes(**child, va, kLen, 2), 0);
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
}

// Exit and munmap of swap entries free their slots (zap: free_swap_and_cache); a child's exit
// leaves the parent's count.
TEST_F(SwapTest, Zap_SwapEntries_FreeSlots) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  {
    Result<std::unique_ptr<AddressSpace>> child = as->fork();
    ASSERT_TRUE(child);
  }
  EXPECT_EQ(mem->swap().nr_used(), 64u);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->madvise(va, kLen / 2, MADV_DONTNEED), 0);
  EXPECT_EQ(mem->swap().nr_used(), 32u);
  ASSERT_EQ(as->munmap(va + kLen / 2, kLen / 4), 0);
  EXPECT_EQ(mem->swap().nr_used(), 16u);
  EXPECT_EQ(verify_bytes(*as, va + 3 * kLen / 4, kLen / 4, 1), 0);
  Result<uint64_t> zero = cpu::load<uint64_t>(*as, va);
  ASSERT_TRUE(zero);
  EXPECT_EQ(*zero, 0u);
}

// free_swap_and_cache: the last swap entry of a slot whose cached folio nobody maps drops the
// folio from the swap cache (trylock under the PTL), and the folio is freed.
//   1. PAGEOUT, fork: slot count 2.   2. child reads: folio cached, mapped by the child, count 1.
//   3. child MADV_DONTNEED: folio cached, unmapped, count 1 (the parent's entry names it).
//   4. parent munmap: count 0, folio unmapped: it leaves the cache, the frame is free.
TEST_F(SwapTest, Zap_LastEntryOfUnmappedCachedFolio_DropsItFromCache) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child);
  EXPECT_EQ(verify_bytes(**child, va, kPageSize, 1), 0);
  const uint64_t free_mapped = mem->free_pages();
  ASSERT_EQ((*child)->madvise(va, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(mem->free_pages(), free_mapped) << "still cached: the parent's entry names it";
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->munmap(va, kPageSize), 0);
  EXPECT_EQ(mem->free_pages(), free_mapped + 1) << "dropped from the swap cache and freed";
  EXPECT_EQ(mem->swap().nr_used(), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

// mremap moves swap entries (the count stays); mprotect leaves them; the data follows.
TEST_F(SwapTest, MremapMovesAndMprotectKeepsSwapEntries) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  ASSERT_EQ(as->mprotect(va, kLen, PROT_READ), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 64);
  ASSERT_EQ(as->mprotect(va, kLen, PROT_READ | PROT_WRITE), 0);
  Result<Va> moved = as->mremap(va, kLen, kLen, MREMAP_MAYMOVE | MREMAP_FIXED, va + 64 * kLen);
  ASSERT_TRUE(moved);
  EXPECT_EQ(count_swap(*as, *moved, kLen), 64);
  EXPECT_EQ(mem->swap().nr_used(), 64u);
  EXPECT_MM_CHECK_OK(*mem);
  std::vector<uint64_t> want(kPageSize / 8), got(kPageSize / 8);
  for (uint64_t i = 0; i < 64; i++) {
    page_bytes(va + i * kPageSize, 1, want.data());
    ASSERT_EQ(cpu::copy_out(*as, *moved + i * kPageSize, got.data(), kPageSize), 0);
    EXPECT_EQ(std::memcmp(want.data(), got.data(), kPageSize), 0) << i;
  }
}

// MADV_PAGEOUT skips what Linux's walk skips: pages another process maps (fork-shared), shared
// mappings (shmem), non-present entries; it splits an exclusive THP and swaps its pages out.
TEST_F(SwapTest, Pageout_SkipsSharedPages_SplitsExclusiveThp) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 0) << "fork-shared pages stay";
  child->reset();
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 64) << "exclusive again after the child's exit";

  Result<Va> shm = as->mmap(0, kLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(shm);
  fill_bytes(*as, *shm, kLen, 3);
  ASSERT_EQ(as->madvise(*shm, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, *shm, kLen), 0) << "shmem pageout is not modelled";

  Result<Va> thp = as->mmap(0, 2 * kPmdSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(thp);
  const Va h = pmd_align_up(*thp);
  ASSERT_EQ(as->madvise(h, kPmdSize, MADV_HUGEPAGE), 0);
  fill_bytes(*as, h, kPmdSize, 4);
  ASSERT_EQ(query_page(*as, h).kind, PageKind::kThpPmd);
  ASSERT_EQ(as->madvise(h, kPmdSize, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, h, kPmdSize), 512);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, h, kPmdSize, 4), 0);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
  EXPECT_EQ(verify_bytes(*as, *shm, kLen, 3), 0);
}

// Lazily freed clean pages are discarded instead of swapped; one written after MADV_FREE is
// live again: try_to_unmap finds it dirty, the discard is abandoned (Linux: folio_set_swapbacked,
// activate), and the next PAGEOUT swaps it out with its new bytes.
TEST_F(SwapTest, Lazyfree_CleanDiscarded_RedirtiedSwapped) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_FREE), 0);
  fill_bytes(*as, va, kPageSize, 2);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(mem->stat_reclaim_lazyfree.get(), 63u);
  EXPECT_EQ(mem->stat_pswpout.get(), 0u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall) << "redirtied: not discarded";
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 2), 0);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  EXPECT_EQ(mem->stat_pswpout.get(), 1u) << "a normal anonymous page again";
  EXPECT_TRUE(is_swap(*as, va));
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kNone) << "discarded";
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 2), 0);
  for (Va p = va + kPageSize; p < va + kLen; p += kPageSize) {
    Result<uint64_t> v = cpu::load<uint64_t>(*as, p);
    ASSERT_TRUE(v);
    ASSERT_EQ(*v, 0u) << "a discarded lazyfree page reads as zero";
  }
}

// A lazily freed page with a GUP reference (direct I/O in flight) is not discarded: the I/O may
// still write into it.
TEST_F(SwapTest, Lazyfree_GupReference_NotDiscarded) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_FREE), 0);
  Folio* pages[1] = {};
  ASSERT_EQ(get_user_pages_fast(*as, va, 1, 0, pages), 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall) << "kept while referenced";
  EXPECT_EQ(mem->stat_reclaim_lazyfree.get(), 0u);
  put_page(pages[0]);
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 1), 0);
}

// No swap device: anonymous pages cannot be reclaimed, PAGEOUT leaves them.
TEST_F(SwapTest, NoSwap_PageoutKeepsAnonPages) {
  make(PhysMem::Config{.ram_bytes = 64ULL << 20, .swap_slots = 0});
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 0);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
}

// Bad input: MADV_PAGEOUT/COLD on hugetlb is -EINVAL (can_madv_lru_vma), a hole -ENOMEM after
// the mapped part was done; nothing else changes.
TEST_F(SwapTest, Pageout_BadInput) {
  Result<Va> h = as->mmap(0, kPmdSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_TRUE(h);
  ASSERT_EQ(cpu::store<uint64_t>(*as, *h, 5), 0);
  EXPECT_EQ(as->madvise(*h, kPmdSize, MADV_PAGEOUT), -EINVAL);
  EXPECT_EQ(as->madvise(*h, kPmdSize, MADV_COLD), -EINVAL);
  EXPECT_EQ(as->madvise(*h + 1, kPageSize, MADV_PAGEOUT), -EINVAL);
  const Va va = map_anon(*as, 2 * kPageSize);
  fill_bytes(*as, va, 2 * kPageSize, 1);
  ASSERT_EQ(as->munmap(va + kPageSize, kPageSize), 0);
  EXPECT_EQ(as->madvise(va, 2 * kPageSize, MADV_PAGEOUT), -ENOMEM);
  EXPECT_TRUE(is_swap(*as, va)) << "the mapped part was paged out";
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 1), 0);
  Result<uint64_t> v = cpu::load<uint64_t>(*as, *h);
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, 5u);
}

// MADV_COLD ages without reclaiming: PTEs old, folios on the inactive list; shrink_lru then
// reclaims them first (they need no second look).
TEST_F(SwapTest, Cold_DeactivatesThenShrinkReclaims) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  EXPECT_EQ(mem->lru_counts().inactive, 64u) << "new anonymous folios start inactive";
  ASSERT_EQ(as->madvise(va, kLen, MADV_COLD), 0);
  EXPECT_EQ(count_swap(*as, va, kLen), 0);
  EXPECT_EQ(mem->lru_counts().inactive, 64u);
  EXPECT_EQ(mem->shrink_lru(64), 64u);
  EXPECT_EQ(count_swap(*as, va, kLen), 64);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
}

// LRU aging, batch by batch (32 folios, oldest first). Pages A = [0, 32), B = [32, 64),
// faulted in that order, all young:
//   shrink_lru(1): A kept (young: referenced, made old), B kept likewise, A again: old and
//                  not used since: reclaimed (the whole batch: 32).
//   touch B1 = [32, 48)
//   shrink_lru(16): B1 referenced a second time: activated; B2 = [48, 64) unused: reclaimed.
TEST_F(SwapTest, ShrinkLru_ReferencedPagesActivated_UnusedReclaimed) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  EXPECT_EQ(mem->shrink_lru(1), 32u);
  EXPECT_EQ(count_swap(*as, va, kLen / 2), 32) << "the oldest batch went";
  EXPECT_EQ(count_swap(*as, va + kLen / 2, kLen / 2), 0);
  EXPECT_EQ(verify_bytes(*as, va + kLen / 2, kLen / 4, 1), 0);  // touch B1
  EXPECT_EQ(mem->shrink_lru(16), 16u);
  EXPECT_EQ(count_swap(*as, va + kLen / 2, kLen / 4), 0) << "used pages stay";
  EXPECT_EQ(count_swap(*as, va + 3 * kLen / 4, kLen / 4), 16) << "unused pages go";
  EXPECT_EQ(mem->lru_counts().active, 16u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
}

// hmm_range_fault: a snapshot reports a swapped page as nothing (0, as for any non-present
// entry), HMM_PFN_REQ_FAULT swaps it in (handle_mm_fault -> do_swap_page).
TEST_F(SwapTest, HmmRangeFault_SwapEntry_SnapshotZero_FaultSwapsIn) {
  const Va va = map_anon(*as, kLen);
  fill_bytes(*as, va, kLen, 1);
  ASSERT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kLen, &mirror), 0);
  std::vector<uint64_t> pfns;
  ASSERT_EQ(mirror_range(*as, n, va, va + kLen, 0, pfns), 0);
  for (uint64_t p : pfns) EXPECT_EQ(p & HMM_PFN_VALID, 0u);
  EXPECT_EQ(count_swap(*as, va, kLen), 64) << "a snapshot faults nothing";
  ASSERT_EQ(mirror_range(*as, n, va, va + kLen, HMM_PFN_REQ_FAULT, pfns), 0);
  for (uint64_t i = 0; i < 64; i++) {
    EXPECT_TRUE(pfns[i] & HMM_PFN_VALID) << i;
    EXPECT_EQ(pfns[i] & ~HMM_PFN_FLAGS, query_page(*as, va + i * kPageSize).pfn);
  }
  EXPECT_EQ(mem->stat_pswpin.get(), 64u);
  n.remove();
  EXPECT_EQ(verify_bytes(*as, va, kLen, 1), 0);
}

// GUP (pin_user_pages through make_device_exclusive's fault, and plain GUP) faults swap
// entries in; a pinned page is not reclaimed.
TEST_F(SwapTest, Gup_FaultsSwapIn_PinnedPageNotReclaimed) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  Folio* pages[1] = {};
  ASSERT_EQ(pin_user_pages_fast(*as, va, 1, FOLL_WRITE, pages), 1);
  EXPECT_FALSE(is_swap(*as, va));
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  EXPECT_FALSE(is_swap(*as, va)) << "a pinned page cannot be swapped out";
  unpin_user_pages(pages, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  EXPECT_TRUE(is_swap(*as, va));
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 1), 0);
}

// Direct reclaim: with a memory limit below the working set, faults reclaim the oldest pages
// to swap and every byte survives; without swap the same load ends in OOM (-ENOMEM).
TEST_F(SwapTest, MemoryLimit_DirectReclaimSwapsOut) {
  make(PhysMem::Config{.ram_bytes = 64ULL << 20, .thp = ThpMode::kNever, .swap_slots = 1024,
                       .memory_limit_pages = 96});
  const uint64_t len = 256 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  EXPECT_LE(mem->used_pages(), 96u);
  EXPECT_GT(mem->stat_direct_reclaim.get(), 0u);
  EXPECT_GE(count_swap(*as, va, len), 256 - 96);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, len, 1), 0);  // swap-ins reclaim others in turn
  EXPECT_LE(mem->used_pages(), 96u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(SwapTest, MemoryLimit_NoSwap_Oom) {
  make(PhysMem::Config{.ram_bytes = 64ULL << 20, .thp = ThpMode::kNever, .swap_slots = 0,
                       .memory_limit_pages = 32});
  const Va va = map_anon(*as, 64 * kPageSize);
  int rc = 0;
  uint64_t written = 0;
  for (; written < 64 && rc == 0; written++) rc = cpu::store<uint64_t>(*as, va + written * kPageSize, written + 1);
  EXPECT_EQ(rc, -ENOMEM);
  EXPECT_EQ(mem->used_pages(), 32u);
  for (uint64_t i = 0; i + 1 < written; i++) {
    Result<uint64_t> v = cpu::load<uint64_t>(*as, va + i * kPageSize);
    ASSERT_TRUE(v);
    EXPECT_EQ(*v, i + 1);
  }
}

// Fault injection: a failed slot allocation leaves the page mapped; a failed folio allocation
// on swap-in fails the access with -ENOMEM and leaves the swap entry (and its count) as it
// was; the next access succeeds.
TEST_F(SwapTest, FaultInjection_SlotAllocAndSwapinAlloc_RollBack) {
  const Va va = map_anon(*as, 2 * kPageSize);
  fill_bytes(*as, va, 2 * kPageSize, 1);
  {
    fault_inject::ScopedArm arm("mm.swap_alloc_slot", {.nth = 1, .times = 1});
    ASSERT_EQ(as->madvise(va, 2 * kPageSize, MADV_PAGEOUT), 0);
  }
  EXPECT_FALSE(is_swap(*as, va)) << "slot allocation failed: the page stays";
  EXPECT_TRUE(is_swap(*as, va + kPageSize));
  EXPECT_MM_CHECK_OK(*mem);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 1, .times = 1});
    Result<uint64_t> v = cpu::load<uint64_t>(*as, va + kPageSize);
    EXPECT_FALSE(v);
    if (!v) EXPECT_EQ(v.error(), -ENOMEM);
  }
  EXPECT_TRUE(is_swap(*as, va + kPageSize));
  EXPECT_EQ(mem->swap().nr_used(), 1u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_bytes(*as, va, 2 * kPageSize, 1), 0);
}

// Many threads fault the same swapped pages at once: each page is read from its slot once
// (the others find the folio in the swap cache or wait on its lock), every byte is right.
TEST_F(SwapTest, ConcurrentSwapin_SamePages_ReadOnce) {
  const uint64_t len = 256 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  ASSERT_EQ(as->madvise(va, len, MADV_PAGEOUT), 0);
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; t++) {
    threads.emplace_back([&, t] {
      std::vector<uint64_t> want(kPageSize / 8), got(kPageSize / 8);
      for (uint64_t i = 0; i < 256; i++) {
        const Va p = va + ((i * 7 + t * 64) % 256) * kPageSize;
        page_bytes(p, 1, want.data());
        if (cpu::copy_out(*as, p, got.data(), kPageSize) != 0 ||
            std::memcmp(want.data(), got.data(), kPageSize) != 0) {
          bad++;
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(mem->stat_pswpin.get(), 256u);
  EXPECT_MM_CHECK_OK(*mem);
}

// Reclaim racing CPU writers (seeded): one thread shrinks the LRU in a loop while two write
// generations into their halves; the last generation of every page survives.
TEST_F(SwapTest, ConcurrentReclaimAndWrites_Seeded) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const uint64_t len = 128 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  std::atomic<bool> stop{false};
  std::thread reclaimer([&] {
    while (!stop.load()) (void)mem->shrink_lru(16);
  });
  std::vector<std::thread> writers;
  std::vector<uint64_t> last(128, 1);
  for (int w = 0; w < 2; w++) {
    writers.emplace_back([&, w] {
      std::mt19937_64 rng(seed + w);
      for (int i = 0; i < 400; i++) {
        const uint64_t page = w * 64 + rng() % 64;
        const uint64_t gen = last[page] + 1;
        std::vector<uint64_t> buf(kPageSize / 8);
        page_bytes(va + page * kPageSize, gen, buf.data());
        ASSERT_EQ(cpu::copy_in(*as, va + page * kPageSize, buf.data(), kPageSize), 0);
        last[page] = gen;
        if (i % 50 == 0) (void)as->madvise(va + page * kPageSize, kPageSize, MADV_PAGEOUT);
      }
    });
  }
  for (std::thread& th : writers) th.join();
  stop = true;
  reclaimer.join();
  EXPECT_MM_CHECK_OK(*mem);
  for (uint64_t p = 0; p < 128; p++) {
    ASSERT_EQ(verify_bytes(*as, va + p * kPageSize, kPageSize, last[p]), 0) << p;
  }
}

// The window between try_to_unmap and __remove_mapping, replayed: a CPU fault finds the swap
// entry and the folio in the swap cache, locked by reclaim, and waits; reclaim then sees the
// fault's reference and keeps the folio cached; the fault maps that folio without reading the
// slot.
//
//   reclaim (thread R)                        CPU reader (thread C)
//   1. add_to_swap, try_to_unmap: swap PTE
//      stop at mm.vmscan.unmapped (folio locked)
//                                             2. fault: swap entry, cache hit (ref taken),
//                                                trylock fails: stop at mm.fault.swap_cache_busy
//   3. released: writes the slot, remove_mapping
//      fails (refcount 3), folio stays cached,
//      unlocked
//                                             4. released: waits for the unlock, retries,
//                                                maps the cached folio (no slot read)
TEST_F(SwapTest, Race_FaultDuringReclaim_SwapCacheHit) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  sched_point::Pause unmapped("mm.vmscan.unmapped");
  std::thread r([&] { ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0); });
  ASSERT_TRUE(unmapped.wait_reached());
  ASSERT_TRUE(is_swap(*as, va));
  sched_point::Pause busy("mm.fault.swap_cache_busy");
  std::atomic<int> bad{-1};
  std::thread c([&] { bad = verify_bytes(*as, va, kPageSize, 1); });
  ASSERT_TRUE(busy.wait_reached());
  unmapped.release();
  r.join();
  EXPECT_EQ(mem->stat_pswpout.get(), 1u);
  EXPECT_TRUE(is_swap(*as, va)) << "the entry stays until the fault maps the cached folio";
  busy.release();
  c.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(mem->stat_pswpin.get(), 0u) << "mapped from the swap cache, not read from the slot";
  EXPECT_EQ(query_page(*as, va).refcount, 2) << "mapped and still cached";
  EXPECT_MM_CHECK_OK(*mem);
}

// ---- seed 004 on the reclaim path ----

// A mirror that records the invalidations it gets and their owners.
class OwnerMirror : public MmuIntervalNotifierOps {
 public:
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& range, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock);
    n->set_seq(cur_seq);
    events.push_back({range.event, range.owner});
    return true;
  }
  int count(MmuNotifyEvent e, const void* owner) {
    std::lock_guard<std::mutex> g(lock);
    int k = 0;
    for (auto& ev : events) k += ev.first == e && ev.second == owner;
    return k;
  }
  std::mutex lock;
  std::vector<std::pair<MmuNotifyEvent, const void*>> events;
};

char kDevice;

// Seed 004 (folio_referenced_one, try_to_unmap_one): a device-exclusive page is reclaimable.
// folio_referenced skips the entry (no CPU accessed bit; left untouched), so the LRU scan
// reclaims it; try_to_unmap handles the entry like a present PTE, and the device loses its
// access through the CLEAR invalidation (owner none). The CPU reads it back from swap.
TEST_F(SwapTest, Seed004_DeviceExclusivePage_ReclaimedThroughLru) {
  const Va va = map_anon(*as, kPageSize);
  fill_bytes(*as, va, kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_COLD), 0);  // old, inactive, not referenced
  OwnerMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPageSize, &mirror), 0);
  {
    ReadLock g(&as->mmap_lock());
    Result<Folio*> page = make_device_exclusive(*as, va, &kDevice);
    ASSERT_TRUE(page);
    folio_unlock((*page)->head());
    (*page)->head()->put();
  }
  ASSERT_EQ(query_page(*as, va).leaf, SoftLeafType::kDeviceExclusive);
  // MADV_PAGEOUT does not see it (only present PTEs are walked, as in Linux).
  ASSERT_EQ(as->madvise(va, kPageSize, MADV_PAGEOUT), 0);
  ASSERT_EQ(query_page(*as, va).leaf, SoftLeafType::kDeviceExclusive);
  const int clears_before = mirror.count(MmuNotifyEvent::kClear, nullptr);
  EXPECT_EQ(mem->shrink_lru(1), 1u);
  EXPECT_TRUE(is_swap(*as, va)) << "the device-exclusive page was swapped out";
  EXPECT_EQ(mirror.count(MmuNotifyEvent::kClear, nullptr), clears_before + 1)
      << "the device learns through a CLEAR invalidation";
  EXPECT_EQ(mem->stat_pswpout.get(), 1u) << "written: the entry's folio was dirty";
  EXPECT_MM_CHECK_OK(*mem);
  n.remove();
  EXPECT_EQ(verify_bytes(*as, va, kPageSize, 1), 0);
}

}  // namespace
}  // namespace gpusvm::mm::testing
