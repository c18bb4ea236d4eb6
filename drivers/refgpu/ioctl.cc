// The refgpu ioctl dispatch (drm_ioctl with the driver's table) and the user copies.
#include "drivers/refgpu/ioctl.h"

#include <array>
#include <cerrno>
#include <cstring>

namespace gpusvm::refgpu {

int copy_from_user(void* dst, uint64_t uptr, size_t len) {
  if (len == 0) return 0;
  if (uptr < kUserMinAddr || uptr + len < uptr) return -EFAULT;
  std::memcpy(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(uptr)), len);
  return 0;
}

int copy_to_user(uint64_t uptr, const void* src, size_t len) {
  if (len == 0) return 0;
  if (uptr < kUserMinAddr || uptr + len < uptr) return -EFAULT;
  std::memcpy(reinterpret_cast<void*>(static_cast<uintptr_t>(uptr)), src, len);
  return 0;
}

namespace {

using Handler = int (*)(RefgpuFile&, devfs::Process&, void* karg);

struct IoctlDesc {
  unsigned long cmd = 0;  // the full encoding (DRM_IOCTL_REFGPU_*)
  Handler fn = nullptr;
};

template <typename T, int (*F)(RefgpuFile&, devfs::Process&, T*)>
int call(RefgpuFile& f, devfs::Process& p, void* karg) {
  return F(f, p, static_cast<T*>(karg));
}

#define REFGPU_IOCTL(req, T, fn) \
  IoctlDesc { DRM_IOCTL_REFGPU_##req, &call<T, fn> }

// Indexed by nr - DRM_COMMAND_BASE (xe_ioctls[] of xe_device.c).
const std::array<IoctlDesc, 17> kIoctls = {
    REFGPU_IOCTL(DEVICE_QUERY, drm_refgpu_device_query, ioctl_device_query),
    REFGPU_IOCTL(GEM_CREATE, drm_refgpu_gem_create, ioctl_gem_create),
    REFGPU_IOCTL(GEM_MMAP_OFFSET, drm_refgpu_gem_mmap_offset, ioctl_gem_mmap_offset),
    REFGPU_IOCTL(GEM_CLOSE, drm_refgpu_gem_close, ioctl_gem_close),
    REFGPU_IOCTL(VM_CREATE, drm_refgpu_vm_create, ioctl_vm_create),
    REFGPU_IOCTL(VM_DESTROY, drm_refgpu_vm_destroy, ioctl_vm_destroy),
    REFGPU_IOCTL(VM_BIND, drm_refgpu_vm_bind, ioctl_vm_bind),
    REFGPU_IOCTL(EXEC_QUEUE_CREATE, drm_refgpu_exec_queue_create, ioctl_exec_queue_create),
    REFGPU_IOCTL(EXEC_QUEUE_DESTROY, drm_refgpu_exec_queue_destroy, ioctl_exec_queue_destroy),
    REFGPU_IOCTL(EXEC, drm_refgpu_exec, ioctl_exec),
    REFGPU_IOCTL(WAIT_USER_FENCE, drm_refgpu_wait_user_fence, ioctl_wait_user_fence),
    REFGPU_IOCTL(MADVISE, drm_refgpu_madvise, ioctl_madvise),
    REFGPU_IOCTL(VM_QUERY_MEM_RANGE_ATTRS, drm_refgpu_vm_query_mem_range_attr, ioctl_query_mem_range_attrs),
    REFGPU_IOCTL(SYNCOBJ_CREATE, drm_refgpu_syncobj_create, ioctl_syncobj_create),
    REFGPU_IOCTL(SYNCOBJ_DESTROY, drm_refgpu_syncobj_destroy, ioctl_syncobj_destroy),
    REFGPU_IOCTL(SYNCOBJ_WAIT, drm_refgpu_syncobj_wait, ioctl_syncobj_wait),
    REFGPU_IOCTL(FAULT_QUERY, drm_refgpu_fault_query, ioctl_fault_query),
};

#undef REFGPU_IOCTL

// The largest argument struct (the kernel's on-stack buffer of drm_ioctl).
constexpr size_t kMaxArgSize = 256;

}  // namespace

int RefgpuFile::ioctl(devfs::Process& caller, unsigned long request, void* arg) {
  if (_IOC_TYPE(request) != DRM_IOCTL_BASE) return -EINVAL;
  const unsigned nr = _IOC_NR(request);
  if (nr < DRM_COMMAND_BASE || nr >= DRM_COMMAND_BASE + kIoctls.size()) return -EINVAL;
  const IoctlDesc& d = kIoctls[nr - DRM_COMMAND_BASE];
  if (request != d.cmd) return -EINVAL;  // direction or size differs from the table
  const size_t size = _IOC_SIZE(request);
  static_assert(sizeof(drm_refgpu_vm_bind) <= kMaxArgSize);
  if (size > kMaxArgSize) return -EINVAL;
  if (!dev_->enter()) return -ENODEV;
  alignas(8) unsigned char karg[kMaxArgSize];
  const uint64_t uarg = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(arg));
  int rc = 0;
  if (_IOC_DIR(request) & _IOC_WRITE) rc = copy_from_user(karg, uarg, size);
  if (rc == 0) rc = d.fn(*this, caller, karg);
  // On success the struct goes back; wait_user_fence also on -ETIME (its timeout was
  // updated: 0 once expired).
  const bool copy_back = rc == 0 || (rc == -ETIME && request == DRM_IOCTL_REFGPU_WAIT_USER_FENCE);
  if (copy_back && (_IOC_DIR(request) & _IOC_READ)) {
    const int crc = copy_to_user(uarg, karg, size);
    if (crc) rc = crc;
  }
  dev_->exit();
  return rc;
}

}  // namespace gpusvm::refgpu
