// Jobs that fail: an invalid address (the error fence names the address and the access, the
// VM and the queue stay usable), an ISA error (no fault record: -EIO), and the runtime's own
// argument checks, which refuse before anything reaches the device.
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

// IGT's invalid-address jobs: a store to an address nothing maps fails the job with -EFAULT
// and the fault record of that address (a write); a read of another does too (a read). Jobs
// after them on the same queue and VM run normally.
TEST(SysallocFault, InvalidAddressJobThenVmStillUsable) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto good = r.ctx.malloc(4096);
  ASSERT_TRUE(good.ok());
  rt::CmdBuf warm;  // the runtime's batch arena exists before the hole is made
  ASSERT_EQ(warm.store_dword(*good, 0), 0);
  ASSERT_EQ(r.run(warm), 0);
  auto hole = r.ctx.mmap(64 << 10, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(hole.ok());
  ASSERT_EQ(r.ctx.munmap(*hole, 64 << 10), 0);  // an address that was mapped and no longer is
  for (uint32_t access : {REFGPU_ACCESS_WRITE, REFGPU_ACCESS_READ}) {
    SCOPED_TRACE(access);
    const rt::Va bad = *hole + 8192 + access * 64;
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_dword(*good, 1), 0);
    if (access == REFGPU_ACCESS_WRITE)
      ASSERT_EQ(cb.store_qword(bad, 5), 0);
    else
      ASSERT_EQ(cb.load_compare(bad, REFGPU_UFENCE_WAIT_OP_EQ, 0, ~0ull, REFGPU_CMD_FLAG_QWORD), 0);
    ASSERT_EQ(cb.store_dword(*good + 4, 2), 0);  // never reached
    ASSERT_EQ(r.ctx.store<uint64_t>(*good, 0), 0);
    auto f = r.queues[0].submit(cb);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->wait(kWaitNs), -EFAULT);
    EXPECT_EQ(f->status(), -EFAULT);
    auto e = f->error();
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->error, -EFAULT);
    EXPECT_EQ(e->has_fault, 1u);
    EXPECT_EQ(e->address, bad);
    EXPECT_EQ(e->access, access);
    EXPECT_EQ(e->fault_type, static_cast<uint32_t>(REFGPU_FAULT_TYPE_NOT_PRESENT));
    EXPECT_EQ(*r.ctx.load<uint32_t>(*good), 1u);      // what ran before the fault landed
    EXPECT_EQ(*r.ctx.load<uint32_t>(*good + 4), 0u);  // what came after did not run
    // The VM and the queue still work.
    rt::CmdBuf ok;
    ASSERT_EQ(ok.store_dword(*good + 4, 3), 0);
    EXPECT_EQ(r.run(ok), 0);
    EXPECT_EQ(*r.ctx.load<uint32_t>(*good + 4), 3u);
  }
  EXPECT_GE(r.stat(REFGPU_STAT_JOB_ERRORS), 2u);
  EXPECT_EQ(r.ctx.free(*good), 0);
  r.check_mm();
}

// A job that fails without a GPU fault (a failed LOAD_COMPARE check): -EIO, no fault named.
TEST(SysallocFault, CheckFailureIsEioWithoutFault) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.malloc(64);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.store<uint64_t>(*a, 41), 0);
  rt::CmdBuf cb;
  ASSERT_EQ(cb.load_compare(*a, REFGPU_UFENCE_WAIT_OP_EQ, 42, ~0ull, REFGPU_CMD_FLAG_QWORD), 0);
  auto f = r.queues[1].submit(cb);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->wait(kWaitNs), -EIO);
  auto e = f->error();
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->has_fault, 0u);
  rt::CmdBuf ok;
  ASSERT_EQ(ok.load_compare(*a, REFGPU_UFENCE_WAIT_OP_EQ, 41, ~0ull, REFGPU_CMD_FLAG_QWORD), 0);
  EXPECT_EQ(r.run(ok, 1), 0);
  EXPECT_EQ(r.ctx.free(*a), 0);
}

