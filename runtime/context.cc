// Contexts: the fault-mode VM and its one mirror bind, the two heaps, the process's mappings
// and CPU accesses, advice, the attribute and residency queries, and prefetch.
#include <sys/mman.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/types.h"
#include "runtime/runtime_internal.h"

using namespace gpusvm;

namespace gpusvm::rt {

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// [addr, addr + len) widened to pages; -EINVAL for len 0, overflow or a range outside user space.
int page_span(uint64_t addr, uint64_t len, uint64_t* start, uint64_t* range) {
  if (len == 0 || addr + len < addr) return -EINVAL;
  const uint64_t s = mm::page_align_down(addr);
  const uint64_t e = mm::page_align_up(addr + len);
  if (e < addr + len || e > mm::kTaskSize) return -EINVAL;
  *start = s;
  *range = e - s;
  return 0;
}

namespace {
// The MADVISE arguments for one attribute `type` of [start, start + range) of ctx's VM.
drm_refgpu_madvise madvise_args(gpusvm_rt_context* ctx, uint64_t start, uint64_t range, uint32_t type) {
  drm_refgpu_madvise m{};
  m.start = start;
  m.range = range;
  m.vm_id = ctx->vm_id;
  m.type = type;
  return m;
}
}  // namespace

int madvise_pref(gpusvm_rt_context* ctx, uint64_t start, uint64_t range, int32_t loc, uint16_t policy) {
  drm_refgpu_madvise m = madvise_args(ctx, start, range, REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC);
  m.preferred_mem_loc.devmem_fd = loc;
  m.preferred_mem_loc.migration_policy = policy;
  return ctx->io(DRM_IOCTL_REFGPU_MADVISE, &m);
}

int madvise_atomic(gpusvm_rt_context* ctx, uint64_t start, uint64_t range, uint32_t val) {
  drm_refgpu_madvise m = madvise_args(ctx, start, range, REFGPU_MEM_RANGE_ATTR_ATOMIC);
  m.atomic.val = val;
  return ctx->io(DRM_IOCTL_REFGPU_MADVISE, &m);
}

int advise_reset(gpusvm_rt_context* ctx, uint64_t start, uint64_t range) {
  if (int rc = madvise_pref(ctx, start, range, REFGPU_PREFERRED_LOC_DEFAULT_DEVICE, REFGPU_MIGRATE_ALL_PAGES))
    return rc;
  return madvise_atomic(ctx, start, range, REFGPU_ATOMIC_UNDEFINED);
}

}  // namespace gpusvm::rt

extern "C" {

int gpusvm_rt_context_create(gpusvm_rt_device* dev, uint32_t flags, gpusvm_rt_context** out) {
  if (!dev || !out || flags) return -EINVAL;
  // The mirror covers the CPU's whole user address space [0, TASK_SIZE): the GPU must be able
  // to address all of it (compute-runtime refuses shared system allocations otherwise).
  if (!(dev->config.flags & REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR)) return -EOPNOTSUPP;
  if (dev->config.va_bits >= 64 || (1ull << dev->config.va_bits) < mm::kTaskSize) return -EOPNOTSUPP;
  auto* ctx = new (std::nothrow) gpusvm_rt_context;
  if (!ctx) return -ENOMEM;
  ctx->dev = dev;
  drm_refgpu_vm_create c{};
  c.flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE;
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_VM_CREATE, &c)) {
    delete ctx;
    return rc;
  }
  ctx->vm_id = c.vm_id;
  drm_refgpu_vm_bind b{};
  b.vm_id = ctx->vm_id;
  b.num_binds = 1;
  b.bind.op = REFGPU_VM_BIND_OP_MAP;
  b.bind.flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR | REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET;
  b.bind.addr = 0;
  b.bind.range = mm::kTaskSize;
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_VM_BIND, &b)) {
    drm_refgpu_vm_destroy d{};
    d.vm_id = ctx->vm_id;
    (void)ctx->io(DRM_IOCTL_REFGPU_VM_DESTROY, &d);
    delete ctx;
    return rc;
  }
  ctx->heap = std::make_unique<rt::Heap>(ctx->mm(), [ctx](mm::Va s, uint64_t len) {
    return rt::advise_reset(ctx, s, len);
  });
  // Batches and fences are written by the CPU before each job and read once by the device:
  // they stay in system memory instead of bouncing to VRAM on every fetch.
  ctx->internal = std::make_unique<rt::Heap>(ctx->mm(), [ctx](mm::Va s, uint64_t len) {
    return rt::madvise_pref(ctx, s, len, REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM, REFGPU_MIGRATE_ALL_PAGES);
  });
  dev->contexts.fetch_add(1);
  *out = ctx;
  return 0;
}

