// Process: a simulated user process - one address space (mm_struct) and one fd table - and
// the system calls on device files: open, ioctl, close (DESIGN.md §2).
//
// Ownership: the Process owns its address space through a shared_ptr; device files that
// mirror it hold a reference too (mmgrab: the AddressSpace object stays valid until the last
// file is closed, its mappings go at exit). The fd table holds shared references to Files.
//
// Exit (destructor or exit()): the address space exits first (RELEASE to its notifiers, then
// every mapping is unmapped), then the fd table is closed - the order of Linux's do_exit
// (exit_mm before exit_files).
//
// Locking: fd_lock_ (a leaf) guards the fd table; no driver code runs under it, so a file's
// release (destructor) runs after it is dropped.
#pragma once

#include <memory>
#include <string_view>
#include <vector>

#include "drivers/devfs/device.h"
#include "drivers/devfs/registry.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/mm/address_space.h"

namespace gpusvm::devfs {


class Process {
 public:
  // A new process with an empty address space on `mem` that sees the devices of `devices`
  // (which must outlive it). Errors: -EINVAL (null argument), -ENOMEM.
  static Result<std::unique_ptr<Process>> create(mm::PhysMem* mem, DeviceRegistry* devices);
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // fork(2): a child whose address space is AddressSpace::fork() of this one and whose fd
  // table refers to the same open files (the child's dup of each fd). Errors from the mm fork.
  Result<std::unique_ptr<Process>> fork();
  // exit(2): address space exit, then every fd closed. Idempotent.
  void exit();

  mm::AddressSpace& mm() { return *mm_; }
  // A reference that keeps the AddressSpace object alive (mmgrab), for device files.
  std::shared_ptr<mm::AddressSpace> mm_ref() { return mm_; }
  DeviceRegistry& devices() { return *devices_; }

  // The fd table (used by the system calls below).
  Result<int> fd_install(std::shared_ptr<File> file) GPUSVM_EXCLUDES(fd_lock_);
  std::shared_ptr<File> fd_get(int fd) const GPUSVM_EXCLUDES(fd_lock_);  // fget
  std::shared_ptr<File> fd_remove(int fd) GPUSVM_EXCLUDES(fd_lock_);

  static constexpr int kMaxFds = 1024;

 private:
  Process(std::shared_ptr<mm::AddressSpace> mm, DeviceRegistry* devices)
      : mm_(std::move(mm)), devices_(devices) {}

  const std::shared_ptr<mm::AddressSpace> mm_;
  DeviceRegistry* const devices_;
  mutable SpinLock fd_lock_{&kFdTableLockClass};
  std::vector<std::shared_ptr<File>> fds_ GPUSVM_GUARDED_BY(fd_lock_);  // index = fd
};

// open(2) of device `name` in process p. Returns the lowest free fd, or -ENOENT (no such
// device), -EMFILE (fd table full), or the driver's open error.
Result<int> open(std::string_view name, Process& p);
// ioctl(2): dispatches to the file's driver. Returns 0 or a negative errno; -EBADF for a
// closed fd. The file stays open for the call even if another thread closes the fd.
int ioctl(Process& p, int fd, unsigned long request, void* arg);
// mmap(2) of device file fd in p's address space: AddressSpace::mmap_device with the file's
// mmap hook (File::mmap). The file is held for the call (fget); the mapping does not keep it
// open afterwards (see Vma::vm_file). Returns the address, or -EBADF (closed fd), -ENODEV (the
// driver has no mmap), mmap's argument errors, or the driver's error.
Result<mm::Va> mmap(Process& p, mm::Va addr, uint64_t len, int prot, int flags, int fd,
                    uint64_t offset = 0);
// close(2). -EBADF for a closed fd. The driver's release runs when the last reference to the
// file goes (this call, or the end of an ioctl in flight, or the last forked copy).
int close(Process& p, int fd);

}  // namespace gpusvm::devfs
