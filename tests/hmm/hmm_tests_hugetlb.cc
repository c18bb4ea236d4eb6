// The hugetlb tests of hmm-tests (docs/hmm-tests-port.md §2 rows 9 and 23): a private
// anonymous MAP_HUGETLB mapping of one 2 MiB page, written by the device through
// hmm_range_fault's write fault, and snapshotted with map order 9 (PROT_PMD).
//
// The kernel test SKIPs (6.12: returns) when the mmap fails for lack of a free huge page; the
// model's machine has 16 pool pages (like the oracle), so here the mmap must succeed.
#include "gpusvm/mm/address_space.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

int ident(uint64_t i) { return static_cast<int>(i); }

// Hugepagesize: 2048 kB in the model (one hstate, PMD size).
constexpr uint64_t kDefaultHsize = mm::kPmdSize;

// Write huge TLBFS page.
TEST_P(Hmm, anon_write_hugetlbfs) {
  const uint64_t size = align_up(TWOMEG, kDefaultHsize);
  const uint64_t npages = size >> kPageShift;
  auto buffer = HmmBuffer::map(*proc, size, size, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_NE(buffer->ptr, 0u) << "huge page could not be allocated";
  EXPECT_EQ(mem->hugetlb_counts().reserved, 1u);
  // Initialize data that the device will write to buffer->ptr.
  for (uint64_t i = 0; i < size / sizeof(int); ++i) buffer->mirror[i] = ident(i);
  // Simulate a device writing system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  ASSERT_EQ(buffer->faults, 1u);
  // The write fault consumed the reservation: one pool page in use, mapped by the PMD.
  EXPECT_EQ(mem->hugetlb_counts().reserved, 0u);
  EXPECT_EQ(mem->hugetlb_counts().in_use, 1u);
  EXPECT_EQ(proc->mm().stats().faults_hugetlb.get(), 1u);
  // Check what the device wrote.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, size / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(v[i], ident(i)) << i;
  buffer.reset();  // munmap gives the page back to the pool
  EXPECT_EQ(mem->hugetlb_counts().in_use, 0u);
  EXPECT_EQ(mem->hugetlb_counts().free, mem->hugetlb_counts().total);
}

// Test that hugetlb pages are reported to the device with their PMD size (compound).
TEST_P(Hmm, compound) {
  const uint64_t size = align_up(TWOMEG, kDefaultHsize);
  const uint64_t npages = size >> kPageShift;
  auto buffer = HmmBuffer::map(*proc, size, npages, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_NE(buffer->ptr, 0u) << "huge page could not be allocated";
  // Initialize the pages the device will snapshot in buffer->ptr.
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, size / sizeof(int), ident), 0);
  // Simulate a device snapshotting CPU pagetables.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // Check what the device saw.
  const uint8_t* m = buffer->mirror_bytes();
  for (uint64_t i = 0; i < npages; ++i) {
    ASSERT_EQ(m[i], HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD) << i;
  }
  // Make the region read-only.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, size, PROT_READ), 0);
  // Simulate a device snapshotting CPU pagetables.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // Check what the device saw.
  m = buffer->mirror_bytes();
  for (uint64_t i = 0; i < npages; ++i) {
    ASSERT_EQ(m[i], HMM_DMIRROR_PROT_READ | HMM_DMIRROR_PROT_PMD) << i;
  }
  // The data survived both snapshots and the mprotect (nothing was split or copied).
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, size / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(v[i], ident(i)) << i;
  EXPECT_EQ(proc->mm().stats().thp_split_pmd.get(), 0u);
}

// Not in hmm-tests: a device migration of a hugetlb range is refused (migrate_vma_setup
// returns -EINVAL for hugetlb VMAs, so the driver's MIGRATE_TO_DEV fails), and the data stays.
TEST_P(Hmm, migrate_hugetlb_refused) {
  const uint64_t size = TWOMEG;
  const uint64_t npages = size >> kPageShift;
  auto buffer = HmmBuffer::map(*proc, size, size, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB);
  ASSERT_NE(buffer->ptr, 0u);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, size / sizeof(int), ident), 0);
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), npages), -EINVAL);
  EXPECT_EQ(device().pages_in_use(), 0u);
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, size / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(v[i], ident(i)) << i;
  // make_device_exclusive refuses hugetlb pages (HMM_DMIRROR_EXCLUSIVE fails).
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), 1), -EOPNOTSUPP);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
