// hmm-tests port, second part: device release, device-exclusive access, fork with device
// pages, and the THP-shaped migration tests (which pass their conditions with the 4 KiB
// collection gpusvm/mm does today; the compound variants come with MIGRATE_VMA_SELECT_COMPOUND).
#include <thread>

#include "gpusvm/mm/address_space.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

int ident(uint64_t i) { return static_cast<int>(i); }
int neg(uint64_t i) { return -static_cast<int>(i); }

constexpr uint64_t kNpages = align_up(HMM_BUFFER_SIZE, kPageSize) >> kPageShift;
constexpr uint64_t kSize = kNpages << kPageShift;
constexpr uint64_t kInts = kSize / sizeof(int);
constexpr uint64_t kIntsPerPage = kPageSize / sizeof(int);

std::unique_ptr<HmmBuffer> anon_buffer(devfs::Process& p, uint64_t size, uint64_t mirror,
                                       int prot = PROT_READ | PROT_WRITE) {
  return HmmBuffer::map(p, size, mirror, prot, MAP_PRIVATE | MAP_ANONYMOUS);
}

// Points at `va` with the mirror of `b` (buffer->ptr = map in the C tests, without changing
// what hmm_buffer_free unmaps).
struct View {
  HmmBuffer h;
  View(HmmBuffer& b, Va va) : b_(b) {
    h.ptr = va;
    h.mirror.swap(b.mirror);
  }
  ~View() { b_.mirror.swap(h.mirror); }
  HmmBuffer& b_;
};

// The C tests' `for (i...) ASSERT_EQ(ptr[i]++, i [+ base])` loop, a page at a time: the CPU
// reads the page (faulting it back if needed), then writes it incremented.
void cpu_check_and_increment(devfs::Process& p, Va va, uint64_t ints, int base) {
  for (uint64_t i0 = 0; i0 < ints; i0 += kIntsPerPage) {
    int rc;
    std::vector<int> v = cpu_read_ints(p, va + i0 * sizeof(int), kIntsPerPage, &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t k = 0; k < kIntsPerPage; k++) {
      ASSERT_EQ(v[k], static_cast<int>(i0 + k) + base) << i0 + k;
      v[k]++;
    }
    ASSERT_EQ(mm::cpu::copy_in(p.mm(), va + i0 * sizeof(int), v.data(), kPageSize), 0);
  }
}

void cpu_expect_ints(devfs::Process& p, Va va, uint64_t ints, int (*f)(uint64_t), int base = 0) {
  int rc;
  std::vector<int> v = cpu_read_ints(p, va, ints, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < ints; ++i) ASSERT_EQ(v[i], f(i) + base) << i;
}

TEST_P(Hmm, migrate_release) {
  auto buffer = anon_buffer(*proc, kSize, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Release device memory.
  const uint64_t faults_before = device().cpu_faults.get();
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_RELEASE, buffer.get(), kNpages), 0);
  EXPECT_EQ(device().pages_in_use(), 0u);
  // Fault pages back to system memory and check them (they are already there).
  cpu_expect_ints(*proc, buffer->ptr, kInts / 2, ident);
  EXPECT_EQ(device().cpu_faults.get(), faults_before);
}

// Basic check of exclusive faulting.
TEST_P(Hmm, exclusive) {
  auto buffer = anon_buffer(*proc, kSize, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Map memory exclusively for device access.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Fault pages back to system memory and check them.
  cpu_check_and_increment(*proc, buffer->ptr, kInts, 0);
  cpu_expect_ints(*proc, buffer->ptr, kInts, ident, 1);
  // Check atomic access revoked.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_CHECK_EXCLUSIVE, buffer.get(), kNpages), 0);
}

TEST_P(Hmm, exclusive_mprotect) {
  auto buffer = anon_buffer(*proc, kSize, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kSize, PROT_READ), 0);
  // Simulate a device writing system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), kNpages), -EPERM);
}

