// Device removal (drm_dev_unplug) with jobs in flight: every fence completes - with -ENODEV
// where the job could not finish - user fences are written, waiters wake, and every ioctl
// afterwards is -ENODEV without crashing; closing the file works on the removed device.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

TEST(RefgpuIoctlRemoval, JobsInFlightCompleteWithEnodev) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(0);
  const uint32_t q0 = r.queue_create(vm, 0), q1 = r.queue_create(vm, 1);
  const mm::Va mem = r.anon(2 * 4096);
  r.mirror_pin(vm, mem, 2 * 4096);
  const mm::Va flag = mem + 4096;
  // A job that waits for a flag nobody sets: it is running when the device goes.
  Batch spin;
  spin.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                   REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT, flag, 1, ~0ull, 0});
  spin.end();
  r.put_bytes(mem, spin.bytes);
  constexpr int kJobs = 6;
  std::vector<uint32_t> so;
  for (int i = 0; i < kJobs; i++) {
    so.push_back(r.syncobj_create());
    // Even jobs spin; odd ones fetch an unmapped batch (a fault in service or failed).
    ASSERT_EQ(r.exec(i % 2 ? q1 : q0, i % 2 ? 0x40000000 : mem,
                     {r.syncobj_signal(so.back()), r.ufence_signal(flag + 8 + 8 * i, 100 + i)}),
              0);
  }
  // A CPU thread sleeps in wait_user_fence on a value that never comes.
  std::atomic<int> wait_rc{1};
  std::thread waiter([&] { wait_rc = r.wait_ufence(flag, 77); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto t0 = std::chrono::steady_clock::now();
  r.dev->unplug();
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_EQ(wait_rc.load(), -ENODEV);
  for (int i = 0; i < kJobs; i++) {
    std::shared_ptr<Fence> f = r.file->syncobj_fence(*r.file->find_syncobj(so[i]));
    ASSERT_NE(f, nullptr);
    ASSERT_TRUE(f->signaled()) << "job " << i;
    // The spinning jobs could not finish; the others failed their fault (-EFAULT) or were
    // cancelled/faulted with -ENODEV by the removal.
    if (i % 2 == 0) EXPECT_EQ(f->status(), -ENODEV) << i;
    else EXPECT_TRUE(f->status() == -ENODEV || f->status() == -EFAULT) << i << " " << f->status();
    EXPECT_EQ(r.load64(flag + 8 + 8 * i), 100u + i) << "user fence of job " << i;
  }
  // Every request is -ENODEV now, whatever its arguments; nothing crashes.
  drm_refgpu_vm_create c{};
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), -ENODEV);
  drm_refgpu_exec_queue_destroy qd{};
  qd.exec_queue_id = q0;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &qd), -ENODEV);
  drm_refgpu_device_query dq{};
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), -ENODEV);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC, nullptr), -ENODEV);
  EXPECT_FALSE(devfs::open("refgpu0", *r.proc).ok());
  // Release on the removed device: the queues are already dead.
  r.file.reset();
  EXPECT_EQ(devfs::close(*r.proc, r.fd), 0);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
}

// Removal races ioctls from several threads: each call returns 0 or -ENODEV (or a job
// error on a fence), never crashes, and every fence completes.
TEST(RefgpuIoctlRemoval, RacesIoctlsFromThreads) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(0);
  std::atomic<bool> stop{false};
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  for (int t = 0; t < 3; t++) {
    ts.emplace_back([&, t] {
      const uint32_t q = [&] {
        drm_refgpu_engine_class_instance inst{REFGPU_ENGINE_CLASS_COMPUTE, static_cast<uint16_t>(t % 2), 0, 0};
        drm_refgpu_exec_queue_create c{};
        c.width = 1;
        c.num_placements = 1;
        c.vm_id = vm;
        c.instances = uptr(&inst);
        return r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &c) == 0 ? c.exec_queue_id : 0u;
      }();
      while (!stop.load()) {
        int rc = r.exec(q, 0x800000);
        if (rc != 0 && rc != -ENODEV && !(q == 0 && rc == -ENOENT)) bad++;
        drm_refgpu_syncobj_create s{};
        rc = r.io(DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, &s);
        if (rc != 0 && rc != -ENODEV) bad++;
        if (rc == -ENODEV) break;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  r.dev->unplug();
  stop = true;
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GE(r.stat(REFGPU_STAT_JOBS), 1u);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
