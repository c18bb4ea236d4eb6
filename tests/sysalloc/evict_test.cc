// xe_exec_system_allocator's evict sections: a working set of 112.5 % of VRAM, each buffer
// faulted into VRAM in turn, so later faults evict earlier buffers back to system memory;
// every buffer's data is checked afterwards, by the GPU and by the CPU.
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

}  // namespace
}  // namespace gpusvm::sysalloc
