// GEM through the ioctls: every field of GEM_CREATE / GEM_MMAP_OFFSET / GEM_CLOSE and of a
// vm_bind MAP of a BO handle misused (errno, nothing changed), and end to end with ioctls
// only: a VRAM BO and a system BO, the system BO CPU-mapped through the device fd and
// written, both bound in a fault-mode VM (the VRAM one carved out of a CPU_ADDR_MIRROR
// region), a batch copying between them and into mirrored memory, VRAM pressure evicting the
// bound BO (its bytes kept), and an UNMAP giving the VA back to the mirror.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <cstring>
#include <vector>

#include "drivers/refgpu/bo.h"
#include "gpusvm/base/fault_inject.h"
#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

constexpr uint32_t kLrFault = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE;
constexpr uint32_t kSys = 1u << 0, kVram = 1u << 1;

drm_refgpu_gem_create gem(uint64_t size, uint32_t placement) {
  drm_refgpu_gem_create c{};
  c.size = size;
  c.placement = placement;
  return c;
}

int gem_close(IoctlRig& r, uint32_t h) {
  drm_refgpu_gem_close c{};
  c.handle = h;
  return r.io(DRM_IOCTL_REFGPU_GEM_CLOSE, &c);
}

drm_refgpu_vm_bind bind_one(uint32_t vm, uint32_t op, uint32_t flags, uint64_t addr, uint64_t range,
                            uint32_t obj = 0, uint64_t obj_offset = 0) {
  drm_refgpu_vm_bind b{};
  b.vm_id = vm;
  b.num_binds = 1;
  b.bind.op = op;
  b.bind.flags = flags;
  b.bind.addr = addr;
  b.bind.range = range;
  b.bind.obj = obj;
  b.bind.obj_offset = obj_offset;
  return b;
}

size_t vmas(IoctlRig& r, uint32_t vm) { return r.file->find_vm(vm)->vm->vmas(0, ~0ull).size(); }