// Check copy-on-write works.
TEST_P(Hmm, exclusive_cow) {
  auto buffer = anon_buffer(*proc, kSize, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_EXCLUSIVE, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  Result<std::unique_ptr<devfs::Process>> child = proc->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  // Child verifies COW independently, concurrently with the parent.
  std::thread t([&] {
    cpu_check_and_increment(**child, buffer->ptr, kInts, 0);
    cpu_expect_ints(**child, buffer->ptr, kInts, ident, 1);
    (*child)->exit();
  });
  // Parent: also increment to verify COW works for both processes.
  cpu_check_and_increment(*proc, buffer->ptr, kInts, 0);
  cpu_expect_ints(*proc, buffer->ptr, kInts, ident, 1);
  t.join();
  child->reset();
}

// Check that a device writing an anonymous private mapping will copy-on-write if a child
// process inherits the mapping; also that after fork() the child can read the memory, from
// system memory or from the device.
TEST_P(Hmm, anon_write_child) {
  for (int migrate = 0; migrate < 2; ++migrate) {
    for (int use_thp = 0; use_thp < 2; ++use_thp) {
      SCOPED_TRACE("migrate " + std::to_string(migrate) + " thp " + std::to_string(use_thp));
      const uint64_t npages = align_up(use_thp ? TWOMEG : HMM_BUFFER_SIZE, kPageSize) >> kPageShift;
      const uint64_t size = npages << kPageShift;
      const uint64_t ints = size / sizeof(int);
      auto buffer = anon_buffer(*proc, size * 2, size);
      Va ptr = buffer->ptr;
      if (use_thp) {
        ptr = align_up(buffer->ptr, size);
        ASSERT_EQ(proc->mm().madvise(ptr, size, MADV_HUGEPAGE), 0);
      }
      View view(*buffer, ptr);
      // Initialize buffer->ptr so we can tell if it is written.
      ASSERT_EQ(cpu_write_ints(*proc, ptr, ints, ident), 0);
      // Initialize data that the device will write to buffer->ptr.
      for (uint64_t i = 0; i < ints; ++i) view.h.mirror[i] = neg(i);
      if (migrate) {
        ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
        ASSERT_EQ(view.h.cpages, npages);
        // MIGRATE_TO_DEV read the data (i) back into the mirror: the child writes that.
      }
      Result<std::unique_ptr<devfs::Process>> child = proc->fork();
      ASSERT_TRUE(child.ok()) << child.error();
      std::thread t([&] {
        devfs::Process& c = **child;
        // Check that we see the parent's values.
        cpu_expect_ints(c, ptr, ints, ident);
        if (!migrate) {
          for (uint64_t i = 0; i < ints; ++i) ASSERT_EQ(view.h.mirror[i], neg(i)) << i;
        }
        // The child process needs its own mirror to its own mm.
        const int child_fd = hmm_open(c, 0);
        ASSERT_GE(child_fd, 0);
        // Simulate a device writing system memory.
        HmmBuffer cb;
        cb.ptr = ptr;
        cb.mirror = view.h.mirror;
        ASSERT_EQ(hmm_dmirror_cmd(c, child_fd, HMM_DMIRROR_WRITE, &cb, npages), 0);
        EXPECT_EQ(cb.cpages, npages);
        EXPECT_EQ(cb.faults, 1u);
        // Check what the device wrote.
        cpu_expect_ints(c, ptr, ints, migrate ? ident : neg);
        EXPECT_EQ(devfs::close(c, child_fd), 0);
        c.exit();  // _exit(0)
      });
      t.join();  // waitpid
      child->reset();
      ASSERT_FALSE(HasFatalFailure());
      // Check that the parent's buffer did not change.
      cpu_expect_ints(*proc, ptr, ints, ident);
    }
  }
}

// Test copy-on-write in device pages: the parent's write to a device page it shares with a
// child migrates it back to system memory first, then copies it.
TEST_P(Hmm, hmm_cow_in_device) {
  const uint64_t npages = 4;
  const uint64_t size = npages << kPageShift;
  auto buffer = anon_buffer(*proc, size, size);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, size / sizeof(int), ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // The child exists (and would spin) until the parent kills it.
  Result<std::unique_ptr<devfs::Process>> child = proc->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  // Parent process writes to COW pages and gets a new copy in system memory.
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, size / sizeof(int), ident), 0);
  // Terminate child (SIGKILL: its address space goes away) and wait.
  child->reset();
  // Take snapshot to CPU pagetables.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  const uint8_t* m = buffer->mirror_bytes();
  for (uint64_t i = 0; i < npages; i++) ASSERT_EQ(m[i], HMM_DMIRROR_PROT_WRITE) << i;
}

// Migrate private anonymous huge empty page.
TEST_P(Hmm, migrate_anon_huge_empty) {
  const uint64_t size = TWOMEG;
  auto buffer = anon_buffer(*proc, 2 * size, size, PROT_READ);
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);  // memset 0xFF
  const uint64_t npages = size >> kPageShift;
  const Va map = align_up(buffer->ptr, size);
  ASSERT_EQ(proc->mm().madvise(map, size, MADV_HUGEPAGE), 0);
  View view(*buffer, map);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
  ASSERT_EQ(view.h.cpages, npages);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(view.h.mirror[i], 0) << i;
}

