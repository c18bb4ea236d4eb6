// mmap, munmap, mprotect, madvise, mremap, fork and exit: page state and data after each.
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using SyscallTest = MmTest;

TEST_F(SyscallTest, MmapPlacesHintedFixedAndAlignedMappings) {
  Result<Va> a = as->mmap(0x200000000, 3 * kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, 0x200000000u);  // a free hint is honoured
  Result<Va> b = as->mmap(0x200000000, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(b.ok());
  EXPECT_NE(*b, 0x200000000u);  // an occupied hint is not
  Result<Va> c = as->mmap(0, 4 * kPmdSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(pmd_aligned(*c));  // whole-2 MiB anonymous mappings are THP-aligned
  EXPECT_EQ(as->mmap(*a, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE).error(),
            -EEXIST);
  // MAP_FIXED replaces what was there, contents included.
  ASSERT_EQ(as->mmap(*a, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).error(), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, *a, 5), 0);
  ASSERT_TRUE(as->mmap(*a, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).ok());
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *a), 0u);
}

TEST_F(SyscallTest, MmapPopulatePrefaults) {
  Result<Va> a = as->mmap(0, 8 * kPageSize, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE);
  ASSERT_TRUE(a.ok());
  for (int i = 0; i < 8; i++) EXPECT_EQ(query_page(*as, *a + i * kPageSize).kind, PageKind::kSmall);
  Result<Va> r = as->mmap(0, 2 * kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(query_page(*as, *r).kind, PageKind::kZeroPage);
}

TEST_F(SyscallTest, MunmapPartOfThpSplitsPmdAndKeepsData) {
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, 2 * kPmdSize, 1);
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  ASSERT_EQ(as->munmap(va + 16 * kPageSize, 4 * kPageSize), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPte);
  EXPECT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kThpPmd);
  EXPECT_EQ(cpu::load<uint64_t>(*as, va + 17 * kPageSize).error(), -EFAULT);
  EXPECT_EQ(verify_pages(*as, va, 16 * kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va + 20 * kPageSize, 2 * kPmdSize - 20 * kPageSize, 1), 0);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 1u);
  EXPECT_EQ(mem->deferred_split_count(), 1u);  // the partly unmapped THP waits for a split
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->munmap(va, 2 * kPmdSize), 0);
  EXPECT_EQ(mem->deferred_split_count(), 0u);
  EXPECT_EQ(mem->free_pages(), initial_free);
}

TEST_F(SyscallTest, MprotectPartOfThpSplitsAndProtects) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, kPmdSize, 2);
  ASSERT_EQ(as->mprotect(va + kPageSize, kPageSize, PROT_READ), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPte);
  EXPECT_TRUE(query_page(*as, va).writable);
  EXPECT_FALSE(query_page(*as, va + kPageSize).writable);
  EXPECT_EQ(cpu::store<uint64_t>(*as, va + kPageSize, 0), -EFAULT);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 2), 0);
  // Write access back: an exclusive page becomes writable without a fault.
  ASSERT_EQ(as->mprotect(va + kPageSize, kPageSize, PROT_READ | PROT_WRITE), 0);
  EXPECT_TRUE(query_page(*as, va + kPageSize).writable);
  ASSERT_EQ(as->mprotect(va, kPmdSize, PROT_NONE), 0);
  EXPECT_EQ(cpu::load<uint64_t>(*as, va).error(), -EFAULT);
  ASSERT_EQ(as->mprotect(va, kPmdSize, PROT_READ), 0);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 2), 0);
  EXPECT_EQ(as->mprotect(va, 2 * kPmdSize, PROT_READ), -ENOMEM);  // hole: nothing changes
  EXPECT_EQ(as->mprotect(va + 1, kPageSize, PROT_READ), -EINVAL);
  EXPECT_EQ(as->mprotect(va, kPageSize, 0x100), -EINVAL);
}

