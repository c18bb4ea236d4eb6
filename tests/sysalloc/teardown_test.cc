// Teardown while a fault is in flight, pinned: the fault service is stopped at the named
// point refgpu.fault.got_pages (get_pages done, GPU PTEs not written yet, the VM lock held)
// while the program tears its device down, or the process exits; then the fault is let go.
// Every fence completes (with an error: the job cannot finish), the teardown returns in
// bounded time, nothing is left behind (no VRAM in use, mm::check clean) and a new program
// can use the device.
#include <chrono>
#include <csignal>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

constexpr uint64_t kLen = 8ull << 20;
constexpr uint64_t kPages = kLen / 4096;
constexpr auto kBlockedFor = std::chrono::milliseconds(100);
constexpr auto kTeardownBound = std::chrono::seconds(20);

// A job that faults the runtime's batch and fence memory in, so that the next job's first
// fault is (normally) its data's. Run before the point is armed.
int warm_up(Rig& r) {
  auto w = r.ctx.malloc(64);
  if (!w) return w.error();
  rt::CmdBuf warm;
  if (int rc = warm.store_dword(*w, 5)) return rc;
  if (int rc = r.run(warm)) return rc;
  return r.ctx.free(*w);
}

// A job on queue 0 that faults kLen bytes in, 4 KiB at a time (dword 1 + p at page p).
int submit_faulting_job(Rig& r, rt::Va* buf, rt::Fence* fence) {
  auto a = r.ctx.malloc(kLen);
  if (!a) return a.error();
  *buf = *a;
  rt::CmdBuf cb;
  if (int rc = cb.store_strided(0, *a, 4096, kPages, 1, 1)) return rc;
  auto f = r.queues[0].submit(cb);
  if (!f) return f.error();
  *fence = std::move(*f);
  return 0;
}

// The job was stopped after the held fault: the pages before the first unwritten one hold
// their values, every other byte is zero. Returns how many pages were written.
uint64_t check_written_prefix(Rig& r, rt::Va buf) {
  std::vector<uint32_t> v(kLen / 4);
  EXPECT_EQ(r.ctx.read<uint32_t>(buf, v), 0);
  uint64_t written = 0;
  while (written < kPages && v[written * 1024] == 1 + written) ++written;
  for (uint64_t i = 0; i < v.size(); ++i) {
    const bool mine = i % 1024 == 0 && i / 1024 < written;
    if (!mine) EXPECT_EQ(v[i], 0u) << "dword " << i << " (written prefix " << written << " pages)";
    if (!mine && v[i] != 0) break;
  }
  return written;
}

// A second program on the same machine: the device is usable and holds no VRAM. Its
// statistics (device-wide) show that both jobs of the first program ended, the held one with
// an error (every fence completed, none is left running).
void expect_device_reusable(Rig& r) {
  auto p = r.machine->create_process();
  ASSERT_TRUE(p.ok());
  auto d = rt::Device::open(**p, 0);
  ASSERT_TRUE(d.ok());
  auto info = d->info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->vram_used, 0u);
  auto stats = d->stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ((*stats)[REFGPU_STAT_JOBS], 2u);  // the warm-up and the held job
  EXPECT_EQ((*stats)[REFGPU_STAT_JOB_ERRORS], 1u);
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

// The program destroys its queues while the job's fault is held mid-service:
//
//   engine 0            fault handler                     closer thread        test
//   store page 0: miss
//   raise, wait ------> pop, get_pages
//                       [refgpu.fault.got_pages] stop ----------------------> wait_reached
//                                                          queue destroy:
//                                                          kill the queue,
//                                                          wait for the job    (blocked 100 ms)
//                       <------------------------------------------------------ release
//                       commit PTEs, complete(0)
//   replay, abort seen
//   fence: -ECANCELED ------------------------------------> destroy returns
//                                                                              fence -EIO, no fault
//                                                                              context, device closed
TEST(SysallocTeardown, DeviceCloseWhileFaultsInFlight) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  ASSERT_EQ(warm_up(r), 0);
  sched_point::Pause pause("refgpu.fault.got_pages", {.thread = "refgpu-fault"});
  ASSERT_EQ(pause.status(), 0);
  rt::Va buf = 0;
  rt::Fence f;
  ASSERT_EQ(submit_faulting_job(r, &buf, &f), 0);
  ASSERT_TRUE(pause.wait_reached());
  Async closer([&] { r.queues.clear(); });
  // The queue destroy cannot return while its running job waits for the held fault.
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(closer.done());
  EXPECT_EQ(f.status(), 1);  // still pending
  pause.release();
  ASSERT_TRUE(closer.wait(kTeardownBound)) << "queue destroy hangs after the fault was released";
  EXPECT_EQ(f.wait(kWaitNs), -EIO);  // cancelled: a job error without a fault
  auto err = f.error();
  ASSERT_TRUE(err.ok());
  EXPECT_EQ(err->has_fault, 0u);
  // The page whose fault was held (the warm-up made it the job's first fault), nothing more.
  EXPECT_EQ(check_written_prefix(r, buf), 1u);
  EXPECT_EQ(f.reset(), 0);
  EXPECT_EQ(r.ctx.free(buf), 0);
  r.close();
  r.check_mm();
  expect_device_reusable(r);
}

// The process is killed while the job's fault is held mid-service. do_exit tears the address
// space down first (the range's pages are invalidated: the held commit will find them
// stale), then closes the device file, whose release destroys the queue and waits for the job:
//
//   fault handler                       killer thread (do_exit)           test
//   [refgpu.fault.got_pages] stop ---------------------------------------> wait_reached
//                                       mm exit: RELEASE, unmap all
//                                       file release: queue destroy,
//                                       wait for the job                   (blocked 100 ms)
//   <--------------------------------------------------------------------- release
//   commit: pages stale, service again:
//   no VMA -> the fault fails; job fails
//                                       queue and VM destroyed, returns
//                                                                          wait: killed; fence ends
//                                                                          with an error; mm::check
TEST(SysallocTeardown, ProcessExitWhileFaultsInFlight) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  ASSERT_EQ(warm_up(r), 0);
  sched_point::Pause pause("refgpu.fault.got_pages", {.thread = "refgpu-fault"});
  ASSERT_EQ(pause.status(), 0);
  rt::Va buf = 0;
  rt::Fence f;
  ASSERT_EQ(submit_faulting_job(r, &buf, &f), 0);
  ASSERT_TRUE(pause.wait_reached());
  Async killer([&] { EXPECT_EQ(r.proc->kill(SIGKILL), 0); });
  std::this_thread::sleep_for(kBlockedFor);
  EXPECT_FALSE(killer.done());  // the file's release waits for the job, the job for the fault
  pause.release();
  ASSERT_TRUE(killer.wait(kTeardownBound)) << "process exit hangs after the fault was released";
  auto status = r.proc->wait(std::chrono::seconds(30));
  ASSERT_TRUE(status.ok());
  EXPECT_TRUE(status->killed());
  // The program's handles outlive its process here: the fence's slots went with the address
  // space, so its wait ends at once with -EFAULT (no hang); the device's statistics below
  // show how the job ended.
  EXPECT_EQ(f.wait(kWaitNs), -EFAULT);
  EXPECT_EQ(f.reset(), 0);
  r.close(/*clean=*/false);
  const mm::CheckReport rep = mm::check(r.machine->mem());
  EXPECT_TRUE(rep.ok()) << rep.to_string();
  expect_device_reusable(r);
}

}  // namespace
}  // namespace gpusvm::sysalloc
