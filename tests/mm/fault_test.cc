// CPU faults: what each kind of first access and write leaves in the page table.
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using FaultTest = MmTest;

TEST_F(FaultTest, ReadFaultMapsZeroPage) {
  Va va = map_anon(*as, 16 * kPageSize);
  ASSERT_NE(va, 0u);
  Result<uint64_t> v = cpu::load<uint64_t>(*as, va + 3 * kPageSize + 8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0u);
  PageState st = query_page(*as, va + 3 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kZeroPage);
  EXPECT_FALSE(st.writable);
  EXPECT_EQ(st.pfn, mem->zero_pfn());
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  EXPECT_EQ(as->stats().faults_read_zero.get(), 1u);
  EXPECT_EQ(mem->free_pages(), initial_free);  // the zero page costs nothing
}

TEST_F(FaultTest, WriteFaultAllocatesExclusivePage) {
  Va va = map_anon(*as, 4 * kPageSize);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPageSize, 0x1234), 0);
  PageState st = query_page(*as, va + kPageSize);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_TRUE(st.writable);
  EXPECT_TRUE(st.dirty);
  EXPECT_TRUE(st.anon_exclusive);
  EXPECT_EQ(st.mapcount, 1);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPageSize), 0x1234u);
  EXPECT_EQ(as->stats().faults_anon.get(), 1u);
  EXPECT_EQ(mem->free_pages(), initial_free - 1);
}

TEST_F(FaultTest, WriteAfterReadReplacesZeroPage) {
  Va va = map_anon(*as, kPageSize);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va).ok());
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kZeroPage);
  ASSERT_EQ(cpu::store<uint32_t>(*as, va + 100, 0xabcdef), 0);
  PageState st = query_page(*as, va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_NE(st.pfn, mem->zero_pfn());
  EXPECT_EQ(*cpu::load<uint32_t>(*as, va + 100), 0xabcdefu);
  EXPECT_EQ(*cpu::load<uint32_t>(*as, va + 104), 0u);
  EXPECT_EQ(as->stats().faults_cow.get(), 1u);
  // The zero page itself was never written.
  EXPECT_EQ(*reinterpret_cast<const uint32_t*>(mem->zero_page()->data() + 100), 0u);
}

TEST_F(FaultTest, HugeRegionReadMapsHugeZeroWriteMapsThp) {
  Va va = map_anon(*as, 4 * kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(va, 0u);
  ASSERT_TRUE(pmd_aligned(va));
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va + 5 * kPageSize).ok());
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);
  EXPECT_EQ(query_page(*as, va + kPmdSize - kPageSize).kind, PageKind::kHugeZero);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize + 7 * kPageSize, 77), 0);
  PageState st = query_page(*as, va + kPmdSize + 7 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kThpPmd);
  EXPECT_TRUE(st.writable);
  EXPECT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kThpPmd);
  EXPECT_EQ(as->stats().faults_thp.get(), 1u);
  EXPECT_EQ(as->stats().faults_huge_zero.get(), 1u);
  EXPECT_EQ(mem->free_pages(), initial_free - kPagesPerPmd);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPmdSize + 7 * kPageSize), 77u);
}

// Linux >= 6.13 replaces the huge zero PMD by a fresh THP on a write (do_huge_zero_wp_pmd);
// when no THP can be allocated it splits the PMD into zero PTEs and COWs one 4 KiB page.
TEST_F(FaultTest, WriteToHugeZeroAllocatesThp) {
  TestMirror mirror;
  MmuIntervalNotifier n;
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  ASSERT_EQ(n.insert(as.get(), va, 2 * kPmdSize, &mirror), 0);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va).ok());
  ASSERT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va + 9 * kPageSize, 9), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 9 * kPageSize), 9u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 10 * kPageSize), 0u);
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kClear));  // a mirror of the huge zero folio drops it
  EXPECT_EQ(mem->free_pages(), initial_free - kPagesPerPmd);

  ASSERT_TRUE(cpu::load<uint64_t>(*as, va + kPmdSize).ok());
  ASSERT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kHugeZero);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio_thp", {.nth = 1, .times = 0});
    ASSERT_EQ(cpu::store<uint64_t>(*as, va + kPmdSize + 3 * kPageSize, 3), 0);
  }
  EXPECT_EQ(query_page(*as, va + kPmdSize + 3 * kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va + kPmdSize).kind, PageKind::kZeroPage);
  EXPECT_EQ(as->stats().thp_split_pmd.get(), 1u);
  EXPECT_EQ(mem->free_pages(), initial_free - kPagesPerPmd - 1);
  n.remove();
}

