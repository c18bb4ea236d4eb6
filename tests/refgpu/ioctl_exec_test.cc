// ioctl contracts of exec queues, exec and its syncs, wait_user_fence and the fault query, and
// end-to-end runs through the ioctls: a batch in process memory that writes data and user
// fences, waited on from the CPU; a batch nothing maps, which fails its job cleanly.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

drm_refgpu_engine_class_instance compute0() { return {REFGPU_ENGINE_CLASS_COMPUTE, 0, 0, 0}; }

TEST(RefgpuIoctlExecQueue, CreateValidatesEveryField) {
  IoctlRig r;
  const uint32_t vm = r.vm_create();
  drm_refgpu_engine_class_instance inst = compute0();
  drm_refgpu_exec_queue_create c{};
  c.width = 1;
  c.num_placements = 1;
  c.vm_id = vm;
  c.instances = uptr(&inst);
  auto expect = [&](drm_refgpu_exec_queue_create bad, int err) {
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &bad), err);
    EXPECT_EQ(bad.exec_queue_id, 0u);
    EXPECT_EQ(r.file->num_exec_queues(), 0u);
  };
  drm_refgpu_exec_queue_create b = c;
  b.extensions = 1;
  expect(b, -EINVAL);
  b = c;
  b.width = 2;
  expect(b, -EINVAL);
  b = c;
  b.num_placements = 0;
  expect(b, -EINVAL);
  b = c;
  b.flags = 1;
  expect(b, -EINVAL);
  b = c;
  b.reserved[1] = 1;
  expect(b, -EINVAL);
  b = c;
  b.vm_id = vm + 1;
  expect(b, -ENOENT);
  b = c;
  b.instances = 0;
  expect(b, -EFAULT);
  inst.engine_class = REFGPU_ENGINE_CLASS_COPY;  // the device reports no copy engine class
  expect(c, -EINVAL);
  inst = compute0();
  inst.engine_instance = 2;  // two engines
  expect(c, -EINVAL);
  inst = compute0();
  inst.gt_id = 1;
  expect(c, -EINVAL);
  inst = compute0();
  inst.pad = 1;
  expect(c, -EINVAL);
  inst = compute0();
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &c), 0);
  EXPECT_EQ(c.exec_queue_id, 1u);
  EXPECT_EQ(r.file->num_exec_queues(), 1u);
}

TEST(RefgpuIoctlExecQueue, DestroyValidates) {
  IoctlRig r;
  const uint32_t q = r.queue_create(r.vm_create());
  drm_refgpu_exec_queue_destroy d{};
  d.exec_queue_id = q;
  d.pad = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d), -EINVAL);
  d.pad = 0;
  d.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d), -EINVAL);
  d.reserved[0] = 0;
  d.exec_queue_id = q + 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d), -ENOENT);
  EXPECT_EQ(r.file->num_exec_queues(), 1u);
  d.exec_queue_id = q;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d), 0);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d), -ENOENT);
  EXPECT_EQ(r.queue_create(r.vm_create()), q + 1) << "ids are never reused";
}

