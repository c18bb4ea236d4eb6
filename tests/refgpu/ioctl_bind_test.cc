// vm_bind, madvise and the range-attribute query through the ioctls: every field's misuse
// (errno, nothing bound), and the system-allocator path end to end with ioctls only: a
// fault-mode VM with a CPU_ADDR_MIRROR bind over malloc'd-like memory, a batch stored there
// that writes data and a user fence, the CPU waiting on the fence and reading the bytes.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>

#include "tests/refgpu/ioctl_test_util.h"
#include "tests/refgpu/refgpu_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

constexpr uint32_t kLrFault = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE;

drm_refgpu_vm_bind_op mirror_op(uint64_t addr, uint64_t range) {
  drm_refgpu_vm_bind_op o{};
  o.op = REFGPU_VM_BIND_OP_MAP;
  o.flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR;
  o.addr = addr;
  o.range = range;
  return o;
}

drm_refgpu_vm_bind bind_one(uint32_t vm, const drm_refgpu_vm_bind_op& o) {
  drm_refgpu_vm_bind b{};
  b.vm_id = vm;
  b.num_binds = 1;
  b.bind = o;
  return b;
}

size_t vmas(IoctlRig& r, uint32_t vm) { return r.file->find_vm(vm)->vm->vmas(0, ~0ull).size(); }

TEST(RefgpuIoctlBind, MisuseBindsNothing) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(kLrFault);
  const uint32_t other_vm = r.vm_create(kLrFault);
  const uint32_t other_q = r.queue_create(other_vm);
  const uint64_t va = 1ull << 32;
  const drm_refgpu_vm_bind good = bind_one(vm, mirror_op(va, 1 << 20));
  auto expect = [&](drm_refgpu_vm_bind b, int err) {
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), err);
    EXPECT_EQ(vmas(r, vm), 0u);
  };
  auto op = [&](auto&& mut, int err) {
    drm_refgpu_vm_bind b = good;
    mut(b.bind);
    expect(b, err);
  };
  drm_refgpu_vm_bind b = good;
  b.extensions = 1;
  expect(b, -EINVAL);
  b = good;
  b.reserved[1] = 1;
  expect(b, -EINVAL);
  b = good;
  b.num_binds = 0;
  expect(b, -EINVAL);
  b = good;
  b.num_binds = 1025;
  expect(b, -EINVAL);
  b = good;
  b.num_syncs = 65;
  expect(b, -EINVAL);
  b = good;
  b.vm_id = 9;
  expect(b, -ENOENT);
  b = good;
  b.exec_queue_id = 9;
  expect(b, -ENOENT);
  b = good;
  b.exec_queue_id = other_q;  // a queue of another VM
  expect(b, -EINVAL);
  b = good;
  b.num_syncs = 1;
  b.syncs = 0;
  expect(b, -EFAULT);
  b = good;
  b.num_binds = 2;
  b.vector_of_binds = 0x20;
  expect(b, -EFAULT);
  op([](auto& o) { o.extensions = 1; }, -EINVAL);
  op([](auto& o) { o.pad = 1; }, -EINVAL);
  op([](auto& o) { o.pad2 = 1; }, -EINVAL);
  op([](auto& o) { o.reserved[2] = 1; }, -EINVAL);
  op([](auto& o) { o.op = 3; }, -EINVAL);
  op([](auto& o) { o.flags |= 1u << 5; }, -EINVAL);
  op([](auto& o) { o.addr += 8; }, -EINVAL);
  op([](auto& o) { o.range = 4095; }, -EINVAL);
  op([](auto& o) { o.range = 0; }, -EINVAL);
  op([](auto& o) { o.addr = (1ull << 48) - 4096; o.range = 8192; }, -EINVAL);  // past va_bits
  op([](auto& o) { o.addr = ~0ull & ~4095ull; o.range = 8192; }, -EINVAL);     // wraps
  op([](auto& o) { o.obj = 1; }, -EINVAL);          // a mirror has no BO
  op([](auto& o) { o.obj_offset = 4096; }, -EINVAL);
  op([](auto& o) { o.flags |= REFGPU_VM_BIND_FLAG_EVICT; }, -EINVAL);
  op([](auto& o) { o.flags |= REFGPU_VM_BIND_FLAG_READONLY; }, -EINVAL);
  op([](auto& o) { o.prefetch_mem_region_instance = 1; }, -EINVAL);
  op([](auto& o) { o.flags = REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET; o.obj = 1; }, -EINVAL);
  op([](auto& o) { o.flags = 0; }, -EINVAL);              // MAP of nothing
  op([](auto& o) { o.flags = 0; o.obj = 7; }, -ENOENT);   // no such BO
  op([](auto& o) { o.op = REFGPU_VM_BIND_OP_UNMAP; o.flags = REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET; }, -EINVAL);
  op([](auto& o) { o.op = REFGPU_VM_BIND_OP_PREFETCH; o.flags = REFGPU_VM_BIND_FLAG_EVICT; }, -EINVAL);
  op([](auto& o) { o.op = REFGPU_VM_BIND_OP_UNMAP; }, -EINVAL);  // UNMAP takes no CPU_ADDR_MIRROR
  // Two ops, the second bad: nothing of the first is applied.
  drm_refgpu_vm_bind_op ops[2] = {mirror_op(va, 1 << 20), mirror_op(va + (2 << 20), 1 << 20)};
  ops[1].pad = 1;
  b = good;
  b.num_binds = 2;
  b.vector_of_binds = uptr(ops);
  expect(b, -EINVAL);
  // Overlapping mirrors: Vm::bind's own check, still nothing applied.
  ops[1] = mirror_op(va + 4096, 1 << 20);
  expect(b, -EINVAL);
  // A mirror needs fault mode.
  const uint32_t plain = r.vm_create(REFGPU_VM_CREATE_FLAG_LR_MODE);
  b = bind_one(plain, mirror_op(va, 1 << 20));
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), -EINVAL);
  b = good;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  EXPECT_EQ(vmas(r, vm), 1u);
}