TEST_F(FaultTest, ThpFallsBackTo4kWhenHugeAllocationFails) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
  fault_inject::ScopedArm arm("mm.alloc_folio_thp", {.nth = 1, .times = 0});
  ASSERT_EQ(arm.status(), 0);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, 1), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
  EXPECT_EQ(as->stats().faults_thp_fallback.get(), 1u);
  EXPECT_EQ(fault_inject::failures("mm.alloc_folio_thp"), 1u);
}

TEST_F(FaultTest, OomWhenSmallAllocationFails) {
  Va va = map_anon(*as, kPageSize);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 1, .times = 0});
    EXPECT_EQ(cpu::store<uint64_t>(*as, va, 1), -ENOMEM);
    EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  }
  EXPECT_EQ(cpu::store<uint64_t>(*as, va, 2), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 2u);
}

TEST_F(FaultTest, PermissionErrors) {
  Va ro = map_anon(*as, kPageSize, PROT_READ);
  Va none = map_anon(*as, kPageSize, PROT_NONE);
  EXPECT_EQ(cpu::store<uint64_t>(*as, ro, 1), -EFAULT);
  EXPECT_TRUE(cpu::load<uint64_t>(*as, ro).ok());
  EXPECT_EQ(cpu::load<uint64_t>(*as, none).error(), -EFAULT);
  EXPECT_EQ(cpu::load<uint64_t>(*as, 0x1000).error(), -EFAULT);  // no VMA
  EXPECT_EQ(cpu::atomic_fetch_add(*as, ro, 1).error(), -EFAULT);
  EXPECT_GE(as->stats().faults_sigsegv.get(), 3u);
}

TEST_F(FaultTest, AtomicsAreAtomicAndNeedAlignment) {
  Va va = map_anon(*as, kPageSize);
  EXPECT_EQ(cpu::atomic_fetch_add(*as, va + 4, 1).error(), -EINVAL);
  EXPECT_EQ(*cpu::atomic_fetch_add(*as, va, 5), 0u);
  EXPECT_EQ(*cpu::atomic_cmpxchg(*as, va, 5, 9), 5u);
  EXPECT_EQ(*cpu::atomic_cmpxchg(*as, va, 5, 11), 9u);  // failed compare returns current
  EXPECT_EQ(*cpu::atomic_exchange(*as, va, 3), 9u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 3u);
}

TEST_F(FaultTest, CopyAcrossPagesAndMemset) {
  Va va = map_anon(*as, 3 * kPageSize);
  std::vector<uint8_t> in(2 * kPageSize + 100);
  for (size_t i = 0; i < in.size(); i++) in[i] = static_cast<uint8_t>(i * 7);
  ASSERT_EQ(cpu::copy_in(*as, va + 50, in.data(), in.size()), 0);
  std::vector<uint8_t> out(in.size());
  ASSERT_EQ(cpu::copy_out(*as, va + 50, out.data(), out.size()), 0);
  EXPECT_EQ(in, out);
  ASSERT_EQ(cpu::memset(*as, va + kPageSize - 8, 0xee, 16), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va + kPageSize), 0xeeeeeeeeeeeeeeeeULL);
  EXPECT_EQ(cpu::copy_out(*as, kTaskSize - 8, out.data(), 16), -EFAULT);
}

TEST_F(FaultTest, SharedMappingWritesAreSharedAndReadOnlyFileIsCopied) {
  Result<Va> sh = as->mmap(0, 2 * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(sh.ok());
  ASSERT_EQ(cpu::store<uint64_t>(*as, *sh, 42), 0);
  EXPECT_EQ(query_page(*as, *sh).kind, PageKind::kSmall);
  EXPECT_EQ(as->stats().faults_shmem.get(), 1u);

  // A file-like object mapped twice: shared writes are visible through the private mapping
  // until it writes, then the private mapping has its own copy.
  auto file = ShmemObject::create(mem.get(), 4 * kPageSize, "file");
  ASSERT_TRUE(file.ok());
  Result<Va> shared = as->mmap(0, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_SHARED, *file);
  Result<Va> priv = as->mmap(0, 4 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, *file);
  ASSERT_TRUE(shared.ok() && priv.ok());
  ASSERT_EQ(cpu::store<uint64_t>(*as, *shared, 1), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *priv), 1u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, *priv, 2), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *shared), 1u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *priv), 2u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, *shared, 3), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *priv), 2u);
  EXPECT_MM_CHECK_OK(*mem);
  // Beyond the end of the object: SIGBUS -> -EFAULT.
  Result<Va> big = as->mmap(0, 8 * kPageSize, PROT_READ, MAP_SHARED, *file);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(cpu::load<uint64_t>(*as, *big + 5 * kPageSize).error(), -EFAULT);
}

}  // namespace
}  // namespace gpusvm::mm::testing
