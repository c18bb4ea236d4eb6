// Vm with VRAM (refmem's VramPagemap): faults migrate by the preferred location, PREFETCH
// moves ranges to VRAM and back, GLOBAL atomics force VRAM and CPU access brings the pages
// home. Real engines run the batches; every byte is checked from the CPU.
#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <vector>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/engine.h"
#include "drivers/refgpu/fault_service.h"
#include "drivers/refgpu/vm.h"
#include "drivers/refgpu/vram_pagemap.h"
#include "drivers/refgpu/vram_region.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "tests/mm/mm_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu {
namespace {

using testing::Batch;
constexpr auto kWait = std::chrono::seconds(20);
constexpr uint64_t kBase = 1ull << 32;
constexpr uint64_t kMirror = 32ull << 20;
constexpr uint64_t kBatch = kBase + kMirror - kSZ2M;

class VmVramTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem = mm::testing::make_mem(256ull << 20);
    ASSERT_NE(mem, nullptr);
    as = mm::testing::make_as(mem.get());
    ASSERT_NE(as, nullptr);
    Result<std::unique_ptr<VramRegion>> r = VramRegion::create(1, 32ull << 20);
    ASSERT_TRUE(r.ok());
    region = std::move(*r);
    copy = std::make_unique<CopyEngine>(mem.get(), &region->arena(), std::make_unique<HostCopyBackend>(1));
    dev = std::make_unique<svm::Device>("refgpu0");
    Result<std::unique_ptr<VramPagemap>> v =
        VramPagemap::create(mem.get(), dev.get(), region.get(), copy.get(), {});
    ASSERT_TRUE(v.ok()) << v.error();
    vram = std::move(*v);
    resolver = std::make_unique<HostMemoryResolver>(mem.get(), &region->arena());
    VmConfig c{.id = 1, .flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE,
               .as = as.get(), .mem = resolver.get(), .device = dev.get(), .vram = {vram.get()}};
    Result<std::unique_ptr<Vm>> m = Vm::create(std::move(c));
    ASSERT_TRUE(m.ok()) << m.error();
    vm = std::move(*m);
    service = std::make_unique<FaultService>(&fq, 2, [this](uint32_t id) { return id == 1 ? vm : nullptr; });
    engine = std::make_unique<Engine>(0, &fq);
    auto q = engine->create_queue(10, vm->mmu());
    ASSERT_TRUE(q.ok());
    queue = *q;
    Result<mm::Va> va = as->mmap(kBase, kMirror, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
    ASSERT_TRUE(va.ok());
    ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase, kMirror, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR), 0);
  }
  void TearDown() override {
    if (engine && queue) EXPECT_EQ(engine->destroy_queue(queue), 0);
    service.reset();
    if (vm) EXPECT_EQ(vm->check_ptes(), 0);
    vm.reset();  // ranges evicted home
    EXPECT_MM_CHECK_OK(*mem);
    as->exit();
    EXPECT_EQ(vram->live_device_maps(), 0);
    vram.reset();
    EXPECT_EQ(region->buddy().used_bytes(), 0u) << "VRAM leaked";
    EXPECT_EQ(dev->dma_mappings(), 0u);
    as.reset();
  }
  int bind(uint32_t op, uint64_t va, uint64_t len, uint32_t flags = 0, uint32_t region_instance = 0) {
    BindOp o{.op = op, .flags = flags, .addr = va, .range = len, .prefetch_region = region_instance};
    return vm->bind(std::span<const BindOp>(&o, 1));
  }
  int run(uint64_t va, Batch& b) {
    b.end();
    EXPECT_EQ(mm::cpu::copy_in(*as, va, b.bytes.data(), b.bytes.size()), 0);
    auto f = queue->submit(va);
    return f.ok() ? (*f)->wait(kWait) : f.error();
  }
  uint64_t load(uint64_t va) {
    Result<uint64_t> v = mm::cpu::load<uint64_t>(*as, va);
    return v.ok() ? *v : ~0ull;
  }
  Target target_of(uint64_t va) {
    std::optional<GpuLeaf> l = vm->page_table().lookup(va);
    EXPECT_TRUE(l) << std::hex << va;
    return l ? l->target : Target::kSystem;
  }

  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<mm::AddressSpace> as;
  std::unique_ptr<VramRegion> region;
  std::unique_ptr<CopyEngine> copy;
  std::unique_ptr<svm::Device> dev;
  std::unique_ptr<VramPagemap> vram;
  std::unique_ptr<HostMemoryResolver> resolver;
  FaultQueue fq;
  std::shared_ptr<Vm> vm;
  std::unique_ptr<FaultService> service;
  std::unique_ptr<Engine> engine;
  std::shared_ptr<ExecQueue> queue;
};

