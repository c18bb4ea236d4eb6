// DRM_IOCTL_REFGPU_FAULT_QUERY: the fault unit's records of one VM (FaultQueue::records).
#include <algorithm>
#include <cerrno>
#include <cstring>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

int ioctl_fault_query(RefgpuFile& f, devfs::Process& caller, drm_refgpu_fault_query* a) {
  (void)caller;
  if (a->extensions || a->pad || !all_zero(a->reserved)) return -EINVAL;
  if (a->flags & ~REFGPU_FAULT_QUERY_FLAG_CLEAR) return -EINVAL;
  std::shared_ptr<FileVm> vm = f.find_vm(a->vm_id);
  if (!vm) return -ENOENT;
  if (a->num_faults == 0) {  // count only; CLEAR is ignored (nothing is returned)
    a->num_faults = static_cast<uint32_t>(f.dev().fault_queue().records(vm->asid, false).size());
    return 0;
  }
  if (a->num_faults > FaultQueue::kRecords) return -EINVAL;
  // Check the destination before anything is dropped: a failed copy must not lose records.
  const size_t cap = a->num_faults;
  std::vector<drm_refgpu_fault_record> out(cap);
  if (copy_to_user(a->faults, out.data(), cap * sizeof(drm_refgpu_fault_record))) return -EFAULT;
  // CLEAR drops every record of the VM, so the caller passes a capacity of at least the
  // count (a larger ring than the capacity loses the newest records).
  std::vector<FaultRecord> recs = f.dev().fault_queue().records(vm->asid, a->flags & REFGPU_FAULT_QUERY_FLAG_CLEAR);
  const size_t n = std::min(cap, recs.size());
  for (size_t i = 0; i < n; i++) {
    const FaultRecord& r = recs[i];
    drm_refgpu_fault_record& o = out[i];
    o.address = r.fault.address;
    o.vm_id = vm->id;
    o.exec_queue_id = r.fault.exec_queue_id;
    o.access = r.fault.access == Access::kRead    ? REFGPU_ACCESS_READ
               : r.fault.access == Access::kWrite ? REFGPU_ACCESS_WRITE
                                                  : REFGPU_ACCESS_ATOMIC;
    o.fault_type = r.fault.type == FaultType::kNotPresent ? REFGPU_FAULT_TYPE_NOT_PRESENT : REFGPU_FAULT_TYPE_PERMISSION;
    o.engine_instance = r.fault.engine;
    o.status = r.status;
    o.timestamp_ns = r.timestamp_ns;
  }
  if (copy_to_user(a->faults, out.data(), n * sizeof(drm_refgpu_fault_record))) return -EFAULT;
  a->num_faults = static_cast<uint32_t>(n);
  return 0;
}

}  // namespace gpusvm::refgpu
