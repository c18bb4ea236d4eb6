// xe_exec_system_allocator's malloc sections: jobs on malloc'd memory (one fault per job and
// many faults per job), calloc/realloc/aligned_alloc, and free's advice reset.
#include <cstring>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

// IGT "malloc": each job stores a dword into its own malloc'd buffer; the CPU checks them.
TEST(SysallocMalloc, Malloc) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr int kJobs = 16;
  std::vector<rt::Va> bufs;
  for (int j = 0; j < kJobs; ++j) {
    auto a = r.ctx.malloc(4096);
    ASSERT_TRUE(a.ok()) << gpusvm_rt_strerror(a.error());
    ASSERT_EQ(*a % 16, 0u);
    ASSERT_EQ(r.ctx.store<uint64_t>(*a, 0), 0);
    bufs.push_back(*a);
  }
  for (int j = 0; j < kJobs; ++j) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_dword(bufs[j], pattern(j, 0x11)), 0);
    ASSERT_EQ(r.run(cb, j % 2), 0);
  }
  for (int j = 0; j < kJobs; ++j) {
    auto v = r.ctx.load<uint32_t>(bufs[j]);
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(*v, pattern(j, 0x11)) << "job " << j;
    EXPECT_EQ(r.ctx.free(bufs[j]), 0);
  }
  EXPECT_GT(r.stat(REFGPU_STAT_FAULTS_4K) + r.stat(REFGPU_STAT_FAULTS_64K) + r.stat(REFGPU_STAT_FAULTS_2M), 0u);
  r.check_mm();
}

// IGT "malloc-multi-fault": one job writes a buffer much larger than one fault's range, so
// it takes many faults; every dword is checked.
TEST(SysallocMalloc, MallocMultiFault) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kBytes = 4ull << 20;
  auto a = r.ctx.malloc(kBytes);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_strided(0, *a, 4, kBytes / 4, 7, 3), 0);
  ASSERT_EQ(r.run(cb), 0);
  std::vector<uint32_t> out(kBytes / 4);
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, out), 0);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], 7 + 3 * i) << i;
  const uint64_t faults =
      r.stat(REFGPU_STAT_FAULTS_4K) + r.stat(REFGPU_STAT_FAULTS_64K) + r.stat(REFGPU_STAT_FAULTS_2M);
  EXPECT_GE(faults, 2u);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// IGT "malloc-nomemset": the buffer is never touched by the CPU before the jobs, so the GPU's
// faults find no pages at all (pte_none) and the ranges are populated by the device (zeroed
// VRAM). The first job checks that it reads zeros, stores into every other dword, and the CPU
// then reads the GPU's values and the zeros between them; a second job checks every dword of
// the CPU's overwrite of one page (the CPU fault brought it back) and the zeros after it.
TEST(SysallocMalloc, MallocNoMemset) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kBytes = 2ull << 20;
  auto a = r.ctx.aligned_alloc(2ull << 20, kBytes);
  ASSERT_TRUE(a.ok());
  auto res = r.ctx.residency(*a, kBytes);
  ASSERT_TRUE(res.ok());
  EXPECT_EQ(res->none, res->pages) << "nothing populated before the jobs";
  rt::CmdBuf cb;
  ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 8, kBytes / 8, 0, 0), 0);
  ASSERT_EQ(cb.store_strided(0, *a, 8, kBytes / 8, 11, 5), 0);
  ASSERT_EQ(r.run(cb), 0);
  EXPECT_GT(r.stat(REFGPU_STAT_FAULTS_4K) + r.stat(REFGPU_STAT_FAULTS_64K) + r.stat(REFGPU_STAT_FAULTS_2M), 0u);
  std::vector<uint32_t> out(kBytes / 4);
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, out), 0);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], i % 2 ? 0u : 11 + 5 * (i / 2)) << i;
  std::vector<uint32_t> page(1024);
  for (size_t i = 0; i < page.size(); ++i) page[i] = 0x7700 + 3 * static_cast<uint32_t>(i);
  ASSERT_EQ(r.ctx.write<uint32_t>(*a + 4096, page), 0);
  rt::CmdBuf cb2;
  ASSERT_EQ(cb2.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a + 4096, 4, page.size(), 0x7700, 3), 0);
  ASSERT_EQ(cb2.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a + 8192 + 4, 8, 1024, 0, 0), 0);
  ASSERT_EQ(r.run(cb2), 0);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// The malloc family's contracts: calloc zeroes reused memory, realloc keeps the bytes,
