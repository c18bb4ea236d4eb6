// The hmm-tests that need the host-model features added for them (docs/mm.md "File objects",
// "Device-file mmap", "GUP and pins"): file_read, file_write, migrate_file_private,
// migrate_shared, mixedmap and hmm_gup_test (device-private). Same scenarios and pass conditions as the kernel's
// tools/testing/selftests/mm/hmm-tests.c; test names as there.
//
// Mapping of the C harness for these tests: hmm_create_file(size) (O_TMPFILE + ftruncate) ->
// ShmemObject::create; pwrite/pread on the fd -> ShmemObject::pwrite/pread; mmap of the file
// -> AddressSpace::mmap with the object; mmap of the dmirror fd -> devfs::mmap; the gup_test
// debugfs ioctls -> gup_test_exec below, which does what mm/gup_test.c does for each command
// (take the pages, release them before returning).
#include <cstring>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/shmem.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

int ident(uint64_t i) { return static_cast<int>(i); }

constexpr uint64_t kNpages = align_up(HMM_BUFFER_SIZE, kPageSize) >> kPageShift;
constexpr uint64_t kSize = kNpages << kPageShift;
constexpr uint64_t kInts = kSize / sizeof(int);

// hmm_create_file: an unlinked temporary file of `size` bytes.
std::shared_ptr<mm::ShmemObject> hmm_create_file(mm::PhysMem* mem, uint64_t size) {
  Result<std::shared_ptr<mm::ShmemObject>> f = mm::ShmemObject::create(mem, size, "hmm-tests-tmpfile");
  return f.ok() ? *f : nullptr;
}

// A buffer whose mapping is the file (buffer->fd = fd; mmap(NULL, size, prot, flags, fd, 0)).
std::unique_ptr<HmmBuffer> file_buffer(devfs::Process& p, std::shared_ptr<mm::ShmemObject> file,
                                       uint64_t size, int prot, int flags) {
  auto b = std::make_unique<HmmBuffer>();
  b->proc = &p;
  b->size = size;
  b->mirror.assign(size / sizeof(int), 0);
  Result<Va> va = p.mm().mmap(0, size, prot, flags, std::move(file));
  EXPECT_TRUE(va.ok()) << "mmap: " << va.error();
  b->ptr = va.ok() ? *va : 0;
  return b;
}

// Read mmap'ed file memory.
TEST_P(Hmm, file_read) {
  auto file = hmm_create_file(mem, kSize);
  ASSERT_NE(file, nullptr);
  // Write initial contents of the file.
  std::vector<int> init(kInts);
  for (uint64_t i = 0; i < kInts; ++i) init[i] = ident(i);
  ASSERT_EQ(file->pwrite(init.data(), kSize, 0), static_cast<int64_t>(kSize));
  auto buffer = file_buffer(*proc, file, kSize, PROT_READ, MAP_SHARED);
  ASSERT_NE(buffer->ptr, 0u);
  // Simulate a device reading system memory.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  ASSERT_EQ(buffer->faults, 1u);
  // Check what the device read.
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
}

// Write mmap'ed file memory.
TEST_P(Hmm, file_write) {
  auto file = hmm_create_file(mem, kSize);
  ASSERT_NE(file, nullptr);
  auto buffer = file_buffer(*proc, file, kSize, PROT_READ | PROT_WRITE, MAP_SHARED);
  ASSERT_NE(buffer->ptr, 0u);
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
  // Check that the device also wrote the file.
  std::vector<int> back(kInts, -1);
  ASSERT_EQ(file->pread(back.data(), kSize, 0), static_cast<int64_t>(kSize));
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(back[i], ident(i)) << i;
}

