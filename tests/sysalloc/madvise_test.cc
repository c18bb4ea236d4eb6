// xe_exec_system_allocator's madvise sections: preferred location alternating between VRAM
// and system memory, the atomic policies (device, global, cpu), partial madvise splitting the
// attribute ranges, and the attribute query.
#include <vector>


#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

constexpr uint64_t kLen = 256 << 10;

// IGT "madvise-preffered-loc-*": jobs alternate with the preferred location flipping between
// device and system; each job's faults place the pages where the advice says, and the data
// follows.
TEST(SysallocMadvise, PreferredLocationAlternating) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.mmap(kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  for (uint32_t round = 0; round < 4; ++round) {
    SCOPED_TRACE(round);
    const bool device = round % 2 == 0;
    ASSERT_EQ(r.ctx.advise_preferred(*a, kLen, device ? GPUSVM_RT_LOCATION_DEVICE : GPUSVM_RT_LOCATION_SYSTEM), 0);
    // The CPU touches everything first (the pages come back to system memory).
    std::vector<uint32_t> v(kLen / 4);
    for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, round);
    ASSERT_EQ(r.ctx.write<uint32_t>(*a, v), 0);
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(0, *a, 4, v.size(), round * 1000, 1), 0);
    ASSERT_EQ(r.run(cb), 0);
    auto res = r.ctx.residency(*a, kLen);
    ASSERT_TRUE(res.ok());
    if (device) {
      EXPECT_EQ(res->device, kLen / 4096);
    } else {
      EXPECT_EQ(res->device, 0u);
      EXPECT_EQ(res->system, kLen / 4096);
    }
    ASSERT_EQ(r.ctx.read<uint32_t>(*a, v), 0);
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], round * 1000 + i) << i;
  }
  EXPECT_EQ(r.ctx.munmap(*a, kLen), 0);
  r.check_mm();
}

// IGT "madvise-atomic-device/global/cpu": a device atomic works under DEVICE and GLOBAL (and
// the CPU's atomics still see every increment under GLOBAL); under CPU the device atomic fails
// its job with an atomic fault on the address, and the value is unchanged.
TEST(SysallocMadvise, AtomicPolicies) {
  for (uint32_t policy : {REFGPU_ATOMIC_DEVICE, REFGPU_ATOMIC_GLOBAL, REFGPU_ATOMIC_CPU}) {
    SCOPED_TRACE(policy);
    Rig r;
    ASSERT_EQ(r.open(), 0);
    auto a = r.ctx.malloc(64 << 10);
    ASSERT_TRUE(a.ok());
    const rt::Va counter = (*a + 4095) & ~4095ull;
    ASSERT_EQ(r.ctx.store<uint64_t>(counter, 100), 0);
    ASSERT_EQ(r.ctx.advise_atomic(counter, 4096, policy), 0);
    rt::CmdBuf cb;
    for (int i = 0; i < 10; ++i) ASSERT_EQ(cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_CMD_FLAG_QWORD, counter), 0);
    auto f = r.queues[0].submit(cb);
    ASSERT_TRUE(f.ok());
    const int st = f->wait(kWaitNs);
    if (policy == REFGPU_ATOMIC_CPU) {
      EXPECT_EQ(st, -EFAULT);
      auto e = f->error();
      ASSERT_TRUE(e.ok());
      EXPECT_EQ(e->has_fault, 1u);
      EXPECT_EQ(e->address, counter);
      EXPECT_EQ(e->access, static_cast<uint32_t>(REFGPU_ACCESS_ATOMIC));
      EXPECT_EQ(*r.ctx.load<uint64_t>(counter), 100u);
    } else {
      EXPECT_EQ(st, 0);
      auto old = r.ctx.atomic_fetch_add(counter, 1);  // a CPU atomic after the device's
      ASSERT_TRUE(old.ok());
      EXPECT_EQ(*old, 110u);
      EXPECT_EQ(*r.ctx.load<uint64_t>(counter), 111u);
    }
    EXPECT_EQ(r.ctx.free(*a), 0);
    r.check_mm();
  }
}

