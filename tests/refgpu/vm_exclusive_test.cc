// DEVICE atomics on system memory through device-exclusive entries (drivers/refgpu/
// vm_exclusive.cc): a device atomic makes the range's pages device-exclusive and maps them
// atomic; a CPU access (or fork, or munmap) takes them back and revokes the GPU mapping.
// Real engines run the batches; every value is checked from the CPU; TearDown checks the GPU
// PTEs against the CPU page table (an atomic system leaf under DEVICE must sit over a
// device-exclusive entry) and runs mm::check.
#include <gtest/gtest.h>

#include <memory>
#include <optional>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/page_state.h"
#include "tests/refgpu/vm_test_fixture.h"

namespace gpusvm::refgpu {
namespace {

using testing::Batch;
using testing::kBase;
using testing::kWait;

class VmExclusiveTest : public testing::VmTest {
 protected:
  // The counter's 2 MiB attribute piece gets the DEVICE policy; batches stay elsewhere.
  static constexpr uint64_t kPiece = kBase + 4 * kSZ2M;
  static constexpr uint64_t kCtr = kPiece;  // the first page: the first one converted

  void SetUp() override {
    VmTest::SetUp();
    make_vm();
    mirror_all();
    ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 16 * kSZ4K), 0);
    ASSERT_EQ(vm->madvise_atomic(kPiece, kSZ2M, REFGPU_ATOMIC_DEVICE), 0);
    ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kCtr, 100), 0);
  }
  // Runs n device increments of kCtr from batch slot `slot`.
  int gpu_inc(int n, unsigned slot) {
    Batch b;
    for (int i = 0; i < n; i++) b.atomic(REFGPU_ATOMIC_OP_INC, kCtr, 0, 0, REFGPU_CMD_FLAG_QWORD);
    return run(kBatch + slot * kSZ4K, b);
  }
  bool cpu_entry_exclusive(uint64_t va) {
    const mm::PageState s = mm::query_page(*as, va);
    return s.kind == mm::PageKind::kSoftLeaf && s.leaf == mm::SoftLeafType::kDeviceExclusive;
  }
  bool gpu_atomic(uint64_t va) {
    std::optional<GpuLeaf> l = vm->page_table().lookup(va);
    return l && (l->perms & kPermAtomic);
  }
};

// The CPU and the device increment one counter in turns: each device atomic converts the
// pages and maps them atomic, each CPU access takes them back and revokes the mapping. The
// final value is exact.
TEST_F(VmExclusiveTest, CpuAndDeviceIncrementInTurns) {
  // A plain device write under DEVICE maps system memory without the atomic bit and without
  // making anything exclusive.
  Batch st;
  st.store_qword(kCtr + 8, 7);
  ASSERT_EQ(run(kBatch, st), 0);
  EXPECT_FALSE(gpu_atomic(kCtr + 8));
  EXPECT_EQ(as->stats().exclusive_made.get(), 0u);

  uint64_t expect = 100;
  uint64_t retries_after_first = 0;
  for (unsigned round = 0; round < 4; round++) {
    const uint64_t made = as->stats().exclusive_made.get();
    const uint64_t restored = as->stats().exclusive_restored.get();
    ASSERT_EQ(gpu_inc(3, 1 + round), 0) << round;
    expect += 3;
    // Every page of the range (the whole 2 MiB piece) is the device's now, mapped atomic.
    EXPECT_TRUE(gpu_atomic(kCtr));
    EXPECT_TRUE(cpu_entry_exclusive(kCtr));
    EXPECT_TRUE(cpu_entry_exclusive(kPiece + kSZ2M - kSZ4K));
    // The first round may convert page 0 twice: converting it splits the THP's PMD, an
    // invalidation that is not ours, so the service runs once more. Later rounds never retry.
    if (round == 0) {
      EXPECT_GE(as->stats().exclusive_made.get() - made, kSZ2M / kSZ4K);
      retries_after_first = vm->stats().fault_retries.get();
      EXPECT_LE(retries_after_first, 1u);
    } else {
      EXPECT_EQ(as->stats().exclusive_made.get() - made, kSZ2M / kSZ4K);
    }
    EXPECT_EQ(vm->check_ptes(), 0);
    // The CPU's increment faults the page back: the GPU mapping of the range goes.
    Result<uint64_t> v = mm::cpu::load<uint64_t>(*as, kCtr);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, expect);
    EXPECT_FALSE(cpu_entry_exclusive(kCtr));
    EXPECT_FALSE(vm->page_table().lookup(kCtr)) << "GPU mapping not revoked by the CPU access";
    EXPECT_GT(as->stats().exclusive_restored.get(), restored);
    ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kCtr, *v + 1), 0);
    expect += 1;
  }
  EXPECT_EQ(load(kCtr), expect);
  EXPECT_EQ(load(kCtr + 8), 7u);  // the plain write survived every conversion
  // Each conversion's own EXCLUSIVE invalidation was recognised, never treated as a reason
  // to retry.
  EXPECT_GE(vm->stats().exclusive_pages.get(), 4 * (kSZ2M / kSZ4K));
  EXPECT_EQ(vm->stats().exclusive_skipped_invalidations.get(), vm->stats().exclusive_pages.get());
  EXPECT_EQ(vm->stats().fault_retries.get(), retries_after_first);
}

