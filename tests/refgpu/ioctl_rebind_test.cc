// BO rebind for VMs without fault mode, through the ioctls: a BO bound in VRAM is evicted (by
// hand and by VRAM pressure), and the next exec revalidates it (back into VRAM, or system
// memory when VRAM stays full of the VM's own busy BOs) and binds it again before the job is
// queued; a failure injected into the revalidation rolls every rebind back and the exec
// fails with the error, queueing nothing. An LR VM (preempt-fence mode) rebinds when the
// suspended job touches the zapped binding.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "drivers/refgpu/bo.h"
#include "gpusvm/base/fault_inject.h"
#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

constexpr uint32_t kSys = 1u << 0, kVram = 1u << 1;
constexpr uint64_t kBoSize = 4 * 4096;

std::vector<std::byte> pattern_of(uint64_t len, uint8_t seed) {
  std::vector<std::byte> p(len);
  for (uint64_t i = 0; i < len; i++) p[i] = std::byte(uint8_t(i * 7 + seed + (i >> 12)));
  return p;
}

void put_qword(std::vector<std::byte>* b, uint64_t off, uint64_t v) { std::memcpy(b->data() + off, &v, 8); }

// A non-fault VM with one queue and pinned process memory for batches and copies.
struct RebindRig {
  explicit RebindRig(uint32_t vm_flags = 0) {
    vm = r.vm_create(vm_flags);
    q = r.queue_create(vm);
    mem = r.anon(16 * 4096);
    r.mirror_pin(vm, mem, 16 * 4096);
    so = r.syncobj_create();
  }
  Vm* v() { return r.file->find_vm(vm)->vm.get(); }
  // Runs `bb` (ended here) to completion through EXEC and a syncobj wait: the exec's result.
  int run(Batch bb) {
    bb.end();
    r.put_bytes(mem, bb.bytes);
    const int rc = r.exec(q, mem, {IoctlRig::syncobj_signal(so)});
    if (rc) return rc;
    int32_t err = 1;
    EXPECT_EQ(r.syncobj_wait(so, &err), 0);
    EXPECT_EQ(err, 0);
    return 0;
  }
  std::vector<std::byte> cpu_bytes(mm::Va va, uint64_t len) {
    std::vector<std::byte> got(len);
    EXPECT_EQ(mm::cpu::copy_out(r.proc->mm(), va, got.data(), len), 0);
    return got;
  }
  std::vector<std::byte> bo_bytes(Bo* bo) {
    std::vector<std::byte> got(bo->size());
    EXPECT_EQ(bo->read(0, got.data(), got.size()), 0);
    return got;
  }
  std::optional<GpuLeaf> leaf(uint64_t va) { return v()->page_table().lookup(va); }

  IoctlRig r;
  uint32_t vm = 0, q = 0, so = 0;
  mm::Va mem = 0;
};

Batch copy(uint64_t dst, uint64_t src, uint64_t len) {
  Batch bb;
  bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, src, len});
  return bb;
}