int gpusvm_rt_context_destroy(gpusvm_rt_context* ctx) {
  if (!ctx) return -EINVAL;
  if (ctx->queues.load() || ctx->fences.load() || ctx->bos.load()) return -EBUSY;
  ctx->heap.reset();
  ctx->internal.reset();
  drm_refgpu_vm_destroy d{};
  d.vm_id = ctx->vm_id;
  const int rc = ctx->io(DRM_IOCTL_REFGPU_VM_DESTROY, &d);
  ctx->dev->contexts.fetch_sub(1);
  delete ctx;
  return rc;
}

uint32_t gpusvm_rt_context_vm_id(const gpusvm_rt_context* ctx) { return ctx ? ctx->vm_id : 0; }

int gpusvm_rt_malloc(gpusvm_rt_context* ctx, size_t size, gpusvm_rt_va* out) {
  if (!ctx || !out) return -EINVAL;
  Result<mm::Va> a = ctx->heap->alloc(size, rt::Heap::kMinAlign);
  if (!a) return a.error();
  *out = *a;
  return 0;
}

int gpusvm_rt_calloc(gpusvm_rt_context* ctx, size_t n, size_t size, gpusvm_rt_va* out) {
  if (!ctx || !out) return -EINVAL;
  if (size && n > std::numeric_limits<size_t>::max() / size) return -ENOMEM;
  Result<mm::Va> a = ctx->heap->alloc(n * size, rt::Heap::kMinAlign);
  if (!a) return a.error();
  // Arena blocks may be reused memory: zero them (fresh mappings are zero already, and
  // leaving them untouched keeps them unpopulated).
  if (n * size < GPUSVM_RT_MMAP_THRESHOLD) {
    if (int rc = mm::cpu::memset(ctx->mm(), *a, 0, n * size)) {
      (void)ctx->heap->free(*a);
      return rc;
    }
  }
  *out = *a;
  return 0;
}

int gpusvm_rt_aligned_alloc(gpusvm_rt_context* ctx, size_t align, size_t size, gpusvm_rt_va* out) {
  if (!ctx || !out || !align || (align & (align - 1))) return -EINVAL;
  Result<mm::Va> a = ctx->heap->alloc(size, align);
  if (!a) return a.error();
  *out = *a;
  return 0;
}

int gpusvm_rt_realloc(gpusvm_rt_context* ctx, gpusvm_rt_va p, size_t size, gpusvm_rt_va* out) {
  if (!ctx || !out) return -EINVAL;
  if (!p) return gpusvm_rt_malloc(ctx, size, out);
  Result<uint64_t> old = ctx->heap->usable_size(p);
  if (!old) return old.error();
  if (size == 0) {
    if (int rc = ctx->heap->free(p)) return rc;
    *out = 0;
    return 0;
  }
  if (size <= *old && *old - size < 4096) {  // shrinking a little: keep the block
    *out = p;
    return 0;
  }
  Result<mm::Va> n = ctx->heap->alloc(size, rt::Heap::kMinAlign);
  if (!n) return n.error();
  std::vector<unsigned char> buf(64 << 10);
  const uint64_t keep = std::min<uint64_t>(*old, size);
  for (uint64_t off = 0; off < keep; off += buf.size()) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(buf.size(), keep - off));
    int rc = mm::cpu::copy_out(ctx->mm(), p + off, buf.data(), chunk);
    if (!rc) rc = mm::cpu::copy_in(ctx->mm(), *n + off, buf.data(), chunk);
    if (rc) {
      (void)ctx->heap->free(*n);
      return rc;
    }
  }
  (void)ctx->heap->free(p);
  *out = *n;
  return 0;
}

int gpusvm_rt_free(gpusvm_rt_context* ctx, gpusvm_rt_va p) {
  if (!ctx) return -EINVAL;
  if (!p) return 0;
  return ctx->heap->free(p);
}

