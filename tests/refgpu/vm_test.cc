// Vm end to end: real engines execute real batches that live in process memory mirrored by
// a fault-mode VM; the fault service (FaultService over the FaultQueue) binds what they
// touch. Every byte the GPU writes is checked from the CPU and vice versa; after each
// scenario the GPU PTEs are checked against the CPU page table and mm::check runs.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "drivers/refgpu/engine.h"
#include "drivers/refgpu/fault_queue.h"
#include "drivers/refgpu/fault_service.h"
#include "drivers/refgpu/vm.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "tests/mm/mm_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"
#include "tests/refgpu/vm_test_fixture.h"

namespace gpusvm::refgpu {
namespace {

using testing::Batch;
using testing::VmTest;
using testing::kBase;
using testing::kMirror;
using testing::kWait;
using testing::value_or;

TEST_F(VmTest, CreateValidatesFlags) {
  VmConfig c{.id = 1, .flags = REFGPU_VM_CREATE_FLAG_FAULT_MODE, .as = as.get(), .mem = resolver.get(),
             .device = device.get()};
  EXPECT_EQ(Vm::create(c).error(), -EINVAL);  // fault mode needs LR mode
  c.flags = 1u << 7;
  EXPECT_EQ(Vm::create(c).error(), -EINVAL);
  c.flags = REFGPU_VM_CREATE_FLAG_LR_MODE;
  c.id = 0;
  EXPECT_EQ(Vm::create(c).error(), -EINVAL);
  c.id = 2;
  Result<std::unique_ptr<Vm>> v = Vm::create(c);
  ASSERT_TRUE(v.ok());
  // A mirror needs fault mode.
  BindOp o{.op = REFGPU_VM_BIND_OP_MAP, .flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR, .addr = kBase, .range = kSZ4K};
  EXPECT_EQ((*v)->bind(std::span<const BindOp>(&o, 1)), -EINVAL);
}

// The GPU copies what the CPU wrote and stores its own pattern; the CPU reads every byte.
TEST_F(VmTest, MirrorFaultsOnSystemMemoryMoveEveryByte) {
  make_vm();
  mirror_all();
  constexpr uint64_t kLen = 3ull << 20;  // crosses a 2 MiB boundary: several ranges
  const uint64_t src = kBase, dst = kBase + (8ull << 20), pat = kBase + (16ull << 20);
  std::vector<uint8_t> bytes(kLen);
  for (uint64_t i = 0; i < kLen; i++) bytes[i] = static_cast<uint8_t>(i * 7 + (i >> 12));
  ASSERT_EQ(mm::cpu::copy_in(*as, src, bytes.data(), kLen), 0);
  Batch b;
  b.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, src, kLen});
  b.add(refgpu_cmd_store_strided{REFGPU_CMD_HEADER(REFGPU_OP_STORE_STRIDED, 12), REFGPU_CMD_FLAG_QWORD,
                                 pat, 8, kLen / 8, 0x1000, 3});
  ASSERT_EQ(run(kBatch, b), 0);
  std::vector<uint8_t> got(kLen);
  ASSERT_EQ(mm::cpu::copy_out(*as, dst, got.data(), kLen), 0);
  EXPECT_EQ(got, bytes);
  for (uint64_t i = 0; i < kLen / 8; i++) {
    if (load(pat + i * 8) != 0x1000 + 3 * i) {
      ADD_FAILURE() << "qword " << i;
      break;
    }
  }
  const VmStats& s = vm->stats();
  EXPECT_GT(s.faults_4k.get() + s.faults_64k.get() + s.faults_2m.get(), 0u);
  EXPECT_EQ(s.fault_errors.get(), 0u);
  EXPECT_GT(vm->gpusvm()->nr_ranges(), 2u);
  {
    const VmStats& st = vm->stats();
    const uint64_t n = st.faults_4k.get() + st.faults_64k.get() + st.faults_2m.get();
    std::printf("vm: %llu serviced faults (4K %llu, 64K %llu, 2M %llu), %.1f us/fault, "
                "get_pages %.1f us, bind %.1f us, migrate %.1f us per fault, %llu migrations\n",
                (unsigned long long)n, (unsigned long long)st.faults_4k.get(),
                (unsigned long long)st.faults_64k.get(), (unsigned long long)st.faults_2m.get(),
                n ? st.fault_ns.get() / 1e3 / n : 0.0, n ? st.get_pages_ns.get() / 1e3 / n : 0.0,
                n ? st.bind_ns.get() / 1e3 / n : 0.0, n ? st.migrate_ns.get() / 1e3 / n : 0.0,
                (unsigned long long)st.migrations_to_vram.get());
  }
  // The CPU changes a page the GPU has mapped: the GPU reads the new value (invalidation).
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, src, 0xfeedface), 0);
  Batch c;
  c.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD, src, 0xfeedface, ~0ull, 0});
  ASSERT_EQ(run(kBatch + 4096, c), 0);
  EXPECT_EQ(vm->check_ptes(), 0);
}

