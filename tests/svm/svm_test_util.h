// Fixture for the Gpusvm contract tests: a machine (PhysMem + AddressSpace, no drivers), one
// TestGpu, and the teardown every scenario ends with (no DMA mapping left, mm::check clean,
// every page returned).
#pragma once

#include <gtest/gtest.h>

#include <memory>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/svm/gpusvm.h"
#include "tests/mm/mm_test_util.h"
#include "tests/svm/test_gpu.h"

namespace gpusvm::svm::testing {

using mm::testing::fill_pages;
using mm::testing::pattern;
using mm::testing::verify_pages;

// 1 GiB: 2 MiB- and 512 MiB-aligned, far from where mmap(0, ...) places things.
inline constexpr mm::Va kBase = 1ULL << 30;
inline constexpr uint64_t k4K = 4ULL << 10;
inline constexpr uint64_t k64K = 64ULL << 10;
inline constexpr uint64_t k2M = 2ULL << 20;

class SvmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem = mm::testing::make_mem(128ULL << 20);
    ASSERT_NE(mem, nullptr);
    as = mm::testing::make_as(mem.get());
    ASSERT_NE(as, nullptr);
    initial_free = mem->free_pages();
  }
  void TearDown() override {
    fault_inject::disarm_all();
    if (gpu) {
      gpu->unbind_all();
      for (int i = 0; i < gpu_devices; i++) EXPECT_EQ(gpu->device(i)->dma_mappings(), 0u);
      gpu.reset();
    }
    EXPECT_MM_CHECK_OK(*mem);
    as.reset();
    EXPECT_EQ(mem->free_pages(), initial_free);
  }
  void make_gpu(TestGpu::Options o = {}) {
    int rc = 0;
    gpu_devices = o.devices;
    gpu = std::make_unique<TestGpu>(as.get(), o, &rc);
    ASSERT_EQ(rc, 0);
  }
  // An anonymous mapping at a fixed address (MAP_FIXED_NOREPLACE).
  mm::Va map_at(mm::Va va, uint64_t len, int prot = PROT_READ | PROT_WRITE, bool huge = false) {
    Result<mm::Va> r = as->mmap(va, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
    EXPECT_TRUE(r.ok()) << r.error();
    if (!r) return 0;
    EXPECT_EQ(as->madvise(va, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0);
    return *r;
  }
  // The range covering va (driver lock taken), with a reference; null when none.
  RangeRef find(mm::Va va) {
    MutexLock g(&gpu->vm_lock());
    Notifier* n = gpu->gpusvm()->notifier_find(va, va + 1);
    Range* r = n ? gpu->gpusvm()->range_find(n, va, va + 1) : nullptr;
    if (!r) return RangeRef();
    r->get();
    return RangeRef(r);
  }
  // range_find_or_insert with the driver lock.
  Result<RangeRef> insert(mm::Va va, Ctx ctx = {}, mm::Va gs = 0, mm::Va ge = ~mm::Va{0}) {
    MutexLock g(&gpu->vm_lock());
    return gpu->gpusvm()->range_find_or_insert(va, gs, ge, ctx);
  }
  // Every word the GPU reads equals what the CPU reads, page by page.
  int gpu_matches_cpu(mm::Va start, uint64_t len) {
    int bad = 0;
    for (mm::Va va = start; va < start + len; va += k4K) {
      Result<uint64_t> g = gpu->gpu_load(va);
      Result<uint64_t> c = mm::cpu::load<uint64_t>(*as, va);
      if (!g || !c || *g != *c) {
        if (bad++ < 5) {
          ADD_FAILURE() << std::hex << va << ": gpu " << (g ? *g : 0xdead) << " (" << std::dec
                        << g.error() << ") cpu " << std::hex << (c ? *c : 0xdead);
        }
      }
    }
    return bad;
  }

  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<mm::AddressSpace> as;
  std::unique_ptr<TestGpu> gpu;
  int gpu_devices = 1;
  uint64_t initial_free = 0;
};

}  // namespace gpusvm::svm::testing