// fork while the device holds the pages: fork gives them back to the parent first (the GPU
// mapping is revoked), the child gets a copy; the next device atomic converts the parent's
// pages again and the child's copy is untouched.
TEST_F(VmExclusiveTest, ForkWhileExclusive) {
  ASSERT_EQ(gpu_inc(5, 1), 0);
  ASSERT_TRUE(cpu_entry_exclusive(kCtr));
  Result<std::unique_ptr<mm::AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  EXPECT_FALSE(cpu_entry_exclusive(kCtr));
  EXPECT_FALSE(vm->page_table().lookup(kCtr));
  EXPECT_EQ(vm->check_ptes(), 0);
  ASSERT_EQ(gpu_inc(2, 2), 0);
  EXPECT_TRUE(cpu_entry_exclusive(kCtr));
  EXPECT_EQ(load(kCtr), 107u);
  Result<uint64_t> c = mm::cpu::load<uint64_t>(**child, kCtr);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, 105u);
  child->reset();
  EXPECT_MM_CHECK_OK(*mem);
}

// munmap while the device holds the pages: the entries go with the mapping, the GPU mapping
// with them (the range is collected); the VA mapped again works from both sides.
TEST_F(VmExclusiveTest, MunmapWhileExclusive) {
  ASSERT_EQ(gpu_inc(4, 1), 0);
  ASSERT_TRUE(cpu_entry_exclusive(kCtr));
  ASSERT_EQ(as->munmap(kPiece, kSZ2M), 0);
  EXPECT_FALSE(vm->page_table().lookup(kCtr));
  EXPECT_MM_CHECK_OK(*mem);
  map(kPiece, kSZ2M);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kCtr, 40), 0);
  ASSERT_EQ(gpu_inc(2, 2), 0);
  EXPECT_TRUE(cpu_entry_exclusive(kCtr));
  EXPECT_EQ(load(kCtr), 42u);
}

// The CPU touches a page the conversion has already made exclusive, before the commit:
//
//   fault handler (vm lock, mmap lock read)        CPU
//   get_pages: all 512 pages present
//   make_device_exclusive(kCtr)   (own EXCLUSIVE invalidation: skipped, pages stay valid)
//   -- refgpu.fault.exclusive_made --            store kCtr: fault on the exclusive entry,
//                                                 CLEAR invalidation: zap + unmap the pages,
//                                                 the PTE is present again, 1000 written
//   next page: pages_valid false -> -EAGAIN
//   again: get_pages (gives back the rest), convert all, commit, the atomic runs
//
// The device's increment is neither lost nor applied to a stale copy: 100 + 1000 + 1.
TEST_F(VmExclusiveTest, CpuAccessRacingTheConversionRetries) {
  sched_point::Pause pause("refgpu.fault.exclusive_made", {.thread = "refgpu-fault"});
  ASSERT_EQ(pause.status(), 0);
  Batch b;
  b.atomic(REFGPU_ATOMIC_OP_INC, kCtr, 0, 0, REFGPU_CMD_FLAG_QWORD);
  std::shared_ptr<Fence> f = submit(kBatch + kSZ4K, b);
  ASSERT_TRUE(f);
  ASSERT_TRUE(pause.wait_reached());
  ASSERT_TRUE(cpu_entry_exclusive(kCtr));
  const uint64_t restored = as->stats().exclusive_restored.get();
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kCtr, 1100), 0);
  EXPECT_EQ(as->stats().exclusive_restored.get(), restored + 1);
  EXPECT_FALSE(cpu_entry_exclusive(kCtr));
  pause.release();
  EXPECT_EQ(f->wait(kWait), 0);
  EXPECT_EQ(load(kCtr), 1101u);
  EXPECT_GT(vm->stats().fault_retries.get(), 0u);
}

// Memory make_device_exclusive refuses (shared anonymous memory is shmem) fails the job
// cleanly instead of mapping a non-exclusive page atomic; the VM stays usable.
TEST_F(VmExclusiveTest, SharedMemoryCannotBeMadeExclusive) {
  const uint64_t shared = kBase + 8 * kSZ2M;
  ASSERT_EQ(as->munmap(shared, kSZ2M), 0);
  Result<mm::Va> r = as->mmap(shared, kSZ2M, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
  ASSERT_TRUE(r.ok()) << r.error();
  ASSERT_EQ(vm->madvise_atomic(shared, kSZ2M, REFGPU_ATOMIC_DEVICE), 0);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, shared, 5), 0);
  Batch b;
  b.atomic(REFGPU_ATOMIC_OP_INC, shared, 0, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch + kSZ4K, b), -EFAULT);
  EXPECT_EQ(load(shared), 5u);
  EXPECT_FALSE(gpu_atomic(shared));
  ASSERT_EQ(gpu_inc(1, 2), 0);  // the VM is still usable
  EXPECT_EQ(load(kCtr), 101u);
}

// Without system-memory atomics DEVICE forces VRAM (never an atomic bit on system memory, no
// device-exclusive entries); with no VRAM at all, the job fails.
using VmNoSmemAtomicsTest = testing::VmTest;
TEST_F(VmNoSmemAtomicsTest, DeviceAtomicsForceVramInstead) {
  make_vm(/*smem_atomics=*/false);
  mirror_all();
  const uint64_t ctr = kBase + 4 * kSZ2M;
  ASSERT_EQ(vm->madvise_atomic(ctr, kSZ2M, REFGPU_ATOMIC_DEVICE), 0);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, ctr, 3), 0);
  Batch b;
  b.atomic(REFGPU_ATOMIC_OP_INC, ctr, 0, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch, b), -EFAULT);
  EXPECT_EQ(load(ctr), 3u);
  EXPECT_FALSE(vm->page_table().lookup(ctr));
  EXPECT_EQ(as->stats().exclusive_made.get(), 0u);
}

}  // namespace
}  // namespace gpusvm::refgpu
