// Teardown while faults are in flight: the program destroys its queue, context and device
// while a job is still faulting its buffer in; and the process exits (is killed) in the
// middle of it. Everything ends in bounded time, the device is left with no VRAM in use and
// a new program can use it.
#include <chrono>
#include <csignal>
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

constexpr uint64_t kLen = 8ull << 20;

// A job that faults kLen bytes in, 4 KiB at a time (one store per page).
int submit_faulting_job(Rig& r, rt::Va* buf, rt::Fence* fence) {
  auto a = r.ctx.malloc(kLen);
  if (!a) return a.error();
  *buf = *a;
  rt::CmdBuf cb;
  if (int rc = cb.store_strided(0, *a, 4096, kLen / 4096, 1, 1)) return rc;
  auto f = r.queues[0].submit(cb);
  if (!f) return f.error();
  *fence = std::move(*f);
  return 0;
}

// A second program on the same machine: the device is usable and holds no VRAM.
void expect_device_reusable(Rig& r) {
  auto p = r.machine->create_process();
  ASSERT_TRUE(p.ok());
  auto d = rt::Device::open(**p, 0);
  ASSERT_TRUE(d.ok());
  auto info = d->info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->vram_used, 0u);
  auto c = rt::Context::create(*d);
  ASSERT_TRUE(c.ok());
  auto q = rt::Queue::create(*c, 1);
  ASSERT_TRUE(q.ok());
  auto a = c->malloc(4096);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_dword(*a, 77), 0);
  auto f = q->submit(cb);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->wait(kWaitNs), 0);
  EXPECT_EQ(*c->load<uint32_t>(*a), 77u);
  EXPECT_EQ(f->reset(), 0);
  EXPECT_EQ(c->free(*a), 0);
  EXPECT_EQ(q->reset(), 0);
  EXPECT_EQ(c->reset(), 0);
  EXPECT_EQ(d->reset(), 0);
  (*p)->exit(0);
}

TEST(SysallocTeardown, DeviceCloseWhileFaultsInFlight) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  rt::Va buf = 0;
  rt::Fence f;
  ASSERT_EQ(submit_faulting_job(r, &buf, &f), 0);
  const auto t0 = std::chrono::steady_clock::now();
  r.queues.clear();  // queue destroy: the job is cancelled at its next instruction
  const int st = f.wait(kWaitNs);
  EXPECT_TRUE(st == 0 || st == -EIO) << st;  // it finished first, or it was cancelled
  EXPECT_EQ(f.reset(), 0);
  EXPECT_EQ(r.ctx.free(buf), 0);
  r.close();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  r.check_mm();
  expect_device_reusable(r);
}

TEST(SysallocTeardown, ProcessExitWhileFaultsInFlight) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  rt::Va buf = 0;
  rt::Fence f;
  ASSERT_EQ(submit_faulting_job(r, &buf, &f), 0);
  ASSERT_EQ(r.proc->kill(SIGKILL), 0);
  auto status = r.proc->wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.ok());
  EXPECT_TRUE(status->killed());
  // The program's handles outlive its process here: each ends with an error, none hangs.
  const int st = f.wait(kWaitNs);
  EXPECT_NE(st, -ETIME);
  EXPECT_EQ(f.reset(), 0);
  r.close(/*clean=*/false);
  const mm::CheckReport rep = mm::check(r.machine->mem());
  EXPECT_TRUE(rep.ok()) << rep.to_string();
  expect_device_reusable(r);
}

}  // namespace
}  // namespace gpusvm::sysalloc