TEST_F(SyscallTest, MadviseDontneedZeroesAndFreeMarksClean) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 3);
  ASSERT_EQ(as->madvise(va + 2 * kPageSize, 2 * kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(query_page(*as, va + 2 * kPageSize).kind, PageKind::kNone);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 2 * kPageSize), 0u);
  EXPECT_EQ(verify_pages(*as, va, 2 * kPageSize, 3), 0);
  ASSERT_EQ(as->madvise(va + 4 * kPageSize, kPageSize, MADV_FREE), 0);
  PageState st = query_page(*as, va + 4 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_FALSE(st.dirty);
  EXPECT_EQ(verify_pages(*as, va + 4 * kPageSize, kPageSize, 3), 0);
  EXPECT_EQ(as->madvise(va, kPageSize, 12345), -EINVAL);
  EXPECT_EQ(as->madvise(va + 1, kPageSize, MADV_DONTNEED), -EINVAL);
  EXPECT_EQ(as->madvise(va, 64 * kPageSize, MADV_DONTNEED), -ENOMEM);  // hole after the VMA
}

// Linux splits the folio itself when MADV_FREE covers part of an exclusively mapped THP; since
// 6.12 the split maps all-zero subpages to the shared zero page and frees them.
TEST_F(SyscallTest, MadviseFreeOfPartThpSplitsFolioAndRemapsZeroPages) {
  TestMirror mirror;
  MmuIntervalNotifier n;
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  ASSERT_EQ(n.insert(as.get(), va, kPmdSize, &mirror), 0);
  fill_pages(*as, va, kPmdSize / 2, 14);  // second half stays zero
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  ASSERT_EQ(as->madvise(va + 4 * kPageSize, 2 * kPageSize, MADV_FREE), 0);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  for (uint64_t p = 0; p < kPagesPerPmd; p++) {
    PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, p < kPagesPerPmd / 2 ? PageKind::kSmall : PageKind::kZeroPage) << p;
  }
  EXPECT_FALSE(query_page(*as, va + 4 * kPageSize).dirty);  // lazily freeable now
  EXPECT_TRUE(query_page(*as, va + 3 * kPageSize).dirty);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize / 2, 14), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPmdSize - kPageSize), 0u);
  EXPECT_EQ(mem->free_pages(), initial_free - kPagesPerPmd / 2);  // the zero half was freed
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kClear));
  EXPECT_MM_CHECK_OK(*mem);
  // A folio another process maps is not split.
  Va va2 = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va2, kPmdSize, 15);
  ASSERT_EQ(as->madvise(va2, kPageSize, MADV_DONTNEED), 0);  // PTE-mapped now
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  ASSERT_EQ(as->madvise(va2 + 8 * kPageSize, kPageSize, MADV_FREE), 0);
  EXPECT_EQ(query_page(*as, va2 + 8 * kPageSize).kind, PageKind::kThpPte);
  EXPECT_EQ(as->stats().thp_split_folio.get(), 1u);
  n.remove();
}

TEST_F(SyscallTest, MadviseDontneedOfWholeAndPartThp) {
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, 2 * kPmdSize, 4);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  ASSERT_EQ(as->madvise(va + kPmdSize, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kNone);
  EXPECT_EQ(query_page(*as, va + kPmdSize + kPageSize).kind, PageKind::kThpPte);
  EXPECT_EQ(verify_pages(*as, va + kPmdSize + kPageSize, kPmdSize - kPageSize, 4), 0);
}

TEST_F(SyscallTest, MadviseHugepageFlagsAndCollapse) {
  Va va = map_anon(*as, 2 * kPmdSize);
  ASSERT_TRUE(pmd_aligned(va));
  fill_pages(*as, va, kPmdSize / 2, 5);  // 4 KiB pages (no hint yet)
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize / 2, 5), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPmdSize - kPageSize), 0u);
  EXPECT_EQ(as->stats().thp_collapse.get(), 1u);
  EXPECT_EQ(as->madvise(va + kPmdSize, kPmdSize, MADV_COLLAPSE), -EINVAL);  // nothing there
  ASSERT_EQ(as->madvise(va + kPmdSize, kPmdSize, MADV_HUGEPAGE), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize, 1), 0);
  EXPECT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kThpPmd);
  ASSERT_EQ(as->madvise(va, 2 * kPmdSize, MADV_NOHUGEPAGE), 0);
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), -EINVAL);
}

