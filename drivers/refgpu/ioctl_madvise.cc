// DRM_IOCTL_REFGPU_MADVISE and DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS (xe_vm_madvise.c):
// field checks, then the VM's attribute calls (vm_madvise.h).
#include <cerrno>
#include <vector>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

namespace {
int check_span(uint64_t start, uint64_t range, uint64_t va_limit) {
  if (start % 4096 || range % 4096 || range == 0) return -EINVAL;
  if (start + range < start || start + range > va_limit) return -EINVAL;
  return 0;
}
// Resolves a madvise devmem_fd (> 0) of the caller (xe_vm_madvise's drm_pagemap_from_fd).
// true: a refgpu file of this same device (its own VRAM). Errors: -EBADF (no open file at fd,
// or not a refgpu device file), -ENOLINK (another refgpu device: no device has a link to
// another yet, so its VRAM is never reachable; docs/refgpu.md, Missing).
Result<bool> devmem_fd_is_this_device(RefgpuFile& f, devfs::Process& caller, int32_t fd) {
  std::shared_ptr<devfs::File> file = caller.fd_get(fd);
  auto* other = dynamic_cast<RefgpuFile*>(file.get());
  if (!other) return Err{-EBADF};
  if (&other->dev() != &f.dev()) return Err{-ENOLINK};
  return true;
}
}  // namespace

int ioctl_madvise(RefgpuFile& f, devfs::Process& caller, drm_refgpu_madvise* a) {
  if (a->extensions || !all_zero(a->reserved)) return -EINVAL;
  if (int rc = check_span(a->start, a->range, f.dev().va_limit())) return rc;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  switch (a->type) {
    case REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC: {
      const auto& p = a->preferred_mem_loc;
      if (p.reserved || p.migration_policy > REFGPU_MIGRATE_ONLY_SYSTEM_PAGES) return -EINVAL;
      if (p.devmem_fd < REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM) return -EINVAL;
      if (p.devmem_fd == REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM && p.region_instance) return -EINVAL;
      if (!vm) return -ENOENT;
      int32_t fd = p.devmem_fd;
      if (fd > 0) {
        // A device named by an fd of the caller: its VRAM needs a link from this device.
        Result<bool> same = devmem_fd_is_this_device(f, caller, fd);
        if (!same) return same.error();
        fd = REFGPU_PREFERRED_LOC_DEFAULT_DEVICE;  // this device's own fd: its own VRAM
      }
      return vm->vm->madvise_preferred_loc(a->start, a->range, fd, p.migration_policy, p.region_instance);
    }
    case REFGPU_MEM_RANGE_ATTR_ATOMIC:
      if (a->atomic.pad || a->atomic.reserved || a->atomic.val > REFGPU_ATOMIC_CPU) return -EINVAL;
      if (!vm) return -ENOENT;
      return vm->vm->madvise_atomic(a->start, a->range, a->atomic.val);
    default:
      return -EINVAL;
  }
}

int ioctl_query_mem_range_attrs(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_query_mem_range_attr* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->reserved)) return -EINVAL;
  if (int rc = check_span(a->start, a->range, f.dev().va_limit())) return rc;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  if (!vm) return -ENOENT;
  if (a->num_mem_ranges == 0) {
    Result<uint32_t> n = vm->vm->query_mem_range_attrs_count(a->start, a->range);
    if (!n) return n.error();
    a->num_mem_ranges = *n;
    a->sizeof_mem_range_attr = sizeof(drm_refgpu_mem_range_attr);
    return 0;
  }
  // The kernel bounds the array by what it may allocate; one attribute per page of the span
  // is the most there can be, and 2^16 is far beyond any real answer.
  if (a->num_mem_ranges > (1u << 16)) return -EINVAL;
  std::vector<MemAttrRange> ranges(a->num_mem_ranges);
  Result<uint32_t> n = vm->vm->query_mem_range_attrs(a->start, a->range, ranges);
  if (!n) return n.error();
  std::vector<drm_refgpu_mem_range_attr> out(*n);
  for (uint32_t i = 0; i < *n; i++) {
    out[i] = {};
    out[i].start = ranges[i].start;
    out[i].end = ranges[i].end;
    out[i].preferred_mem_loc.devmem_fd = ranges[i].attrs.devmem_fd;
    out[i].preferred_mem_loc.migration_policy = ranges[i].attrs.migration_policy;
    out[i].atomic.val = ranges[i].attrs.atomic;
  }
  if (copy_to_user(a->vector_of_mem_attr, out.data(), out.size() * sizeof(out[0]))) return -EFAULT;
  a->num_mem_ranges = *n;
  a->sizeof_mem_range_attr = sizeof(drm_refgpu_mem_range_attr);
  return 0;
}

}  // namespace gpusvm::refgpu