// IGT "madvise-split-vma" / the attribute query: advice on a middle part splits the mirror's
// attribute ranges into three, a second advice on an overlapping part into more; the query
// reports each piece with its attributes; free() of a large block resets its advice.
TEST(SysallocMadvise, PartialSplitsAndQuery) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kPages = 16;
  auto a = r.ctx.mmap(kPages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  auto q = r.ctx.attrs(*a, kPages * 4096);
  ASSERT_TRUE(q.ok());
  ASSERT_EQ(q->size(), 1u);
  EXPECT_LE((*q)[0].start, *a);
  EXPECT_GE((*q)[0].end, *a + kPages * 4096);
  EXPECT_EQ((*q)[0].preferred_location, GPUSVM_RT_LOCATION_DEVICE);

  ASSERT_EQ(r.ctx.advise_preferred(*a + 4 * 4096, 8 * 4096, GPUSVM_RT_LOCATION_SYSTEM), 0);
  ASSERT_EQ(r.ctx.advise_atomic(*a + 10 * 4096, 4 * 4096, REFGPU_ATOMIC_GLOBAL), 0);
  q = r.ctx.attrs(*a, kPages * 4096);
  ASSERT_TRUE(q.ok());
  // [0,4) default, [4,10) system, [10,12) system+global, [12,14) global, [14,16) default.
  struct Want {
    uint64_t s, e;
    int32_t loc;
    uint32_t atomic;
  };
  const std::vector<Want> want = {{0, 4, GPUSVM_RT_LOCATION_DEVICE, REFGPU_ATOMIC_UNDEFINED},
                                  {4, 10, GPUSVM_RT_LOCATION_SYSTEM, REFGPU_ATOMIC_UNDEFINED},
                                  {10, 12, GPUSVM_RT_LOCATION_SYSTEM, REFGPU_ATOMIC_GLOBAL},
                                  {12, 14, GPUSVM_RT_LOCATION_DEVICE, REFGPU_ATOMIC_GLOBAL},
                                  {14, 16, GPUSVM_RT_LOCATION_DEVICE, REFGPU_ATOMIC_UNDEFINED}};
  ASSERT_EQ(q->size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(i);
    if (i > 0) EXPECT_EQ((*q)[i].start, *a + want[i].s * 4096);
    if (i + 1 < want.size()) EXPECT_EQ((*q)[i].end, *a + want[i].e * 4096);
    EXPECT_EQ((*q)[i].preferred_location, want[i].loc);
    EXPECT_EQ((*q)[i].atomic, want[i].atomic);
  }
  // Too small an array is -ENOSPC with the count.
  gpusvm_rt_range_attr two[2];
  uint32_t n = 0;
  EXPECT_EQ(gpusvm_rt_query_attrs(r.ctx.get(), *a, kPages * 4096, two, 2, &n), -ENOSPC);
  EXPECT_EQ(n, want.size());
  // The GPU job on the split range works, each part placed by its advice.
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_strided(0, *a, 4096, kPages, 1, 1), 0);
  ASSERT_EQ(r.run(cb), 0);
  for (uint64_t p = 0; p < kPages; ++p) EXPECT_EQ(*r.ctx.load<uint32_t>(*a + p * 4096), 1 + p);
  ASSERT_EQ(r.ctx.munmap(*a, kPages * 4096), 0);
  // A large malloc block freed by munmap: the runtime resets its advice itself (the driver's
  // autoreset covers only the ranges the GPU faulted, when its garbage collector runs).
  auto big = r.ctx.malloc(1 << 20);
  ASSERT_TRUE(big.ok());
  ASSERT_EQ(r.ctx.advise_preferred(*big, 1 << 20, GPUSVM_RT_LOCATION_SYSTEM), 0);
  ASSERT_EQ(r.ctx.free(*big), 0);
  q = r.ctx.attrs(*big, 1 << 20);
  ASSERT_TRUE(q.ok());
  for (const gpusvm_rt_range_attr& at : *q) {
    EXPECT_EQ(at.preferred_location, GPUSVM_RT_LOCATION_DEVICE);
    EXPECT_EQ(at.atomic, static_cast<uint32_t>(REFGPU_ATOMIC_UNDEFINED));
  }
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