// A fault that cannot be serviced fails its job with an error fence; the VM stays usable.
TEST_F(VmTest, UnserviceableFaultsFailTheJobAndTheVmStaysUsable) {
  make_vm();
  mirror_all();
  const uint64_t ro = kBase + kMirror + (4ull << 20);
  map(ro, kSZ2M, PROT_READ);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, ro, kSZ2M, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), 0);
  const uint64_t none = kBase + kMirror + (8ull << 20);
  map(none, kSZ2M, PROT_NONE);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, none, kSZ2M, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), 0);
  struct Case {
    const char* what;
    uint64_t addr;
  } cases[] = {{"not mirrored", kBase + (1ull << 40)},
               {"mirrored, no CPU VMA", kBase + kMirror + (16ull << 20)},
               {"write to a read-only VMA", ro},
               {"PROT_NONE", none}};
  map(kBase + kMirror + (16ull << 20), kSZ4K);  // mapped for the CPU but not mirrored...
  ASSERT_EQ(as->munmap(kBase + kMirror + (16ull << 20), kSZ4K), 0);  // ...and gone again
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase + kMirror + (16ull << 20), kSZ2M,
                 REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), 0);
  uint64_t batch = kBatch;
  for (const Case& c : cases) {
    Batch b;
    b.store_qword(c.addr, 1);
    EXPECT_EQ(run(batch, b), -EFAULT) << c.what;
    batch += 4096;
    Batch ok;
    ok.store_qword(kBase + 8 * (batch - kBatch) / 4096, 0xabc0 + (batch - kBatch) / 4096);
    EXPECT_EQ(run(batch, ok), 0) << "after " << c.what;
    EXPECT_EQ(load(kBase + 8 * (batch - kBatch) / 4096), 0xabc0 + (batch - kBatch) / 4096);
    batch += 4096;
  }
  EXPECT_EQ(vm->stats().fault_errors.get(), 4u);
  // A read of the read-only VMA works and is mapped without write permission.
  Batch r;
  r.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD, ro, 0, ~0ull, 0});
  EXPECT_EQ(run(batch, r), 0);
  std::optional<GpuLeaf> l = vm->page_table().lookup(ro);
  ASSERT_TRUE(l);
  EXPECT_FALSE(l->perms & kPermWrite);
}

TEST_F(VmTest, UnmapOfAMirrorWithRangesIsBusyUnlessEvict) {
  make_vm();
  mirror_all();
  Batch b;
  b.store_qword(kBase + kSZ2M, 42);
  ASSERT_EQ(run(kBatch, b), 0);
  ASSERT_TRUE(vm->page_table().lookup(kBase + kSZ2M));
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_UNMAP, kBase, 4 * kSZ2M), -EBUSY);
  EXPECT_TRUE(vm->page_table().lookup(kBase + kSZ2M));  // nothing changed
  // A part without ranges unmaps fine and splits the mirror.
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_UNMAP, kBase + 8 * kSZ2M, kSZ2M), 0);
  std::vector<GpuVma> v = vm->vmas(0, ~0ull);
  ASSERT_EQ(v.size(), 2u);
  EXPECT_EQ(v[0].end, kBase + 8 * kSZ2M);
  EXPECT_EQ(v[1].start, kBase + 9 * kSZ2M);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_UNMAP, kBase, 4 * kSZ2M, REFGPU_VM_BIND_FLAG_EVICT), 0);
  EXPECT_FALSE(vm->page_table().lookup(kBase + kSZ2M));
  EXPECT_EQ(load(kBase + kSZ2M), 42u);  // the data stays with the process
  // The GPU no longer reaches the unmapped span: a fault there fails the job.
  Batch c;
  c.store_qword(kBase + kSZ2M, 43);
  EXPECT_EQ(run(kBatch + 4096, c), -EFAULT);
  EXPECT_EQ(load(kBase + kSZ2M), 42u);
  // Overlapping MAP, misaligned, beyond the VA bits, unknown flag: -EINVAL, nothing bound.
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase + 8 * kSZ2M, 2 * kSZ2M, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), -EINVAL);
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase + 8 * kSZ2M + 1, kSZ4K, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), -EINVAL);
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_MAP, GpuPageTable::kVaLimit - kSZ4K, 2 * kSZ4K,
                 REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), -EINVAL);
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_UNMAP, kBase, kSZ4K, 1u << 9), -EINVAL);
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ4K), -EINVAL);  // no longer mirrored
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase + 8 * kSZ2M, kSZ2M, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), 0);
}

