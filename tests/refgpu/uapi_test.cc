// uapi/refgpu.h from C++: request numbers are distinct DRM driver ioctls whose encoded size
// is their struct's, and the ISA's length fields agree with the structs.
#include "uapi/refgpu.h"

#include <gtest/gtest.h>

#include <set>

namespace {

TEST(RefgpuUapi, RequestsAreDistinctDriverIoctlsOfTheirStructSize) {
  struct Req {
    unsigned long nr;
    size_t size;
  };
  const Req reqs[] = {
      {DRM_IOCTL_REFGPU_DEVICE_QUERY, sizeof(drm_refgpu_device_query)},
      {DRM_IOCTL_REFGPU_GEM_CREATE, sizeof(drm_refgpu_gem_create)},
      {DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, sizeof(drm_refgpu_gem_mmap_offset)},
      {DRM_IOCTL_REFGPU_GEM_CLOSE, sizeof(drm_refgpu_gem_close)},
      {DRM_IOCTL_REFGPU_VM_CREATE, sizeof(drm_refgpu_vm_create)},
      {DRM_IOCTL_REFGPU_VM_DESTROY, sizeof(drm_refgpu_vm_destroy)},
      {DRM_IOCTL_REFGPU_VM_BIND, sizeof(drm_refgpu_vm_bind)},
      {DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, sizeof(drm_refgpu_exec_queue_create)},
      {DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, sizeof(drm_refgpu_exec_queue_destroy)},
      {DRM_IOCTL_REFGPU_EXEC, sizeof(drm_refgpu_exec)},
      {DRM_IOCTL_REFGPU_WAIT_USER_FENCE, sizeof(drm_refgpu_wait_user_fence)},
      {DRM_IOCTL_REFGPU_MADVISE, sizeof(drm_refgpu_madvise)},
      {DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, sizeof(drm_refgpu_vm_query_mem_range_attr)},
      {DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, sizeof(drm_refgpu_syncobj_create)},
      {DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY, sizeof(drm_refgpu_syncobj_destroy)},
      {DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, sizeof(drm_refgpu_syncobj_wait)},
      {DRM_IOCTL_REFGPU_FAULT_QUERY, sizeof(drm_refgpu_fault_query)},
  };
  std::set<unsigned long> seen;
  for (const Req& r : reqs) {
    EXPECT_TRUE(seen.insert(r.nr).second) << std::hex << r.nr;
    EXPECT_EQ(_IOC_TYPE(r.nr), static_cast<unsigned>(DRM_IOCTL_BASE));
    EXPECT_GE(_IOC_NR(r.nr), static_cast<unsigned>(DRM_COMMAND_BASE));
    EXPECT_LT(_IOC_NR(r.nr), static_cast<unsigned>(DRM_COMMAND_END));
    EXPECT_EQ(_IOC_SIZE(r.nr), r.size) << std::hex << r.nr;
    EXPECT_NE(_IOC_DIR(r.nr) & _IOC_WRITE, 0u) << "every request passes its struct in";
    EXPECT_EQ(r.size % 8, 0u);
  }
}

TEST(RefgpuUapi, EncodingRoundTrips) {
  const uint32_t h = REFGPU_CMD_HEADER(REFGPU_OP_LOAD_STRIDED, sizeof(refgpu_cmd_load_strided) / 4);
  EXPECT_EQ(REFGPU_CMD_OPCODE(h), static_cast<uint32_t>(REFGPU_OP_LOAD_STRIDED));
  EXPECT_EQ(REFGPU_CMD_LENGTH(h), 14u);
  EXPECT_LE(REFGPU_STAT_COUNT, 64);
}

}  // namespace
