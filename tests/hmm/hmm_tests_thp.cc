// hmm-tests port, compound migration: 2 MiB folios moved whole (MIGRATE_VMA_SELECT_COMPOUND),
// device-private PMDs, and the FAIL_ALLOC fallbacks to 512 small pages (seed 003's split
// during migration, in both directions).
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/page_state.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

int ident(uint64_t i) { return static_cast<int>(i); }

constexpr uint64_t kSize = TWOMEG;
constexpr uint64_t kNpages = kSize >> kPageShift;
constexpr uint64_t kInts = kSize / sizeof(int);

// mmap(2 * size) and the aligned 2 MiB inside it with MADV_HUGEPAGE.
struct ThpBuffer {
  ThpBuffer(devfs::Process& p, int prot) : proc(p) { remap(prot); }
  ~ThpBuffer() {
    if (old_ptr) {
      EXPECT_EQ(proc.mm().munmap(old_ptr, 2 * kSize), 0);
    }
  }
  void remap(int prot) {
    if (old_ptr) {
      ASSERT_EQ(proc.mm().munmap(old_ptr, 2 * kSize), 0);
    }
    Result<Va> va = proc.mm().mmap(0, 2 * kSize, prot, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(va.ok());
    old_ptr = *va;
    h.ptr = align_up(old_ptr, kSize);
    ASSERT_EQ(proc.mm().madvise(h.ptr, kSize, MADV_HUGEPAGE), 0);
  }
  devfs::Process& proc;
  Va old_ptr = 0;
  HmmBuffer h;  // ptr = the aligned 2 MiB; mirror below
};

int cpu_int(devfs::Process& p, Va va) {
  Result<int> v = mm::cpu::load<int>(p.mm(), va);
  EXPECT_TRUE(v.ok());
  return v.ok() ? *v : -1;
}

// Migrate private anonymous huge page and fault back to sysmem.
TEST_P(Hmm, migrate_anon_huge_fault) {
  Result<Va> va = proc->mm().mmap(0, 2 * kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(va.ok());
  HmmBuffer b;
  b.ptr = align_up(*va, kSize);
  b.mirror.assign(kInts, -1);
  ASSERT_EQ(cpu_write_ints(*proc, b.ptr, kInts, ident), 0);
  ASSERT_EQ(proc->mm().madvise(b.ptr, kSize, MADV_COLLAPSE), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &b, kNpages), 0);
  ASSERT_EQ(b.cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(b.mirror[i], ident(i)) << i;
  if (!coherent()) {
    ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, &b, kNpages), 0);
    ASSERT_EQ(b.cpages, kNpages);
    const uint8_t* m = b.mirror_bytes();
    for (uint64_t i = 0; i < kNpages; ++i) {
      ASSERT_EQ(m[i], HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD) << i;
    }
    // /proc/self/pagemap: every page is swap-like (PM_SWAP), not present.
    for (uint64_t i = 0; i < kNpages; ++i) {
      ASSERT_EQ(mm::query_page(proc->mm(), b.ptr + i * kPageSize).kind, mm::PageKind::kSoftLeaf) << i;
    }
  }
  // Fault pages back to system memory and check them.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, b.ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
  ASSERT_EQ(proc->mm().munmap(*va, 2 * kSize), 0);
}

// Migrate private anonymous huge page with allocation errors.
TEST_P(Hmm, migrate_anon_huge_err) {
  ThpBuffer buf(*proc, PROT_READ | PROT_WRITE);
  buf.h.mirror.assign(2 * kSize / sizeof(int), -1);
  ASSERT_EQ(cpu_write_ints(*proc, buf.h.ptr, kInts, ident), 0);
  // Migrate memory to device but force a THP allocation error.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &buf.h, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &buf.h, kNpages), 0);
  ASSERT_EQ(buf.h.cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buf.h.mirror[i], ident(i)) << i;
  // Try faulting back a single (PAGE_SIZE) page.
  ASSERT_EQ(cpu_int(*proc, buf.h.ptr + 2048 * sizeof(int)), 2048);
  // Unmap and remap the region to reset things.
  ASSERT_NO_FATAL_FAILURE(buf.remap(PROT_READ | PROT_WRITE));
  ASSERT_EQ(cpu_write_ints(*proc, buf.h.ptr, kInts, ident), 0);
  // Migrate THP to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &buf.h, kNpages), 0);
  ASSERT_EQ(buf.h.cpages, kNpages);
  // Force an allocation error when migrating back a THP resident in the device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &buf.h, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, &buf.h, kNpages), 0);
  ASSERT_EQ(cpu_int(*proc, buf.h.ptr + 2048 * sizeof(int)), 2048);
}

// Migrate private anonymous huge zero page with allocation errors. (The C test's second
// `ptr[0]` read goes through the pointer of the first mapping and relies on the new mmap
// landing at the same address; the port reads through the new mapping.)
TEST_P(Hmm, migrate_anon_huge_zero_err) {
  ThpBuffer buf(*proc, PROT_READ);
  buf.h.mirror.assign(2 * kSize / sizeof(int), -1);
  // Migrate memory to device but force a THP allocation error.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &buf.h, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &buf.h, kNpages), 0);
  ASSERT_EQ(buf.h.cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buf.h.mirror[i], 0) << i;
  // Try faulting back a single (PAGE_SIZE) page.
  ASSERT_EQ(cpu_int(*proc, buf.h.ptr + 2048 * sizeof(int)), 0);
  // Unmap and remap the region to reset things.
  ASSERT_NO_FATAL_FAILURE(buf.remap(PROT_READ));
  // Initialize buffer in system memory (zero THP page).
  ASSERT_EQ(cpu_int(*proc, buf.h.ptr), 0);
  // Migrate memory to device but force a THP allocation error.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &buf.h, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &buf.h, kNpages), 0);
  ASSERT_EQ(buf.h.cpages, kNpages);
  // Fault the device memory back and check it.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buf.h.ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], 0) << i;
}

// benchmark_thp_migration, as a smoke test: one size (one THP), THP and 4 KiB, one warm-up
// and one timed-shape iteration; every call must succeed and the data survive. The figures
// belong to tools/gpusvm-bench (DESIGN §10: no timed tests).
TEST_P(Hmm, benchmark_thp_migration) {
  for (int use_thp = 0; use_thp < 2; ++use_thp) {
    SCOPED_TRACE("thp " + std::to_string(use_thp));
    auto buffer = HmmBuffer::map(*proc, kSize, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_EQ(proc->mm().madvise(buffer->ptr, kSize, use_thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0);
    ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, [](uint64_t i) { return static_cast<int>(i & 0xFF); }), 0);
    for (int it = 0; it < 2; it++) {
      ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
      ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer.get(), kNpages), 0);
    }
    int rc;
    std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], static_cast<int>(i & 0xFF)) << i;
  }
}

}  // namespace
}  // namespace gpusvm::hmm_tests
