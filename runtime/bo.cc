// Buffer objects: GEM_CREATE private to the context's VM, VM_BIND MAP / UNMAP of a BO inside
// the mirror, and the CPU view (GEM_MMAP_OFFSET + mmap of the device file). Every argument is
// checked here before any ioctl, so a bad call changes nothing.
#include <sys/mman.h>

#include <cerrno>
#include <new>

#include "gpusvm/mm/types.h"
#include "runtime/runtime_internal.h"

using namespace gpusvm;

namespace gpusvm::rt {
namespace {

constexpr uint32_t kPlacements = GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM;

// One VM_BIND op of the context's VM, synchronous (the driver binds before it returns).
int bind_op(gpusvm_rt_context* ctx, uint32_t op, uint32_t handle, uint64_t bo_offset, mm::Va addr, uint64_t len,
            uint32_t flags) {
  drm_refgpu_vm_bind b{};
  b.vm_id = ctx->vm_id;
  b.num_binds = 1;
  b.bind.op = op;
  b.bind.obj = handle;
  b.bind.obj_offset = bo_offset;
  b.bind.addr = addr;
  b.bind.range = len;
  b.bind.flags = flags;
  return ctx->io(DRM_IOCTL_REFGPU_VM_BIND, &b);
}

int unbind_locked(gpusvm_rt_bo* bo, size_t i) GPUSVM_REQUIRES(bo->lock) {
  const gpusvm_rt_bo::Binding b = bo->bindings[i];
  const int rc = bind_op(bo->ctx, REFGPU_VM_BIND_OP_UNMAP, 0, 0, b.addr, b.len, 0);
  // Gone from the list whatever the driver said: after -EBADF/-ENODEV (file or device gone)
  // the VM and its bindings went with the file.
  bo->bindings.erase(bo->bindings.begin() + static_cast<std::ptrdiff_t>(i));
  return rc;
}

int munmap_locked(gpusvm_rt_bo* bo) GPUSVM_REQUIRES(bo->lock) {
  const int rc = bo->ctx->mm().munmap(bo->cpu_va, bo->size);
  bo->cpu_va = 0;
  return rc;
}

}  // namespace
}  // namespace gpusvm::rt

extern "C" {

int gpusvm_rt_bo_create(gpusvm_rt_context* ctx, uint64_t size, uint32_t placement, gpusvm_rt_bo** out) {
  if (!ctx || !out) return -EINVAL;
  if (size == 0 || !mm::page_aligned(size)) return -EINVAL;
  if (placement == 0 || (placement & ~rt::kPlacements)) return -EINVAL;
  if ((placement & GPUSVM_RT_BO_PLACEMENT_VRAM) && !(ctx->dev->config.flags & REFGPU_CONFIG_FLAG_HAS_VRAM))
    return -EINVAL;
  auto* bo = new (std::nothrow) gpusvm_rt_bo;
  if (!bo) return -ENOMEM;
  drm_refgpu_gem_create c{};
  c.size = size;
  c.placement = placement;  // the uapi's bits: region instance n (0 system, 1 VRAM)
  c.vm_id = ctx->vm_id;     // private to the context's VM (compute-runtime's default)
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_GEM_CREATE, &c)) {
    delete bo;
    return rc;
  }
  bo->ctx = ctx;
  bo->handle = c.handle;
  bo->size = size;
  bo->placement = placement;
  ctx->bos.fetch_add(1);
  *out = bo;
  return 0;
}

int gpusvm_rt_bo_destroy(gpusvm_rt_bo* bo) {
  if (!bo) return -EINVAL;
  int first = 0;
  {
    MutexLock g(&bo->lock);
    while (!bo->bindings.empty()) {
      const int rc = rt::unbind_locked(bo, bo->bindings.size() - 1);
      if (!first) first = rc;
    }
    if (bo->cpu_va) {
      const int rc = rt::munmap_locked(bo);
      if (!first) first = rc;
    }
  }
  drm_refgpu_gem_close c{};
  c.handle = bo->handle;
  const int rc = bo->ctx->io(DRM_IOCTL_REFGPU_GEM_CLOSE, &c);
  if (!first) first = rc;
  bo->ctx->bos.fetch_sub(1);
  delete bo;
  return first;
}

uint64_t gpusvm_rt_bo_size(const gpusvm_rt_bo* bo) { return bo ? bo->size : 0; }

int gpusvm_rt_bo_bind(gpusvm_rt_bo* bo, gpusvm_rt_va addr, uint64_t bo_offset, uint64_t len, uint32_t flags) {
  if (!bo || (flags & ~GPUSVM_RT_BO_BIND_READONLY)) return -EINVAL;
  if (len == 0 || !mm::page_aligned(addr) || !mm::page_aligned(bo_offset) || !mm::page_aligned(len)) return -EINVAL;
  if (bo_offset > bo->size || len > bo->size - bo_offset) return -EINVAL;
  if (addr + len < addr || addr + len > mm::kTaskSize) return -EINVAL;
  MutexLock g(&bo->lock);
  for (const gpusvm_rt_bo::Binding& b : bo->bindings) {
    if (addr < b.addr + b.len && b.addr < addr + len) return -EINVAL;
  }
  const uint32_t bind_flags = (flags & GPUSVM_RT_BO_BIND_READONLY) ? REFGPU_VM_BIND_FLAG_READONLY : 0;
  if (int rc = rt::bind_op(bo->ctx, REFGPU_VM_BIND_OP_MAP, bo->handle, bo_offset, addr, len, bind_flags)) return rc;
  bo->bindings.push_back({addr, len});
  return 0;
}

int gpusvm_rt_bo_unbind(gpusvm_rt_bo* bo, gpusvm_rt_va addr) {
  if (!bo) return -EINVAL;
  MutexLock g(&bo->lock);
  for (size_t i = 0; i < bo->bindings.size(); ++i) {
    if (bo->bindings[i].addr == addr) return rt::unbind_locked(bo, i);
  }
  return -EINVAL;
}

int gpusvm_rt_bo_mmap(gpusvm_rt_bo* bo, int prot, gpusvm_rt_va* out) {
  if (!bo || !out || prot == 0 || (prot & ~(PROT_READ | PROT_WRITE))) return -EINVAL;
  if (!(bo->placement & GPUSVM_RT_BO_PLACEMENT_SYSTEM)) return -EINVAL;  // no CPU-visible VRAM
  MutexLock g(&bo->lock);
  if (bo->cpu_va) return -EBUSY;
  drm_refgpu_gem_mmap_offset o{};
  o.handle = bo->handle;
  if (int rc = bo->ctx->io(DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET, &o)) return rc;
  gpusvm_rt_device* dev = bo->ctx->dev;
  Result<mm::Va> va = devfs::mmap(*dev->proc, 0, bo->size, prot, MAP_SHARED, dev->fd, o.offset);
  if (!va) return va.error();
  bo->cpu_va = *va;
  *out = *va;
  return 0;
}

int gpusvm_rt_bo_munmap(gpusvm_rt_bo* bo) {
  if (!bo) return -EINVAL;
  MutexLock g(&bo->lock);
  if (!bo->cpu_va) return -EINVAL;
  return rt::munmap_locked(bo);
}

}  // extern "C"