// Every misuse of exec and of its syncs: the errno, and no job submitted, no syncobj given a
// fence, no user fence written.
TEST(RefgpuIoctlExec, MisuseSubmitsNothing) {
  IoctlRig r;
  const uint32_t lr_vm = r.vm_create();
  const uint32_t vm = r.vm_create(0);
  const uint32_t q = r.queue_create(vm);
  const uint32_t lr_q = r.queue_create(lr_vm);
  const uint32_t so = r.syncobj_create();
  const mm::Va fence = r.anon(4096);
  drm_refgpu_sync good[2] = {};
  good[0].type = REFGPU_SYNC_TYPE_SYNCOBJ;
  good[0].flags = REFGPU_SYNC_FLAG_SIGNAL;
  good[0].handle = so;
  good[1].type = REFGPU_SYNC_TYPE_USER_FENCE;
  good[1].flags = REFGPU_SYNC_FLAG_SIGNAL;
  good[1].addr = fence;
  good[1].timeline_value = 5;
  drm_refgpu_exec e{};
  e.exec_queue_id = q;
  e.num_syncs = 2;
  e.address = 0x100000;
  e.num_batch_buffer = 1;
  drm_refgpu_sync s[2];
  e.syncs = uptr(s);
  auto expect = [&](const drm_refgpu_exec& bad, int err) {
    drm_refgpu_exec copy = bad;
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC, &copy), err);
    EXPECT_EQ(r.stat(REFGPU_STAT_JOBS), 0u);
    EXPECT_EQ(r.dev->engine(0)->stats().jobs.get(), 0u);
    EXPECT_EQ(r.file->syncobj_fence(*r.file->find_syncobj(so)), nullptr);
    EXPECT_EQ(r.load64(fence), 0u);
    std::memcpy(s, good, sizeof(s));
  };
  std::memcpy(s, good, sizeof(s));
  drm_refgpu_exec b = e;
  b.extensions = 1;
  expect(b, -EINVAL);
  b = e;
  b.pad[2] = 1;
  expect(b, -EINVAL);
  b = e;
  b.reserved[0] = 1;
  expect(b, -EINVAL);
  b = e;
  b.num_batch_buffer = 2;
  expect(b, -EINVAL);
  b = e;
  b.address = 0x100004;  // not 8-byte aligned
  expect(b, -EINVAL);
  b = e;
  b.address = 1ull << 48;  // beyond the VA
  expect(b, -EINVAL);
  b = e;
  b.num_syncs = 65;
  expect(b, -EINVAL);
  b = e;
  b.exec_queue_id = 99;
  expect(b, -ENOENT);
  b = e;
  b.syncs = 0;
  expect(b, -EFAULT);
  // The syncs, one field at a time.
  s[1].extensions = 1;
  expect(e, -EINVAL);
  s[0].reserved[1] = 1;
  expect(e, -EINVAL);
  s[0].type = 2;
  expect(e, -EINVAL);
  s[0].flags = 2;
  expect(e, -EINVAL);
  s[0].handle = so + 10;
  expect(e, -ENOENT);
  s[0].addr = (1ull << 32) | so;  // the union's upper half
  expect(e, -EINVAL);
  s[0].timeline_value = 1;
  expect(e, -EINVAL);
  s[1].flags = 0;  // a user fence must signal
  expect(e, -EINVAL);
  s[1].addr = fence + 4;
  expect(e, -EINVAL);
  s[1].addr = 8;
  expect(e, -EINVAL);
  b = e;
  b.exec_queue_id = lr_q;  // an LR VM's job signals no syncobj
  expect(b, -EOPNOTSUPP);
  s[0].flags = 0;  // an in-fence with nothing in it
  expect(e, -EINVAL);
  EXPECT_EQ(r.file->num_exec_queues(), 2u);
}

// The happy path (what the system-allocator runtime does): a batch in malloc'd process
// memory stores data and a FENCE_WRITE; the exec's user-fence sync is written at the job's
// end; the CPU waits on both with wait_user_fence and reads the data back.
TEST(RefgpuIoctlExec, BatchInProcessMemoryWritesDataAndUserFences) {
  IoctlRig r;
  const uint32_t vm = r.vm_create();
  const uint32_t q = r.queue_create(vm, 1);
  const mm::Va mem = r.anon(4 * 4096);
  const mm::Va batch = mem, data = mem + 4096, fences = mem + 3 * 4096;
  r.mirror_pin(vm, mem, 4 * 4096);
  Batch bb;
  for (uint32_t i = 0; i < 64; i++) bb.store_dword(data + 4 * i, 0xc0de0000u + i);
  bb.add(refgpu_cmd_memset{REFGPU_CMD_HEADER(REFGPU_OP_MEMSET, 6), 0x5a, data + 4096, 4096});
  bb.fence(fences, 7).end();
  r.put_bytes(batch, bb.bytes);
  drm_refgpu_sync s{};
  s.type = REFGPU_SYNC_TYPE_USER_FENCE;
  s.flags = REFGPU_SYNC_FLAG_SIGNAL;
  s.addr = fences + 8;
  s.timeline_value = 0xfeed;
  drm_refgpu_exec e{};
  e.exec_queue_id = q;
  e.num_syncs = 1;
  e.syncs = uptr(&s);
  e.address = batch;
  e.num_batch_buffer = 1;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC, &e), 0);
  drm_refgpu_wait_user_fence w{};
  w.addr = fences;
  w.op = REFGPU_UFENCE_WAIT_OP_EQ;
  w.value = 7;
  w.mask = ~0ull;
  w.timeout = 10'000'000'000;
  w.exec_queue_id = q;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &w), 0);
  EXPECT_GT(w.timeout, 0);
  EXPECT_LE(w.timeout, 10'000'000'000);
  w.addr = fences + 8;
  w.value = 0xfe00;
  w.mask = 0xff00;  // masked compare
  w.timeout = 10'000'000'000;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &w), 0);
  EXPECT_EQ(r.load64(fences + 8), 0xfeedu);
  for (uint32_t i = 0; i < 64; i++) {
    auto v = mm::cpu::load<uint32_t>(r.proc->mm(), data + 4 * i);
    ASSERT_TRUE(v.ok());
    ASSERT_EQ(*v, 0xc0de0000u + i) << i;
  }
  for (uint64_t off = 256; off < 4096; off += 8) ASSERT_EQ(r.load64(data + off), 0u) << off;
  for (uint64_t off = 0; off < 4096; off += 8) ASSERT_EQ(r.load64(data + 4096 + off), 0x5a5a5a5a5a5a5a5aull) << off;
  EXPECT_EQ(r.stat(REFGPU_STAT_JOBS), 1u);
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
  drm_refgpu_fault_query fq{};
  fq.vm_id = vm;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &fq), 0);
  EXPECT_EQ(fq.num_faults, 0u);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
}