TEST(RefgpuIoctlGem, MisuseChangesNothing) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(kLrFault);
  auto create_fails = [&](drm_refgpu_gem_create c, int err) {
    const size_t before = r.file->num_bos();
    const uint64_t vram_used = r.dev->vram_region(0).used();
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), err);
    EXPECT_EQ(r.file->num_bos(), before);
    EXPECT_EQ(r.dev->vram_region(0).used(), vram_used);
  };
  drm_refgpu_gem_create c = gem(4096, kSys);
  c.extensions = 1;
  create_fails(c, -EINVAL);
  for (int i = 0; i < 2; i++) {
    c = gem(4096, kSys);
    c.reserved[i] = 1;
    create_fails(c, -EINVAL);
  }
  c = gem(4096, kSys);
  c.handle = 5;  // out only
  create_fails(c, -EINVAL);
  c = gem(4096, kSys);
  c.flags = 1u << 5;
  create_fails(c, -EINVAL);
  c.flags = REFGPU_GEM_CREATE_FLAG_DEFER_BACKING;
  create_fails(c, -EOPNOTSUPP);
  create_fails(gem(0, kSys), -EINVAL);
  create_fails(gem(4095, kSys), -EINVAL);
  create_fails(gem(4096 + 512, kVram), -EINVAL);
  create_fails(gem(kBoMaxSize + 4096, kSys), -EINVAL);
  create_fails(gem(~0ull & ~4095ull, kSys), -EINVAL);
  create_fails(gem(4096, 0), -EINVAL);
  create_fails(gem(4096, 1u << 2), -EINVAL);
  create_fails(gem(4096, kSys | (1u << 31)), -EINVAL);
  create_fails(gem(16ull << 20, kVram), -EINVAL);  // VRAM-only, larger than the 8 MiB region
  create_fails(gem(128ull << 20, kSys), -EINVAL);  // larger than the machine's 64 MiB of RAM

  c = gem(4096, kSys);
  c.vm_id = 77;
  create_fails(c, -ENOENT);

  // Handles from 1, never reused.
  const uint32_t h1 = r.gem_create(8192, kSys);
  const uint32_t h2 = r.gem_create(8192, kVram);
  EXPECT_EQ(h1, 1u);
  EXPECT_EQ(h2, 2u);
  EXPECT_EQ(gem_close(r, h1), 0);
  EXPECT_EQ(gem_close(r, h1), -ENOENT);  // double close
  EXPECT_EQ(r.gem_create(4096, kSys), 3u);
  EXPECT_EQ(r.file->num_bos(), 2u);
  drm_refgpu_gem_close cl{};
  cl.handle = h2;
  cl.pad = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CLOSE, &cl), -EINVAL);
  cl.pad = 0;
  cl.reserved[1] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CLOSE, &cl), -EINVAL);
  EXPECT_EQ(gem_close(r, 0), -ENOENT);
  EXPECT_EQ(gem_close(r, 99), -ENOENT);
  EXPECT_EQ(r.file->num_bos(), 2u);

  // GEM_MMAP_OFFSET.
  drm_refgpu_gem_mmap_offset mo{};
  mo.handle = h2;
  mo.extensions = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), -EINVAL);
  mo.extensions = 0;
  mo.flags = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), -EINVAL);
  mo.flags = 0;
  mo.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), -EINVAL);
  mo.reserved[0] = 0;
  mo.handle = h1;  // closed
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), -ENOENT);
  mo.handle = h2;  // VRAM-only: no CPU-visible VRAM
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), -EINVAL);
  EXPECT_EQ(mo.offset, 0u);
  EXPECT_EQ(r.file->find_bo(h2)->bo->backing(), BoBacking::kVram);
  // An mmap of the fd at an offset no BO of this file has: -EINVAL, nothing mapped.
  EXPECT_EQ(devfs::mmap(*r.proc, 0, 4096, PROT_READ, MAP_SHARED, r.fd, 1ull << 40).error(), -EINVAL);
  // A VRAM BO's real offset without GEM_MMAP_OFFSET (guessed): -EINVAL.
  EXPECT_EQ(devfs::mmap(*r.proc, 0, 4096, PROT_READ, MAP_SHARED, r.fd, r.file->find_bo(h2)->bo->mmap_offset())
                .error(),
            -EINVAL);

  // vm_bind MAP of a handle.
  const uint64_t va = 1ull << 40;
  auto bind_fails = [&](drm_refgpu_vm_bind b, int err) {
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), err);
    EXPECT_EQ(vmas(r, vm), 0u);
  };
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, 99), -ENOENT);
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, h1), -ENOENT);  // closed
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 3 * 4096, h2), -EINVAL);  // past the end
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, h2, 8192), -EINVAL);
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, h2, 100), -EINVAL);  // unaligned
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, h2, ~0ull & ~4095ull), -EINVAL);
  // A BO private to another VM.
  const uint32_t vm2 = r.vm_create(kLrFault);
  c = gem(4096, kSys);
  c.vm_id = vm2;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), 0);
  bind_fails(bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, c.handle), -EINVAL);
  drm_refgpu_vm_bind ok = bind_one(vm2, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, c.handle);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &ok), 0);
  EXPECT_EQ(vmas(r, vm2), 1u);
  // A valid bind of the second page.
  ok = bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, h2, 4096);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &ok), 0);
  EXPECT_EQ(vmas(r, vm), 1u);
  // The private BO does not keep its VM: after VM_DESTROY the VM is gone and its id is never
  // reused, so the BO cannot be bound anywhere.
  drm_refgpu_vm_destroy vd{};
  vd.vm_id = vm2;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &vd), 0);
  EXPECT_EQ(r.file->find_vm(vm2), nullptr);
  EXPECT_EQ(r.file->num_vms(), 1u);
  const uint32_t vm3 = r.vm_create(kLrFault);
  EXPECT_NE(vm3, vm2);
  drm_refgpu_vm_bind b3 = bind_one(vm3, REFGPU_VM_BIND_OP_MAP, 0, va, 4096, c.handle);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b3), -EINVAL);
  EXPECT_EQ(vmas(r, vm3), 0u);
}

