// The port of the kernel's hmm-tests (tools/testing/selftests/mm/hmm-tests.c) on dmirror:
// same scenarios, same pass conditions (data, cpages, faults), test names as in the kernel.
// docs/hmm-tests-port.md §2 describes every test; the ones not here are listed in
// docs/dmirror.md with the model feature they wait for.
#include <chrono>
#include <cstdio>
#include <random>
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

std::unique_ptr<HmmBuffer> anon_buffer(devfs::Process& p, uint64_t size, int prot = PROT_READ | PROT_WRITE) {
  return HmmBuffer::map(p, size, size, prot, MAP_PRIVATE | MAP_ANONYMOUS);
}

// Simple NULL test of device open/close.
TEST_P(Hmm, open_close) {}

// Read private anonymous memory.
TEST_P(Hmm, anon_read) {
  auto buffer = anon_buffer(*proc, kSize);
  ASSERT_NE(buffer->ptr, 0u);
  // Initialize buffer in system memory but leave the first two pages zero (pte_none and
  // pfn_zero).
  const uint64_t skip = 2 * kPageSize / sizeof(int);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr + skip * sizeof(int), kInts - skip,
                           [](uint64_t i) { return static_cast<int>(i + 2 * kPageSize / sizeof(int)); }),
            0);
  // Set buffer permission to read-only.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kSize, PROT_READ), 0);
  // Populate the CPU page table with a special zero page.
  Result<int> val = mm::cpu::load<int>(proc->mm(), buffer->ptr + kPageSize);
  ASSERT_TRUE(val.ok());
  ASSERT_EQ(*val, 0);
  // Simulate a device reading system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  ASSERT_EQ(buffer->faults, 1u);
  // Check what the device read.
  uint64_t i = 0;
  for (; i < skip; ++i) ASSERT_EQ(buffer->mirror[i], 0) << i;
  for (; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], static_cast<int>(i)) << i;
}

// Read private anonymous memory which has been protected with mprotect() PROT_NONE.
TEST_P(Hmm, anon_read_prot) {
  auto buffer = anon_buffer(*proc, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Initialize mirror buffer so we can verify it isn't written.
  for (uint64_t i = 0; i < kInts; ++i) buffer->mirror[i] = neg(i);
  // Protect buffer from reading.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kSize, PROT_NONE), 0);
  // Simulate a device reading system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), kNpages), -EFAULT);
  // Allow CPU to read the buffer so we can check it.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kSize, PROT_READ), 0);
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
  // Check what the device read.
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], neg(i)) << i;
}

// Write private anonymous memory.
TEST_P(Hmm, anon_write) {
  auto buffer = anon_buffer(*proc, kSize);
  // Initialize data that the device will write to buffer->ptr.
  for (uint64_t i = 0; i < kInts; ++i) buffer->mirror[i] = ident(i);
  // Simulate a device writing system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  ASSERT_EQ(buffer->faults, 1u);
  // Check what the device wrote.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
}

// Write private anonymous memory which has been protected with mprotect() PROT_READ.
TEST_P(Hmm, anon_write_prot) {
  auto buffer = anon_buffer(*proc, kSize, PROT_READ);
  // Simulate a device reading a zero page of memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), 1), 0);
  ASSERT_EQ(buffer->cpages, 1u);
  ASSERT_EQ(buffer->faults, 1u);
  // Initialize data that the device will write to buffer->ptr.
  for (uint64_t i = 0; i < kInts; ++i) buffer->mirror[i] = ident(i);
  // Simulate a device writing system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), kNpages), -EPERM);
  // Check what the device wrote.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], 0) << i;
  // Now allow writing and see that the zero page is replaced.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kSize, PROT_WRITE | PROT_READ), 0);
  // Simulate a device writing system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  ASSERT_EQ(buffer->faults, 1u);
  // Check what the device wrote.
  v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
}

