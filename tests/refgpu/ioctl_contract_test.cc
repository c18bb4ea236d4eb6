// ioctl contracts of the dispatch, device query, VM and syncobj requests: every misuse returns
// its documented errno and changes nothing (the file's tables, the caller's struct).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <string_view>

#include "tests/refgpu/ioctl_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

// ---- dispatch ----

TEST(RefgpuIoctlDispatch, RequestEncodingMustMatchTheTable) {
  IoctlRig r;
  drm_refgpu_vm_create c{};
  c.flags = REFGPU_VM_CREATE_FLAG_LR_MODE;
  // Wrong size, wrong direction, a type that is not DRM, a core DRM nr, an nr past the table.
  EXPECT_EQ(r.io(DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_VM_CREATE, __u64[3]), &c), -EINVAL);
  EXPECT_EQ(r.io(DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_VM_CREATE, drm_refgpu_vm_create), &c), -EINVAL);
  EXPECT_EQ(r.io(_IOWR('x', DRM_COMMAND_BASE + DRM_REFGPU_VM_CREATE, drm_refgpu_vm_create), &c), -EINVAL);
  EXPECT_EQ(r.io(DRM_IOWR(DRM_REFGPU_VM_CREATE, drm_refgpu_vm_create), &c), -EINVAL);
  EXPECT_EQ(r.io(DRM_IOWR(DRM_COMMAND_BASE + 0x11, drm_refgpu_vm_create), &c), -EINVAL);
  EXPECT_EQ(c.vm_id, 0u);
  EXPECT_EQ(r.file->num_vms(), 0u);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), 0);
  EXPECT_EQ(c.vm_id, 1u);
}

TEST(RefgpuIoctlDispatch, BadArgumentPointerIsEfault) {
  IoctlRig r;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, nullptr), -EFAULT);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, reinterpret_cast<void*>(0x10)), -EFAULT);
  EXPECT_EQ(r.file->num_vms(), 0u);
}

TEST(RefgpuIoctlDispatch, WrongDirectionOfAValidRequestIsEinval) {
  IoctlRig r;
  drm_refgpu_gem_create g{};
  g.size = 4096;
  g.placement = 1;
  EXPECT_EQ(r.io(DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_GEM_CREATE, drm_refgpu_gem_create), &g), -EINVAL);
  EXPECT_EQ(g.handle, 0u);
  EXPECT_EQ(r.file->num_bos(), 0u);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_GEM_CREATE, &g), 0);  // the same struct, the table's encoding
  EXPECT_EQ(g.handle, 1u);
}

// ---- device query ----

TEST(RefgpuIoctlQuery, TwoCallProtocolForEveryQuery) {
  IoctlRig r;
  const struct {
    uint32_t query;
    uint32_t size;
  } qs[] = {{REFGPU_DEVICE_QUERY_CONFIG, sizeof(drm_refgpu_query_config)},
            {REFGPU_DEVICE_QUERY_MEM_REGIONS, sizeof(drm_refgpu_query_mem_regions)},
            {REFGPU_DEVICE_QUERY_ENGINES, sizeof(drm_refgpu_query_engines)},
            {REFGPU_DEVICE_QUERY_STATS, sizeof(drm_refgpu_query_stats)}};
  for (const auto& q : qs) {
    drm_refgpu_device_query dq{};
    dq.query = q.query;
    ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
    EXPECT_EQ(dq.size, q.size);
    std::vector<unsigned char> buf(q.size + 16, 0xa5);
    dq.data = uptr(buf.data());
    dq.size = q.size - 1;  // too small: -EINVAL, nothing written
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), -EINVAL);
    EXPECT_EQ(dq.size, q.size - 1);
    for (unsigned char b : buf) ASSERT_EQ(b, 0xa5);
    dq.size = q.size + 16;  // larger is fine: the size used comes back
    ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
    EXPECT_EQ(dq.size, q.size);
    for (size_t i = q.size; i < buf.size(); i++) ASSERT_EQ(buf[i], 0xa5) << "wrote past the answer";
  }
}

