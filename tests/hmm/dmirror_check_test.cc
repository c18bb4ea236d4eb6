// Dmirror::check_mirror (issue 9 §5): the device page table checked against the CPU page
// table. Legal states after every kind of request pass; each kind of stale device mapping,
// planted through the test hook, is reported with its address and frame.
#include <gtest/gtest-spi.h>
#include <sys/mman.h>

#include <string>

#include "drivers/dmirror/dmirror.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/page_state.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

using dmirror::DptEntry;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

class DmirrorCheckTest : public ::testing::Test, protected HmmMachine {
 public:
  void teardown_mirror_check() { expect_mirrors_ok(); }

 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(start());
    fd = hmm_open(*proc, 0);
    ASSERT_GE(fd, 0);
    d = dynamic_cast<dmirror::Dmirror*>(proc->fd_get(fd).get());
    ASSERT_NE(d, nullptr);
  }
  void TearDown() override { stop(); }
  std::unique_ptr<HmmBuffer> buffer(uint64_t npages, bool fill = true) {
    auto b = HmmBuffer::map(*proc, npages * kPageSize, npages * kPageSize, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS);
    if (fill) {
      EXPECT_EQ(cpu_write_ints(*proc, b->ptr, npages * kPageSize / sizeof(int),
                               [](uint64_t i) { return static_cast<int>(i + 11); }),
                0);
    }
    return b;
  }
  mm::Pfn cpu_pfn(Va va) { return mm::query_page(proc->mm(), va).pfn; }
  // The one problem check_mirror reports, "" when it reports none, "<n problems>" for more.
  std::string only_problem() {
    std::vector<std::string> p = d->check_mirror();
    if (p.empty()) return "";
    if (p.size() > 1) return std::to_string(p.size()) + " problems, first: " + p[0];
    return p[0];
  }
  int fd = -1;
  dmirror::Dmirror* d = nullptr;
};

// READ, WRITE, MIGRATE_TO_DEV, EXCLUSIVE and a THP read all leave a consistent mirror.
TEST_F(DmirrorCheckTest, LegalStates_NoProblems) {
  auto b = buffer(16);
  auto unwritten = buffer(4, /*fill=*/false);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, unwritten.get(), 4), 0);  // zero pages
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, b.get(), 4), 0);
  HmmBuffer mid;
  mid.proc = nullptr;  // a view: not unmapped by its destructor
  mid.ptr = b->ptr + 4 * kPageSize;
  mid.mirror.assign(8 * kPageSize / sizeof(int), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &mid, 8), 0);
  mid.ptr = b->ptr + 12 * kPageSize;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, &mid, 4), 0);
  // A 2 MiB THP read through the device.
  auto thp = HmmBuffer::map(*proc, 2 * TWOMEG, TWOMEG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  const Va huge = align_up(thp->ptr, TWOMEG);
  ASSERT_EQ(proc->mm().madvise(huge, TWOMEG, MADV_HUGEPAGE), 0);
  ASSERT_EQ(mm::cpu::store<uint64_t>(proc->mm(), huge, 5), 0);
  HmmBuffer hv;
  hv.ptr = huge;
  hv.mirror.assign(TWOMEG / sizeof(int), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, &hv, TWOMEG / kPageSize), 0);
  EXPECT_EQ(mm::query_page(proc->mm(), huge).kind, mm::PageKind::kThpPmd);
  EXPECT_GE(d->pt_entries(), 4u + 4u + 8u + 4u + TWOMEG / kPageSize);
  EXPECT_EQ(only_problem(), "");
  // A CPU write takes the exclusive pages back: their device entries go, the rest stays.
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), b->ptr + 12 * kPageSize, 1), 0);
  EXPECT_EQ(only_problem(), "");
}