// Check that a device writing an anonymous shared mapping will not copy-on-write if a child
// process inherits the mapping.
TEST_P(Hmm, anon_write_child_shared) {
  auto buffer = HmmBuffer::map(*proc, kSize, kSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_NE(buffer->ptr, 0u);
  // Initialize buffer->ptr so we can tell if it is written.
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Initialize data that the device will write to buffer->ptr.
  for (uint64_t i = 0; i < kInts; ++i) buffer->mirror[i] = neg(i);

  Result<std::unique_ptr<devfs::Process>> child = proc->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  // The child: its own thread, its own mm, its own mirror of that mm.
  std::thread t([&] {
    devfs::Process& c = **child;
    // Check that we see the parent's values.
    int rc;
    std::vector<int> v = cpu_read_ints(c, buffer->ptr, kInts, &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], neg(i)) << i;
    // The child process needs its own mirror to its own mm.
    const int child_fd = hmm_open(c, 0);
    ASSERT_GE(child_fd, 0);
    // Simulate a device writing system memory.
    ASSERT_EQ(hmm_dmirror_cmd(c, child_fd, HMM_DMIRROR_WRITE, buffer.get(), kNpages), 0);
    EXPECT_EQ(buffer->cpages, kNpages);
    EXPECT_EQ(buffer->faults, 1u);
    // Check what the device wrote.
    v = cpu_read_ints(c, buffer->ptr, kInts, &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], neg(i)) << i;
    EXPECT_EQ(devfs::close(c, child_fd), 0);
    c.exit();  // _exit(0)
  });
  t.join();  // waitpid
  child->reset();
  ASSERT_FALSE(HasFatalFailure());
  // Check that the parent's buffer did change.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], neg(i)) << i;
}

// Write private anonymous huge page.
TEST_P(Hmm, anon_write_huge) {
  uint64_t size = 2 * TWOMEG;
  auto buffer = anon_buffer(*proc, size);
  ASSERT_NE(buffer->ptr, 0u);
  size /= 2;
  const uint64_t npages = size >> kPageShift;
  const Va map = align_up(buffer->ptr, size);
  ASSERT_EQ(proc->mm().madvise(map, size, MADV_HUGEPAGE), 0);
  // Initialize data that the device will write to buffer->ptr.
  for (uint64_t i = 0; i < size / sizeof(int); ++i) buffer->mirror[i] = ident(i);
  // Simulate a device writing system memory (through the aligned 2 MiB).
  HmmBuffer view;
  view.ptr = map;
  view.mirror = buffer->mirror;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, &view, npages), 0);
  ASSERT_EQ(view.cpages, npages);
  ASSERT_EQ(view.faults, 1u);
  // Check what the device wrote.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, map, size / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(v[i], ident(i)) << i;
}

// Migrate anonymous memory to device private memory.
TEST_P(Hmm, migrate) {
  auto buffer = anon_buffer(*proc, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  // Check what the device read.
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
}

// Migrate anonymous memory to device private memory and fault some of it back to system
// memory, then try migrating the resulting mix of system and device private memory to the
// device.
TEST_P(Hmm, migrate_fault) {
  auto buffer = anon_buffer(*proc, kSize);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Fault half the pages back to system memory and check them.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts / 2, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts / 2; ++i) ASSERT_EQ(v[i], ident(i)) << i;
  // Migrate memory to the device again.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  // Check what the device read.
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
}

// Migrate anonymous memory to device memory and back to system memory multiple times. In
// case of private zone configuration, this is done through fault pages accessed by CPU. In
// case of coherent zone configuration, the pages from the device should be explicitly
// migrated back to system memory: coherent device memory is accessed by the CPU without a
// page fault.
TEST_P(Hmm, migrate_multiple) {
  for (int c = 0; c < NTIMES; c++) {
    auto buffer = anon_buffer(*proc, kSize);
    ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
    // Migrate memory to device.
    ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
    ASSERT_EQ(buffer->cpages, kNpages);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
    // Migrate back to system memory and check them.
    if (coherent()) {
      ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer.get(), kNpages), 0);
      ASSERT_EQ(buffer->cpages, kNpages);
    }
    int rc;
    std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
  }
}