int gpusvm_rt_alloc_size(gpusvm_rt_context* ctx, gpusvm_rt_va p, size_t* size) {
  if (!ctx || !size) return -EINVAL;
  Result<uint64_t> s = ctx->heap->usable_size(p);
  if (!s) return s.error();
  *size = *s;
  return 0;
}

int gpusvm_rt_mmap(gpusvm_rt_context* ctx, gpusvm_rt_va hint, size_t len, int prot, int flags, gpusvm_rt_va* out) {
  if (!ctx || !out || !(flags & MAP_ANONYMOUS)) return -EINVAL;
  Result<mm::Va> a = ctx->mm().mmap(hint, len, prot, flags);
  if (!a) return a.error();
  *out = *a;
  return 0;
}

int gpusvm_rt_munmap(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len) {
  if (!ctx) return -EINVAL;
  return ctx->mm().munmap(addr, len);
}

int gpusvm_rt_mremap(gpusvm_rt_context* ctx, gpusvm_rt_va old_addr, size_t old_len, size_t new_len, int flags,
                     gpusvm_rt_va new_addr, gpusvm_rt_va* out) {
  if (!ctx || !out) return -EINVAL;
  Result<mm::Va> a = ctx->mm().mremap(old_addr, old_len, new_len, flags, new_addr);
  if (!a) return a.error();
  *out = *a;
  return 0;
}

int gpusvm_rt_file_create(gpusvm_rt_context* ctx, uint64_t size, gpusvm_rt_file** out) {
  if (!ctx || !out) return -EINVAL;
  Result<std::shared_ptr<mm::ShmemObject>> obj = mm::ShmemObject::create(ctx->mm().mem(), size, "gpusvm-rt-file");
  if (!obj) return obj.error();
  auto* f = new (std::nothrow) gpusvm_rt_file;
  if (!f) return -ENOMEM;
  f->obj = std::move(*obj);
  *out = f;
  return 0;
}

int gpusvm_rt_file_destroy(gpusvm_rt_file* file) {
  if (!file) return -EINVAL;
  delete file;
  return 0;
}

int64_t gpusvm_rt_file_pwrite(gpusvm_rt_file* file, const void* buf, uint64_t len, uint64_t off) {
  if (!file) return -EINVAL;
  return file->obj->pwrite(buf, len, off);
}

int64_t gpusvm_rt_file_pread(gpusvm_rt_file* file, void* buf, uint64_t len, uint64_t off) {
  if (!file) return -EINVAL;
  return file->obj->pread(buf, len, off);
}

int gpusvm_rt_mmap_file(gpusvm_rt_context* ctx, gpusvm_rt_va hint, size_t len, int prot, int flags,
                        gpusvm_rt_file* file, uint64_t offset, gpusvm_rt_va* out) {
  if (!ctx || !file || !out || (flags & MAP_ANONYMOUS)) return -EINVAL;
  Result<mm::Va> a = ctx->mm().mmap(hint, len, prot, flags, file->obj, offset);
  if (!a) return a.error();
  *out = *a;
  return 0;
}

int gpusvm_rt_mprotect(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, int prot) {
  if (!ctx) return -EINVAL;
  return ctx->mm().mprotect(addr, len, prot);
}

int gpusvm_rt_madvise_host(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, int advice) {
  if (!ctx) return -EINVAL;
  return ctx->mm().madvise(addr, len, advice);
}

int gpusvm_rt_write(gpusvm_rt_context* ctx, gpusvm_rt_va dst, const void* src, size_t len) {
  if (!ctx || (len && !src)) return -EINVAL;
  return mm::cpu::copy_in(ctx->mm(), dst, src, len);
}

int gpusvm_rt_read(gpusvm_rt_context* ctx, gpusvm_rt_va src, void* dst, size_t len) {
  if (!ctx || (len && !dst)) return -EINVAL;
  return mm::cpu::copy_out(ctx->mm(), src, dst, len);
}

int gpusvm_rt_memset(gpusvm_rt_context* ctx, gpusvm_rt_va dst, int c, size_t len) {
  if (!ctx) return -EINVAL;
  return mm::cpu::memset(ctx->mm(), dst, c, len);
}

namespace {
int put_old(Result<uint64_t> r, uint64_t* old) {
  if (!r) return r.error();
  if (old) *old = *r;
  return 0;
}
}  // namespace

