// xe_exec_system_allocator's evict sections: a working set of 112.5 % of VRAM, each buffer
// faulted into VRAM in turn, so later faults evict earlier buffers back to system memory;
// every buffer's data is checked afterwards, by the GPU and by the CPU. evict-malloc-mix-bo
// interleaves VRAM buffer objects with the malloc'd buffers.
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

TEST(SysallocEvict, EvictMalloc) {
  Rig r({.vram = 16ull << 20});
  ASSERT_EQ(r.open(), 0);
  auto info = r.dev.info();
  ASSERT_TRUE(info.ok());
  const uint64_t total = info->vram_size / 8 * 9;  // 112.5 %
  constexpr uint64_t kBuf = 2ull << 20;
  const uint64_t n = total / kBuf;
  std::vector<rt::Va> bufs;
  for (uint64_t b = 0; b < n; ++b) {
    auto a = r.ctx.aligned_alloc(kBuf, kBuf);
    ASSERT_TRUE(a.ok());
    bufs.push_back(*a);
  }
  // Round 1: each buffer written by the GPU (faults migrate it to VRAM, evicting others).
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, bufs[b], 8, kBuf / 8, b << 32, 1), 0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  EXPECT_GT(r.stat(REFGPU_STAT_EVICTIONS) + r.stat(REFGPU_STAT_MIGRATIONS_TO_SMEM), 0u);
  // Round 2: the GPU checks every buffer (faulting evicted ones back in).
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, bufs[b], 8, kBuf / 8, b << 32, 1),
              0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  auto info2 = r.dev.info();
  ASSERT_TRUE(info2.ok());
  EXPECT_LE(info2->vram_used, info2->vram_size);
  // The CPU reads everything back.
  std::vector<uint64_t> v(kBuf / 8);
  for (uint64_t b = 0; b < n; ++b) {
    ASSERT_EQ(r.ctx.read<uint64_t>(bufs[b], v), 0);
    for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], (b << 32) + i) << b << " " << i;
  }
  for (rt::Va a : bufs) EXPECT_EQ(r.ctx.free(a), 0);
  r.check_mm();
}

// evict-malloc-mix-bo: 112.5 % of VRAM, every other 2 MiB buffer a BO (system + VRAM
// placement, created in VRAM) bound over a reserved address range, the others malloc'd. The
// BOs and the svm ranges evict each other; every byte is checked by the GPU after the round
// that evicted, and by the CPU at the end (the BOs through their CPU views).
TEST(SysallocEvict, EvictMallocMixBo) {
  Rig r({.vram = 16ull << 20});
  ASSERT_EQ(r.open(), 0);
  auto info = r.dev.info();
  ASSERT_TRUE(info.ok());
  constexpr uint64_t kBuf = 2ull << 20;
  const uint64_t n = info->vram_size / 8 * 9 / kBuf;
  std::vector<rt::Va> bufs;
  std::vector<rt::Bo> bos;
  for (uint64_t b = 0; b < n; ++b) {
    if (b % 2) {
      auto va = r.ctx.mmap(kBuf, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);  // the BO's VA
      ASSERT_TRUE(va.ok());
      auto bo = rt::Bo::create(r.ctx, kBuf, GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM);
      ASSERT_TRUE(bo.ok()) << bo.error();
      ASSERT_EQ(bo->bind(*va), 0);
      bos.push_back(std::move(*bo));
      bufs.push_back(*va);
    } else {
      auto a = r.ctx.aligned_alloc(kBuf, kBuf);
      ASSERT_TRUE(a.ok());
      bufs.push_back(*a);
    }
  }
  const uint64_t evictions0 = r.stat(REFGPU_STAT_EVICTIONS);
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, bufs[b], 8, kBuf / 8, b << 32, 1), 0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  EXPECT_GT(r.stat(REFGPU_STAT_EVICTIONS), evictions0);
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, bufs[b], 8, kBuf / 8, b << 32, 1),
              0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  auto info2 = r.dev.info();
  ASSERT_TRUE(info2.ok());
  EXPECT_LE(info2->vram_used, info2->vram_size);
  std::vector<uint64_t> v(kBuf / 8);
  for (uint64_t b = 0; b < n; ++b) {
    rt::Va at = bufs[b];
    if (b % 2) {
      auto view = bos[b / 2].mmap(PROT_READ);  // moves the BO to system memory
      ASSERT_TRUE(view.ok()) << view.error();
      at = *view;
    }
    ASSERT_EQ(r.ctx.read<uint64_t>(at, v), 0);
    for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], (b << 32) + i) << b << " " << i;
  }
  bos.clear();  // unbind, unmap the views, close
  for (uint64_t b = 0; b < n; ++b) {
    EXPECT_EQ(b % 2 ? r.ctx.munmap(bufs[b], kBuf) : r.ctx.free(bufs[b]), 0);
  }
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
