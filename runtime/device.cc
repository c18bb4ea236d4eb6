// Devices: discovery (open "refgpu<index>" in order), the configuration queries, statistics,
// and the drmIoctl-style restart wrapper every runtime call goes through.
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <string>
#include <thread>

#include "gpusvm/base/errno.h"
#include "runtime/runtime_internal.h"

namespace gpusvm::rt {

int drm_ioctl(devfs::Process& proc, int fd, unsigned long request, void* arg) {
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (;;) {
    const int rc = devfs::ioctl(proc, fd, request, arg);
    if (rc != -EINTR && rc != -EAGAIN) return rc;
    if (std::chrono::steady_clock::now() >= deadline) return rc;
    std::this_thread::yield();
  }
}

namespace {

std::string device_name(uint32_t index) { return std::string(REFGPU_DEVICE_NAME) + std::to_string(index); }

// The two-call device query: size first, then the answer into `out` (of `cap` bytes).
int device_query(devfs::Process& proc, int fd, uint32_t query, void* out, uint32_t cap) {
  drm_refgpu_device_query q{};
  q.query = query;
  if (int rc = drm_ioctl(proc, fd, DRM_IOCTL_REFGPU_DEVICE_QUERY, &q)) return rc;
  if (q.size > cap) return -EOVERFLOW;  // a newer driver's answer than this runtime knows
  q.data = uptr(out);
  return drm_ioctl(proc, fd, DRM_IOCTL_REFGPU_DEVICE_QUERY, &q);
}

}  // namespace
}  // namespace gpusvm::rt

using namespace gpusvm;

