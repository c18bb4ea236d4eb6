// mm::check's rules for states the other suites never build on purpose (issue 9 §5): a device
// folio that nothing references any more (leaked), and the legal state of a pinned hugetlb
// page that MADV_DONTNEED zapped (not a leak: the pin owns it until it is dropped).
#include <sys/mman.h>

#include <string>

#include "gpusvm/mm/gup.h"
#include "tests/mm/leaked_folio_lock.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

bool reports(const CheckReport& r, const std::string& a, const std::string& b = "") {
  for (const std::string& p : r.problems) {
    if (p.find(a) != std::string::npos && p.find(b) != std::string::npos) return true;
  }
  return false;
}

class CheckerTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 64);
    ASSERT_TRUE(dev->ok());
  }
  void TearDown() override {
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 64u) << "device pages leaked";
    dev.reset();
    MmTest::TearDown();
  }
  std::unique_ptr<TestDevice> dev;
};

// A device folio with a reference that nothing accounts for: the extra reference shows as a
// refcount mismatch while the page is mapped (an existing rule), and once the mapping is gone
// the folio is unmapped, unpinned and still referenced - leaked device memory that only a
// walk of the pagemap's frames can see (the page tables no longer lead to it).
TEST_F(CheckerTest, LeakedDeviceFolio_Reported) {
  const Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va, 2 * kPageSize, 1);
  ASSERT_EQ(*dev->migrate_to_device(*as, va, va + 2 * kPageSize), 2u);
  Folio* folio = mem->folio_of(query_page(*as, va).pfn);
  ASSERT_TRUE(dev->pgmap()->contains(folio->pfn()));
  EXPECT_MM_CHECK_OK(*mem);
  folio->get();  // the leak: a driver's reference that is never dropped
  CheckReport r = check(*mem);
  EXPECT_TRUE(reports(r, "folio " + hex(folio->pfn()), "refcount 2, expected 1")) << r.to_string();
  ASSERT_EQ(as->munmap(va, 2 * kPageSize), 0);
  // Page 1 went back to the device; page 0 did not.
  EXPECT_EQ(dev->free_pages(), 63u);
  r = check(*mem);
  EXPECT_EQ(r.problems.size(), 1u) << r.to_string();
  EXPECT_TRUE(reports(r, "device folio " + hex(folio->pfn()), "refcount 1, but no entry maps it"))
      << r.to_string();
  folio->put();  // the last reference: the page goes back to the driver
  EXPECT_EQ(dev->free_pages(), 64u);
  EXPECT_MM_CHECK_OK(*mem);
}

// A device folio the driver allocated and never used (refcount 1 from folio_init, no entry):
// the same leak, found without any address space involved.
TEST_F(CheckerTest, AllocatedUnusedDeviceFolio_Reported) {
  Folio* folio = dev->pgmap()->folio_init(dev->pgmap()->first_pfn() + 5, 0);
  ASSERT_NE(folio, nullptr);
  CheckReport r = check(*mem);
  EXPECT_TRUE(reports(r, "device folio " + hex(folio->pfn()), "leaked")) << r.to_string();
  {
    // Left locked too (a migration that forgot its destination): both are reported. Locked
    // by another thread: check() takes mmap locks, which rank before the folio lock.
    LeakedFolioLock leak(folio);
    r = check(*mem);
    EXPECT_TRUE(reports(r, "device folio " + hex(folio->pfn()), "left locked")) << r.to_string();
    EXPECT_EQ(r.problems.size(), 2u) << r.to_string();
  }
  folio->put();
  EXPECT_MM_CHECK_OK(*mem);
}

// A pinned hugetlb page zapped by MADV_DONTNEED stays in use (the pin holds it) although no
// page table maps it: legal, and the pool accounting must count it. Before: "hugetlb pool: 1
// in use, 0 mapped". A hugetlb folio held by a plain leaked reference is still reported.
TEST_F(CheckerTest, PinnedZappedHugetlbPage_NotAFalseAlarm) {
  Result<Va> va = as->mmap(0, kPmdSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_TRUE(va.ok()) << va.error();
  fill_pages(*as, *va, kPmdSize, 4);
  Folio* page = nullptr;
  ASSERT_EQ(pin_user_pages_fast(*as, *va, 1, FOLL_WRITE, &page), 1);
  Folio* folio = page->head();
  ASSERT_TRUE(folio->test(kFolioHugetlb));
  ASSERT_EQ(as->madvise(*va, kPmdSize, MADV_DONTNEED), 0);
  EXPECT_EQ(query_page(*as, *va).kind, PageKind::kNone);
  EXPECT_EQ(folio->pincount(), 1);
  EXPECT_EQ(mem->hugetlb_counts().in_use, 1u);
  EXPECT_MM_CHECK_OK(*mem);
  // The pin still sees the old bytes.
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(folio->data()), pattern(*va, 4));
  // An extra plain reference besides the pin is still a problem.
  folio->get();
  CheckReport r = check(*mem);
  EXPECT_TRUE(reports(r, "folio " + hex(folio->pfn()), "unmapped, 1 pins, refcount 2")) << r.to_string();
  folio->put();
  unpin_user_page(page);
  EXPECT_EQ(mem->hugetlb_counts().in_use, 0u);
  EXPECT_MM_CHECK_OK(*mem);
  // A new fault gets a fresh zeroed page.
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::mm::testing
