// In-fences as scheduler dependencies, through the ioctls: EXEC with an unsignalled in-syncobj
// returns at once and its job runs after the signal (data checked), a queue stays in order
// behind a blocked job while other queues go on, an in-fence with an error fails the job
// without running it (the error reaches its out-fences), and device removal completes every
// dependency-blocked job's fence with an error.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

// A job that spins until the qword at `flag` is 1.
Batch& wait_flag(Batch& bb, uint64_t flag) {
  return bb.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                        REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT, flag, 1, ~0ull, 0});
}
Batch& copy8(Batch& bb, uint64_t dst, uint64_t src) {
  return bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, src, 8});
}

struct DepsRig {
  DepsRig() {
    vm = r.vm_create(0);
    q0 = r.queue_create(vm, 0);
    q1 = r.queue_create(vm, 1);
    mem = r.anon(8 * 4096);
    r.mirror_pin(vm, mem, 8 * 4096);
    words = mem + 7 * 4096;
  }
  // Writes batch i (ended here) at page i of mem and returns its address.
  mm::Va batch(int i, Batch bb) {
    bb.end();
    r.put_bytes(mem + i * 4096, bb.bytes);
    return mem + i * 4096;
  }
  mm::Va word(int i) const { return words + 8 * i; }
  void set_flag(int i) { ASSERT_TRUE(mm::cpu::atomic_exchange(r.proc->mm(), word(i), 1).ok()); }

  IoctlRig r;
  uint32_t vm = 0, q0 = 0, q1 = 0;
  mm::Va mem = 0, words = 0;
};

// Job A (q0) spins on flag w0, then writes w1 = 1. Job B (q1) depends on A's fence and copies
// w1 to w2; job C (q1, no in-fence) copies w2 to w3, so it must run after B (one queue is in
// order). Job D (q0 is busy with A, so a third queue on engine 1) has no dependency and runs
// while B and C wait:
//
//   test:  exec A ---- exec B (returns, B blocked) -- exec C -- exec D ... D done -- set w0
//   q0:    [A spins ...........................................................] w1=1, signal
//   q1:               [B waits on A's fence] [C waits behind B] ........................ B, C run
//   q2:                                                  [D runs]
TEST(RefgpuIoctlDeps, ExecReturnsAtOnceAndTheJobRunsAfterItsInFence) {
  DepsRig t;
  IoctlRig& r = t.r;
  const uint32_t q2 = r.queue_create(t.vm, 1);
  const uint32_t so_a = r.syncobj_create(), so_b = r.syncobj_create(), so_c = r.syncobj_create(),
                 so_d = r.syncobj_create();
  Batch a;
  wait_flag(a, t.word(0)).store_qword(t.word(1), 1);
  Batch b, c, d;
  copy8(b, t.word(2), t.word(1));
  copy8(c, t.word(3), t.word(2));
  d.store_qword(t.word(4), 0xd);
  ASSERT_EQ(r.exec(t.q0, t.batch(0, a), {IoctlRig::syncobj_signal(so_a)}), 0);
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_EQ(r.exec(t.q1, t.batch(1, b), {IoctlRig::syncobj_in(so_a), IoctlRig::syncobj_signal(so_b)}), 0);
  ASSERT_EQ(r.exec(t.q1, t.batch(2, c), {IoctlRig::syncobj_signal(so_c)}), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1)) << "the ioctls did not wait";
  ASSERT_EQ(r.exec(q2, t.batch(3, d), {IoctlRig::syncobj_signal(so_d)}), 0);
  int32_t err = 1;
  ASSERT_EQ(r.syncobj_wait(so_d, &err), 0);  // another queue on the same engine goes on
  EXPECT_EQ(err, 0);
  EXPECT_EQ(r.load64(t.word(4)), 0xdu);
  // B and C are still queued: nothing of theirs ran.
  ASSERT_NE(r.fence_of(so_b), nullptr);
  EXPECT_FALSE(r.fence_of(so_b)->signaled());
  EXPECT_FALSE(r.fence_of(so_c)->signaled());
  EXPECT_EQ(r.file->find_exec_queue(t.q1)->q->queued(), 2u);
  EXPECT_EQ(r.load64(t.word(2)), 0u);
  EXPECT_EQ(r.load64(t.word(3)), 0u);
  t.set_flag(0);
  for (uint32_t so : {so_a, so_b, so_c}) {
    ASSERT_EQ(r.syncobj_wait(so, &err), 0);
    EXPECT_EQ(err, 0);
  }
  EXPECT_EQ(r.load64(t.word(1)), 1u);
  EXPECT_EQ(r.load64(t.word(2)), 1u) << "B ran after A";
  EXPECT_EQ(r.load64(t.word(3)), 1u) << "C ran after B";
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
}