TEST_F(VmTest, PrefetchToSystemBindsBeforeAnyFault) {
  make_vm();
  mirror_all();
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kBase + 5 * kSZ4K, 77), 0);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ2M), 0);
  EXPECT_TRUE(vm->page_table().lookup(kBase + 5 * kSZ4K));
  EXPECT_EQ(fq.stats().raised.get(), 0u);
  EXPECT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ2M, 0, 3), -EINVAL);  // no VRAM instance 3
  // The batch's own page faults; the prefetched data does not.
  Batch b;
  b.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD, kBase + 5 * kSZ4K, 77, ~0ull, 0});
  b.store_qword(kBase + 6 * kSZ4K, 78);
  const uint64_t before = fq.stats().raised.get();
  ASSERT_EQ(run(kBatch, b), 0);
  EXPECT_EQ(fq.stats().raised.get() - before, 1u);  // the fetch of the batch only
  EXPECT_EQ(load(kBase + 6 * kSZ4K), 78u);
}

TEST_F(VmTest, MadviseSplitsMergesAndTheQueryIsTwoCalls) {
  make_vm();
  mirror_all();
  EXPECT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs_count(kBase, kMirror), 99), 1u);
  // Split into three: [0,1M) default, [1M,3M) atomic DEVICE, [3M, end) default.
  ASSERT_EQ(vm->madvise_atomic(kBase + (1ull << 20), 2ull << 20, REFGPU_ATOMIC_DEVICE), 0);
  Result<uint32_t> n = vm->query_mem_range_attrs_count(kBase, kMirror);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 3u);
  std::vector<MemAttrRange> out(*n);
  ASSERT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs(kBase, kMirror, out), 0), 3u);
  EXPECT_EQ(out[0].start, kBase);
  EXPECT_EQ(out[0].end, kBase + (1ull << 20));
  EXPECT_EQ(out[1].attrs.atomic, static_cast<uint32_t>(REFGPU_ATOMIC_DEVICE));
  EXPECT_EQ(out[1].end, kBase + (3ull << 20));
  EXPECT_EQ(out[2].end, kBase + kMirror);
  // Ranges change between the calls: more are needed than counted -> -ENOSPC.
  ASSERT_EQ(vm->madvise_preferred_loc(kBase + (5ull << 20), kSZ4K, REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM,
                                      REFGPU_MIGRATE_ALL_PAGES, 0), 0);
  EXPECT_EQ(vm->query_mem_range_attrs(kBase, kMirror, out).error(), -ENOSPC);
  EXPECT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs_count(kBase, kMirror), 0), 5u);
  // Setting the middle back to the defaults merges everything again.
  ASSERT_EQ(vm->madvise_atomic(kBase + (1ull << 20), 2ull << 20, REFGPU_ATOMIC_UNDEFINED), 0);
  ASSERT_EQ(vm->madvise_preferred_loc(kBase + (5ull << 20), kSZ4K, REFGPU_PREFERRED_LOC_DEFAULT_DEVICE,
                                      REFGPU_MIGRATE_ALL_PAGES, 0), 0);
  EXPECT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs_count(kBase, kMirror), 0), 1u);
  // A query clipped to a window reports the pieces clipped to it.
  ASSERT_EQ(vm->madvise_atomic(kBase + kSZ2M, kSZ2M, REFGPU_ATOMIC_GLOBAL), 0);
  std::vector<MemAttrRange> w(3);
  ASSERT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs(kBase + kSZ2M + kSZ4K, kSZ4K, w), 0), 1u);
  EXPECT_EQ(w[0].start, kBase + kSZ2M + kSZ4K);
  EXPECT_EQ(w[0].end, kBase + kSZ2M + 2 * kSZ4K);
  // Errors: outside any mirror, misaligned, bad values, another device without a resolver.
  EXPECT_EQ(vm->madvise_atomic(kBase + kMirror, kSZ4K, REFGPU_ATOMIC_DEVICE), -EINVAL);
  EXPECT_EQ(vm->madvise_atomic(kBase + 1, kSZ4K, REFGPU_ATOMIC_DEVICE), -EINVAL);
  EXPECT_EQ(vm->madvise_atomic(kBase, kSZ4K, 9), -EINVAL);
  EXPECT_EQ(vm->madvise_preferred_loc(kBase, kSZ4K, 5, 0, 0), -EBADF);
  EXPECT_EQ(vm->madvise_preferred_loc(kBase, kSZ4K, REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM, 7, 0), -EINVAL);
  EXPECT_EQ(vm->query_mem_range_attrs_count(kBase, 0).error(), -EINVAL);
  EXPECT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs_count(kBase + kMirror, kSZ2M), 9), 0u);
}

