// get_user_pages / pin_user_pages: faults as a CPU access, references and pins that mm::check
// accounts for, pinned pages that migration leaves alone, device-private pages brought back.
#include <cstring>

#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

class GupTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 256);
    ASSERT_TRUE(dev->ok());
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 256u) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }
  long gup(Va start, unsigned long n, unsigned flags, Folio** pages) {
    ReadLock g(&as->mmap_lock());
    return get_user_pages(*as, start, n, flags, pages);
  }
  long pin(Va start, unsigned long n, unsigned flags, Folio** pages) {
    ReadLock g(&as->mmap_lock());
    return pin_user_pages(*as, start, n, flags, pages);
  }
  std::unique_ptr<TestDevice> dev;
};

TEST_F(GupTest, WriteGupFaultsInAndReferencesEachPage) {
  Va va = map_anon(*as, 4 * kPageSize);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, va + kPageSize).ok());  // page 1: the zero page
  Folio* pages[4] = {};
  // 1. FOLL_WRITE faults every page in writable (the zero page is replaced) and references it.
  ASSERT_EQ(gup(va, 4, FOLL_WRITE, pages), 4);
  for (uint64_t p = 0; p < 4; p++) {
    PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << p;
    EXPECT_TRUE(st.writable) << p;
    EXPECT_EQ(pages[p]->pfn(), st.pfn) << p;
    EXPECT_EQ(pages[p]->refcount(), 2) << p;  // mapping + ours
    EXPECT_EQ(pages[p]->pincount(), 0) << p;
    // 2. What the "device" writes through the page, the CPU reads.
    const uint64_t v = pattern(va + p * kPageSize, 1);
    std::memcpy(pages[p]->data(), &v, sizeof(v));
  }
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
  for (Folio* p : pages) put_page(p);
  EXPECT_EQ(query_page(*as, va).refcount, 1);
  // 3. The fast variant takes the lock itself: same result.
  ASSERT_EQ(get_user_pages_fast(*as, va + kPageSize, 2, FOLL_WRITE, pages), 2);
  EXPECT_EQ(pages[0]->pfn(), query_page(*as, va + kPageSize).pfn);
  put_page(pages[0]);
  put_page(pages[1]);
}

TEST_F(GupTest, ReadGupOfAHoleReturnsTheUnreferencedZeroPage) {
  Va va = map_anon(*as, kPageSize);
  Folio* page = nullptr;
  ASSERT_EQ(gup(va, 1, 0, &page), 1);
  EXPECT_EQ(page, mem->zero_page());
  put_page(page);  // a no-op for the zero page
  ASSERT_EQ(pin(va, 1, 0, &page), 1);
  EXPECT_EQ(page->pincount(), 0);  // zero pages are never pinned
  unpin_user_page(page);
}

// The point of pins: mm::check accounts for them, mapped or not, and they keep the page.
TEST_F(GupTest, PinsAreCountedByCheckAndOutliveTheMapping) {
  Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 2);
  const uint64_t free0 = mem->free_pages();
  Folio* pages[2] = {};
  ASSERT_EQ(pin(va, 2, FOLL_WRITE | FOLL_LONGTERM, pages), 2);
  EXPECT_EQ(pages[0]->pincount(), 1);
  EXPECT_EQ(pages[0]->refcount(), 2);
  EXPECT_TRUE(pages[0]->maybe_dma_pinned());
  EXPECT_MM_CHECK_OK(*mem);  // mapping + pin
  // munmap while pinned: the pages stay (the device may still DMA to them), unmapped.
  ASSERT_EQ(as->munmap(va, 2 * kPageSize), 0);
  EXPECT_EQ(mem->free_pages(), free0);
  EXPECT_EQ(pages[1]->refcount(), 1);
  EXPECT_MM_CHECK_OK(*mem);  // pinned, unmapped: accounted, not a leak
  uint64_t word = 0;
  std::memcpy(&word, pages[1]->data(), sizeof(word));
  EXPECT_EQ(word, pattern(va + kPageSize, 2));
  unpin_user_pages(pages, 2);
  EXPECT_EQ(mem->free_pages(), free0 + 2);
}