TEST_F(SyscallTest, MremapMovesGrowsAndShrinks) {
  Va va = map_anon(*as, 8 * kPageSize);
  fill_pages(*as, va, 8 * kPageSize, 6);
  // Shrink in place.
  Result<Va> s = as->mremap(va, 8 * kPageSize, 6 * kPageSize, 0);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, va);
  EXPECT_EQ(cpu::load<uint64_t>(*as, va + 7 * kPageSize).error(), -EFAULT);
  // Grow in place (space above is free).
  Result<Va> g = as->mremap(va, 6 * kPageSize, 8 * kPageSize, 0);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(*g, va);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 7 * kPageSize), 0u);
  // Move to a fixed place.
  const Va dst = 0x300000000;
  Result<Va> m = as->mremap(va, 6 * kPageSize, 6 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(*m, dst);
  EXPECT_EQ(verify_pages(*as, dst, 6 * kPageSize, 6, va), 0);
  EXPECT_EQ(cpu::load<uint64_t>(*as, va).error(), -EFAULT);
  EXPECT_MM_CHECK_OK(*mem);
  // Errors.
  EXPECT_EQ(as->mremap(dst, kPageSize, 2 * kPageSize, MREMAP_FIXED, dst + kPmdSize).error(), -EINVAL);
  EXPECT_EQ(as->mremap(dst, kPageSize, kPageSize, 0x40).error(), -EINVAL);
  EXPECT_EQ(as->mremap(0x10000000, kPageSize, kPageSize, 0).error(), -EFAULT);
  EXPECT_EQ(as->mremap(dst, kPageSize, 2 * kPageSize, MREMAP_DONTUNMAP | MREMAP_MAYMOVE).error(), -EINVAL);
}

TEST_F(SyscallTest, MremapOfThpKeepsPmdWhenAlignedAndSplitsWhenNot) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, kPmdSize, 7);
  const Va aligned = 0x400000000;
  ASSERT_TRUE(as->mremap(va, kPmdSize, kPmdSize, MREMAP_MAYMOVE | MREMAP_FIXED, aligned).ok());
  EXPECT_EQ(query_page(*as, aligned).kind, PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(*as, aligned, kPmdSize, 7, va), 0);
  const Va unaligned = 0x500000000 + 3 * kPageSize;
  ASSERT_TRUE(as->mremap(aligned, kPmdSize, kPmdSize, MREMAP_MAYMOVE | MREMAP_FIXED, unaligned).ok());
  EXPECT_EQ(query_page(*as, unaligned).kind, PageKind::kThpPte);
  EXPECT_EQ(verify_pages(*as, unaligned, kPmdSize, 7, va), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(SyscallTest, MremapDontunmapLeavesEmptySource) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 8);
  Result<Va> m = as->mremap(va, 4 * kPageSize, 4 * kPageSize, MREMAP_MAYMOVE | MREMAP_DONTUNMAP);
  ASSERT_TRUE(m.ok());
  EXPECT_NE(*m, va);
  EXPECT_EQ(verify_pages(*as, *m, 4 * kPageSize, 8, va), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u);  // still mapped, now empty
}