// Migrate private anonymous huge zero page.
TEST_P(Hmm, migrate_anon_huge_zero) {
  const uint64_t size = TWOMEG;
  auto buffer = anon_buffer(*proc, 2 * size, size, PROT_READ);
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
  const uint64_t npages = size >> kPageShift;
  const Va map = align_up(buffer->ptr, size);
  ASSERT_EQ(proc->mm().madvise(map, size, MADV_HUGEPAGE), 0);
  View view(*buffer, map);
  // Initialize a read-only zero huge page.
  Result<int> val = mm::cpu::load<int>(proc->mm(), map);
  ASSERT_TRUE(val.ok());
  ASSERT_EQ(*val, 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
  ASSERT_EQ(view.h.cpages, npages);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(view.h.mirror[i], 0) << i;
  // Fault pages back to system memory and check them.
  cpu_expect_ints(*proc, map, size / sizeof(int), [](uint64_t) { return 0; });
}

// Migrate private anonymous huge page and free.
TEST_P(Hmm, migrate_anon_huge_free) {
  const uint64_t size = TWOMEG;
  auto buffer = anon_buffer(*proc, 2 * size, size);
  std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
  const uint64_t npages = size >> kPageShift;
  const Va map = align_up(buffer->ptr, size);
  ASSERT_EQ(proc->mm().madvise(map, size, MADV_HUGEPAGE), 0);
  View view(*buffer, map);
  ASSERT_EQ(cpu_write_ints(*proc, map, size / sizeof(int), ident), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
  ASSERT_EQ(view.h.cpages, npages);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(view.h.mirror[i], ident(i)) << i;
  // Try freeing it.
  ASSERT_EQ(proc->mm().madvise(map, size, MADV_FREE), 0);
}

// Migrate memory and fault back to sysmem after partially unmapping.
TEST_P(Hmm, migrate_partial_unmap_fault) {
  const uint64_t size = TWOMEG;
  const uint64_t unmap_size = size / 2;
  const uint64_t offsets[3] = {0, size / 4, size / 2};
  for (int use_thp = 0; use_thp < 2; ++use_thp) {
    for (uint64_t off : offsets) {
      SCOPED_TRACE("thp " + std::to_string(use_thp) + " offset " + std::to_string(off));
      auto buffer = anon_buffer(*proc, 2 * size, size);
      std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
      const uint64_t npages = size >> kPageShift;
      const Va map = align_up(buffer->ptr, size);
      ASSERT_EQ(proc->mm().madvise(map, size, use_thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0);
      View view(*buffer, map);
      ASSERT_EQ(cpu_write_ints(*proc, map, size / sizeof(int), ident), 0);
      ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
      ASSERT_EQ(view.h.cpages, npages);
      for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(view.h.mirror[i], ident(i)) << i;
      ASSERT_EQ(proc->mm().munmap(map + off, unmap_size), 0);
      // Fault pages back to system memory and check them.
      if (off > 0) cpu_expect_ints(*proc, map, off / sizeof(int), ident);
      const uint64_t rest = off + unmap_size;
      if (rest < size) {
        int rc;
        std::vector<int> v = cpu_read_ints(*proc, map + rest, (size - rest) / sizeof(int), &rc);
        ASSERT_EQ(rc, 0);
        for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], ident(rest / sizeof(int) + i)) << i;
      }
    }
  }
}

TEST_P(Hmm, migrate_remap_fault) {
  const uint64_t size = TWOMEG;
  const uint64_t offsets[3] = {0, size / 4, size / 2};
  for (int before = 0; before < 2; ++before) {
    for (int dont_unmap = 0; dont_unmap < 2; ++dont_unmap) {
      for (int use_thp = 0; use_thp < 2; ++use_thp) {
        for (uint64_t off : offsets) {
          SCOPED_TRACE("before " + std::to_string(before) + " dont_unmap " + std::to_string(dont_unmap) +
                       " thp " + std::to_string(use_thp) + " offset " + std::to_string(off));
          int flags = MREMAP_MAYMOVE | MREMAP_FIXED;
          if (dont_unmap) flags |= MREMAP_DONTUNMAP;
          auto buffer = anon_buffer(*proc, 8 * size, size);
          std::fill(buffer->mirror.begin(), buffer->mirror.end(), -1);
          const uint64_t npages = size >> kPageShift;
          const Va map = align_up(buffer->ptr, size);
          ASSERT_EQ(proc->mm().madvise(map, size, use_thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0);
          ASSERT_EQ(proc->mm().munmap(map + size, size * 2), 0);
          View view(*buffer, map);
          ASSERT_EQ(cpu_write_ints(*proc, map, size / sizeof(int), ident), 0);
          Va new_ptr = 0;
          if (before) {
            Result<Va> r = proc->mm().mremap(map, size, size, flags, map + size + off);
            ASSERT_TRUE(r.ok()) << r.error();
            new_ptr = *r;
            view.h.ptr = new_ptr;
          }
          ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &view.h, npages), 0);
          ASSERT_EQ(view.h.cpages, npages);
          for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(view.h.mirror[i], ident(i)) << i;
          if (!before) {
            Result<Va> r = proc->mm().mremap(map, size, size, flags, map + size + off);
            ASSERT_TRUE(r.ok()) << r.error();
            new_ptr = *r;
            view.h.ptr = new_ptr;
          }
          // Fault pages back to system memory and check them.
          cpu_expect_ints(*proc, new_ptr, size / sizeof(int), ident);
          ASSERT_EQ(proc->mm().munmap(new_ptr, size), 0);
        }
      }
    }
  }
}

}  // namespace
}  // namespace gpusvm::hmm_tests
