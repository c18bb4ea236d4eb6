// RefgpuFile: one open refgpu device file (a drm_file with its xe_file state): the id tables
// of the objects the file created - VMs, exec queues, syncobjs, GEM handles - the ioctl entry
// point and the mmap of BOs.
//
// Design notes:
//  - Ids are allocated from 1 upwards per table and never reused while the file is open
//    (IdTable, id_table.h: an xarray with XA_FLAGS_ALLOC1 and a cyclic cursor that never
//    wraps in practice: 2^32 creations), so a stale id is -ENOENT and never names a newer
//    object.
//  - Objects are shared_ptrs: an ioctl takes a reference under the file lock and works with
//    no lock held; destroy removes the id first, so a concurrent ioctl either saw the object
//    before (and keeps it alive to its end) or gets -ENOENT.
//  - A FileVm holds the driver's Vm (vm.h). An exec queue translates through its VM's MMU,
//    so a VM with queues cannot be destroyed (-EBUSY) and release destroys queues before
//    VMs.
//  - GEM handles (drm_gem_handle_create / drm_gem_handle_delete): a FileBo per handle, from 1
//    and never reused, holding a counted reference (BoRef). GEM_CLOSE drops the handle and its
//    reference only: a VM binding keeps its own BoRef, and a CPU mapping keeps the BO's shmem
//    object (the VMA's file), so both outlive the handle. A second table maps each BO's fake
//    mmap offset to it (the drm_vma_offset_manager of the file: an mmap of the device fd
//    resolves only BOs this file has a handle for, as drm_vma_node_is_allowed).
//  - Release (the destructor): destroys every exec queue (queued jobs -ECANCELED, a running
//    one stops), then drops VMs, syncobjs and GEM handles. Works on a removed device.
//
// Locking: lock_ (kRefgpuFileLockClass, a leaf) guards the tables; nothing is called under it.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>

#include "drivers/devfs/device.h"
#include "drivers/refgpu/bo.h"
#include "drivers/refgpu/device.h"
#include "drivers/refgpu/engine.h"
#include "drivers/refgpu/fence.h"
#include "drivers/refgpu/gpu_mmu.h"
#include "drivers/refgpu/gpu_page_table.h"
#include "drivers/refgpu/id_table.h"
#include "drivers/refgpu/tlb.h"
#include "drivers/refgpu/vm.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/address_space.h"

namespace gpusvm::refgpu {

// A VM of the file: the driver's Vm (vm.h) and what keeps it valid - the address space it
// mirrors (the Vm points at it) - under the file's uapi id. The device's VM table refers to
// the Vm through this object (an aliasing shared_ptr), so a fault service that found the Vm
// keeps the address space too; the destructor takes the VM out of the table first.
struct FileVm {
  FileVm(RefgpuDevice* dev, uint32_t id, uint32_t asid, std::shared_ptr<mm::AddressSpace> mm)
      : dev(dev), id(id), asid(asid), mm(std::move(mm)) {}
  ~FileVm();
  bool lr_mode() const { return vm->flags() & REFGPU_VM_CREATE_FLAG_LR_MODE; }
  bool fault_mode() const { return vm->fault_mode(); }

  RefgpuDevice* const dev;
  const uint32_t id;    // the file's uapi id
  const uint32_t asid;  // the device-wide id the MMU, fault unit and fault records know
  const std::shared_ptr<mm::AddressSpace> mm;  // declared before vm: outlives it
  std::unique_ptr<Vm> vm;
  std::atomic<int> queues{0};  // exec queues on this VM (vm_destroy: -EBUSY while > 0)
  // Deferred vm_binds of this VM, in order, on the device's bind engine. Its jobs hold a
  // reference to this FileVm: vm_destroy and file release destroy the queue (pending binds
  // end -ECANCELED), which breaks that cycle.
  std::shared_ptr<ExecQueue> bind_queue;
};

struct FileExecQueue {
  uint32_t id = 0;
  std::shared_ptr<FileVm> vm;
  Engine* engine = nullptr;
  std::shared_ptr<ExecQueue> q;
  // The first error a job of this queue ended with (0: none): the queue is "banned" for
  // wait_user_fence's -EIO, as Xe's xe_exec_queue_is_banned.
  std::atomic<int> error{0};
};

// A GEM handle's object. vm_id: the VM it is private to (GEM_CREATE's vm_id: only that VM may
// bind it), or 0. An id, not a reference: the BO must not keep a destroyed VM alive, and ids
// are never reused, so a BO private to a destroyed VM can never be bound again.
struct FileBo {
  uint32_t handle = 0;
  BoRef bo;
  uint32_t vm_id = 0;
};

struct Syncobj {
  // The fence it holds (drm_syncobj_replace_fence); null until something signals into it.
  // Guarded by the file lock.
  std::shared_ptr<Fence> fence;
};

class RefgpuFile final : public devfs::File {
 public:
  RefgpuFile(std::shared_ptr<RefgpuDevice> dev, std::shared_ptr<mm::AddressSpace> mm)
      : dev_(std::move(dev)), mm_(std::move(mm)) {}
  ~RefgpuFile() override;
  RefgpuFile(const RefgpuFile&) = delete;
  RefgpuFile& operator=(const RefgpuFile&) = delete;

