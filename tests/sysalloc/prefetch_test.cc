// xe_exec_system_allocator's prefetch and many-stride sections, and the residency query.
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

// IGT "prefetch": prefetch a malloc'd buffer to VRAM with a fence, then the job finds it
// there (no migration on fault), and back to system memory; residency follows each step and
// the data survives both moves.
TEST(SysallocPrefetch, Prefetch) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kBytes = 2ull << 20;
  auto a = r.ctx.aligned_alloc(2ull << 20, kBytes);
  ASSERT_TRUE(a.ok());
  std::vector<uint32_t> v(kBytes / 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, 1);
  ASSERT_EQ(r.ctx.write<uint32_t>(*a, v), 0);
  auto res = r.ctx.residency(*a, kBytes);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->pages, kBytes / 4096);
  EXPECT_EQ(res->system, kBytes / 4096);

  auto f = r.ctx.prefetch(*a, kBytes, 1);
  ASSERT_TRUE(f.ok()) << gpusvm_rt_strerror(f.error());
  ASSERT_EQ(f->wait(kWaitNs), 0);
  res = r.ctx.residency(*a, kBytes);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->device, kBytes / 4096);
  const uint64_t to_vram = r.stat(REFGPU_STAT_MIGRATIONS_TO_VRAM);
  EXPECT_GT(to_vram, 0u);
  EXPECT_EQ(r.stat(REFGPU_STAT_COPY_BYTES_TO_VRAM), kBytes);

  rt::CmdBuf cb;  // the job checks the CPU's data in VRAM, then adds 1 to each dword
  ASSERT_EQ(cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, 1, pattern(0, 1), 0), 0);
  ASSERT_EQ(cb.store_strided(0, *a, 4, v.size(), 5, 1), 0);
  ASSERT_EQ(r.run(cb), 0);
  EXPECT_EQ(r.stat(REFGPU_STAT_MIGRATIONS_TO_VRAM), to_vram);  // nothing left to migrate

  ASSERT_EQ(r.ctx.prefetch(*a, kBytes, GPUSVM_RT_REGION_SYSTEM, false).error(), 0);
  res = r.ctx.residency(*a, kBytes);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->device, 0u);
  EXPECT_EQ(res->system, kBytes / 4096);
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, v), 0);
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], 5 + i) << i;
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// Prefetch to the madvised preferred location, and the argument checks.
TEST(SysallocPrefetch, PrefetchPreferredAndErrors) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.mmap(256 << 10, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.memset(*a, 0x5a, 256 << 10), 0);
  ASSERT_EQ(r.ctx.advise_preferred(*a, 256 << 10, GPUSVM_RT_LOCATION_DEVICE), 0);
  auto f = r.ctx.prefetch(*a, 256 << 10, GPUSVM_RT_REGION_PREFERRED);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->wait(kWaitNs), 0);
  EXPECT_EQ(r.ctx.residency(*a, 256 << 10)->device, 64u);
  EXPECT_EQ(r.ctx.prefetch(*a, 0, 1).error(), -EINVAL);
  EXPECT_EQ(r.ctx.prefetch(*a, 4096, 7).error(), -EINVAL);            // no such region
  EXPECT_EQ(r.ctx.prefetch(mm::kTaskSize, 4096, 1).error(), -EINVAL);  // outside user space
  std::vector<uint8_t> back(256 << 10);
  ASSERT_EQ(r.ctx.read<uint8_t>(*a, back), 0);  // CPU reads fault it back
  for (uint8_t b : back) ASSERT_EQ(b, 0x5a);
  EXPECT_EQ(r.ctx.munmap(*a, 256 << 10), 0);
  r.check_mm();
}

// IGT "many-stride": records 40 KiB apart (so every record is on a page of its own and runs
// of them cross 2 MiB boundaries), written by one job, read back by another and by the CPU,
// fault-driven and prefetched.
TEST(SysallocPrefetch, ManyStride) {
  for (bool prefetch : {false, true}) {
    SCOPED_TRACE(prefetch);
    Rig r;
    ASSERT_EQ(r.open(), 0);
    constexpr uint64_t kStride = 40 << 10;
    constexpr uint64_t kRecs = 128;
    auto a = r.ctx.malloc(kStride * kRecs);
    ASSERT_TRUE(a.ok());
    if (prefetch) ASSERT_EQ(r.ctx.prefetch(*a, kStride * kRecs, 1, false).error(), 0);
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, *a, kStride, kRecs, 1000, 7), 0);
    ASSERT_EQ(r.run(cb), 0);
    rt::CmdBuf chk;  // a second job reads the records back, and sums them
    auto sum = r.ctx.malloc(8);
    ASSERT_TRUE(sum.ok());
    ASSERT_EQ(chk.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM,
                               *a, kStride, kRecs, 1000, 7, *sum),
              0);
    ASSERT_EQ(r.run(chk, 1), 0);
    uint64_t expect = 0;
    for (uint64_t i = 0; i < kRecs; ++i) {
      expect += 1000 + 7 * i;
      ASSERT_EQ(*r.ctx.load<uint64_t>(*a + i * kStride), 1000 + 7 * i) << i;
    }
    EXPECT_EQ(*r.ctx.load<uint64_t>(*sum), expect);
    EXPECT_EQ(r.ctx.free(*a), 0);
    EXPECT_EQ(r.ctx.free(*sum), 0);
    r.check_mm();
  }
}

}  // namespace
}  // namespace gpusvm::sysalloc
