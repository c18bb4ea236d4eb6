// hmm_range_fault: snapshot, fault, write-fault, flags semantics, errors and owners.
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

class HmmRangeFaultTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    base = map_anon(*as, 16 * kPmdSize);
    ASSERT_NE(base, 0u);
    ASSERT_EQ(notifier.insert(as.get(), base, 16 * kPmdSize, &mirror), 0);
  }
  void TearDown() override {
    notifier.remove();
    MmTest::TearDown();
  }
  Va base = 0;
  TestMirror mirror;
  MmuIntervalNotifier notifier;
  std::vector<uint64_t> pfns;
};

TEST_F(HmmRangeFaultTest, SnapshotReportsWhatIsThere) {
  ASSERT_EQ(cpu::store<uint64_t>(*as, base, 1), 0);                 // writable page
  ASSERT_TRUE(cpu::load<uint64_t>(*as, base + kPageSize).ok());     // zero page
  ASSERT_EQ(mirror_range(*as, notifier, base, base + 4 * kPageSize, 0, pfns), 0);
  EXPECT_EQ(pfns[0] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID | HMM_PFN_WRITE);
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[0]), query_page(*as, base).pfn);
  EXPECT_EQ(pfns[1] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID);
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[1]), mem->zero_pfn());
  EXPECT_EQ(pfns[2], 0u);  // nothing there, nothing faulted
  EXPECT_EQ(pfns[3], 0u);
  EXPECT_EQ(hmm_pfn_to_map_order(pfns[0]), 0u);
  EXPECT_EQ(query_page(*as, base + 2 * kPageSize).kind, PageKind::kNone);
  EXPECT_EQ(as->stats().hmm_faults.get(), 0u);
}

