// Vm with VRAM (refmem's VramPagemap): faults migrate by the preferred location, PREFETCH
// moves ranges to VRAM and back, GLOBAL atomics force VRAM and CPU access brings the pages
// home. Real engines run the batches; every byte is checked from the CPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "drivers/refgpu/bo.h"
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


// A BO mapped at a GPU VA outside the mirror: bound at MAP time, zapped when its backing
// moves, bound again (at the new place) by the next fault. Every byte checked.
TEST_F(VmVramTest, BoMapIsBoundAndAMoveZapsIt) {
  Result<BoRef> bo = Bo::create({.mem = mem.get(), .vram = vram.get(), .size = kSZ2M,
                                 .placement = kBoPlacementSystem | kBoPlacementVram});
  ASSERT_TRUE(bo.ok()) << bo.error();
  ASSERT_EQ((*bo)->backing(), BoBacking::kVram);
  std::vector<uint8_t> bytes(kSZ2M);
  for (uint64_t i = 0; i < kSZ2M; i++) bytes[i] = static_cast<uint8_t>(i * 31 + (i >> 12));
  ASSERT_EQ((*bo)->write(0, bytes.data(), kSZ2M), 0);
  const uint64_t bva = kBase + (1ull << 36);
  BindOp op{.op = REFGPU_VM_BIND_OP_MAP, .addr = bva, .range = kSZ2M, .bo = *bo};
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), 0);
  std::optional<GpuLeaf> l = vm->page_table().lookup(bva);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->target, Target::kVram);
  EXPECT_EQ(l->size, kSZ2M);  // a contiguous 2 MiB backing is one leaf
  for (int pass = 0; pass < 2; pass++) {
    const uint64_t dst = kBase + (pass + 1) * 2 * kSZ2M;
    Batch b;
    b.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, bva, kSZ2M});
    b.store_qword(bva + 8 * pass, 0x5000 + pass);  // the GPU writes into the BO too
    ASSERT_EQ(run(kBatch + pass * kSZ4K, b), 0) << pass;
    std::vector<uint8_t> got(kSZ2M);
    ASSERT_EQ(mm::cpu::copy_out(*as, dst, got.data(), kSZ2M), 0);
    EXPECT_EQ(got, bytes) << pass;
    const uint64_t w = 0x5000u + pass;
    std::memcpy(&bytes[8 * pass], &w, 8);
    std::vector<uint8_t> in_bo(kSZ2M);
    ASSERT_EQ((*bo)->read(0, in_bo.data(), kSZ2M), 0);
    EXPECT_EQ(in_bo, bytes) << pass;
    if (pass == 0) {
      ASSERT_EQ((*bo)->move_to_system(), 0);  // eviction: the binding is zapped
      EXPECT_FALSE(vm->page_table().lookup(bva));
    }
  }
  l = vm->page_table().lookup(bva);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->target, Target::kSystem);  // rebound where it is now
  op = BindOp{.op = REFGPU_VM_BIND_OP_UNMAP, .addr = bva, .range = kSZ4K};
  EXPECT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), -EINVAL);  // a BO binding goes whole
  op.range = kSZ2M;
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), 0);
  EXPECT_FALSE(vm->page_table().lookup(bva));
  EXPECT_EQ((*bo)->move_to_vram(), 0);  // no observer left to tell
}

// A BO carved out of a mirror region takes that VA from the system allocator; UNMAP gives it
// back: the GPU then reaches the process's memory there again.
TEST_F(VmVramTest, BoCarvedOutOfTheMirrorReturnsItsVaOnUnmap) {
  Result<BoRef> bo = Bo::create({.mem = mem.get(), .vram = vram.get(), .size = kSZ2M,
                                 .placement = kBoPlacementSystem});
  ASSERT_TRUE(bo.ok());
  const uint64_t va = kBase + 4 * kSZ2M;
  // Over mirrored memory the GPU has ranges in: -EBUSY.
  Batch t;
  t.store_qword(va, 1);
  ASSERT_EQ(run(kBatch, t), 0);
  BindOp op{.op = REFGPU_VM_BIND_OP_MAP, .addr = va, .range = kSZ2M, .bo = *bo};
  EXPECT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), -EBUSY);
  ASSERT_EQ(as->madvise(va, kSZ2M, MADV_DONTNEED), 0);
  BindOp evict{.op = REFGPU_VM_BIND_OP_UNMAP, .flags = REFGPU_VM_BIND_FLAG_EVICT, .addr = va, .range = kSZ2M};
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&evict, 1)), 0);  // ranges gone, VA unbound
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), 0);     // over nothing now
  BindOp un{.op = REFGPU_VM_BIND_OP_UNMAP, .addr = va, .range = kSZ2M};
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&un, 1)), 0);
  // Mirror it again, then carve the BO out of the middle of the mirror.
  BindOp mir{.op = REFGPU_VM_BIND_OP_MAP, .flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR, .addr = va, .range = kSZ2M};
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&mir, 1)), 0);
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&op, 1)), 0);
  std::vector<GpuVma> v = vm->vmas(0, ~0ull);
  ASSERT_EQ(v.size(), 3u);  // [mirror][bo][mirror]
  EXPECT_EQ(v[1].kind, GpuVma::Kind::kBo);
  EXPECT_TRUE(v[1].carved);
  Batch b;
  b.store_qword(va + 16, 0xb0);
  ASSERT_EQ(run(kBatch + kSZ4K, b), 0);
  uint64_t in_bo = 0;
  ASSERT_EQ((*bo)->read(16, &in_bo, 8), 0);
  EXPECT_EQ(in_bo, 0xb0u);
  EXPECT_EQ(load(va + 16), 0u);  // the process's page is not the BO
  ASSERT_EQ(vm->bind(std::span<const BindOp>(&un, 1)), 0);
  v = vm->vmas(0, ~0ull);
  ASSERT_EQ(v.size(), 1u);  // the BO's VA is mirror again, merged with its neighbours
  EXPECT_EQ(v[0].kind, GpuVma::Kind::kMirror);
  EXPECT_EQ(v[0].end - v[0].start, kMirror);
  Batch c;
  c.store_qword(va + 16, 0xc0);
  ASSERT_EQ(run(kBatch + 2 * kSZ4K, c), 0);
  EXPECT_EQ(load(va + 16), 0xc0u);
  ASSERT_EQ((*bo)->read(16, &in_bo, 8), 0);
  EXPECT_EQ(in_bo, 0xb0u);
}

}  // namespace
}  // namespace gpusvm::refgpu