int gpusvm_rt_atomic_fetch_add(gpusvm_rt_context* ctx, gpusvm_rt_va addr, uint64_t delta, uint64_t* old) {
  if (!ctx || addr % 8) return -EINVAL;
  return put_old(mm::cpu::atomic_fetch_add(ctx->mm(), addr, delta), old);
}

int gpusvm_rt_atomic_exchange(gpusvm_rt_context* ctx, gpusvm_rt_va addr, uint64_t value, uint64_t* old) {
  if (!ctx || addr % 8) return -EINVAL;
  return put_old(mm::cpu::atomic_exchange(ctx->mm(), addr, value), old);
}

int gpusvm_rt_atomic_cmpxchg(gpusvm_rt_context* ctx, gpusvm_rt_va addr, uint64_t expected, uint64_t desired,
                             uint64_t* old) {
  if (!ctx || addr % 8) return -EINVAL;
  return put_old(mm::cpu::atomic_cmpxchg(ctx->mm(), addr, expected, desired), old);
}

int gpusvm_rt_advise_preferred_location(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, int32_t location,
                                        uint16_t migration_policy) {
  if (!ctx || location < GPUSVM_RT_LOCATION_SYSTEM || migration_policy > REFGPU_MIGRATE_ONLY_SYSTEM_PAGES)
    return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  return rt::madvise_pref(ctx, s, r, location, migration_policy);
}

int gpusvm_rt_advise_atomic(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, uint32_t policy) {
  if (!ctx || policy > REFGPU_ATOMIC_CPU) return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  return rt::madvise_atomic(ctx, s, r, policy);
}

int gpusvm_rt_advise_reset(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len) {
  if (!ctx) return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  return rt::advise_reset(ctx, s, r);
}

int gpusvm_rt_query_attrs(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, gpusvm_rt_range_attr* attrs,
                          uint32_t capacity, uint32_t* count) {
  if (!ctx || !count || (capacity && !attrs)) return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  // The kernel's two calls, again while the pieces change under us (-ENOSPC), bounded.
  for (int attempt = 0; attempt < 64; ++attempt) {
    drm_refgpu_vm_query_mem_range_attr q{};
    q.vm_id = ctx->vm_id;
    q.start = s;
    q.range = r;
    if (int rc = ctx->io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q)) return rc;
    if (q.sizeof_mem_range_attr != sizeof(drm_refgpu_mem_range_attr)) return -EOVERFLOW;
    const uint32_t n = q.num_mem_ranges;
    if (n == 0) {
      *count = 0;
      return 0;
    }
    std::vector<drm_refgpu_mem_range_attr> v(n);
    q.vector_of_mem_attr = rt::uptr(v.data());
    const int rc = ctx->io(DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, &q);
    if (rc == -ENOSPC) continue;
    if (rc) return rc;
    const uint32_t got = q.num_mem_ranges;
    *count = got;
    if (capacity == 0) return 0;
    if (capacity < got) return -ENOSPC;
    for (uint32_t i = 0; i < got; ++i) {
      attrs[i] = gpusvm_rt_range_attr{v[i].start, v[i].end, v[i].preferred_mem_loc.devmem_fd,
                                      v[i].preferred_mem_loc.migration_policy, v[i].atomic.val, 0};
    }
    return 0;
  }
  return -EAGAIN;
}

int gpusvm_rt_query_residency(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, gpusvm_rt_residency* out) {
  if (!ctx || !out) return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  gpusvm_rt_residency res{};
  for (uint64_t va = s; va < s + r; va += mm::kPageSize) {
    const mm::PageState st = mm::query_page(ctx->mm(), va);
    ++res.pages;
    switch (st.kind) {
      case mm::PageKind::kNone:
        ++res.none;
        break;
      case mm::PageKind::kSoftLeaf:
        if (st.leaf == mm::SoftLeafType::kDevicePrivateRead || st.leaf == mm::SoftLeafType::kDevicePrivateWrite)
          ++res.device;
        else if (st.leaf == mm::SoftLeafType::kDeviceExclusive)
          ++res.exclusive;
        else if (st.leaf == mm::SoftLeafType::kSwap)
          ++res.none;
        else
          ++res.system;  // a migration entry: the page is moving, still backed by its source
        break;
      default:
        ++res.system;
        break;
    }
  }
  *out = res;
  return 0;
}

}  // extern "C"