// A's job fails (a store to an address nothing maps, after it waited for w0). B depends on
// it: B does not run (its store never lands), its fence and its syncobj carry A's error, its
// user fence is written (as for any job end), and C behind it on the same queue runs. An
// in-fence that had already failed at submit does the same.
TEST(RefgpuIoctlDeps, InFenceErrorFailsTheJobWithoutRunningIt) {
  DepsRig t;
  IoctlRig& r = t.r;
  const uint32_t so_a = r.syncobj_create(), so_b = r.syncobj_create(), so_c = r.syncobj_create();
  Batch a;
  wait_flag(a, t.word(0)).store_qword(0x40000000, 1);
  Batch b, c;
  b.store_qword(t.word(1), 0xbad);
  c.store_qword(t.word(2), 0xc);
  ASSERT_EQ(r.exec(t.q0, t.batch(0, a), {IoctlRig::syncobj_signal(so_a)}), 0);
  ASSERT_EQ(r.exec(t.q1, t.batch(1, b),
                   {IoctlRig::syncobj_in(so_a), IoctlRig::syncobj_signal(so_b), IoctlRig::ufence_signal(t.word(5), 7)}),
            0);
  ASSERT_EQ(r.exec(t.q1, t.batch(2, c), {IoctlRig::syncobj_signal(so_c)}), 0);
  EXPECT_FALSE(r.fence_of(so_b)->signaled());
  t.set_flag(0);
  int32_t err = 0;
  ASSERT_EQ(r.syncobj_wait(so_b, &err), 0);
  EXPECT_EQ(err, -EFAULT);
  EXPECT_EQ(r.fence_of(so_a)->status(), -EFAULT);
  EXPECT_EQ(r.fence_of(so_b)->status(), -EFAULT);
  ASSERT_EQ(r.syncobj_wait(so_c, &err), 0);
  EXPECT_EQ(err, 0);
  EXPECT_EQ(r.load64(t.word(1)), 0u) << "B must not have run";
  EXPECT_EQ(r.load64(t.word(2)), 0xcu);
  EXPECT_EQ(r.wait_ufence(t.word(5), 7), 0) << "B's user fence is written at its end";
  EXPECT_EQ(r.dev->engine(1)->stats().dep_errors.get(), 1u);
  // The failed fence is already signaled at the next submit: the same answer.
  const uint32_t so_d = r.syncobj_create();
  ASSERT_EQ(r.exec(t.q1, t.batch(1, b), {IoctlRig::syncobj_in(so_a), IoctlRig::syncobj_signal(so_d)}), 0);
  ASSERT_EQ(r.syncobj_wait(so_d, &err), 0);
  EXPECT_EQ(err, -EFAULT);
  EXPECT_EQ(r.load64(t.word(1)), 0u);
  EXPECT_EQ(r.dev->engine(1)->stats().dep_errors.get(), 2u);
}

// Device removal with jobs blocked on dependencies: A spins on a flag nobody sets; B (q1)
// depends on A, C is behind B, D (q0) behind A, E depends on a syncobj fence nobody ever
// signals. unplug() returns within its bound and every fence completes with -ENODEV; the
// user fences are written.
TEST(RefgpuIoctlDeps, RemovalCompletesDependencyBlockedJobs) {
  DepsRig t;
  IoctlRig& r = t.r;
  const uint32_t never = r.syncobj_create();
  r.file->syncobj_replace_fence(*r.file->find_syncobj(never), std::make_shared<Fence>());
  Batch a;
  wait_flag(a, t.word(0));
  Batch b;
  b.store_qword(t.word(1), 1);
  const mm::Va ba = t.batch(0, a), bb = t.batch(1, b);
  std::vector<uint32_t> so;
  for (int i = 0; i < 5; i++) so.push_back(r.syncobj_create());
  auto out = [&](int i) {
    return std::vector<drm_refgpu_sync>{IoctlRig::syncobj_signal(so[i]), IoctlRig::ufence_signal(t.word(8 + i), 100 + i)};
  };
  ASSERT_EQ(r.exec(t.q0, ba, out(0)), 0);  // A
  auto with_in = [&](std::vector<drm_refgpu_sync> s, uint32_t in) {
    s.push_back(IoctlRig::syncobj_in(in));
    return s;
  };
  ASSERT_EQ(r.exec(t.q1, bb, with_in(out(1), so[0])), 0);  // B: after A
  ASSERT_EQ(r.exec(t.q1, bb, out(2)), 0);                  // C: behind B
  ASSERT_EQ(r.exec(t.q0, bb, out(3)), 0);                  // D: behind A
  const uint32_t q2 = r.queue_create(t.vm, 1);
  ASSERT_EQ(r.exec(q2, bb, with_in(out(4), never)), 0);     // E: a fence nobody signals
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto t0 = std::chrono::steady_clock::now();
  r.dev->unplug();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  for (int i = 0; i < 5; i++) {
    std::shared_ptr<Fence> f = r.fence_of(so[i]);
    ASSERT_NE(f, nullptr);
    ASSERT_TRUE(f->signaled()) << "job " << i;
    EXPECT_EQ(f->status(), -ENODEV) << "job " << i;
    EXPECT_EQ(r.load64(t.word(8 + i)), 100u + i) << "user fence of job " << i;
  }
  EXPECT_EQ(r.load64(t.word(1)), 0u) << "no blocked job ran";
  EXPECT_FALSE(r.fence_of(never)->signaled());
  r.file.reset();
  EXPECT_EQ(devfs::close(*r.proc, r.fd), 0);
}