TEST_F(VmTest, MadviseToAPeerWithoutALinkIsEnolink) {
  VmConfig c{.id = 1, .flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE,
             .as = as.get(), .mem = resolver.get(), .device = device.get()};
  c.resolve_devmem = [](int32_t fd, uint16_t) -> Result<svm::Pagemap*> {
    return Err{fd == 7 ? -ENOLINK : -EBADF};
  };
  Result<std::unique_ptr<Vm>> v = Vm::create(std::move(c));
  ASSERT_TRUE(v.ok());
  vm = std::move(*v);
  mirror_all();
  EXPECT_EQ(vm->madvise_preferred_loc(kBase, kSZ4K, 7, 0, 0), -ENOLINK);
  EXPECT_EQ(vm->madvise_preferred_loc(kBase, kSZ4K, 8, 0, 0), -EBADF);
  EXPECT_EQ(value_or<uint32_t>(vm->query_mem_range_attrs_count(kBase, kMirror), 0), 1u);  // unchanged
}

// MADVISE_AUTORESET: advice on memory the CPU unmapped goes back to the defaults.
TEST_F(VmTest, AutoresetRestoresDefaultsOnMunmap) {
  make_vm();
  mirror_all(REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET);
  ASSERT_EQ(vm->madvise_atomic(kBase, kSZ2M, REFGPU_ATOMIC_DEVICE), 0);
  Batch b;
  b.store_qword(kBase + 64, 5);
  ASSERT_EQ(run(kBatch, b), 0);
  ASSERT_EQ(as->munmap(kBase, kSZ2M), 0);
  map(kBase, kSZ2M);
  Batch c;
  c.store_qword(kBase + 64, 6);  // the fault collects the unmapped range first
  ASSERT_EQ(run(kBatch + 4096, c), 0);
  EXPECT_EQ(load(kBase + 64), 6u);
  std::vector<MemAttrRange> out(4);
  Result<uint32_t> n = vm->query_mem_range_attrs(kBase, kSZ2M, out);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1u);
  EXPECT_EQ(out[0].attrs.atomic, static_cast<uint32_t>(REFGPU_ATOMIC_UNDEFINED));
}

// A munmap queues the GPU's ranges there to the garbage collector; their MADVISE_AUTORESET
// runs when they are collected. If that waited for the next GPU fault, advice given to memory
// mapped at the same address in between would be reset by that fault (found by the
// refgpu-fault-service benchmark). madvise collects first:
//   GPU fault at X (range) -> CPU munmap X (range queued) -> mmap X -> madvise X atomic CPU
//   -> GPU fault at X: the advice must still be CPU (the device atomic fails).
TEST_F(VmTest, AdviceAfterMunmapAndRemapSurvivesTheNextFault) {
  make_vm();
  mirror_all(REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET);
  Batch b;
  b.store_qword(kBase + 64, 5);
  ASSERT_EQ(run(kBatch, b), 0);
  ASSERT_EQ(as->munmap(kBase, kSZ2M), 0);
  map(kBase, kSZ2M);
  ASSERT_EQ(vm->madvise_atomic(kBase, kSZ2M, REFGPU_ATOMIC_CPU), 0);
  Batch one;
  one.atomic(REFGPU_ATOMIC_OP_ADD, kBase + 64, 5, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch + 4096, one), -EFAULT);
  EXPECT_EQ(load(kBase + 64), 0u);
  std::vector<MemAttrRange> out(4);
  Result<uint32_t> n = vm->query_mem_range_attrs(kBase, kSZ2M, out);
  ASSERT_TRUE(n.ok());
  ASSERT_EQ(*n, 1u);
  EXPECT_EQ(out[0].attrs.atomic, static_cast<uint32_t>(REFGPU_ATOMIC_CPU));
}