// Read anonymous memory multiple times.
TEST_P(Hmm, anon_read_multiple) {
  for (int c = 0; c < NTIMES; c++) {
    auto buffer = anon_buffer(*proc, kSize);
    std::vector<int> init(kInts);
    for (uint64_t i = 0; i < kInts; ++i) init[i] = static_cast<int>(i + c);
    ASSERT_EQ(mm::cpu::copy_in(proc->mm(), buffer->ptr, init.data(), kSize), 0);
    // Simulate a device reading system memory.
    ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), kNpages), 0);
    ASSERT_EQ(buffer->cpages, kNpages);
    ASSERT_EQ(buffer->faults, 1u);
    for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], static_cast<int>(i + c)) << i;
  }
}

// Try reading anonymous memory while it is being unmapped.
TEST_P(Hmm, anon_teardown) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int c = 0; c < NTIMES; ++c) {
    auto buffer = anon_buffer(*proc, kSize);
    std::vector<int> init(kInts);
    for (uint64_t i = 0; i < kInts; ++i) init[i] = static_cast<int>(i + c);
    ASSERT_EQ(mm::cpu::copy_in(proc->mm(), buffer->ptr, init.data(), kSize), 0);
    const auto delay = std::chrono::nanoseconds(rng() % 32000);
    // Delay for a bit and then unmap the upper half while it is being read.
    std::thread unmapper([&] {
      std::this_thread::sleep_for(delay);
      EXPECT_EQ(proc->mm().munmap(buffer->ptr + kSize / 2, kSize / 2), 0);
    });
    // Simulate a device reading system memory.
    const int rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), kNpages);
    if (rc == 0) {
      ASSERT_EQ(buffer->cpages, kNpages);
      ASSERT_EQ(buffer->faults, 1u);
      for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], static_cast<int>(i + c)) << i;
    } else {
      EXPECT_EQ(rc, -EFAULT);  // the upper half went away under the fault
    }
    unmapper.join();
  }
}

INSTANTIATE_TEST_SUITE_P(hmm_device_private, Hmm, ::testing::Values(DeviceType::kDevicePrivate));
INSTANTIATE_TEST_SUITE_P(hmm_device_coherent, Hmm, ::testing::Values(DeviceType::kDeviceCoherent));

// ---- hmm2: two devices ----

// Try to migrate various memory types to device private memory.
TEST_P(Hmm2, migrate_mixed) {
  const uint64_t npages = 6;
  const uint64_t size = npages << kPageShift;
  auto buffer = anon_buffer(*proc, size, PROT_NONE);
  const Va p = buffer->ptr;
  // Migrating a protected area should be an error.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), npages), -EINVAL);
  // Punch a hole after the first page address.
  ASSERT_EQ(proc->mm().munmap(p + kPageSize, kPageSize), 0);
  // We expect an error if the vma doesn't cover the range.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 3), -EINVAL);
  // Page 2 will be a read-only zero page.
  ASSERT_EQ(proc->mm().mprotect(p + 2 * kPageSize, kPageSize, PROT_READ), 0);
  Result<int> r = mm::cpu::load<int>(proc->mm(), p + 2 * kPageSize);
  ASSERT_TRUE(r.ok());
  const int val = *r + 3;
  ASSERT_EQ(val, 3);
  // Page 3 will be read-only.
  ASSERT_EQ(proc->mm().mprotect(p + 3 * kPageSize, kPageSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), p + 3 * kPageSize, val), 0);
  ASSERT_EQ(proc->mm().mprotect(p + 3 * kPageSize, kPageSize, PROT_READ), 0);
  // Page 4-5 will be read-write.
  ASSERT_EQ(proc->mm().mprotect(p + 4 * kPageSize, 2 * kPageSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), p + 4 * kPageSize, val), 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), p + 5 * kPageSize, val), 0);
  // Now try to migrate pages 2-5 to device 1.
  buffer->ptr = p + 2 * kPageSize;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 4), 0);
  ASSERT_EQ(buffer->cpages, 4u);
  // Page 5 won't be migrated to device 0 because it's on device 1.
  buffer->ptr = p + 5 * kPageSize;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 1), -ENOENT);
  buffer->ptr = p;
}