// A plain (FOLL_GET) reference is invisible to the checker: it is reported until dropped.
// This is what makes the pin count necessary, and proves the check can fail.
TEST_F(GupTest, CheckReportsAnUnaccountedReference) {
  Va va = map_anon(*as, kPageSize);
  Folio* page = nullptr;
  ASSERT_EQ(gup(va, 1, FOLL_WRITE, &page), 1);
  CheckReport r = check(*mem);
  EXPECT_FALSE(r.ok());
  put_page(page);
}

TEST_F(GupTest, PinnedPageIsNotMigrated) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 3);
  Folio* page = nullptr;
  ASSERT_EQ(pin_user_pages_fast(*as, va + 2 * kPageSize, 1, FOLL_WRITE | FOLL_LONGTERM, &page), 1);
  const Pfn pinned = page->pfn();
  // Migration's reference check finds the pin: that page stays, the others move.
  Result<uint64_t> moved = dev->migrate_to_device(*as, va, va + 4 * kPageSize);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 3u);
  PageState st = query_page(*as, va + 2 * kPageSize);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_EQ(st.pfn, pinned);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kSoftLeaf);
  EXPECT_EQ(page->pincount(), 1);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 3), 0);
  unpin_user_page(page);
}

// MADV_COLLAPSE must not copy a page a device still reaches through a GUP reference or a
// (long-term) pin: the collapse would leave the device writing to a page nothing maps and the
// CPU reading a stale copy. Linux refuses (folio_expected_ref_count != folio_ref_count:
// SCAN_PAGE_COUNT, -EAGAIN) and so does the model; once the reference is dropped it collapses.
TEST_F(GupTest, CollapseRefusedWhilePinnedOrReferenced) {
  Va va = map_anon(*as, kPmdSize);
  fill_pages(*as, va, kPmdSize, 3);
  struct Case {
    const char* what;
    bool pin;
    unsigned flags;
  } cases[] = {{"get_user_pages", false, 0}, {"pin_user_pages", true, FOLL_WRITE},
               {"pin_user_pages FOLL_LONGTERM", true, FOLL_WRITE | FOLL_LONGTERM}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    Folio* page = nullptr;
    ASSERT_EQ(c.pin ? pin(va + 7 * kPageSize, 1, c.flags, &page) : gup(va + 7 * kPageSize, 1, c.flags, &page), 1);
    EXPECT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), -EAGAIN);
    EXPECT_EQ(query_page(*as, va).kind, PageKind::kSmall);
    // The "device" writes through its reference; the CPU sees it: the page is still mapped.
    const uint64_t v = 0xd00d0000u + static_cast<uint64_t>(c.pin) + c.flags;
    std::memcpy(page->data(), &v, sizeof v);
    EXPECT_EQ(*cpu::load<uint64_t>(*as, va + 7 * kPageSize), v);
    if (c.pin) unpin_user_page(page); else put_page(page);
    EXPECT_MM_CHECK_OK(*mem);
    // Put the pattern back for the next case.
    ASSERT_EQ(cpu::store<uint64_t>(*as, va + 7 * kPageSize, pattern(va + 7 * kPageSize, 3)), 0);
  }
  EXPECT_EQ(as->madvise(va, kPmdSize, MADV_COLLAPSE), 0);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kThpPmd);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPmdSize, 3), 0);
}

// GUP of device-private pages brings them back to RAM through the driver (write access).
TEST_F(GupTest, DevicePrivatePagesComeBackToRam) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 4);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 4 * kPageSize), 4u);
  Folio* pages[4] = {};
  ASSERT_EQ(gup(va, 1, FOLL_WRITE, &pages[0]), 1);
  ASSERT_EQ(get_user_pages_fast(*as, va + kPageSize, 1, FOLL_WRITE, &pages[1]), 1);
  ASSERT_EQ(pin_user_pages_fast(*as, va + 2 * kPageSize, 1, FOLL_WRITE | FOLL_LONGTERM, &pages[2]), 1);
  ASSERT_EQ(pin(va + 3 * kPageSize, 1, FOLL_WRITE | FOLL_LONGTERM, &pages[3]), 1);
  EXPECT_EQ(dev->cpu_faults.load(), 4);
  for (uint64_t p = 0; p < 4; p++) {
    PageState st = query_page(*as, va + p * kPageSize);
    EXPECT_EQ(st.kind, PageKind::kSmall) << p;
    EXPECT_TRUE(st.writable) << p;
    EXPECT_FALSE(pages[p]->pagemap()) << p;
  }
  put_page(pages[0]);
  put_page(pages[1]);
  unpin_user_page(pages[2]);
  unpin_user_page(pages[3]);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 4), 0);
  EXPECT_EQ(dev->free_pages(), 256u);
}