TEST_F(SyscallTest, ForkSharesCopyOnWrite) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 9);
  const uint64_t before = mem->free_pages();
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  AddressSpace& c = **child;
  EXPECT_EQ(mem->free_pages(), before);  // nothing copied yet
  PageState ps = query_page(*as, va), cs = query_page(c, va);
  EXPECT_EQ(ps.pfn, cs.pfn);
  EXPECT_FALSE(ps.writable);
  EXPECT_FALSE(cs.writable);
  EXPECT_EQ(ps.mapcount, 2);
  EXPECT_MM_CHECK_OK(*mem);
  // The child writes: it gets its own copy; the parent keeps the old data.
  ASSERT_EQ(cpu::store<uint64_t>(c, va, 1234), 0);
  EXPECT_NE(query_page(c, va).pfn, query_page(*as, va).pfn);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), pattern(va, 9));
  EXPECT_EQ(*cpu::load<uint64_t>(c, va), 1234u);
  // The parent's page is now exclusive again: its write reuses the page in place.
  const Pfn ppfn = query_page(*as, va).pfn;
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, 5678), 0);
  EXPECT_EQ(query_page(*as, va).pfn, ppfn);
  EXPECT_EQ(verify_pages(c, va + kPageSize, 3 * kPageSize, 9), 0);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
  EXPECT_EQ(verify_pages(*as, va + kPageSize, 3 * kPageSize, 9), 0);
}

TEST_F(SyscallTest, ForkOfThpThenWriteCopiesOneSmallPage) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, kPmdSize, 10);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(query_page(**child, va).kind, PageKind::kThpPmd);
  ASSERT_EQ(cpu::store<uint64_t>(**child, va + 3 * kPageSize, 1), 0);
  EXPECT_EQ(query_page(**child, va + 3 * kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(**child, va).kind, PageKind::kThpPte);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 10), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(SyscallTest, ForkHonoursDontforkWipeonforkAndShared) {
  Va keep = map_anon(*as, kPageSize);
  Va dont = map_anon(*as, kPageSize);
  Va wipe = map_anon(*as, kPageSize);
  Result<Va> shared = as->mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(shared.ok());
  for (Va v : {keep, dont, wipe, *shared}) ASSERT_EQ(cpu::store<uint64_t>(*as, v, 11), 0);
  ASSERT_EQ(as->madvise(dont, kPageSize, MADV_DONTFORK), 0);
  ASSERT_EQ(as->madvise(wipe, kPageSize, MADV_WIPEONFORK), 0);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  AddressSpace& c = **child;
  EXPECT_EQ(*cpu::load<uint64_t>(c, keep), 11u);
  EXPECT_EQ(cpu::load<uint64_t>(c, dont).error(), -EFAULT);
  EXPECT_EQ(*cpu::load<uint64_t>(c, wipe), 0u);
  ASSERT_EQ(cpu::store<uint64_t>(c, *shared, 99), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *shared), 99u);  // shared memory stays shared
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(SyscallTest, ForkFailureLeavesParentIntact) {
  Va va = map_anon(*as, 64 * kPageSize);
  fill_pages(*as, va, 64 * kPageSize, 12);
  fault_inject::ScopedArm arm("mm.alloc_pgtable", {.nth = 3, .times = 0});
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  EXPECT_EQ(child.error(), -ENOMEM);
  fault_inject::disarm_all();
  EXPECT_EQ(verify_pages(*as, va, 64 * kPageSize, 12), 0);
  fill_pages(*as, va, 64 * kPageSize, 13);
  EXPECT_EQ(verify_pages(*as, va, 64 * kPageSize, 13), 0);
}

TEST_F(SyscallTest, ExitReleasesEverything) {
  Va a = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  Va b = map_anon(*as, 32 * kPageSize);
  fill_pages(*as, a, 2 * kPmdSize, 1);
  fill_pages(*as, b, 32 * kPageSize, 1);
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), a, 2 * kPmdSize, &mirror), 0);
  as->exit();
  EXPECT_TRUE(as->exited());
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kRelease));
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kUnmap));  // the teardown that follows release
  EXPECT_EQ(mem->free_pages(), initial_free);
  as->exit();  // idempotent
  n.remove();
}

}  // namespace
}  // namespace gpusvm::mm::testing