TEST_F(HmmRangeFaultTest, FaultAndWriteFaultPopulate) {
  ASSERT_EQ(mirror_range(*as, notifier, base, base + 8 * kPageSize, HMM_PFN_REQ_FAULT, pfns), 0);
  for (uint64_t p : pfns) {
    EXPECT_TRUE(p & HMM_PFN_VALID);
    EXPECT_FALSE(p & HMM_PFN_WRITE);  // read faults map the zero page
    EXPECT_EQ(hmm_pfn_to_pfn(p), mem->zero_pfn());
  }
  ASSERT_EQ(mirror_range(*as, notifier, base, base + 8 * kPageSize,
                         HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  for (size_t i = 0; i < pfns.size(); i++) {
    EXPECT_EQ(pfns[i] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID | HMM_PFN_WRITE);
    EXPECT_EQ(hmm_pfn_to_pfn(pfns[i]), query_page(*as, base + i * kPageSize).pfn);
    EXPECT_EQ(query_page(*as, base + i * kPageSize).kind, PageKind::kSmall);
  }
  EXPECT_GT(as->stats().hmm_faults.get(), 0u);
  // The device sees the same bytes as the CPU.
  ASSERT_EQ(cpu::store<uint64_t>(*as, base + 3 * kPageSize, 0x77), 0);
  Folio* page = mem->pfn_to_page(hmm_pfn_to_pfn(pfns[3]));
  EXPECT_EQ(*reinterpret_cast<uint64_t*>(page->data()), 0x77u);
}

TEST_F(HmmRangeFaultTest, PerPageRequestsWithMask) {
  // Populate the table with zero pages first: in a hole, hmm faults the whole hole with the
  // union of the requests, exactly as the kernel's hmm_vma_walk_hole does.
  for (int i = 0; i < 4; i++) ASSERT_TRUE(cpu::load<uint64_t>(*as, base + i * kPageSize).ok());
  // default_flags = 0 and pfn_flags_mask = REQ_FAULT|REQ_WRITE: only pages whose input asks
  // are faulted. A fault covers the rest of the walk's PMD chunk (the kernel's
  // hmm_vma_fault(addr, end)), so page 3 is write-faulted along with page 2.
  pfns.assign(5, 0);
  pfns[1] = HMM_PFN_REQ_FAULT;
  pfns[2] = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE;
  pfns[3] = HMM_PFN_DMA_MAPPED;  // caller-owned bit: preserved
  HmmRange r{.notifier = &notifier, .start = base, .end = base + 4 * kPageSize,
             .hmm_pfns = pfns.data(), .pfn_flags_mask = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE};
  int rc = -EBUSY;
  for (int tries = 0; tries < 100 && rc == -EBUSY; tries++) {  // nothing invalidates: 1 try
    ReadLock g(&as->mmap_lock());
    r.notifier_seq = notifier.read_begin();
    rc = hmm_range_fault(&r);
  }
  ASSERT_EQ(rc, 0) << "hmm_range_fault still -EBUSY after 100 tries";
  EXPECT_EQ(pfns[0], HMM_PFN_VALID | mem->zero_pfn());
  EXPECT_EQ(pfns[1], HMM_PFN_VALID | mem->zero_pfn());
  EXPECT_EQ(pfns[2], HMM_PFN_VALID | HMM_PFN_WRITE | query_page(*as, base + 2 * kPageSize).pfn);
  EXPECT_EQ(pfns[3] & ~HMM_PFN_FLAGS, query_page(*as, base + 3 * kPageSize).pfn);
  EXPECT_EQ(pfns[3] & HMM_PFN_FLAGS, HMM_PFN_DMA_MAPPED | HMM_PFN_VALID | HMM_PFN_WRITE);
  EXPECT_EQ(pfns[4], 0u);  // outside the range: untouched
  EXPECT_EQ(query_page(*as, base + 2 * kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, base + kPageSize).kind, PageKind::kZeroPage);
  // Replacing the zero pages invalidated the mirror (COW is a CLEAR of the old page).
  EXPECT_TRUE(mirror.saw(MmuNotifyEvent::kClear));
}

TEST_F(HmmRangeFaultTest, ThpReportsPmdOrder) {
  ASSERT_EQ(as->madvise(base, kPmdSize, MADV_HUGEPAGE), 0);
  ASSERT_EQ(mirror_range(*as, notifier, base, base + kPmdSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  ASSERT_EQ(query_page(*as, base).kind, PageKind::kThpPmd);
  const Pfn head = hmm_pfn_to_pfn(pfns[0]);
  for (size_t i = 0; i < pfns.size(); i++) {
    EXPECT_EQ(hmm_pfn_to_map_order(pfns[i]), kPmdOrder);
    EXPECT_EQ(hmm_pfn_to_pfn(pfns[i]), head + i);
  }
  // A read snapshot of the huge zero folio reports order 9 and no write.
  ASSERT_EQ(as->madvise(base + kPmdSize, kPmdSize, MADV_HUGEPAGE), 0);
  ASSERT_EQ(mirror_range(*as, notifier, base + kPmdSize, base + 2 * kPmdSize, HMM_PFN_REQ_FAULT, pfns), 0);
  EXPECT_EQ(hmm_pfn_to_map_order(pfns[5]), kPmdOrder);
  EXPECT_FALSE(pfns[5] & HMM_PFN_WRITE);
  EXPECT_TRUE(mem->is_huge_zero_pfn(hmm_pfn_to_pfn(pfns[5])));
}

TEST_F(HmmRangeFaultTest, ErrorsAndProtNone) {
  ASSERT_EQ(as->mprotect(base, kPageSize, PROT_NONE), 0);
  ASSERT_EQ(as->mprotect(base + kPageSize, kPageSize, PROT_READ), 0);
  ASSERT_EQ(as->munmap(base + 2 * kPageSize, kPageSize), 0);
  ASSERT_EQ(mirror_range(*as, notifier, base, base + 4 * kPageSize, 0, pfns), 0);
  EXPECT_EQ(pfns[0], HMM_PFN_ERROR);  // PROT_NONE
  EXPECT_EQ(pfns[1], 0u);             // readable, nothing there
  EXPECT_EQ(pfns[2], HMM_PFN_ERROR);  // hole
  EXPECT_EQ(mirror_range(*as, notifier, base, base + kPageSize, HMM_PFN_REQ_FAULT, pfns), -EFAULT);
  EXPECT_EQ(mirror_range(*as, notifier, base + 2 * kPageSize, base + 3 * kPageSize, HMM_PFN_REQ_FAULT, pfns), -EFAULT);
  EXPECT_EQ(mirror_range(*as, notifier, base + kPageSize, base + 2 * kPageSize,
                         HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), -EPERM);
  EXPECT_EQ(mirror_range(*as, notifier, base + kPageSize, base + 2 * kPageSize, HMM_PFN_REQ_FAULT, pfns), 0);
}

TEST_F(HmmRangeFaultTest, BadArguments) {
  pfns.assign(16, 0);
  ReadLock g(&as->mmap_lock());
  HmmRange ok{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = base,
              .end = base + kPageSize, .hmm_pfns = pfns.data()};
  HmmRange r = ok;
  r.notifier = nullptr;
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.start = base + 1;
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.end = r.start;
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.start = base - kPageSize;  // outside the notifier
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.default_flags = HMM_PFN_ERROR;
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.default_flags = HMM_PFN_REQ_MIGRATE;  // reserved until device migration exists
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  r = ok;
  r.hmm_pfns = nullptr;
  EXPECT_EQ(hmm_range_fault(&r), -EINVAL);
  EXPECT_EQ(hmm_range_fault(nullptr), -EINVAL);
  EXPECT_EQ(hmm_range_fault(&ok), 0);
}

TEST_F(HmmRangeFaultTest, InvalidationSinceReadBeginIsEbusy) {
  pfns.assign(1, 0);
  HmmRange r{.notifier = &notifier, .notifier_seq = notifier.read_begin(), .start = base,
             .end = base + kPageSize, .hmm_pfns = pfns.data()};
  ASSERT_EQ(as->madvise(base, kPageSize, MADV_DONTNEED), 0);  // invalidates the notifier
  ReadLock g(&as->mmap_lock());
  EXPECT_EQ(hmm_range_fault(&r), -EBUSY);
  r.notifier_seq = notifier.read_begin();
  EXPECT_EQ(hmm_range_fault(&r), 0);
}

// Device-private entries are reported only to their owner; others see 0 or must fault them
// back to system memory (through the owner's migrate_to_ram).
TEST_F(HmmRangeFaultTest, DevicePrivateOwnerRules) {
  TestDevice dev(mem.get(), 64);
  ASSERT_TRUE(dev.ok());
  int other_tag = 0;
  ASSERT_EQ(cpu::store<uint64_t>(*as, base, 0xabc), 0);
  ASSERT_EQ(*dev.migrate_to_device(*as, base, base + kPageSize), 1u);
  const PageState st = query_page(*as, base);
  ASSERT_EQ(st.kind, PageKind::kSoftLeaf);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(mirror_range(*as, notifier, base, base + kPageSize, 0, pfns, &dev), 0);
  EXPECT_EQ(pfns[0], st.pfn | HMM_PFN_VALID | HMM_PFN_WRITE);
  // The owner is not faulted even when it asks for a fault.
  ASSERT_EQ(mirror_range(*as, notifier, base, base + kPageSize, HMM_PFN_REQ_FAULT, pfns, &dev), 0);
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[0]), st.pfn);
  EXPECT_EQ(dev.cpu_faults.load(), 0);
  ASSERT_EQ(mirror_range(*as, notifier, base, base + kPageSize, 0, pfns, &other_tag), 0);
  EXPECT_EQ(pfns[0], 0u);
  // Another owner asking for the page faults it back to system memory.
  ASSERT_EQ(mirror_range(*as, notifier, base, base + kPageSize, HMM_PFN_REQ_FAULT, pfns, &other_tag), 0);
  EXPECT_EQ(dev.cpu_faults.load(), 1);
  EXPECT_EQ(query_page(*as, base).kind, PageKind::kSmall);
  EXPECT_EQ(hmm_pfn_to_pfn(pfns[0]), query_page(*as, base).pfn);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, base), 0xabcu);
  EXPECT_EQ(dev.freed.load(), 1);  // the device page went back to the device's allocator
}

}  // namespace
}  // namespace gpusvm::mm::testing