// Failures injected into GEM_CREATE's VRAM allocation (the buddy) and into GEM_MMAP_OFFSET's
// move to system memory (the copy engine): a VRAM-only BO fails with nothing left behind, a BO that may live in
// system memory falls back there, and a failed move leaves the BO in VRAM with its bytes.
TEST(RefgpuIoctlGem, InjectedFailuresRollBack) {
  IoctlRig r;
  for (const char* point : {"refgpu.buddy_alloc"}) {
    SCOPED_TRACE(point);
    ASSERT_EQ(fault_inject::arm(point, {.nth = 1, .times = 0}), 0);
    drm_refgpu_gem_create c = gem(1 << 16, kVram);
    const int rc = r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c);
    EXPECT_GT(fault_inject::failures(point), 0u);
    EXPECT_LT(rc, 0);
    EXPECT_EQ(r.file->num_bos(), 0u);
    EXPECT_EQ(r.dev->vram_region(0).used(), 0u);
    c = gem(1 << 16, kVram | kSys);  // may live in system memory: falls back there
    ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), 0);
    fault_inject::disarm_all();
    EXPECT_EQ(r.file->find_bo(c.handle)->bo->backing(), BoBacking::kSystem);
    EXPECT_EQ(r.dev->vram_region(0).used(), 0u);
    ASSERT_EQ(gem_close(r, c.handle), 0);
  }
  const uint32_t h = r.gem_create(1 << 16, kVram | kSys);
  Bo* bo = r.file->find_bo(h)->bo.get();
  ASSERT_EQ(bo->backing(), BoBacking::kVram);
  std::vector<std::byte> pattern(1 << 16);
  for (size_t i = 0; i < pattern.size(); i++) pattern[i] = std::byte(uint8_t(i * 13 + 1));
  ASSERT_EQ(bo->write(0, pattern.data(), pattern.size()), 0);
  ASSERT_EQ(fault_inject::arm("refgpu.copy", {.nth = 1, .times = 0}), 0);
  drm_refgpu_gem_mmap_offset mo{};
  mo.handle = h;
  EXPECT_LT(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), 0);
  fault_inject::disarm_all();
  EXPECT_EQ(mo.offset, 0u);
  EXPECT_EQ(bo->backing(), BoBacking::kVram);
  EXPECT_FALSE(bo->cpu_mapped());
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), 0);
  EXPECT_EQ(bo->backing(), BoBacking::kSystem);
  auto cpu = devfs::mmap(*r.proc, 0, pattern.size(), PROT_READ, MAP_SHARED, r.fd, mo.offset);
  ASSERT_TRUE(cpu.ok()) << cpu.error();
  std::vector<std::byte> got(pattern.size());
  ASSERT_EQ(mm::cpu::copy_out(r.proc->mm(), *cpu, got.data(), got.size()), 0);
  EXPECT_EQ(got, pattern);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
}