// Every runtime call validates its arguments: clear negative errnos, nothing aborts.
TEST(SysallocFault, ArgumentChecks) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  rt::CmdBuf cb;
  EXPECT_EQ(cb.store_dword(2, 1), -EINVAL);                // misaligned
  EXPECT_EQ(cb.store_qword(4, 1), -EINVAL);
  EXPECT_EQ(cb.memset(4096, 0, 0), -EINVAL);               // empty
  EXPECT_EQ(cb.copy(4096, 4100, 16), -EINVAL);             // overlap
  EXPECT_EQ(cb.store_strided(0, 4096, 2, 4, 0, 0), -EINVAL);  // stride not a multiple of 4
  EXPECT_EQ(cb.store_strided(0, 4096, 4, 0, 0, 0), -EINVAL);  // count 0
  EXPECT_EQ(cb.load_strided(0, 4096, 4, 1, 0, 0, 8), -EINVAL);  // sum_addr without SUM
  EXPECT_EQ(cb.atomic(9, 0, 4096), -EINVAL);
  EXPECT_EQ(cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_ATOMIC_FLAG_RETURN, 4096, 0, 0, 0), -EINVAL);
  EXPECT_EQ(cb.load_compare(4096, 17, 0, 0, 0), -EINVAL);
  EXPECT_EQ(cb.store_dword(mm::kTaskSize, 1), -EINVAL);    // outside user space
  EXPECT_EQ(cb.bytes(), 0u);                               // nothing was appended
  EXPECT_EQ(gpusvm_rt_submit(nullptr, cb.get(), nullptr), -EINVAL);
  EXPECT_EQ(gpusvm_rt_malloc(nullptr, 8, nullptr), -EINVAL);
  EXPECT_EQ(gpusvm_rt_device_open(nullptr, 0, nullptr), -EINVAL);
  gpusvm_rt_device* d = nullptr;
  EXPECT_EQ(gpusvm_rt_device_open(rt::process(*r.proc), 3, &d), -ENOENT);
  EXPECT_EQ(d, nullptr);
  EXPECT_EQ(gpusvm_rt_fence_wait(nullptr, 0), -EINVAL);
  EXPECT_EQ(r.ctx.advise_atomic(4096, 4096, 9), -EINVAL);
  EXPECT_EQ(r.ctx.advise_preferred(4096, 0, 0), -EINVAL);
  EXPECT_EQ(r.ctx.mmap(4096, PROT_READ, MAP_PRIVATE).error(), -EINVAL);  // anonymous only
  EXPECT_EQ(gpusvm_rt_queue_create(r.ctx.get(), 7, nullptr), -EINVAL);
  gpusvm_rt_queue* q = nullptr;
  EXPECT_EQ(gpusvm_rt_queue_create(r.ctx.get(), 7, &q), -EINVAL);  // no engine 7
  // Destroy order is enforced, not crashed on.
  EXPECT_EQ(gpusvm_rt_context_destroy(r.ctx.get()), -EBUSY);  // queues alive
  EXPECT_EQ(gpusvm_rt_device_close(r.dev.get()), -EBUSY);     // context alive
  EXPECT_STREQ(gpusvm_rt_strerror(-EOPNOTSUPP), "EOPNOTSUPP: the device cannot mirror this process's address space");
}

// A device whose VA cannot cover the CPU's address space: the context is refused clearly.
TEST(SysallocFault, DeviceVaTooSmallIsRefused) {
  Rig r({.va_bits = 40});
  auto d = rt::Device::open(*r.proc, 0);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->info()->va_bits, 40u);
  EXPECT_EQ(rt::Context::create(*d).error(), -EOPNOTSUPP);
  uint32_t n = 0;
  EXPECT_EQ(gpusvm_rt_device_count(rt::process(*r.proc), &n), 0);
  EXPECT_EQ(n, 1u);
}

}  // namespace
}  // namespace gpusvm::sysalloc