// The whole system-allocator path through the ioctls only.
TEST(RefgpuIoctlBind, MirrorBindExecFaultsInAndWritesProcessMemory) {
  IoctlRig r;
  drm_refgpu_query_config cfg{};
  drm_refgpu_device_query dq{};
  dq.query = REFGPU_DEVICE_QUERY_CONFIG;
  dq.size = sizeof(cfg);
  dq.data = uptr(&cfg);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  ASSERT_TRUE(cfg.flags & REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR);
  const uint32_t vm = r.vm_create(kLrFault);
  const uint32_t q = r.queue_create(vm);
  const uint64_t len = 64 * 4096;
  const mm::Va mem = r.anon(len);  // "malloc": plain anonymous memory, never touched by the GPU before
  drm_refgpu_vm_bind_op whole = mirror_op(0, 1ull << 47);  // mirror the whole CPU VA
  whole.flags |= REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET;
  whole.addr = 4096 * 16;
  whole.range = (1ull << 47) - whole.addr;
  drm_refgpu_vm_bind b = bind_one(vm, whole);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  const mm::Va batch = mem, data = mem + 4096, fences = mem + 63 * 4096;
  Batch bb;
  for (uint32_t i = 0; i < 32; i++) bb.store_qword(data + i * 4096 + 8 * i, 0xabc000ull + i);  // 32 pages fault in
  bb.add(refgpu_cmd_store_strided{REFGPU_CMD_HEADER(REFGPU_OP_STORE_STRIDED, 12), 0, data + 40 * 4096, 4, 1024,
                                  100, 1});
  bb.fence(fences, 1).end();
  r.put_bytes(batch, bb.bytes);
  ASSERT_EQ(r.exec_and_wait(q, batch, fences + 8, 2), 0);
  EXPECT_EQ(r.load64(fences), 1u);
  for (uint32_t i = 0; i < 32; i++)
    for (uint64_t off = 0; off < 4096; off += 8)
      ASSERT_EQ(r.load64(data + i * 4096 + off), off == 8 * i ? 0xabc000ull + i : 0) << i << " " << off;
  for (uint32_t i = 0; i < 1024; i++) {
    auto v = mm::cpu::load<uint32_t>(r.proc->mm(), data + 40 * 4096 + 4 * i);
    ASSERT_TRUE(v.ok());
    ASSERT_EQ(*v, 100 + i);
  }
  EXPECT_GE(r.stat(REFGPU_STAT_FAULTS_4K) + r.stat(REFGPU_STAT_FAULTS_64K) + r.stat(REFGPU_STAT_FAULTS_2M), 1u);
  EXPECT_EQ(r.stat(REFGPU_STAT_JOB_ERRORS), 0u);
  drm_refgpu_fault_query fq{};
  fq.vm_id = vm;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_FAULT_QUERY, &fq), 0);
  EXPECT_GE(fq.num_faults, 1u);
  EXPECT_EQ(r.file->find_vm(vm)->vm->check_ptes(), 0);
  EXPECT_TRUE(mm::check(r.proc->mm()).ok());
  // UNMAP of the mirror that still has ranges: -EBUSY unless EVICT.
  drm_refgpu_vm_bind_op un = whole;
  un.op = REFGPU_VM_BIND_OP_UNMAP;
  un.flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR;  // UNMAP takes EVICT only
  b = bind_one(vm, un);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), -EINVAL);
  un.flags = 0;
  b = bind_one(vm, un);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), -EBUSY);
  EXPECT_EQ(vmas(r, vm), 1u);
  un.flags = REFGPU_VM_BIND_FLAG_EVICT;
  b = bind_one(vm, un);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  EXPECT_EQ(vmas(r, vm), 0u);
}