TEST_F(VmTest, AtomicsFollowThePolicy) {
  make_vm();
  mirror_all();
  const uint64_t ctr = kBase + kSZ2M;
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, ctr, 100), 0);
  Batch inc;
  for (int i = 0; i < 10; i++) inc.atomic(REFGPU_ATOMIC_OP_INC, ctr, 0, 0, REFGPU_CMD_FLAG_QWORD);
  ASSERT_EQ(run(kBatch, inc), 0);  // UNDEFINED on system memory with smem atomics
  EXPECT_EQ(load(ctr), 110u);
  std::optional<GpuLeaf> l = vm->page_table().lookup(ctr);
  ASSERT_TRUE(l);
  EXPECT_TRUE(l->perms & kPermAtomic);
  // CPU policy: the mapping loses its atomic bit, a device atomic fails the job cleanly.
  ASSERT_EQ(vm->madvise_atomic(kBase + kSZ2M, kSZ2M, REFGPU_ATOMIC_CPU), 0);
  l = vm->page_table().lookup(ctr);
  EXPECT_TRUE(!l || !(l->perms & kPermAtomic));
  Batch one;
  one.atomic(REFGPU_ATOMIC_OP_ADD, ctr, 5, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch + 4096, one), -EFAULT);
  EXPECT_EQ(load(ctr), 110u);
  // Plain stores still work there (the VM is usable).
  Batch st;
  st.store_qword(ctr + 8, 9);
  ASSERT_EQ(run(kBatch + 8192, st), 0);
  EXPECT_EQ(load(ctr + 8), 9u);
  l = vm->page_table().lookup(ctr);
  ASSERT_TRUE(l);
  EXPECT_FALSE(l->perms & kPermAtomic);
  // GLOBAL needs VRAM: without any, a device atomic fails instead of being silently wrong.
  ASSERT_EQ(vm->madvise_atomic(kBase + kSZ2M, kSZ2M, REFGPU_ATOMIC_GLOBAL), 0);
  Batch g;
  g.atomic(REFGPU_ATOMIC_OP_INC, ctr, 0, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch + 12288, g), -EFAULT);
  EXPECT_EQ(load(ctr), 110u);
}

TEST_F(VmTest, WithoutSystemMemoryAtomicsAtomicsNeedVram) {
  make_vm(/*smem_atomics=*/false);
  mirror_all();
  const uint64_t ctr = kBase + kSZ2M;
  Batch st;
  st.store_qword(ctr, 1);
  ASSERT_EQ(run(kBatch, st), 0);
  std::optional<GpuLeaf> l = vm->page_table().lookup(ctr);
  ASSERT_TRUE(l);
  EXPECT_FALSE(l->perms & kPermAtomic);  // never an atomic bit on system memory
  Batch inc;
  inc.atomic(REFGPU_ATOMIC_OP_INC, ctr, 0, 0, REFGPU_CMD_FLAG_QWORD);
  EXPECT_EQ(run(kBatch + 4096, inc), -EFAULT);  // and no VRAM to force it to
  EXPECT_EQ(load(ctr), 1u);
}

// Two engines fault the same page while the first fault is in service: the second is
// chained onto it (one service, both replayed).
TEST_F(VmTest, DuplicateFaultsAreChainedOntoTheOneInFlight) {
  make_vm();
  mirror_all();
  // Both batches prefetched, so the only faults are the data page's.
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 2 * kSZ4K), 0);
  const uint64_t data = kBase + 4 * kSZ2M;
  sched_point::Pause pause("refgpu.fault.in_flight");
  ASSERT_EQ(pause.status(), 0);
  Batch a, b;
  a.store_qword(data, 1);
  b.store_qword(data + 8, 2);
  std::shared_ptr<Fence> fa = submit(kBatch, a, 0);
  ASSERT_TRUE(pause.wait_reached());
  std::shared_ptr<Fence> fb = submit(kBatch + kSZ4K, b, 1);
  // The second fault is popped by the other handler and chained.
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (service->stats().chained.get() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(service->stats().chained.get(), 1u);
  pause.release();
  EXPECT_EQ(fa->wait(kWait), 0);
  EXPECT_EQ(fb->wait(kWait), 0);
  EXPECT_EQ(load(data), 1u);
  EXPECT_EQ(load(data + 8), 2u);
  EXPECT_EQ(service->stats().services.get(), 1u);
}