// The default preferred location is the device: the GPU's faults migrate what the CPU wrote
// into VRAM, the GPU works there, and the CPU reads every byte back (pages come home).
TEST_F(VmVramTest, FaultsMigrateToThePreferredVram) {
  constexpr uint64_t kLen = 2 * kSZ2M;
  const uint64_t src = kBase, dst = kBase + 4 * kSZ2M;
  std::vector<uint8_t> bytes(kLen);
  for (uint64_t i = 0; i < kLen; i++) bytes[i] = static_cast<uint8_t>(i * 13 + (i >> 12));
  ASSERT_EQ(mm::cpu::copy_in(*as, src, bytes.data(), kLen), 0);
  Batch b;
  b.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, src, kLen});
  ASSERT_EQ(run(kBatch, b), 0);
  EXPECT_EQ(target_of(src), Target::kVram);
  EXPECT_EQ(target_of(dst + kSZ2M), Target::kVram);
  EXPECT_GT(vm->stats().migrations_to_vram.get(), 0u);
  EXPECT_GT(region->buddy().used_bytes(), 0u);
  EXPECT_EQ(vm->check_ptes(), 0);
  std::vector<uint8_t> got(kLen);
  ASSERT_EQ(mm::cpu::copy_out(*as, dst, got.data(), kLen), 0);
  EXPECT_EQ(got, bytes);
  ASSERT_EQ(mm::cpu::copy_out(*as, src, got.data(), kLen), 0);
  EXPECT_EQ(got, bytes);
  // The CPU faults invalidated the GPU's VRAM mappings of what it read.
  EXPECT_FALSE(vm->page_table().lookup(src));
}

TEST_F(VmVramTest, MadviseSystemKeepsFaultsInSystemMemory) {
  ASSERT_EQ(vm->madvise_preferred_loc(kBase, kSZ2M, REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM,
                                      REFGPU_MIGRATE_ALL_PAGES, 0), 0);
  Batch b;
  b.store_qword(kBase + 64, 7);
  b.store_qword(kBase + kSZ2M + 64, 8);
  ASSERT_EQ(run(kBatch, b), 0);
  EXPECT_EQ(target_of(kBase + 64), Target::kSystem);
  EXPECT_EQ(target_of(kBase + kSZ2M + 64), Target::kVram);
  EXPECT_EQ(load(kBase + 64), 7u);
  EXPECT_EQ(load(kBase + kSZ2M + 64), 8u);
}

TEST_F(VmVramTest, PrefetchMovesRangesToVramAndBack) {
  ASSERT_EQ(mm::cpu::store<uint64_t>(*as, kBase + 8, 99), 0);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ2M, 0, 1), 0);
  EXPECT_EQ(target_of(kBase + 8), Target::kVram);
  EXPECT_EQ(fq.stats().raised.get(), 0u);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ2M, 0, 0), 0);  // to system memory
  EXPECT_EQ(target_of(kBase + 8), Target::kSystem);
  ASSERT_EQ(bind(REFGPU_VM_BIND_OP_PREFETCH, kBase, kSZ2M, 0, REFGPU_CONSULT_MEM_ADVISE_PREF_LOC), 0);
  EXPECT_EQ(target_of(kBase + 8), Target::kVram);  // the default advice: the device
  EXPECT_EQ(vm->check_ptes(), 0);
  EXPECT_EQ(load(kBase + 8), 99u);
}

// GLOBAL atomics live in VRAM even under a system-memory preference; CPU atomics fault the
// pages back, the next device atomic moves them again; no increment is lost.
TEST_F(VmVramTest, GlobalAtomicsForceVramAndCpuAtomicsBringItBack) {
  ASSERT_EQ(vm->madvise_preferred_loc(kBase, kSZ2M, REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM,
                                      REFGPU_MIGRATE_ALL_PAGES, 0), 0);
  ASSERT_EQ(vm->madvise_atomic(kBase, kSZ2M, REFGPU_ATOMIC_GLOBAL), 0);
  const uint64_t ctr = kBase + 128;
  uint64_t batch = kBatch;
  for (int round = 0; round < 3; round++) {
    Batch b;
    for (int i = 0; i < 5; i++) b.atomic(REFGPU_ATOMIC_OP_INC, ctr, 0, 0, REFGPU_CMD_FLAG_QWORD);
    ASSERT_EQ(run(batch, b), 0);
    batch += kSZ4K;
    std::optional<GpuLeaf> l = vm->page_table().lookup(ctr);
    ASSERT_TRUE(l);
    EXPECT_EQ(l->target, Target::kVram);
    EXPECT_TRUE(l->perms & kPermAtomic);
    Result<uint64_t> old = mm::cpu::atomic_fetch_add(*as, ctr, 100);
    ASSERT_TRUE(old.ok());
    EXPECT_EQ(*old, static_cast<uint64_t>(round * 105 + 5));
    EXPECT_FALSE(vm->page_table().lookup(ctr));  // the CPU took the page home
  }
  EXPECT_EQ(load(ctr), 315u);
}

}  // namespace
}  // namespace gpusvm::refgpu