// Evicted by hand (the explicit evict hook, Bo::move_to_system) and by VRAM pressure (a
// VRAM-only BO the size of the region): each time the GPU mapping is zapped, and the next
// exec moves the BO back into VRAM and binds it there; the job reads and writes it.
// When VRAM is full of BOs the VM's job uses (busy: not evictable), the BO is bound in
// system memory instead.
TEST(RefgpuIoctlRebind, EvictedBoIsRevalidatedAndReboundBeforeExec) {
  RebindRig t;
  IoctlRig& r = t.r;
  const uint32_t h = r.gem_create(kBoSize, kVram | kSys);
  Bo* bo = r.bo(h);
  ASSERT_EQ(bo->backing(), BoBacking::kVram);
  std::vector<std::byte> want = pattern_of(kBoSize, 3);
  ASSERT_EQ(bo->write(0, want.data(), kBoSize), 0);
  const uint64_t bo_va = 1ull << 40;
  ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, bo_va, kBoSize, h), 0);
  const mm::Va data = t.mem + 4096;  // 4 pages per copy, three copies
  auto job = [&](int n) {
    Batch bb = copy(data + (n % 3) * kBoSize, bo_va, kBoSize);
    bb.store_qword(bo_va + 8 * n, 0xb0b00000ull + n);
    return bb;
  };
  ASSERT_EQ(t.run(job(1)), 0);
  EXPECT_EQ(t.cpu_bytes(data + kBoSize, kBoSize), want);
  put_qword(&want, 8, 0xb0b00001ull);
  EXPECT_EQ(t.bo_bytes(bo), want);
  ASSERT_TRUE(t.leaf(bo_va));
  EXPECT_EQ(t.leaf(bo_va)->target, Target::kVram);
  EXPECT_EQ(t.v()->stats().bo_rebinds.get(), 0u);

  // By hand: the binding is zapped, the bytes go to system memory.
  ASSERT_EQ(bo->move_to_system(), 0);
  EXPECT_EQ(bo->backing(), BoBacking::kSystem);
  EXPECT_FALSE(t.leaf(bo_va));
  ASSERT_EQ(t.run(job(2)), 0);
  EXPECT_EQ(t.cpu_bytes(data + 2 * kBoSize, kBoSize), want);
  put_qword(&want, 16, 0xb0b00002ull);
  EXPECT_EQ(t.bo_bytes(bo), want);
  EXPECT_EQ(bo->backing(), BoBacking::kVram) << "revalidation moves it back to its placement";
  ASSERT_TRUE(t.leaf(bo_va));
  EXPECT_EQ(t.leaf(bo_va)->target, Target::kVram);
  EXPECT_EQ(t.v()->stats().bo_rebinds.get(), 1u);

  // VRAM pressure: a VRAM-only BO of the whole region evicts it. That BO is bound in the VM
  // too, so the next job keeps it busy: the revalidation cannot evict it and binds ours in
  // system memory (an allowed placement).
  const uint32_t hbig = r.gem_create(8ull << 20, kVram);
  ASSERT_NE(hbig, 0u);
  EXPECT_EQ(bo->backing(), BoBacking::kSystem);
  EXPECT_FALSE(t.leaf(bo_va));
  ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, 1ull << 41, 8ull << 20, hbig), 0);
  ASSERT_EQ(t.run(job(3)), 0);
  EXPECT_EQ(t.cpu_bytes(data, kBoSize), want);
  put_qword(&want, 24, 0xb0b00003ull);
  EXPECT_EQ(t.bo_bytes(bo), want);
  EXPECT_EQ(bo->backing(), BoBacking::kSystem);
  EXPECT_EQ(r.bo(hbig)->backing(), BoBacking::kVram);
  ASSERT_TRUE(t.leaf(bo_va));
  EXPECT_EQ(t.leaf(bo_va)->target, Target::kSystem);
  EXPECT_EQ(t.v()->stats().bo_rebinds.get(), 2u);
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
}