TEST_F(GupTest, WriteGupBreaksCowAfterFork) {
  Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 5);
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  const Pfn shared = query_page(*as, va).pfn;
  Folio* page = nullptr;
  ASSERT_EQ(pin(va, 1, FOLL_WRITE, &page), 1);
  EXPECT_NE(page->pfn(), shared);  // the parent got its own copy to pin
  EXPECT_EQ(query_page(**child, va).pfn, shared);
  const uint64_t v = 77;
  std::memcpy(page->data(), &v, sizeof(v));
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 77u);
  EXPECT_EQ(verify_pages(**child, va, kPageSize, 5), 0);
  EXPECT_MM_CHECK_OK(*mem);
  unpin_user_page(page);
  child->reset();
}

TEST_F(GupTest, PmdMappedThpPagesReferenceTheHead) {
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  ASSERT_NE(va, 0u);
  ASSERT_EQ(cpu::store<uint64_t>(*as, va, 1), 0);
  if (query_page(*as, va).kind != PageKind::kThpPmd) GTEST_SKIP() << "no THP available";
  Folio* page = nullptr;
  ASSERT_EQ(pin(va + 5 * kPageSize, 1, FOLL_WRITE, &page), 1);
  EXPECT_EQ(page->page_index(), 5u);
  EXPECT_EQ(page->head()->pincount(), 1);
  EXPECT_EQ(page->head()->refcount(), 2);
  EXPECT_MM_CHECK_OK(*mem);
  unpin_user_page(page);
}

TEST_F(GupTest, BadInputAndPartialResults) {
  Va va = map_anon(*as, 2 * kPageSize);
  Va ro = map_anon(*as, kPageSize, PROT_READ);
  Va none = map_anon(*as, kPageSize, PROT_NONE);
  Folio* pages[4] = {};
  EXPECT_EQ(gup(va, 1, FOLL_WRITE, nullptr), -EINVAL);
  EXPECT_EQ(gup(va, 1, 1u << 5, pages), -EINVAL);                 // unknown flag
  EXPECT_EQ(gup(va, 1, FOLL_WRITE | FOLL_LONGTERM, pages), -EINVAL);  // LONGTERM needs a pin
  EXPECT_EQ(gup(va, 0, FOLL_WRITE, pages), 0);
  EXPECT_EQ(gup(ro, 1, FOLL_WRITE, pages), -EFAULT);              // no VM_WRITE
  EXPECT_EQ(gup(none, 1, 0, pages), -EFAULT);                     // no VM_READ
  EXPECT_EQ(gup(kTaskSize - kPageSize, 2, 0, pages), -EFAULT);    // past user space
  EXPECT_EQ(gup(va, ~0UL, 0, pages), -EOVERFLOW);
  EXPECT_EQ(pin(0x1000, 1, FOLL_WRITE, pages), -EFAULT);          // no VMA
  // A range running into a hole stops there with what it got.
  ASSERT_EQ(as->munmap(va + kPageSize, kPageSize), 0);
  EXPECT_EQ(pin(va + 8, 3, FOLL_WRITE, pages), 1);                // start rounded down
  EXPECT_EQ(pages[0]->pfn(), query_page(*as, va).pfn);
  unpin_user_pages(pages, 1);
}

TEST_F(GupTest, InjectedAllocationFailureIsEnomemOrPartial) {
  Va va = map_anon(*as, 2 * kPageSize);
  Folio* pages[2] = {};
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 1});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(gup(va, 2, FOLL_WRITE, pages), -ENOMEM);
  }
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kNone);
  {
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 2});
    ASSERT_EQ(pin(va, 2, FOLL_WRITE, pages), 1);
  }
  EXPECT_EQ(pages[0]->pincount(), 1);
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kNone);
  EXPECT_MM_CHECK_OK(*mem);
  unpin_user_page(pages[0]);
}

}  // namespace
}  // namespace gpusvm::mm::testing