// A file that is not a refgpu device's (what madvise must refuse with -EBADF).
class OtherFile : public devfs::File {
 public:
  int ioctl(devfs::Process&, unsigned long, void*) override { return -ENOTTY; }
};
class OtherDevice : public devfs::Device {
 public:
  Result<std::shared_ptr<devfs::File>> open(devfs::Process&) override {
    return std::shared_ptr<devfs::File>(std::make_shared<OtherFile>());
  }
};

// PREFERRED_LOC naming a device by an fd of the caller: this device's own fd is its VRAM;
// another refgpu device has no link to this one (-ENOLINK); a closed fd or another driver's
// file is -EBADF. A refused call changes no attribute.
TEST(RefgpuIoctlMadvise, PreferredLocByDeviceFd) {
  IoctlRig r;
  auto d2 = RefgpuDevice::create(&r.machine->mem(), IoctlRig::small_config());
  ASSERT_TRUE(d2.ok()) << d2.error();
  ASSERT_EQ(r.machine->add_device("refgpu1", *d2), 0);
  ASSERT_EQ(r.machine->add_device("other0", std::make_shared<OtherDevice>()), 0);
  Result<int> fd2 = devfs::open("refgpu1", *r.proc);
  ASSERT_TRUE(fd2.ok()) << fd2.error();
  Result<int> fd_other = devfs::open("other0", *r.proc);
  ASSERT_TRUE(fd_other.ok()) << fd_other.error();
  const uint32_t vm = r.vm_create(kLrFault);
  const uint64_t va = 1ull << 32;
  drm_refgpu_vm_bind b = bind_one(vm, mirror_op(va, 4 << 20));
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  drm_refgpu_madvise m{};
  m.vm_id = vm;
  m.start = va + (1 << 20);
  m.range = 1 << 20;
  m.type = REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC;
  auto advise = [&](int32_t fd) {
    drm_refgpu_madvise x = m;
    x.preferred_mem_loc.devmem_fd = fd;
    return r.io(DRM_IOCTL_REFGPU_MADVISE, &x);
  };
  auto pieces = [&] {
    drm_refgpu_vm_query_mem_range_attr q{};
    q.vm_id = vm;
    q.start = va;
    q.range = 4 << 20;
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), 0);
    return q.num_mem_ranges;
  };
  EXPECT_EQ(advise(*fd2), -ENOLINK);
  EXPECT_EQ(advise(*fd_other), -EBADF);
  EXPECT_EQ(advise(*fd_other + 100), -EBADF);  // no file there
  EXPECT_EQ(pieces(), 1u) << "a refused madvise changed the attributes";
  // The VM's own device named by its fd: its VRAM, stored as DEFAULT_DEVICE (so a first
  // advice to system memory, then this one, merges back into one piece).
  drm_refgpu_madvise sys = m;
  sys.preferred_mem_loc.devmem_fd = REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_MADVISE, &sys), 0);
  EXPECT_EQ(pieces(), 3u);
  ASSERT_EQ(advise(r.fd), 0);
  EXPECT_EQ(pieces(), 1u);
  EXPECT_EQ(devfs::close(*r.proc, *fd2), 0);
  EXPECT_EQ(advise(*fd2), -EBADF);  // closed now
  (*d2)->unplug();
}