// Migrate private file memory to device private memory.
TEST_P(Hmm, migrate_file_private) {
  auto file = hmm_create_file(mem, kSize);
  ASSERT_NE(file, nullptr);
  auto buffer = file_buffer(*proc, file, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE);
  ASSERT_NE(buffer->ptr, 0u);
  // Initialize buffer in system memory (every page becomes a private anonymous copy).
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, kInts, ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), 0);
  ASSERT_EQ(buffer->cpages, kNpages);
  // Check what the device read.
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  // Not in the C test: the copies moved, the file did not see the writes, and the CPU gets
  // its data back from the device.
  std::vector<int> back(kInts, -1);
  ASSERT_EQ(file->pread(back.data(), kSize, 0), static_cast<int64_t>(kSize));
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(back[i], 0) << i;
  EXPECT_EQ(device().pages_in_use(), kNpages);
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, kInts, &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < kInts; ++i) ASSERT_EQ(v[i], ident(i)) << i;
}

// Migrate anonymous shared memory to device private memory. Not a test this file was written
// for, but what the migrate_vma_setup change for migrate_file_private (refuse only hugetlb and
// VM_SPECIAL VMAs, as Linux) makes possible: nothing of the untouched shmem range is collected,
// so the read-back finds no device entry.
TEST_P(Hmm, migrate_shared) {
  auto buffer = HmmBuffer::map(*proc, kSize, kSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_NE(buffer->ptr, 0u);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), kNpages), -ENOENT);
  EXPECT_EQ(device().pages_in_use(), 0u);
}

// Test memory snapshot without faulting in pages accessed by the device (mmap of the device
// file: one zeroed page inserted by the driver, read-only in a private mapping).
TEST_P(Hmm, mixedmap) {
  const uint64_t npages = 1;
  const uint64_t size = npages << kPageShift;
  auto buffer = std::make_unique<HmmBuffer>();
  buffer->proc = proc;
  buffer->size = size;
  buffer->mirror.assign(1, 0);  // malloc(npages): one byte per page
  // Reserve a range of addresses.
  Result<Va> va = devfs::mmap(*proc, 0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ASSERT_TRUE(va.ok()) << va.error();
  buffer->ptr = *va;
  // Simulate a device snapshotting CPU pagetables.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // Check what the device saw.
  const uint8_t* m = buffer->mirror_bytes();
  ASSERT_EQ(m[0], HMM_DMIRROR_PROT_READ);
}

// Not in the C test: the page is the driver's zeroed page; a CPU write copies it (the
// snapshot then sees an ordinary writable page); a failed page allocation fails the mmap
// with nothing left; a closed fd is -EBADF.
TEST_P(Hmm, mixedmap_model_rules) {
  Result<Va> va = devfs::mmap(*proc, 0, 2 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ASSERT_TRUE(va.ok());
  auto buffer = std::make_unique<HmmBuffer>();
  buffer->proc = proc;
  buffer->size = 2 * kPageSize;
  buffer->ptr = *va;
  buffer->mirror.assign(1, 0);
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, *va, 2 * kPageSize / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (int x : v) ASSERT_EQ(x, 0);
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), *va + kPageSize, 5), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), 2), 0);
  EXPECT_EQ(buffer->mirror_bytes()[0], HMM_DMIRROR_PROT_READ);
  EXPECT_EQ(buffer->mirror_bytes()[1], HMM_DMIRROR_PROT_WRITE);
  EXPECT_MM_CHECK_OK(*mem);
  {
    const uint64_t free0 = mem->free_pages();
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 2});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(devfs::mmap(*proc, 0, 4 * kPageSize, PROT_READ, MAP_PRIVATE, fd, 0).error(), -ENOMEM);
    EXPECT_EQ(mem->free_pages(), free0);
  }
  EXPECT_EQ(devfs::mmap(*proc, 0, kPageSize, PROT_READ, MAP_PRIVATE, 99, 0).error(), -EBADF);
}

// mm/gup_test.c's commands, as hmm_gup_test uses them: take the pages the way the command
// names, then release them before returning (gup_test_exec in the C test is one ioctl).
enum GupTestCmd { GUP_BASIC_TEST, GUP_FAST_BENCHMARK, PIN_FAST_BENCHMARK, PIN_LONGTERM_BENCHMARK };