// A chained fault shares a success but not a failure:
//   handler 1: atomic fault at data (policy CPU: it will fail), paused at refgpu.fault.in_flight
//   handler 2: write fault at data + 8, chained onto it (access write <= atomic)
//   release:   the atomic fails with -EFAULT; the write is serviced on its own and succeeds.
TEST_F(VmTest, AChainedFaultIsServicedAgainWhenTheOneInFlightFails) {
  make_vm();
  mirror_all();
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 2 * kSZ4K), 0);
  const uint64_t data = kBase + 4 * kSZ2M;
  ASSERT_EQ(vm->madvise_atomic(data, kSZ2M, REFGPU_ATOMIC_CPU), 0);
  sched_point::Pause pause("refgpu.fault.in_flight");
  ASSERT_EQ(pause.status(), 0);
  Batch a, b;
  a.atomic(REFGPU_ATOMIC_OP_ADD, data, 5, 0, REFGPU_CMD_FLAG_QWORD);
  b.store_qword(data + 8, 2);
  std::shared_ptr<Fence> fa = submit(kBatch, a, 0);
  ASSERT_TRUE(pause.wait_reached());
  std::shared_ptr<Fence> fb = submit(kBatch + kSZ4K, b, 1);
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (service->stats().chained.get() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(service->stats().chained.get(), 1u);
  pause.release();
  EXPECT_EQ(fa->wait(kWait), -EFAULT);
  EXPECT_EQ(fb->wait(kWait), 0);
  EXPECT_EQ(load(data), 0u);
  EXPECT_EQ(load(data + 8), 2u);
}

// A fault in service races an invalidation of its range between get_pages and the commit:
// the commit sees !pages_valid and services again; the GPU ends up with the CPU's page.
TEST_F(VmTest, InvalidationBetweenGetPagesAndCommitRetries) {
  make_vm();
  mirror_all();
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, kSZ4K), 0);
  const uint64_t data = kBase + 6 * kSZ2M;
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, data, 11), 0);
  sched_point::Pause pause("refgpu.fault.got_pages", {.thread = "refgpu-fault"});
  Batch b;
  b.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD, data, 12, ~0ull, 0});
  std::shared_ptr<Fence> f = submit(kBatch, b);
  ASSERT_TRUE(pause.wait_reached());
  // MADV_DONTNEED drops the page; the CPU then writes a new one with the expected value.
  ASSERT_EQ(as->madvise(data & ~(kSZ2M - 1), kSZ2M, MADV_DONTNEED), 0);
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, data, 12), 0);
  pause.release();
  EXPECT_EQ(f->wait(kWait), 0);
  EXPECT_GT(vm->stats().fault_retries.get(), 0u);
  EXPECT_EQ(vm->check_ptes(), 0);
}