TEST(RefgpuIoctlQuery, ConfigRegionsEnginesReportTheDevice) {
  DeviceConfig cfg = IoctlRig::small_config();
  cfg.vram_sizes = {4ull << 20, 6ull << 20};
  cfg.num_engines = 3;
  cfg.smem_atomics = false;
  IoctlRig r(cfg);
  drm_refgpu_query_config c;
  drm_refgpu_device_query dq{};
  dq.query = REFGPU_DEVICE_QUERY_CONFIG;
  dq.size = sizeof(c);
  dq.data = uptr(&c);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  EXPECT_EQ(c.rev, 1u);
  EXPECT_EQ(c.va_bits, 48u);
  EXPECT_EQ(c.flags, REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR | REFGPU_CONFIG_FLAG_HAS_VRAM);
  EXPECT_EQ(c.min_alignment, 4096u);
  EXPECT_EQ(c.num_engines, 3u);
  EXPECT_EQ(c.num_mem_regions, 3u);
  // The backend the suite runs on (ctest registers the suite for both: GPUSVM_REFGPU_BACKEND).
  const char* env = std::getenv("GPUSVM_REFGPU_BACKEND");
  const bool vulkan = env && std::string_view(env) == "vulkan";
  EXPECT_EQ(c.backend, vulkan ? __u32{REFGPU_BACKEND_VULKAN} : __u32{REFGPU_BACKEND_HOST});
  EXPECT_EQ(c.pad, 0u);
  for (__u64 v : c.reserved) EXPECT_EQ(v, 0u);

  drm_refgpu_query_mem_regions m;
  dq.query = REFGPU_DEVICE_QUERY_MEM_REGIONS;
  dq.size = sizeof(m);
  dq.data = uptr(&m);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  ASSERT_EQ(m.num_mem_regions, 3u);
  EXPECT_EQ(m.regions[0].mem_class, REFGPU_MEM_REGION_CLASS_SYSMEM);
  EXPECT_EQ(m.regions[0].total_size, r.machine->mem().ram_pages() * 4096);
  EXPECT_GE(m.regions[0].total_size, 64ull << 20);
  EXPECT_GT(m.regions[0].used, 0u);
  EXPECT_LE(m.regions[0].used, m.regions[0].total_size);
  EXPECT_EQ(m.regions[1].mem_class, REFGPU_MEM_REGION_CLASS_VRAM);
  EXPECT_EQ(m.regions[1].instance, 1u);
  EXPECT_EQ(m.regions[1].total_size, 4ull << 20);
  EXPECT_EQ(m.regions[2].instance, 2u);
  EXPECT_EQ(m.regions[2].total_size, 6ull << 20);
  EXPECT_EQ(m.regions[2].used, 0u);
  // VRAM use shows up as the buddy allocates.
  auto blocks = r.dev->vram_region(1).buddy().alloc(2ull << 20);
  ASSERT_TRUE(blocks.ok());
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  EXPECT_EQ(m.regions[2].used, 2ull << 20);
  EXPECT_EQ(r.dev->vram_region(1).buddy().free(*blocks), 0);

  drm_refgpu_query_engines e;
  dq.query = REFGPU_DEVICE_QUERY_ENGINES;
  dq.size = sizeof(e);
  dq.data = uptr(&e);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  ASSERT_EQ(e.num_engines, 3u);
  for (uint16_t i = 0; i < 3; i++) {
    EXPECT_EQ(e.engines[i].engine_class, REFGPU_ENGINE_CLASS_COMPUTE);
    EXPECT_EQ(e.engines[i].engine_instance, i);
  }
  drm_refgpu_query_stats s;
  dq.query = REFGPU_DEVICE_QUERY_STATS;
  dq.size = sizeof(s);
  dq.data = uptr(&s);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  EXPECT_EQ(s.num_stats, static_cast<uint32_t>(REFGPU_STAT_COUNT));
  EXPECT_EQ(s.values[REFGPU_STAT_JOBS], 0u);
}

TEST(RefgpuIoctlQuery, MisuseIsRejected) {
  IoctlRig r;
  drm_refgpu_query_config c{};
  drm_refgpu_device_query dq{};
  dq.query = REFGPU_DEVICE_QUERY_CONFIG;
  dq.size = sizeof(c);
  dq.data = uptr(&c);
  drm_refgpu_device_query bad = dq;
  bad.extensions = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &bad), -EINVAL);
  bad = dq;
  bad.reserved[1] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &bad), -EINVAL);
  bad = dq;
  bad.query = 4;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &bad), -EINVAL);
  bad = dq;
  bad.data = 8;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &bad), -EFAULT);
  EXPECT_EQ(bad.size, sizeof(c));
  EXPECT_EQ(c.rev, 0u) << "a failed query wrote its answer";
}

// ---- VMs ----

TEST(RefgpuIoctlVm, CreateValidatesFlagsAndReserved) {
  IoctlRig r;
  drm_refgpu_vm_create c{};
  c.flags = REFGPU_VM_CREATE_FLAG_FAULT_MODE;  // fault mode needs LR
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), -EINVAL);
  c.flags = 1u << 3;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), -EINVAL);
  c.flags = 0;
  c.extensions = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), -EINVAL);
  c.extensions = 0;
  c.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), -EINVAL);
  EXPECT_EQ(c.vm_id, 0u);
  EXPECT_EQ(r.file->num_vms(), 0u);
  c.reserved[0] = 0;
  for (uint32_t flags : {0u, REFGPU_VM_CREATE_FLAG_LR_MODE,
                         REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE |
                             REFGPU_VM_CREATE_FLAG_NO_VM_OVERCOMMIT}) {
    c.flags = flags;
    EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_CREATE, &c), 0);
    EXPECT_NE(c.vm_id, 0u);
  }
  EXPECT_EQ(r.file->num_vms(), 3u);
}