// VM_BIND with a pending in-fence returns at once; the MAP is applied (and its out-syncobj
// signals) only after the fence, and a bind with no in-fence behind it waits its turn (binds
// of a VM stay in order). An in-fence with an error applies nothing: the out-fence carries
// the error. VM_DESTROY cancels a bind still waiting (-ECANCELED).
TEST(RefgpuIoctlDeps, VmBindWithPendingInFenceIsDeferred) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(0);
  const uint32_t h = r.gem_create(4096, 1u << 0);
  Vm* v = r.file->find_vm(vm)->vm.get();
  const uint32_t gate = r.syncobj_create(), so1 = r.syncobj_create(), so2 = r.syncobj_create();
  auto gate_fence = std::make_shared<Fence>();
  r.file->syncobj_replace_fence(*r.file->find_syncobj(gate), gate_fence);
  const uint64_t va1 = 1ull << 40, va2 = va1 + (1ull << 30);
  ASSERT_EQ(r.bind(vm, REFGPU_VM_BIND_OP_MAP, va1, 4096, h, 0,
                   {IoctlRig::syncobj_in(gate), IoctlRig::syncobj_signal(so1)}),
            0);
  ASSERT_EQ(r.bind(vm, REFGPU_VM_BIND_OP_MAP, va2, 4096, h, 0, {IoctlRig::syncobj_signal(so2)}), 0);
  EXPECT_EQ(v->vmas(0, ~0ull).size(), 0u) << "nothing applied before the in-fence";
  EXPECT_FALSE(r.fence_of(so1)->signaled());
  EXPECT_FALSE(r.fence_of(so2)->signaled()) << "the second bind waits behind the first";
  gate_fence->signal(0);
  int32_t err = 1;
  ASSERT_EQ(r.syncobj_wait(so2, &err), 0);
  EXPECT_EQ(err, 0);
  EXPECT_EQ(r.fence_of(so1)->status(), 0);
  ASSERT_EQ(v->vmas(0, ~0ull).size(), 2u);
  EXPECT_TRUE(v->page_table().lookup(va1));
  EXPECT_TRUE(v->page_table().lookup(va2));

  // A failed in-fence: nothing applied, the error on the out-fence.
  const uint32_t bad = r.syncobj_create(), so3 = r.syncobj_create();
  auto bad_fence = std::make_shared<Fence>();
  r.file->syncobj_replace_fence(*r.file->find_syncobj(bad), bad_fence);
  const uint64_t va3 = va2 + (1ull << 30);
  ASSERT_EQ(r.bind(vm, REFGPU_VM_BIND_OP_MAP, va3, 4096, h, 0, {IoctlRig::syncobj_in(bad), IoctlRig::syncobj_signal(so3)}),
            0);
  bad_fence->signal(-EIO);
  ASSERT_EQ(r.syncobj_wait(so3, &err), 0);
  EXPECT_EQ(err, -EIO);
  EXPECT_EQ(v->vmas(0, ~0ull).size(), 2u);
  EXPECT_FALSE(v->page_table().lookup(va3));

  // VM_DESTROY with a bind still waiting: cancelled.
  const uint32_t vm2 = r.vm_create(0), gate2 = r.syncobj_create(), so4 = r.syncobj_create();
  auto gate2_fence = std::make_shared<Fence>();
  r.file->syncobj_replace_fence(*r.file->find_syncobj(gate2), gate2_fence);
  ASSERT_EQ(r.bind(vm2, REFGPU_VM_BIND_OP_MAP, va1, 4096, h, 0, {IoctlRig::syncobj_in(gate2), IoctlRig::syncobj_signal(so4)}),
            0);
  drm_refgpu_vm_destroy d{};
  d.vm_id = vm2;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), 0);
  ASSERT_TRUE(r.fence_of(so4)->signaled());
  EXPECT_EQ(r.fence_of(so4)->status(), -ECANCELED);
  gate2_fence->signal(0);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