int gup_test_exec(devfs::Process& p, Va addr, GupTestCmd cmd, unsigned long npages, unsigned flags) {
  std::vector<mm::Folio*> pages(npages);
  const unsigned gup_flags = mm::FOLL_WRITE | flags;
  long got = 0;
  switch (cmd) {
    case GUP_BASIC_TEST: {
      ReadLock g(&p.mm().mmap_lock());
      got = mm::get_user_pages(p.mm(), addr, npages, gup_flags, pages.data());
      break;
    }
    case GUP_FAST_BENCHMARK:
      got = mm::get_user_pages_fast(p.mm(), addr, npages, gup_flags, pages.data());
      break;
    case PIN_FAST_BENCHMARK:
      got = mm::pin_user_pages_fast(p.mm(), addr, npages, gup_flags, pages.data());
      break;
    case PIN_LONGTERM_BENCHMARK: {
      ReadLock g(&p.mm().mmap_lock());
      got = mm::pin_user_pages(p.mm(), addr, npages, gup_flags | mm::FOLL_LONGTERM, pages.data());
      break;
    }
  }
  if (got < 0) return static_cast<int>(got);
  const bool pinned = cmd == PIN_FAST_BENCHMARK || cmd == PIN_LONGTERM_BENCHMARK;
  for (long i = 0; i < got; i++) {
    if (pinned) {
      EXPECT_EQ(pages[i]->head()->pincount(), 1);
      mm::unpin_user_page(pages[i]);
    } else {
      mm::put_page(pages[i]);
    }
  }
  return got == static_cast<long>(npages) ? 0 : -EFAULT;
}

// Test get user device pages through gup_test. Setting PIN_LONGTERM flag. This should
// trigger a migration back to system memory for both, private and coherent type pages.
TEST_P(Hmm, hmm_gup_test) {
  const uint64_t npages = 4;
  const uint64_t size = npages << kPageShift;
  auto buffer = HmmBuffer::map(*proc, size, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  // Initialize buffer in system memory.
  ASSERT_EQ(cpu_write_ints(*proc, buffer->ptr, size / sizeof(int), ident), 0);
  // Migrate memory to device.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  // Check what the device read.
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(buffer->mirror[i], ident(i)) << i;
  ASSERT_EQ(gup_test_exec(*proc, buffer->ptr, GUP_BASIC_TEST, 1, 0), 0);
  ASSERT_EQ(gup_test_exec(*proc, buffer->ptr + 1 * kPageSize, GUP_FAST_BENCHMARK, 1, 0), 0);
  ASSERT_EQ(gup_test_exec(*proc, buffer->ptr + 2 * kPageSize, PIN_FAST_BENCHMARK, 1, mm::FOLL_LONGTERM), 0);
  ASSERT_EQ(gup_test_exec(*proc, buffer->ptr + 3 * kPageSize, PIN_LONGTERM_BENCHMARK, 1, 0), 0);
  // Take snapshot to CPU pagetables.
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_SNAPSHOT, buffer.get(), npages), 0);
  ASSERT_EQ(buffer->cpages, npages);
  const uint8_t* m = buffer->mirror_bytes();
  if (coherent()) {
    ASSERT_EQ(m[0], HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE);
    ASSERT_EQ(m[1], HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE);
  } else {
    ASSERT_EQ(m[0], HMM_DMIRROR_PROT_WRITE);
    ASSERT_EQ(m[1], HMM_DMIRROR_PROT_WRITE);
  }
  ASSERT_EQ(m[2], HMM_DMIRROR_PROT_WRITE);
  ASSERT_EQ(m[3], HMM_DMIRROR_PROT_WRITE);
  // Check again the content on the pages. Make sure there's no corrupted data.
  int rc;
  std::vector<int> v = cpu_read_ints(*proc, buffer->ptr, size / sizeof(int), &rc);
  ASSERT_EQ(rc, 0);
  for (uint64_t i = 0; i < size / sizeof(int); ++i) ASSERT_EQ(v[i], ident(i)) << i;
  // Every page came back from the device, but the coherent pages that only GUP (not a
  // longterm pin) touched: the CPU maps those in place.
  EXPECT_EQ(device().pages_in_use(), coherent() ? 2u : 0u);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