// aligned_alloc aligns, bad calls are clear errors.
TEST(SysallocMalloc, CallocReallocAlignedAlloc) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.malloc(1000);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.memset(*a, 0xab, 1000), 0);
  ASSERT_EQ(r.ctx.free(*a), 0);
  auto c = r.ctx.calloc(250, 4);  // first fit: the same block again
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, *a);
  std::vector<uint8_t> bytes(1000);
  ASSERT_EQ(r.ctx.read<uint8_t>(*c, bytes), 0);
  for (uint8_t b : bytes) ASSERT_EQ(b, 0);
  for (size_t i = 0; i < 1000; ++i) bytes[i] = static_cast<uint8_t>(i * 7);
  ASSERT_EQ(r.ctx.write<uint8_t>(*c, bytes), 0);
  auto g = r.ctx.realloc(*c, 600 << 10);  // grows into a mapping of its own
  ASSERT_TRUE(g.ok());
  std::vector<uint8_t> back(1000);
  ASSERT_EQ(r.ctx.read<uint8_t>(*g, back), 0);
  EXPECT_EQ(back, bytes);
  ASSERT_EQ(r.ctx.free(*g), 0);
  for (size_t align : {64u, 4096u, 65536u, 1u << 21}) {
    auto al = r.ctx.aligned_alloc(align, 100);
    ASSERT_TRUE(al.ok()) << align;
    EXPECT_EQ(*al % align, 0u) << align;
    EXPECT_EQ(r.ctx.free(*al), 0);
  }
  EXPECT_EQ(r.ctx.aligned_alloc(48, 100).error(), -EINVAL);
  EXPECT_EQ(r.ctx.malloc(0).error(), -EINVAL);
  EXPECT_EQ(r.ctx.free(*a + 8), -EINVAL);  // not a block start
  EXPECT_EQ(r.ctx.free(*g), -EINVAL);      // double free
  EXPECT_EQ(r.ctx.calloc(SIZE_MAX / 2, 4).error(), -ENOMEM);
  auto z = r.ctx.realloc(0, 64);
  ASSERT_TRUE(z.ok());
  auto zz = r.ctx.realloc(*z, 0);
  ASSERT_TRUE(zz.ok());
  EXPECT_EQ(*zz, 0u);
  r.check_mm();
}

// free() of an arena block resets the advice of the pages it frees: the next malloc of those
// pages must not inherit the previous owner's placement (free need not unmap).
TEST(SysallocMalloc, FreeResetsAdvice) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.malloc(64 << 10);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.advise_preferred(*a, 64 << 10, GPUSVM_RT_LOCATION_SYSTEM), 0);
  ASSERT_EQ(r.ctx.advise_atomic(*a, 64 << 10, REFGPU_ATOMIC_CPU), 0);
  const rt::Va inner = (*a + 4095) & ~4095ull;
  auto before = r.ctx.attrs(inner, 4096);
  ASSERT_TRUE(before.ok());
  ASSERT_EQ(before->size(), 1u);
  EXPECT_EQ((*before)[0].preferred_location, GPUSVM_RT_LOCATION_SYSTEM);
  EXPECT_EQ((*before)[0].atomic, static_cast<uint32_t>(REFGPU_ATOMIC_CPU));
  ASSERT_EQ(r.ctx.free(*a), 0);
  auto after = r.ctx.attrs(inner, 4096);
  ASSERT_TRUE(after.ok());
  ASSERT_EQ(after->size(), 1u);
  EXPECT_EQ((*after)[0].preferred_location, GPUSVM_RT_LOCATION_DEVICE);
  EXPECT_EQ((*after)[0].atomic, static_cast<uint32_t>(REFGPU_ATOMIC_UNDEFINED));
  // A job on the reused memory: atomics work again (CPU-only atomics would fail it).
  auto b = r.ctx.malloc(64 << 10);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(r.ctx.store<uint64_t>(inner, 5), 0);
  rt::CmdBuf cb;
  ASSERT_EQ(cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_CMD_FLAG_QWORD, inner), 0);
  ASSERT_EQ(r.run(cb), 0);
  EXPECT_EQ(*r.ctx.load<uint64_t>(inner), 6u);
  EXPECT_EQ(r.ctx.free(*b), 0);
  r.check_mm();
}

// A new arena that cannot be mapped (fault point runtime.heap_arena): malloc and submit fail
// with -ENOMEM and leave nothing behind; the next calls work.
TEST(SysallocMalloc, ArenaFailureRollsBack) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  {
    fault_inject::ScopedArm arm("runtime.heap_arena", {.nth = 1, .times = 0});
    EXPECT_EQ(r.ctx.malloc(100).error(), -ENOMEM);  // the user heap's first arena
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_dword(4096 * 100, 1), 0);
    EXPECT_EQ(r.queues[0].submit(cb).error(), -ENOMEM);  // the internal heap's first arena
  }
  auto a = r.ctx.malloc(100);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_dword(*a, 42), 0);
  ASSERT_EQ(r.run(cb), 0);
  EXPECT_EQ(*r.ctx.load<uint32_t>(*a), 42u);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.close();  // no fence or queue left over: every destroy succeeds
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