// A batch at an address nothing maps: the fetch faults, the fault unit cannot service it,
// the job fails with -EFAULT. The failure reaches the syncobj (error), the user fence (still
// written), wait_user_fence on that queue (-EIO) and the fault records.
TEST(RefgpuIoctlExec, UnmappedBatchFailsTheJobCleanly) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(0);
  const uint32_t q = r.queue_create(vm);
  const uint32_t so = r.syncobj_create();
  const mm::Va fence = r.anon(4096);
  ASSERT_EQ(r.exec(q, 0x200000, {r.syncobj_signal(so), r.ufence_signal(fence, 3)}), 0);
  drm_refgpu_syncobj_wait w{};
  w.handles = uptr(&so);
  w.count_handles = 1;
  w.timeout_nsec = std::chrono::duration_cast<std::chrono::nanoseconds>(
                       (std::chrono::steady_clock::now() + std::chrono::seconds(10)).time_since_epoch())
                       .count();
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &w), 0);
  EXPECT_EQ(w.error, -EFAULT);
  // The user fence is written at the job's end whatever its status.
  ASSERT_EQ(r.wait_ufence(fence, 3), 0);
  EXPECT_EQ(r.wait_ufence(fence, 4, q), -EIO);  // 4 never comes; the queue is banned
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 1u);
  EXPECT_EQ(r.stat(REFGPU_STAT_FAULT_ERRORS), 1u);

  drm_refgpu_fault_record rec[4] = {};
  drm_refgpu_fault_query fq{};
  fq.vm_id = vm;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &fq), 0);
  ASSERT_EQ(fq.num_faults, 1u);
  drm_refgpu_fault_query bad = fq;
  bad.flags = 2;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -EINVAL);
  bad = fq;
  bad.pad = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -EINVAL);
  bad = fq;
  bad.extensions = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -EINVAL);
  bad = fq;
  bad.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -EINVAL);
  bad = fq;
  bad.vm_id = vm + 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -ENOENT);
  bad = fq;
  bad.num_faults = 4;
  bad.flags = REFGPU_FAULT_QUERY_FLAG_CLEAR;
  bad.faults = 24;  // a bad pointer loses no record
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &bad), -EFAULT);
  fq.num_faults = 4;
  fq.faults = uptr(rec);
  fq.flags = REFGPU_FAULT_QUERY_FLAG_CLEAR;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &fq), 0);
  ASSERT_EQ(fq.num_faults, 1u);
  EXPECT_EQ(rec[0].address, 0x200000u);
  EXPECT_EQ(rec[0].vm_id, vm);
  EXPECT_EQ(rec[0].exec_queue_id, q);
  EXPECT_EQ(rec[0].access, REFGPU_ACCESS_READ);
  EXPECT_EQ(rec[0].fault_type, REFGPU_FAULT_TYPE_NOT_PRESENT);
  EXPECT_EQ(rec[0].status, -EFAULT);
  EXPECT_GT(rec[0].timestamp_ns, 0u);
  EXPECT_EQ(rec[1].address, 0u);
  fq.num_faults = 0;
  fq.faults = 0;
  fq.flags = 0;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &fq), 0);
  EXPECT_EQ(fq.num_faults, 0u) << "CLEAR kept the record";
  // The queue and the VM stay usable: a second exec runs (and fails the same way).
  EXPECT_EQ(r.exec(q, 0x200000), 0);
}