// A device entry that points at another frame than the one backing its address: what a
// mirror that missed an invalidation keeps (the EXCLUSIVE race's wrong data).
TEST_F(DmirrorCheckTest, EntryForAnotherFrame_Reported) {
  auto b = buffer(2);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, b.get(), 2), 0);
  ASSERT_EQ(only_problem(), "");
  const mm::Pfn other = cpu_pfn(b->ptr + kPageSize);
  d->TEST_pt_store(b->ptr, DptEntry{other, dmirror::kDptWrite});
  const std::string p = only_problem();
  EXPECT_NE(p.find("va " + hex(b->ptr) + " -> pfn " + hex(other)), std::string::npos) << p;
  EXPECT_NE(p.find("the CPU entry maps another frame"), std::string::npos) << p;
  EXPECT_NE(p.find("pfn " + hex(cpu_pfn(b->ptr))), std::string::npos) << p;
  // Any invalidation of the page erases it again (here: MADV_DONTNEED).
  ASSERT_EQ(proc->mm().madvise(b->ptr, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(only_problem(), "");
}

// More access than the CPU entry grants: write over a read-only page (the zero page), atomic
// over a present page.
TEST_F(DmirrorCheckTest, MorePermissionThanCpu_Reported) {
  auto b = buffer(2, /*fill=*/false);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, b.get(), 1), 0);  // page 0: zero page
  const mm::Pfn zero = cpu_pfn(b->ptr);
  ASSERT_EQ(zero, mem->zero_pfn());
  d->TEST_pt_store(b->ptr, DptEntry{zero, dmirror::kDptWrite});
  std::string p = only_problem();
  EXPECT_NE(p.find("device writable, CPU entry read-only"), std::string::npos) << p;
  EXPECT_NE(p.find("va " + hex(b->ptr)), std::string::npos) << p;
  d->TEST_pt_store(b->ptr, DptEntry{zero, 0});
  EXPECT_EQ(only_problem(), "");
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), b->ptr + kPageSize, 1), 0);
  const mm::Pfn page1 = cpu_pfn(b->ptr + kPageSize);
  d->TEST_pt_store(b->ptr + kPageSize, DptEntry{page1, dmirror::kDptWrite | dmirror::kDptAtomic});
  p = only_problem();
  EXPECT_NE(p.find("atomic, CPU entry not device-exclusive"), std::string::npos) << p;
  d->TEST_pt_erase(b->ptr + kPageSize);
  EXPECT_EQ(only_problem(), "");
}

// An entry where the CPU has nothing: a hole of the VMA, or no VMA at all.
TEST_F(DmirrorCheckTest, EntryOverNothing_Reported) {
  auto b = buffer(2, /*fill=*/false);
  const mm::Pfn some = mem->zero_pfn();
  d->TEST_pt_store(b->ptr, DptEntry{some, 0});
  std::string p = only_problem();
  EXPECT_NE(p.find("the CPU entry maps no frame (CPU entry: none"), std::string::npos) << p;
  d->TEST_pt_erase(b->ptr);
  const Va gone = b->ptr;
  b.reset();  // munmap
  d->TEST_pt_store(gone, DptEntry{some, 0});
  p = only_problem();
  EXPECT_NE(p.find("va " + hex(gone)), std::string::npos) << p;
  EXPECT_NE(p.find("no VMA"), std::string::npos) << p;
  d->TEST_pt_erase(gone);
  EXPECT_EQ(only_problem(), "");
}

// The fixture's teardown runs the check for every open file: a stale entry left at the end
// of a scenario fails the test (checked here through the same helper, then repaired).
TEST_F(DmirrorCheckTest, TeardownCheck_SeesStaleEntry) {
  auto b = buffer(1);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, b.get(), 1), 0);
  d->TEST_pt_store(b->ptr, DptEntry{cpu_pfn(b->ptr) + 1, 0});
  EXPECT_EQ(dev[0]->check_mirrors().size(), 1u);
  static DmirrorCheckTest* self;  // EXPECT_NONFATAL_FAILURE's statement may not use `this`
  self = this;
  EXPECT_NONFATAL_FAILURE(self->teardown_mirror_check(), "1 stale device mapping(s) on device 0");
  d->TEST_pt_erase(b->ptr);
  EXPECT_TRUE(dev[0]->check_mirrors().empty());
}

}  // namespace
}  // namespace gpusvm::hmm_tests