// Test memory snapshot without faulting in pages accessed by the device.
TEST_P(Hmm2, snapshot) {
  const uint64_t npages = 7;
  const uint64_t size = npages << kPageShift;
  // hmm-tests mallocs npages bytes of mirror and then lets MIGRATE_TO_DEV read a whole page
  // back into it (a heap overflow the C test survives); the port gives the mirror a page per
  // page.
  auto buffer = HmmBuffer::map(*proc, size, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  const Va p = buffer->ptr;
  // Punch a hole after the first page address.
  ASSERT_EQ(proc->mm().munmap(p + kPageSize, kPageSize), 0);
  // Page 2 will be read-only zero page.
  ASSERT_EQ(proc->mm().mprotect(p + 2 * kPageSize, kPageSize, PROT_READ), 0);
  Result<int> r = mm::cpu::load<int>(proc->mm(), p + 2 * kPageSize);
  ASSERT_TRUE(r.ok());
  const int val = *r + 3;
  ASSERT_EQ(val, 3);
  // Page 3 will be read-only.
  ASSERT_EQ(proc->mm().mprotect(p + 3 * kPageSize, kPageSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), p + 3 * kPageSize, val), 0);
  ASSERT_EQ(proc->mm().mprotect(p + 3 * kPageSize, kPageSize, PROT_READ), 0);
  // Page 4-6 will be read-write.
  ASSERT_EQ(proc->mm().mprotect(p + 4 * kPageSize, 3 * kPageSize, PROT_READ | PROT_WRITE), 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), p + 4 * kPageSize, val), 0);
  // Page 5 will be migrated to device 0.
  buffer->ptr = p + 5 * kPageSize;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 1), 0);
  ASSERT_EQ(buffer->cpages, 1u);
  // Page 6 will be migrated to device 1.
  buffer->ptr = p + 6 * kPageSize;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 1), 0);
  ASSERT_EQ(buffer->cpages, 1u);
  // Simulate a device snapshotting CPU pagetables.
  buffer->ptr = p;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // Check what the device saw.
  const uint8_t* m = buffer->mirror_bytes();
  ASSERT_EQ(m[0], HMM_DMIRROR_PROT_ERROR);
  ASSERT_EQ(m[1], HMM_DMIRROR_PROT_ERROR);
  ASSERT_EQ(m[2], HMM_DMIRROR_PROT_ZERO | HMM_DMIRROR_PROT_READ);
  ASSERT_EQ(m[3], HMM_DMIRROR_PROT_READ);
  ASSERT_EQ(m[4], HMM_DMIRROR_PROT_WRITE);
  if (!coherent()) {
    ASSERT_EQ(m[5], HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL | HMM_DMIRROR_PROT_WRITE);
    ASSERT_EQ(m[6], HMM_DMIRROR_PROT_NONE);
  } else {
    ASSERT_EQ(m[5], HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE);
    ASSERT_EQ(m[6], HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE | HMM_DMIRROR_PROT_WRITE);
  }
}

// Test two devices reading the same memory (double mapped).
TEST_P(Hmm2, double_map) {
  const uint64_t npages = 6;
  const uint64_t size = npages << kPageShift;
  const uint64_t ints = size / sizeof(int);
  auto buffer = anon_buffer(*proc, size);
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, ints, ident), 0);
  // Make region read-only.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, size, PROT_READ), 0);
  // Simulate device 0 reading system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_READ, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  ASSERT_EQ(buffer->faults, 1u);
  for (uint64_t i = 0; i < ints; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Simulate device 1 reading system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_READ, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  ASSERT_EQ(buffer->faults, 1u);
  for (uint64_t i = 0; i < ints; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Migrate pages to device 1 and try to read from device 0.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_READ, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  ASSERT_EQ(buffer->faults, 1u);
  for (uint64_t i = 0; i < ints; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
}

INSTANTIATE_TEST_SUITE_P(hmm2_device_private, Hmm2, ::testing::Values(DeviceType::kDevicePrivate));
INSTANTIATE_TEST_SUITE_P(hmm2_device_coherent, Hmm2, ::testing::Values(DeviceType::kDeviceCoherent));

}  // namespace
}  // namespace gpusvm::hmm_tests