// A queued job's BOs are busy: VRAM pressure while it waits on an in-fence cannot evict them
// (a GEM_CREATE needing their VRAM fails instead), so the job finds its bindings intact.
TEST(RefgpuIoctlRebind, QueuedJobKeepsItsBosFromEviction) {
  RebindRig t;
  IoctlRig& r = t.r;
  const uint32_t h = r.gem_create(6ull << 20, kVram | kSys);
  Bo* bo = r.bo(h);
  ASSERT_EQ(bo->backing(), BoBacking::kVram);
  const std::vector<std::byte> want = pattern_of(4096, 9);
  ASSERT_EQ(bo->write(0, want.data(), 4096), 0);
  const uint64_t bo_va = 1ull << 40;
  ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, bo_va, 6ull << 20, h), 0);
  // The in-fence: a syncobj holding a fence the test signals.
  const uint32_t gate = r.syncobj_create();
  auto gate_fence = std::make_shared<Fence>();
  r.file->syncobj_replace_fence(*r.file->find_syncobj(gate), gate_fence);
  Batch bb = copy(t.mem + 4096, bo_va, 4096);
  bb.end();
  r.put_bytes(t.mem, bb.bytes);
  ASSERT_EQ(r.exec(t.q, t.mem, {IoctlRig::syncobj_in(gate), IoctlRig::syncobj_signal(t.so)}), 0);
  EXPECT_TRUE(bo->busy());
  drm_refgpu_gem_create c{};
  c.size = 4ull << 20;
  c.placement = kVram;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), -ENOSPC);
  EXPECT_EQ(bo->backing(), BoBacking::kVram);
  gate_fence->signal(0);
  int32_t err = 1;
  ASSERT_EQ(r.syncobj_wait(t.so, &err), 0);
  EXPECT_EQ(err, 0);
  EXPECT_EQ(t.cpu_bytes(t.mem + 4096, 4096), want);
  EXPECT_FALSE(bo->busy()) << "the hold ends with the job, before its fence signals";
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), 0) << "evictable again";
  EXPECT_EQ(bo->backing(), BoBacking::kSystem);
}

// A failure during the revalidation (the copy back into VRAM: -EIO; no VRAM for a VRAM-only
// BO: -ENOSPC) fails the exec with that error: no job queued, no out-fence installed, and the
// bindings rebound before the failure are zapped again, so the VM is as before. The next
// exec, with nothing injected, rebinds both and the job sees every byte.
TEST(RefgpuIoctlRebind, FailedRebindRollsBackAndExecFails) {
  RebindRig t;
  IoctlRig& r = t.r;
  const uint32_t ha = r.gem_create(kBoSize, kVram | kSys), hb = r.gem_create(kBoSize, kVram);
  Bo* a = r.bo(ha);
  Bo* b = r.bo(hb);
  const std::vector<std::byte> wa = pattern_of(kBoSize, 1), wb = pattern_of(kBoSize, 2);
  ASSERT_EQ(a->write(0, wa.data(), kBoSize), 0);
  ASSERT_EQ(b->write(0, wb.data(), kBoSize), 0);
  const uint64_t va_a = 1ull << 40, va_b = (1ull << 40) + (1ull << 30);  // a is rebound first
  ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, va_a, kBoSize, ha), 0);
  ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, va_b, kBoSize, hb), 0);
  ASSERT_EQ(a->move_to_system(), 0);
  ASSERT_EQ(b->move_to_system(), 0);
  Batch bb = copy(t.mem + 4096, va_a, kBoSize);
  bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, t.mem + 4096 + kBoSize, va_b, kBoSize});
  bb.end();
  r.put_bytes(t.mem, bb.bytes);

  struct Case {
    const char* point;
    fault_inject::Spec spec;
    int err;
  };
  // copy: a's move back succeeds (hit 1), b's fails (hit 2). buddy: every allocation fails,
  // a (already back in VRAM by then) only rebinds, b may live in VRAM only.
  for (const Case& c : {Case{"refgpu.copy", {.nth = 2, .times = 1}, -EIO},
                        Case{"refgpu.buddy_alloc", {.nth = 1, .times = 0}, -ENOSPC}}) {
    SCOPED_TRACE(c.point);
    const uint64_t jobs = r.stat(REFGPU_STAT_JOBS);
    const uint64_t errors = t.v()->stats().bo_rebind_errors.get();
    ASSERT_EQ(fault_inject::arm(c.point, c.spec), 0);
    EXPECT_EQ(r.exec(t.q, t.mem, {IoctlRig::syncobj_signal(t.so)}), c.err);
    EXPECT_GT(fault_inject::failures(c.point), 0u);
    fault_inject::disarm_all();
    EXPECT_EQ(r.stat(REFGPU_STAT_JOBS), jobs);
    EXPECT_EQ(r.fence_of(t.so), nullptr) << "no out-fence for a failed exec";
    EXPECT_EQ(t.v()->stats().bo_rebind_errors.get(), errors + 1);
    EXPECT_FALSE(t.leaf(va_a)) << "a's rebind rolled back";
    EXPECT_FALSE(t.leaf(va_b));
    EXPECT_EQ(b->backing(), BoBacking::kSystem);
    EXPECT_EQ(t.bo_bytes(a), wa);
    EXPECT_EQ(t.bo_bytes(b), wb);
  }
  EXPECT_EQ(a->backing(), BoBacking::kVram);
  ASSERT_EQ(r.exec(t.q, t.mem, {IoctlRig::syncobj_signal(t.so)}), 0);
  int32_t err = 1;
  ASSERT_EQ(r.syncobj_wait(t.so, &err), 0);
  EXPECT_EQ(err, 0);
  EXPECT_EQ(t.cpu_bytes(t.mem + 4096, kBoSize), wa);
  EXPECT_EQ(t.cpu_bytes(t.mem + 4096 + kBoSize, kBoSize), wb);
  EXPECT_EQ(b->backing(), BoBacking::kVram);
  ASSERT_TRUE(t.leaf(va_a));
  ASSERT_TRUE(t.leaf(va_b));
  EXPECT_EQ(t.leaf(va_b)->target, Target::kVram);
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
}