TEST(RefgpuIoctlMadvise, FieldsAndTwoCallQuery) {
  IoctlRig r;
  const uint32_t vm = r.vm_create(kLrFault);
  const uint64_t va = 1ull << 32;
  drm_refgpu_vm_bind b = bind_one(vm, mirror_op(va, 4 << 20));
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_BIND, &b), 0);
  drm_refgpu_madvise m{};
  m.vm_id = vm;
  m.start = va + (1 << 20);
  m.range = 1 << 20;
  m.type = REFGPU_MEM_RANGE_ATTR_ATOMIC;
  m.atomic.val = REFGPU_ATOMIC_GLOBAL;
  auto bad = [&](auto&& mut, int err) {
    drm_refgpu_madvise x = m;
    mut(x);
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_MADVISE, &x), err);
  };
  bad([](auto& x) { x.extensions = 1; }, -EINVAL);
  bad([](auto& x) { x.reserved[0] = 1; }, -EINVAL);
  bad([](auto& x) { x.start += 1; }, -EINVAL);
  bad([](auto& x) { x.range = 0; }, -EINVAL);
  bad([](auto& x) { x.range = ~0ull & ~4095ull; }, -EINVAL);
  bad([](auto& x) { x.type = 2; }, -EINVAL);
  bad([](auto& x) { x.atomic.val = 4; }, -EINVAL);
  bad([](auto& x) { x.atomic.pad = 1; }, -EINVAL);
  bad([](auto& x) { x.atomic.reserved = 1; }, -EINVAL);
  bad([](auto& x) { x.vm_id = 9; }, -ENOENT);
  bad([](auto& x) { x.start = 1ull << 40; }, -EINVAL);  // not mirrored
  bad([](auto& x) {
    x.type = REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC;
    x.preferred_mem_loc = {};
    x.preferred_mem_loc.migration_policy = 2;
  }, -EINVAL);
  bad([](auto& x) {
    x.type = REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC;
    x.preferred_mem_loc = {};
    x.preferred_mem_loc.devmem_fd = 7;  // not a refgpu file the driver can resolve
  }, -EBADF);
  drm_refgpu_vm_query_mem_range_attr q{};
  q.vm_id = vm;
  q.start = va;
  q.range = 4 << 20;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), 0);
  EXPECT_EQ(q.num_mem_ranges, 1u) << "a failed madvise split the attributes";
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_MADVISE, &m), 0);
  q.num_mem_ranges = 0;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), 0);
  ASSERT_EQ(q.num_mem_ranges, 3u);
  EXPECT_EQ(q.sizeof_mem_range_attr, sizeof(drm_refgpu_mem_range_attr));
  std::vector<drm_refgpu_mem_range_attr> attrs(3);
  q.vector_of_mem_attr = uptr(attrs.data());
  q.num_mem_ranges = 2;  // too few: -ENOSPC
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), -ENOSPC);
  q.num_mem_ranges = 3;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), 0);
  EXPECT_EQ(attrs[0].start, va);
  EXPECT_EQ(attrs[0].end, va + (1 << 20));
  EXPECT_EQ(attrs[1].start, va + (1 << 20));
  EXPECT_EQ(attrs[1].atomic.val, static_cast<uint32_t>(REFGPU_ATOMIC_GLOBAL));
  EXPECT_EQ(attrs[2].end, va + (4 << 20));
  EXPECT_EQ(attrs[2].atomic.val, static_cast<uint32_t>(REFGPU_ATOMIC_UNDEFINED));
  q.vector_of_mem_attr = 0x30;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), -EFAULT);
  q.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q), -EINVAL);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