TEST(RefgpuIoctlGem, EndToEndCopyEvictUnmapReturnsToMirror) {
  IoctlRig r;
  const uint64_t bo_size = 16 * 4096;
  const uint32_t hv = r.gem_create(bo_size, kVram);
  const uint32_t hs = r.gem_create(bo_size, kSys);
  Bo* vbo = r.file->find_bo(hv)->bo.get();
  ASSERT_EQ(vbo->backing(), BoBacking::kVram);
  // The system BO, CPU-mapped through the device fd and written.
  drm_refgpu_gem_mmap_offset mo{};
  mo.handle = hs;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &mo), 0);
  EXPECT_EQ(mo.offset % 4096, 0u);
  // Past the BO's end: -EINVAL.
  EXPECT_EQ(devfs::mmap(*r.proc, 0, bo_size + 4096, PROT_READ, MAP_SHARED, r.fd, mo.offset).error(), -EINVAL);
  auto cpu = devfs::mmap(*r.proc, 0, bo_size, PROT_READ | PROT_WRITE, MAP_SHARED, r.fd, mo.offset);
  ASSERT_TRUE(cpu.ok()) << cpu.error();
  std::vector<std::byte> pattern(bo_size);
  for (uint64_t i = 0; i < bo_size; i++) pattern[i] = std::byte(uint8_t(i * 7 + (i >> 12)));
  r.put_bytes(*cpu, pattern);
  {
    std::vector<std::byte> back(bo_size);
    ASSERT_EQ(r.file->find_bo(hs)->bo->read(0, back.data(), bo_size), 0);  // the BO sees the CPU's bytes
    ASSERT_EQ(back, pattern);
  }

  const uint32_t vm = r.vm_create(kLrFault);
  const uint32_t q = r.queue_create(vm);
  const mm::Va mem = r.anon(64 * 4096);     // batch, fences, data
  const mm::Va carve = r.anon(bo_size);     // the CPU VA the VRAM BO is bound over
  drm_refgpu_vm_bind b = bind_one(vm, REFGPU_VM_BIND_OP_MAP, REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR, 4096 * 16,
                                  (1ull << 47) - 4096 * 16);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  b = bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, carve, bo_size, hv);  // carved out of the mirror
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  const uint64_t sys_va = 1ull << 47;  // above the mirror
  b = bind_one(vm, REFGPU_VM_BIND_OP_MAP, 0, sys_va, bo_size, hs);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  // The handles go; the bindings keep the BOs.
  EXPECT_EQ(gem_close(r, hv), 0);
  EXPECT_EQ(gem_close(r, hs), 0);
  EXPECT_EQ(r.file->num_bos(), 0u);

  uint64_t fence_value = 0;
  // Each job's batch on a page of its own (pages 40..): the FENCE_WRITE lands before the job
  // has fetched its BATCH_END, so overwriting the previous batch in place once the fence is
  // seen would race with the engine still reading it (and fail that job now and then).
  auto run = [&](Batch& bb) {
    bb.fence(mem + 63 * 4096, ++fence_value).end();
    const mm::Va batch = mem + (40 + fence_value) * 4096;
    ASSERT_LT(fence_value, 23u);
    r.put_bytes(batch, bb.bytes);
    ASSERT_EQ(r.exec(q, batch), 0);
    ASSERT_EQ(r.wait_ufence(mem + 63 * 4096, fence_value, q), 0);
  };
  auto check_mem = [&](mm::Va va, const std::vector<std::byte>& want) {
    std::vector<std::byte> got(want.size());
    ASSERT_EQ(mm::cpu::copy_out(r.proc->mm(), va, got.data(), got.size()), 0);
    ASSERT_EQ(got, want);
  };
  const mm::Va data = mem + 4096;
  {
    // system BO -> VRAM BO, VRAM BO -> mirrored memory.
    Batch bb;
    bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, carve, sys_va, bo_size});
    bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, data, carve, bo_size});
    // and a GPU write into the system BO, which the CPU mapping must see.
    bb.store_qword(sys_va + bo_size - 8, 0x1122334455667788ull);
    run(bb);
  }
  check_mem(data, pattern);
  {
    // The CPU mapping outlives the handle and shares the BO's pages with the GPU.
    std::vector<std::byte> want = pattern;
    const uint64_t v = 0x1122334455667788ull;
    std::memcpy(want.data() + bo_size - 8, &v, 8);
    check_mem(*cpu, want);
  }
  {
    std::vector<std::byte> back(bo_size);
    ASSERT_EQ(vbo->read(0, back.data(), bo_size), 0);
    ASSERT_EQ(back, pattern);
  }
  EXPECT_EQ(vbo->backing(), BoBacking::kVram);
  // The CPU's VA under the carve-out was never touched by the GPU (the BO took the VA).
  EXPECT_EQ(r.load64(carve), 0u);

  // VRAM pressure: a VRAM-only BO the size of the whole region evicts the bound one.
  const uint64_t before = vbo->stats().evictions.get();
  const uint32_t hbig = r.gem_create(8ull << 20, kVram);
  ASSERT_NE(hbig, 0u);
  EXPECT_EQ(vbo->backing(), BoBacking::kSystem);
  EXPECT_GT(vbo->stats().evictions.get(), before);
  ASSERT_EQ(gem_close(r, hbig), 0);
  {
    // The evicted BO's bytes, through its (rebound on fault) GPU mapping.
    Batch bb;
    bb.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, data + bo_size, carve, bo_size});
    run(bb);
  }
  check_mem(data + bo_size, pattern);

  // UNMAP of the BO gives the VA back to the mirror: a job there writes process memory.
  const size_t n = vmas(r, vm);
  b = bind_one(vm, REFGPU_VM_BIND_OP_UNMAP, 0, carve, bo_size);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  EXPECT_LE(vmas(r, vm), n);
  {
    Batch bb;
    for (uint64_t p = 0; p < bo_size / 4096; p++) bb.store_qword(carve + p * 4096 + 8, 0x5a5a0000ull + p);
    run(bb);
  }
  for (uint64_t p = 0; p < bo_size / 4096; p++)
    for (uint64_t off = 0; off < 4096; off += 8)
      ASSERT_EQ(r.load64(carve + p * 4096 + off), off == 8 ? 0x5a5a0000ull + p : 0) << p << " " << off;
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
  EXPECT_EQ(r.file->find_vm(vm)->vm->check_ptes(), 0);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