// LR VM without fault mode (preempt-fence mode): the BO is evicted while a job that will
// read it is running (spinning on a flag). When the job touches the zapped binding it is
// suspended on the fault, the binding is revalidated and bound again, and the job resumes
// and reads every byte. A non-LR VM's job fails that fault (-EFAULT): its BOs are busy for
// the LRU, but an explicit move still zaps them.
TEST(RefgpuIoctlRebind, LrJobResumesAfterRebindOnFault) {
  for (const uint32_t flags : {uint32_t{REFGPU_VM_CREATE_FLAG_LR_MODE}, 0u}) {
    SCOPED_TRACE(flags);
    RebindRig t(flags);
    IoctlRig& r = t.r;
    const uint32_t h = r.gem_create(kBoSize, kVram | kSys);
    Bo* bo = r.bo(h);
    const std::vector<std::byte> want = pattern_of(kBoSize, 5);
    ASSERT_EQ(bo->write(0, want.data(), kBoSize), 0);
    const uint64_t bo_va = 1ull << 40;
    ASSERT_EQ(r.bind(t.vm, REFGPU_VM_BIND_OP_MAP, bo_va, kBoSize, h), 0);
    const mm::Va flag = t.mem + 15 * 4096, done = flag + 8;
    Batch bb;
    bb.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                   REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT, flag, 1, ~0ull, 0});
    bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, t.mem + 4096, bo_va, kBoSize});
    bb.end();
    r.put_bytes(t.mem, bb.bytes);
    ASSERT_EQ(r.exec(t.q, t.mem, {IoctlRig::ufence_signal(done, 1)}), 0);
    // The job is spinning (or about to): evict the BO under it.
    ASSERT_EQ(bo->move_to_system(), 0);
    EXPECT_FALSE(t.leaf(bo_va));
    ASSERT_TRUE(mm::cpu::atomic_exchange(r.proc->mm(), flag, 1).ok());
    ASSERT_EQ(r.wait_ufence(done, 1), 0);
    if (flags) {
      EXPECT_EQ(t.cpu_bytes(t.mem + 4096, kBoSize), want);
      EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
      EXPECT_EQ(t.v()->stats().bo_rebinds.get(), 1u);
      ASSERT_TRUE(t.leaf(bo_va));
      EXPECT_EQ(bo->backing(), BoBacking::kVram);
    } else {
      EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 1u);
      EXPECT_EQ(t.v()->stats().bo_rebinds.get(), 0u);
      EXPECT_FALSE(t.leaf(bo_va));
    }
  }
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