TEST(RefgpuIoctlVm, IdsAreNeverReusedAndDestroyChecksEverything) {
  IoctlRig r;
  const uint32_t a = r.vm_create();
  const uint32_t b = r.vm_create();
  EXPECT_NE(a, b);
  drm_refgpu_vm_destroy d{};
  d.vm_id = a;
  d.pad = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), -EINVAL);
  d.pad = 0;
  d.reserved[1] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), -EINVAL);
  d.reserved[1] = 0;
  d.vm_id = 77;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), -ENOENT);
  EXPECT_EQ(r.file->num_vms(), 2u);
  d.vm_id = a;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), 0);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), -ENOENT);  // stale id
  const uint32_t c = r.vm_create();
  EXPECT_NE(c, a);
  EXPECT_NE(c, b);
  EXPECT_EQ(r.file->num_vms(), 2u);
}

TEST(RefgpuIoctlVm, DestroyWithAnExecQueueIsEbusy) {
  IoctlRig r;
  const uint32_t vm = r.vm_create();
  const uint32_t q = r.queue_create(vm);
  drm_refgpu_vm_destroy d{};
  d.vm_id = vm;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), -EBUSY);
  EXPECT_EQ(r.file->num_vms(), 1u);
  drm_refgpu_exec_queue_destroy qd{};
  qd.exec_queue_id = q;
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &qd), 0);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_VM_DESTROY, &d), 0);
  EXPECT_EQ(r.file->num_vms(), 0u);
}

TEST(RefgpuIoctlVm, IdsArePerFile) {
  IoctlRig r;
  const uint32_t a = r.vm_create();
  auto fd2 = devfs::open("refgpu0", *r.proc);
  ASSERT_TRUE(fd2.ok());
  drm_refgpu_vm_create c{};
  ASSERT_EQ(devfs::ioctl(*r.proc, *fd2, DRM_IOCTL_REFGPU_VM_CREATE, &c), 0);
  EXPECT_EQ(c.vm_id, a);  // both files start at 1: different VMs
  drm_refgpu_vm_destroy d{};
  d.vm_id = a;
  ASSERT_EQ(devfs::ioctl(*r.proc, *fd2, DRM_IOCTL_REFGPU_VM_DESTROY, &d), 0);
  EXPECT_EQ(r.file->num_vms(), 1u) << "another file's destroy reached this file's VM";
  EXPECT_EQ(devfs::close(*r.proc, *fd2), 0);
}

// ---- syncobjs ----

TEST(RefgpuIoctlSyncobj, CreateDestroyMisuse) {
  IoctlRig r;
  drm_refgpu_syncobj_create c{};
  c.flags = 2;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, &c), -EINVAL);
  c.flags = 0;
  c.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, &c), -EINVAL);
  EXPECT_EQ(c.handle, 0u);
  EXPECT_EQ(r.file->num_syncobjs(), 0u);
  const uint32_t s = r.syncobj_create();
  drm_refgpu_syncobj_destroy d{};
  d.handle = s;
  d.pad = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, &d), -EINVAL);
  d.pad = 0;
  d.reserved[0] = 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, &d), -EINVAL);
  d.reserved[0] = 0;
  d.handle = s + 1;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, &d), -ENOENT);
  EXPECT_EQ(r.file->num_syncobjs(), 1u);
  d.handle = s;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, &d), 0);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, &d), -ENOENT);
}

TEST(RefgpuIoctlSyncobj, WaitValidatesAndTimesOut) {
  IoctlRig r;
  const uint32_t sig = r.syncobj_create(REFGPU_SYNCOBJ_CREATE_SIGNALED);
  const uint32_t empty = r.syncobj_create();
  uint32_t handles[2] = {sig, empty};
  drm_refgpu_syncobj_wait w{};
  w.handles = uptr(handles);
  w.count_handles = 1;
  w.timeout_nsec = 0;  // already past: a poll
  w.first_signaled = 99;
  drm_refgpu_syncobj_wait bad = w;
  bad.count_handles = 0;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  bad.count_handles = 65;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  bad = w;
  bad.flags = 2;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  bad = w;
  bad.extensions = 8;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  bad = w;
  bad.reserved[1] = 8;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  bad = w;
  bad.handles = 16;
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EFAULT);
  uint32_t stale[1] = {empty + 5};
  bad = w;
  bad.handles = uptr(stale);
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -ENOENT);
  bad = w;
  bad.count_handles = 2;  // the second has no fence yet
  EXPECT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &bad), -EINVAL);
  EXPECT_EQ(bad.first_signaled, 99u);
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &w), 0);
  EXPECT_EQ(w.first_signaled, 0u);
  EXPECT_EQ(w.error, 0);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