// An exec whose in-syncobj holds a pending job's fence runs only after that job ended.
TEST(RefgpuIoctlExec, InSyncobjOrdersJobs) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(0);
  const uint32_t q0 = r.queue_create(vm, 0), q1 = r.queue_create(vm, 1);
  const uint32_t so = r.syncobj_create();
  const mm::Va mem = r.anon(3 * 4096);
  r.mirror_pin(vm, mem, 3 * 4096);
  const mm::Va flag = mem + 2 * 4096;
  // Job A polls the flag until the CPU sets it, then stores 1 at flag + 8.
  Batch a;
  a.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT, flag, 1, ~0ull, 0});
  a.store_qword(flag + 8, 1).end();
  // Job B copies flag + 8 to flag + 16: it sees 1 only if it ran after A.
  Batch b;
  b.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, flag + 16, flag + 8, 8}).end();
  r.put_bytes(mem, a.bytes);
  r.put_bytes(mem + 4096, b.bytes);
  ASSERT_EQ(r.exec(q0, mem, {r.syncobj_signal(so)}), 0);
  std::thread cpu([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    // An atomic CPU store: the engine polls the word concurrently.
    EXPECT_TRUE(mm::cpu::atomic_exchange(r.proc->mm(), flag, 1).ok());
  });
  ASSERT_EQ(r.exec(q1, mem + 4096, {r.syncobj_in(so)}), 0);
  cpu.join();
  ASSERT_EQ(r.wait_ufence(flag + 16, 1, q1), 0);
  EXPECT_EQ(r.load64(flag + 8), 1u);
}

TEST(RefgpuIoctlWaitUserFence, ValidatesOpsAndTimeouts) {
  IoctlRig r;
  const mm::Va f = r.anon(4096);
  ASSERT_EQ(mm::cpu::store<uint64_t>(r.proc->mm(), f, 10), 0);
  drm_refgpu_wait_user_fence w{};
  w.addr = f;
  w.mask = ~0ull;
  w.timeout = 0;
  auto run = [&](drm_refgpu_wait_user_fence a) { return r.io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &a); };
  drm_refgpu_wait_user_fence b = w;
  b.extensions = 1;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.pad = 1;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.pad2 = 1;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.reserved[1] = 1;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.op = 6;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.flags = 2;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.addr = f + 4;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.mask = 0;
  EXPECT_EQ(run(b), -EINVAL);
  b = w;
  b.exec_queue_id = 3;
  EXPECT_EQ(run(b), -ENOENT);
  b = w;
  b.addr = 0x1000;  // nothing mapped there: the CPU read faults
  EXPECT_EQ(run(b), -EFAULT);
  const struct {
    uint16_t op;
    uint64_t value;
    bool holds;
  } cases[] = {{REFGPU_UFENCE_WAIT_OP_EQ, 10, true},  {REFGPU_UFENCE_WAIT_OP_EQ, 11, false},
               {REFGPU_UFENCE_WAIT_OP_NEQ, 11, true}, {REFGPU_UFENCE_WAIT_OP_NEQ, 10, false},
               {REFGPU_UFENCE_WAIT_OP_GT, 9, true},   {REFGPU_UFENCE_WAIT_OP_GT, 10, false},
               {REFGPU_UFENCE_WAIT_OP_GTE, 10, true}, {REFGPU_UFENCE_WAIT_OP_GTE, 11, false},
               {REFGPU_UFENCE_WAIT_OP_LT, 11, true},  {REFGPU_UFENCE_WAIT_OP_LT, 10, false},
               {REFGPU_UFENCE_WAIT_OP_LTE, 10, true}, {REFGPU_UFENCE_WAIT_OP_LTE, 9, false}};
  for (const auto& c : cases) {
    b = w;
    b.op = c.op;
    b.value = c.value;
    b.timeout = 1'000'000;  // 1 ms
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &b), c.holds ? 0 : -ETIME) << c.op << " " << c.value;
    if (!c.holds) EXPECT_EQ(b.timeout, 0) << "an expired relative timeout reads back as 0";
  }
  // The mask applies to both sides: 0x1a & 0x0f == 0x0a.
  b = w;
  b.value = 0x1a;
  b.mask = 0x0f;
  EXPECT_EQ(run(b), 0);
  // ABSTIME in the past: one check, -ETIME.
  b = w;
  b.value = 1;
  b.flags = REFGPU_UFENCE_WAIT_FLAG_ABSTIME;
  b.timeout = 1;
  EXPECT_EQ(run(b), -ETIME);
  // A CPU store satisfies a sleeping waiter (no engine wakes it).
  std::thread cpu([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    EXPECT_EQ(mm::cpu::store<uint64_t>(r.proc->mm(), f, 42), 0);
  });
  b = w;
  b.value = 42;
  b.timeout = 10'000'000'000;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &b), 0);
  cpu.join();
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