// TSan: engines on several queues fault the same range while the CPU munmaps, maps again,
// mprotects and forks it. Jobs either complete or fail with -EFAULT; nothing hangs, the
// mm and the GPU PTEs are consistent at the end.
TEST_F(VmTest, CpuMunmapMprotectForkRaceEngineFaults) {
  make_vm();
  mirror_all();
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 2 * kSZ4K), 0);
  const uint64_t data = kBase + 10 * kSZ2M;
  std::atomic<bool> stop{false};
  std::thread cpu([&] {
    for (int i = 0; i < 30 && !stop.load(); i++) {
      EXPECT_EQ(as->munmap(data, kSZ2M), 0);
      Result<mm::Va> r = as->mmap(data, kSZ2M, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
      EXPECT_TRUE(r.ok());
      EXPECT_EQ(as->mprotect(data, kSZ2M, PROT_READ), 0);
      EXPECT_EQ(as->mprotect(data, kSZ2M, PROT_READ | PROT_WRITE), 0);
      Result<std::unique_ptr<mm::AddressSpace>> child = as->fork();
      EXPECT_TRUE(child.ok());
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  int ok = 0, failed = 0;
  for (int i = 0; i < 20; i++) {
    std::vector<std::shared_ptr<Fence>> fences;
    for (size_t q = 0; q < 2; q++) {
      Batch b;
      b.store_qword(data + 8 * q, 1000 + i);
      fences.push_back(submit(kBatch + q * kSZ4K, b, q));
    }
    for (auto& f : fences) {
      const int rc = f->wait(kWait);
      EXPECT_TRUE(rc == 0 || rc == -EFAULT) << rc;
      (rc == 0 ? ok : failed)++;
    }
  }
  stop = true;
  cpu.join();
  // How many jobs got through depends on the interleaving (under TSan the CPU side can win
  // every one: a job whose access is invalidated before each of its kMaxReplays replays
  // fails with -EFAULT); the service must have run all along.
  EXPECT_EQ(ok + failed, 40);
  EXPECT_GT(service->stats().services.get(), 0u);
  // Quiescent: one more store goes through and reads back.
  Batch b;
  b.store_qword(data, 4242);
  ASSERT_EQ(run(kBatch, b), 0);
  EXPECT_EQ(load(data), 4242u);
  EXPECT_EQ(vm->check_ptes(), 0);
}


// Allocation failures in the service (page-table nodes, range metadata) fail the job with
// -ENOMEM, change nothing, and the next fault on the same address succeeds.
TEST_F(VmTest, AllocationFailuresFailTheJobAndRollBack) {
  make_vm();
  mirror_all();
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 4 * kSZ4K), 0);
  uint64_t batch = kBatch;
  for (const char* point : {"refgpu.pt_alloc", "svm.range_alloc"}) {
    const uint64_t data = kBase + 12 * kSZ2M + (batch - kBatch) * 512;
    ASSERT_EQ(fault_inject::arm(point, {.nth = 1}), 0);
    Batch b;
    b.store_qword(data, 5);
    EXPECT_EQ(run(batch, b), -ENOMEM) << point;
    fault_inject::disarm(point);
    EXPECT_FALSE(vm->page_table().lookup(data)) << point;
    batch += kSZ4K;
    Batch c;
    c.store_qword(data, 6);
    ASSERT_EQ(run(batch, c), 0) << point;
    EXPECT_EQ(load(data), 6u);
    batch += kSZ4K;
  }
  EXPECT_EQ(vm->check_ptes(), 0);
}

// Four exec queues on two engines store into one 2 MiB range at once: every store lands,
// the range is serviced without errors.
TEST_F(VmTest, SeveralQueuesFaultTheSameRange) {
  make_vm();
  for (uint16_t i = 0; i < 2; i++) {
    auto q = engines[i]->create_queue(20 + i, vm->mmu());
    ASSERT_TRUE(q.ok());
    queues.push_back(*q);
  }
  // queues[2], queues[3] run on engines 0 and 1 too (TearDown destroys queue i on engine i % 2).
  mirror_all();
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBatch, 4 * kSZ4K), 0);
  const uint64_t data = kBase + 14 * kSZ2M;
  for (int round = 0; round < 10; round++) {
    std::vector<std::shared_ptr<Fence>> f;
    for (size_t q = 0; q < 4; q++) {
      Batch b;
      b.add(refgpu_cmd_store_strided{REFGPU_CMD_HEADER(REFGPU_OP_STORE_STRIDED, 12), REFGPU_CMD_FLAG_QWORD,
                                     data + q * 8, 32, kSZ2M / 32, uint64_t(round) << 32 | q, 4});
      f.push_back(submit(kBatch + q * kSZ4K, b, q));
    }
    for (auto& x : f) ASSERT_EQ(x->wait(kWait), 0);
    for (size_t q = 0; q < 4; q++) {
      for (uint64_t i = 0; i < kSZ2M / 32; i += 97) {
        ASSERT_EQ(load(data + q * 8 + i * 32), (uint64_t(round) << 32 | q) + 4 * i);
      }
    }
    // The CPU drops the pages between rounds: the next round faults them all again.
    ASSERT_EQ(as->madvise(data, kSZ2M, MADV_DONTNEED), 0);
  }
  EXPECT_EQ(vm->stats().fault_errors.get(), 0u);
  EXPECT_EQ(vm->check_ptes(), 0);
}

}  // namespace
}  // namespace gpusvm::refgpu