  // devfs::File: drm_ioctl (ioctl.cc).
  int ioctl(devfs::Process& caller, unsigned long request, void* arg) override;
  // devfs::File: drm_gem_mmap (ioctl_gem.cc): vma's offset must fall in a BO of this file
  // whose GEM_MMAP_OFFSET was asked (which moved it to system memory for good), and the
  // mapping must fit in it (-EINVAL otherwise); the VMA then maps the BO's shmem object as a
  // MAP_SHARED file mapping, faulted in by the mm like any shmem mapping. Context: the mmap
  // lock held for write (the file lock, a leaf, is taken under it).
  int mmap(devfs::Process& caller, mm::Vma& vma) override;

  RefgpuDevice& dev() { return *dev_; }
  mm::AddressSpace& mm() { return *mm_; }
  std::shared_ptr<mm::AddressSpace> mm_ref() { return mm_; }

  // Id tables. reserve_*_id: a fresh id (never handed out before; 0 when 2^32 - 1 ids were
  // used). insert_*: publishes the object under its id. find_*: null for an unknown id.
  // remove_*: the object, or null. Context: no lock held (they take lock_).
  uint32_t reserve_vm_id() GPUSVM_EXCLUDES(lock_);
  void insert_vm(std::shared_ptr<FileVm> vm) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileVm> find_vm(uint32_t id) GPUSVM_EXCLUDES(lock_);
  // Removes the VM unless it has exec queues: 0, -ENOENT, -EBUSY.
  int remove_vm(uint32_t id) GPUSVM_EXCLUDES(lock_);

  uint32_t reserve_exec_queue_id() GPUSVM_EXCLUDES(lock_);
  void insert_exec_queue(std::shared_ptr<FileExecQueue> q) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileExecQueue> find_exec_queue(uint32_t id) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileExecQueue> remove_exec_queue(uint32_t id) GPUSVM_EXCLUDES(lock_);

  uint32_t add_syncobj(std::shared_ptr<Syncobj> s) GPUSVM_EXCLUDES(lock_);  // 0: ids spent
  std::shared_ptr<Syncobj> find_syncobj(uint32_t id) GPUSVM_EXCLUDES(lock_);
  bool remove_syncobj(uint32_t id) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<Fence> syncobj_fence(const Syncobj& s) GPUSVM_EXCLUDES(lock_);
  void syncobj_replace_fence(Syncobj& s, std::shared_ptr<Fence> f) GPUSVM_EXCLUDES(lock_);

  // GEM handles. add_bo: publishes the BO under a fresh handle (0 when the ids are spent).
  // find_bo: null for an unknown handle. remove_bo: the handle's object, or null.
  // find_bo_by_offset: the BO whose [mmap_offset, + size) contains offset, or null.
  uint32_t add_bo(BoRef bo, uint32_t vm_id) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileBo> find_bo(uint32_t handle) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileBo> remove_bo(uint32_t handle) GPUSVM_EXCLUDES(lock_);
  std::shared_ptr<FileBo> find_bo_by_offset(uint64_t offset) GPUSVM_EXCLUDES(lock_);

  // For tests: the number of live objects in each table.
  size_t num_vms() GPUSVM_EXCLUDES(lock_);
  size_t num_exec_queues() GPUSVM_EXCLUDES(lock_);
  size_t num_syncobjs() GPUSVM_EXCLUDES(lock_);
  size_t num_bos() GPUSVM_EXCLUDES(lock_);

 private:
  const std::shared_ptr<RefgpuDevice> dev_;
  const std::shared_ptr<mm::AddressSpace> mm_;
  Mutex lock_{&kRefgpuFileLockClass};
  // The id tables (id_table.h: ids from 1, never reused).
  IdTable<FileVm> vms_ GPUSVM_GUARDED_BY(lock_);
  IdTable<FileExecQueue> queues_ GPUSVM_GUARDED_BY(lock_);
  IdTable<Syncobj> syncobjs_ GPUSVM_GUARDED_BY(lock_);
  IdTable<FileBo> bos_ GPUSVM_GUARDED_BY(lock_);
  std::map<uint64_t, std::shared_ptr<FileBo>> bo_offsets_ GPUSVM_GUARDED_BY(lock_);  // by mmap_offset
};

}  // namespace gpusvm::refgpu
