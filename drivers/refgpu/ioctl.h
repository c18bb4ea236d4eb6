// The refgpu ioctl layer: drm_ioctl's dispatch for the driver's request table, user copies,
// and the handlers (ioctl_*.cc), one per request of uapi/refgpu.h.
//
// Dispatch (RefgpuFile::ioctl, ioctl.cc), in this order:
//  1. the request must be a DRM driver request (type 'd', nr in [DRM_COMMAND_BASE,
//     DRM_COMMAND_BASE + table size)) whose whole encoding - direction and size included -
//     equals the table's: -EINVAL otherwise (drm_ioctl's answer for an nr beyond the table;
//     refgpu is stricter than drm_ioctl about the size, which it zero-extends for older
//     userspace: there is one revision of this uapi);
//  2. the device must be present (drm_dev_enter): -ENODEV after removal;
//  3. the argument struct is copied in (copy_from_user: -EFAULT for a bad pointer);
//  4. the handler validates every field before it changes anything, does the work and
//     fills the struct; for a request with the write direction (DRM_IOWR) the struct is
//     copied back on success only (-EFAULT if that fails).
//
// User memory: argument structs and the arrays they point to are the caller's program's
// memory (the host memory of the simulated process), copied like copy_from_user /
// copy_to_user. A user pointer below kUserMinAddr (the zero page and below mmap_min_addr)
// or whose range wraps is -EFAULT, as an unmapped address is to the kernel; anything else
// is trusted to be the caller's memory (the simulation cannot probe host memory; the
// fuzzer redirects every pointer into its own buffer or below kUserMinAddr).
//
// What the device reads and writes - batches, user fences, data - is process memory: the
// GPU MMU for engines, the CPU-access API (gpusvm/mm/cpu_access.h) for the driver's own
// user-fence writes and wait_user_fence reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "drivers/devfs/process.h"
#include "drivers/refgpu/file.h"
#include "uapi/refgpu.h"

namespace gpusvm::refgpu {

inline constexpr uint64_t kUserMinAddr = 4096;
inline constexpr uint32_t kMaxSyncs = 64;
inline constexpr uint32_t kMaxSyncobjWait = 64;

// copy_from_user / copy_to_user: 0 or -EFAULT (see above). len 0 always succeeds.
[[nodiscard]] int copy_from_user(void* dst, uint64_t uptr, size_t len);
[[nodiscard]] int copy_to_user(uint64_t uptr, const void* src, size_t len);

// True when every word is zero (reserved fields, pads).
template <typename T, size_t N>
bool all_zero(const T (&a)[N]) {
  for (const T& v : a)
    if (v) return false;
  return true;
}

// A validated drm_refgpu_sync (parse_syncs).
struct SyncEntry {
  uint32_t type = 0;
  bool signal = false;
  std::shared_ptr<Syncobj> syncobj;  // SYNCOBJ
  uint64_t addr = 0;                 // USER_FENCE
  uint64_t value = 0;
};

// xe_sync_entry_parse for every sync of an array in user memory: copies them in and checks
// every field. lr: the VM is in LR mode (a SYNCOBJ cannot signal: -EOPNOTSUPP). Errors:
// -EINVAL (count above kMaxSyncs, extensions, flags, type, alignment, reserved), -EFAULT,
// -ENOENT (unknown syncobj), -EOPNOTSUPP.
[[nodiscard]] int parse_syncs(RefgpuFile& file, uint64_t uptr, uint32_t count, bool lr,
                              std::vector<SyncEntry>* out);
// The fences of the in-syncobjs of syncs, the operation's dependencies (see ioctl_exec.cc).
// 0, -EINVAL (a syncobj without a fence).
[[nodiscard]] int collect_in_fences(RefgpuFile& file, const std::vector<SyncEntry>& syncs,
                                    std::vector<std::shared_ptr<Fence>>* out);
// The out-syncs of a job: SYNCOBJ signal entries get the job's fence; USER_FENCE entries
// write their value at the job's end (a fence callback, through the CPU-access API) and wake
// user-fence waiters. The callback keeps the address space and the device alive.
void attach_out_syncs(RefgpuFile& file, const std::vector<SyncEntry>& syncs,
                      const std::shared_ptr<Fence>& fence);

// The handlers: arg is the kernel copy of the argument struct. Each returns 0 or a negative
// errno with nothing changed.
int ioctl_device_query(RefgpuFile& f, devfs::Process& caller, drm_refgpu_device_query* a);
int ioctl_gem_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_create* a);
int ioctl_gem_mmap_offset(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_mmap_offset* a);
int ioctl_gem_close(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_close* a);
int ioctl_vm_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_create* a);
int ioctl_vm_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_destroy* a);
int ioctl_exec_queue_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec_queue_create* a);
int ioctl_exec_queue_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec_queue_destroy* a);
int ioctl_exec(RefgpuFile& f, devfs::Process& caller, drm_refgpu_exec* a);
int ioctl_wait_user_fence(RefgpuFile& f, devfs::Process& caller, drm_refgpu_wait_user_fence* a);
int ioctl_syncobj_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_create* a);
int ioctl_syncobj_destroy(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_destroy* a);
int ioctl_syncobj_wait(RefgpuFile& f, devfs::Process& caller, drm_refgpu_syncobj_wait* a);
int ioctl_vm_bind(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_bind* a);
int ioctl_madvise(RefgpuFile& f, devfs::Process& caller, drm_refgpu_madvise* a);
int ioctl_query_mem_range_attrs(RefgpuFile& f, devfs::Process& caller, drm_refgpu_vm_query_mem_range_attr* a);
int ioctl_fault_query(RefgpuFile& f, devfs::Process& caller, drm_refgpu_fault_query* a);

}  // namespace gpusvm::refgpu
