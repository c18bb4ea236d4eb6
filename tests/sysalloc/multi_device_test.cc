// xe_exec_system_allocator's two-device sections (multi-GPU SVM): one process, two refgpu
// devices, a context on each mirroring the same address space: a shared counter incremented
// by both devices' atomics (and the CPU's), and data one device wrote read by the other.
#include <thread>
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

struct Second {
  rt::Device dev;
  rt::Context ctx;
  rt::Queue q;
  ~Second() {
    q.reset();
    ctx.reset();
    dev.reset();
  }
};

int open_second(Rig& r, Second* s) {
  auto d = rt::Device::open(*r.proc, 1);
  if (!d) return d.error();
  s->dev = std::move(*d);
  auto c = rt::Context::create(s->dev);
  if (!c) return c.error();
  s->ctx = std::move(*c);
  auto q = rt::Queue::create(s->ctx, 0);
  if (!q) return q.error();
  s->q = std::move(*q);
  return 0;
}

// Both devices increment one counter concurrently, 4 jobs of 16 increments each.
TEST(SysallocMultiDevice, SharedCounterIncrementedByBoth) {
  Rig r({.devices = 2});
  ASSERT_EQ(r.open(), 0);
  uint32_t n = 0;
  ASSERT_EQ(gpusvm_rt_device_count(rt::process(*r.proc), &n), 0);
  ASSERT_EQ(n, 2u);
  Second s;
  ASSERT_EQ(open_second(r, &s), 0);
  auto a = r.ctx.malloc(8);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.store<uint64_t>(*a, 0), 0);
  // System memory for the counter on both VMs: each device's atomics use device-exclusive
  // entries there, handed between the devices by the CPU page table.
  ASSERT_EQ(r.ctx.advise_preferred(*a, 8, GPUSVM_RT_LOCATION_SYSTEM), 0);
  ASSERT_EQ(s.ctx.advise_preferred(*a, 8, GPUSVM_RT_LOCATION_SYSTEM), 0);
  std::atomic<int> failures{0};
  auto incs = [&](const rt::Queue& q) {
    for (int j = 0; j < 4; ++j) {
      rt::CmdBuf cb;
      for (int k = 0; k < 16; ++k) (void)cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_CMD_FLAG_QWORD, *a);
      auto f = q.submit(cb);
      if (!f || f->wait(kWaitNs) != 0) failures.fetch_add(1);
    }
  };
  std::thread t0(incs, std::cref(r.queues[0]));
  std::thread t1(incs, std::cref(s.q));
  t0.join();
  t1.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(*r.ctx.load<uint64_t>(*a), 128u);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// Device 0 writes a buffer (its faults migrate it into device 0's VRAM); device 1 then reads
// and checks it (its faults move the pages), and writes it back; the CPU checks the end.
TEST(SysallocMultiDevice, CrossDeviceReadsAndMigration) {
  Rig r({.devices = 2});
  ASSERT_EQ(r.open(), 0);
  Second s;
  ASSERT_EQ(open_second(r, &s), 0);
  constexpr uint64_t kLen = 256 << 10;
  auto a = r.ctx.malloc(kLen);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf w;
  ASSERT_EQ(w.store_strided(0, *a, 4, kLen / 4, 10, 1), 0);
  ASSERT_EQ(r.run(w), 0);
  rt::CmdBuf rd;
  ASSERT_EQ(rd.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, kLen / 4, 10, 1), 0);
  ASSERT_EQ(rd.store_strided(0, *a, 4, kLen / 4, 20, 2), 0);
  auto f = s.q.submit(rd);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->wait(kWaitNs), 0);
  std::vector<uint32_t> v(kLen / 4);
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, v), 0);
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], 20 + 2 * i) << i;
  EXPECT_EQ(f->reset(), 0);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