extern "C" {

const char* gpusvm_rt_strerror(int err) {
  switch (err) {
    case 0: return "OK: success";
    case -EINVAL: return "EINVAL: invalid argument";
    case -ENOENT: return "ENOENT: no such device or object";
    case -ENOMEM: return "ENOMEM: out of memory";
    case -EBUSY: return "EBUSY: still in use (destroy what depends on it first)";
    case -ETIME: return "ETIME: timed out waiting";
    case -EFAULT: return "EFAULT: bad address (a GPU fault that could not be serviced)";
    case -EIO: return "EIO: the job failed (an ISA error or a failed check)";
    case -EOPNOTSUPP: return "EOPNOTSUPP: the device cannot mirror this process's address space";
    case -ENOSPC: return "ENOSPC: no room (device memory, or the caller's array)";
    case -ENODEV: return "ENODEV: the device is gone";
    case -EBADMSG: return "EBADMSG: a device-side check failed";
    case -ECANCELED: return "ECANCELED: the job's queue was destroyed";
    case -EOVERFLOW: return "EOVERFLOW: the driver's answer is larger than this runtime knows";
    default: return errno_name(err);
  }
}

int gpusvm_rt_device_count(gpusvm_rt_process* proc, uint32_t* count) {
  if (!proc || !count) return -EINVAL;
  auto& p = *reinterpret_cast<devfs::Process*>(proc);
  uint32_t n = 0;
  for (; n < GPUSVM_RT_MAX_DEVICES; ++n) {
    Result<int> fd = devfs::open(rt::device_name(n), p);
    if (!fd) {
      if (fd.error() == -ENOENT) break;
      return fd.error();
    }
    (void)devfs::close(p, *fd);
  }
  *count = n;
  return 0;
}

int gpusvm_rt_device_open(gpusvm_rt_process* proc, uint32_t index, gpusvm_rt_device** out) {
  if (!proc || !out || index >= GPUSVM_RT_MAX_DEVICES) return -EINVAL;
  auto& p = *reinterpret_cast<devfs::Process*>(proc);
  auto* dev = new (std::nothrow) gpusvm_rt_device;
  if (!dev) return -ENOMEM;
  dev->proc = &p;
  dev->index = index;
  Result<int> fd = devfs::open(rt::device_name(index), p);
  if (!fd) {
    delete dev;
    return fd.error();
  }
  dev->fd = *fd;
  int rc = rt::device_query(p, dev->fd, REFGPU_DEVICE_QUERY_CONFIG, &dev->config, sizeof(dev->config));
  if (!rc) rc = rt::device_query(p, dev->fd, REFGPU_DEVICE_QUERY_MEM_REGIONS, &dev->regions, sizeof(dev->regions));
  if (!rc) rc = rt::device_query(p, dev->fd, REFGPU_DEVICE_QUERY_ENGINES, &dev->engines, sizeof(dev->engines));
  if (rc) {
    (void)devfs::close(p, dev->fd);
    delete dev;
    return rc;
  }
  *out = dev;
  return 0;
}

int gpusvm_rt_device_close(gpusvm_rt_device* dev) {
  if (!dev) return -EINVAL;
  if (dev->contexts.load()) return -EBUSY;
  const int rc = devfs::close(*dev->proc, dev->fd);
  delete dev;
  return rc;
}

int gpusvm_rt_device_get_info(gpusvm_rt_device* dev, struct gpusvm_rt_device_info* info) {
  if (!dev || !info) return -EINVAL;
  struct gpusvm_rt_device_info i{};
  i.index = dev->index;
  i.va_bits = dev->config.va_bits;
  i.flags = dev->config.flags;
  i.min_alignment = dev->config.min_alignment;
  i.fd = dev->fd;
  for (uint32_t e = 0; e < dev->engines.num_engines && e < 16; ++e)
    if (dev->engines.engines[e].engine_class == REFGPU_ENGINE_CLASS_COMPUTE) ++i.num_engines;
  // Fresh region usage (the configuration is static, `used` is not).
  drm_refgpu_query_mem_regions regions{};
  if (int rc = rt::device_query(*dev->proc, dev->fd, REFGPU_DEVICE_QUERY_MEM_REGIONS, &regions, sizeof(regions)))
    return rc;
  for (uint32_t r = 0; r < regions.num_mem_regions && r < 8; ++r) {
    const drm_refgpu_mem_region& m = regions.regions[r];
    if (m.mem_class == REFGPU_MEM_REGION_CLASS_SYSMEM) {
      i.sysmem_size = m.total_size;
    } else {
      if (++i.num_vram_regions == 1) {
        i.vram_size = m.total_size;
        i.vram_used = m.used;
      }
    }
  }
  *info = i;
  return 0;
}

int gpusvm_rt_device_stats(gpusvm_rt_device* dev, uint64_t* values, uint32_t capacity, uint32_t* num_stats) {
  if (!dev || !num_stats || (capacity && !values)) return -EINVAL;
  drm_refgpu_query_stats s{};
  if (int rc = rt::device_query(*dev->proc, dev->fd, REFGPU_DEVICE_QUERY_STATS, &s, sizeof(s))) return rc;
  const uint32_t n = s.num_stats < 64 ? s.num_stats : 64;
  for (uint32_t k = 0; k < n && k < capacity; ++k) values[k] = s.values[k];
  *num_stats = n;
  return 0;
}

const char* gpusvm_rt_device_stat_name(uint32_t index) {
  // Indexed by enum drm_refgpu_stat; the static_assert keeps the table and the enum together.
  static constexpr const char* kNames[] = {
      "faults_4k",          "faults_64k",           "faults_2m",
      "valid_faults",       "fault_errors",         "fault_us",
      "migrations_to_vram", "migrations_to_smem",   "migrate_us",
      "get_pages_us",       "bind_us",              "copy_bytes_to_vram",
      "copy_bytes_to_smem", "copy_us",              "tlb_invalidations",
      "tlb_invalidated_pages", "evictions",         "jobs",
      "job_errors",         "migrate_copies_to_vram", "migrate_copies_to_smem",
  };
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == REFGPU_STAT_COUNT, "a name per enum drm_refgpu_stat");
  return index < REFGPU_STAT_COUNT ? kNames[index] : nullptr;
}

}  // extern "C"
