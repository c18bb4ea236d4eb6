// The fault-mode VM fixture of vm_test.cc and vm_exclusive_test.cc: a process (PhysMem +
// AddressSpace) mirrored by one VM without VRAM, its fault service (two handler threads) and
// two engines with one exec queue each; batches live in the mirrored memory. TearDown
// destroys the queues, checks the GPU PTEs against the CPU page table, and runs mm::check.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <memory>
#include <span>
#include <vector>

#include "drivers/refgpu/engine.h"
#include "drivers/refgpu/fault_queue.h"
#include "drivers/refgpu/fault_service.h"
#include "drivers/refgpu/vm.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "tests/mm/mm_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {


template <typename T>
T value_or(const Result<T>& r, T v) {
  return r.ok() ? *r : v;
}
inline constexpr auto kWait = std::chrono::seconds(20);
inline constexpr uint64_t kBase = 1ull << 32;  // the test's mirrored VA
inline constexpr uint64_t kMirror = 64ull << 20;

class VmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem = mm::testing::make_mem(256ull << 20);
    ASSERT_NE(mem, nullptr);
    as = mm::testing::make_as(mem.get());
    ASSERT_NE(as, nullptr);
    resolver = std::make_unique<HostMemoryResolver>(mem.get(), nullptr);
    device = std::make_unique<svm::Device>("refgpu0", mem.get());
  }
  void make_vm(bool smem_atomics = true) {
    VmConfig c{.id = 1, .flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE,
               .as = as.get(), .mem = resolver.get(), .device = device.get(),
               .smem_atomics = smem_atomics};
    Result<std::unique_ptr<Vm>> v = Vm::create(std::move(c));
    ASSERT_TRUE(v.ok()) << v.error();
    vm = std::move(*v);
    service = std::make_unique<FaultService>(&fq, 2, [this](uint32_t id) {
      return id == 1 ? vm : nullptr;
    });
    for (uint16_t i = 0; i < 2; i++) {
      engines.push_back(std::make_unique<Engine>(i, &fq));
      auto q = engines.back()->create_queue(10 + i, vm->mmu());
      ASSERT_TRUE(q.ok());
      queues.push_back(*q);
    }
  }
  void TearDown() override {
    fault_inject::disarm_all();
    for (size_t i = 0; i < queues.size(); i++) EXPECT_EQ(engines[i % 2]->destroy_queue(queues[i]), 0);
    service.reset();
    if (vm) EXPECT_EQ(vm->check_ptes(), 0);
    vm.reset();
    EXPECT_EQ(device->dma_mappings(), 0u);
    EXPECT_MM_CHECK_OK(*mem);
  }
  void map(uint64_t va, uint64_t len, int prot = PROT_READ | PROT_WRITE) {
    Result<mm::Va> r = as->mmap(va, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
    ASSERT_TRUE(r.ok()) << r.error();
  }
  int bind(uint32_t op, uint64_t va, uint64_t len, uint32_t flags = 0, uint32_t region = 0) {
    BindOp o{.op = op, .flags = flags, .addr = va, .range = len, .prefetch_region = region};
    return vm->bind(std::span<const BindOp>(&o, 1));
  }
  // Places the batch at va (process memory, written by the CPU) and runs it on queue qi.
  std::shared_ptr<Fence> submit(uint64_t va, Batch& b, size_t qi = 0) {
    b.end();
    EXPECT_EQ(mm::cpu::copy_in(*as, va, b.bytes.data(), b.bytes.size()), 0);
    auto f = queues[qi]->submit(va);
    EXPECT_TRUE(f.ok());
    return f.ok() ? *f : nullptr;
  }
  int run(uint64_t va, Batch& b, size_t qi = 0) {
    std::shared_ptr<Fence> f = submit(va, b, qi);
    return f ? f->wait(kWait) : -EINVAL;
  }
  uint64_t load(uint64_t va) {
    Result<uint64_t> v = mm::cpu::load<uint64_t>(*as, va);
    EXPECT_TRUE(v.ok()) << std::hex << va;
    return v.ok() ? *v : ~0ull;
  }
  // The standard layout: [kBase, kBase + kMirror) mapped and mirrored; batches at the top.
  void mirror_all(uint32_t flags = 0) {
    map(kBase, kMirror);
    ASSERT_EQ(bind(REFGPU_VM_BIND_OP_MAP, kBase, kMirror, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR | flags), 0);
  }
  static constexpr uint64_t kBatch = kBase + kMirror - (1ull << 20);

  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<mm::AddressSpace> as;
  std::unique_ptr<HostMemoryResolver> resolver;
  std::unique_ptr<svm::Device> device;
  FaultQueue fq;
  std::shared_ptr<Vm> vm;
  std::unique_ptr<FaultService> service;
  std::vector<std::unique_ptr<Engine>> engines;
  std::vector<std::shared_ptr<ExecQueue>> queues;
};

}  // namespace gpusvm::refgpu::testing
