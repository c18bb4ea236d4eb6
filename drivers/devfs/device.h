// Device files: what a driver implements to appear under a name in a DeviceRegistry ("/dev").
//
// Ownership: a Device is shared (std::shared_ptr) by the registry and by every File it opened
// (a file keeps its driver alive, like a module reference). A File is shared by the fd tables
// that hold it (fork duplicates fds) and by every ioctl in flight on it (fget/fput): the
// driver's release runs in the File's destructor when the last of them lets go, in the thread
// that dropped it, with no gpusvm lock held.
#pragma once

#include <cerrno>
#include <memory>

#include "gpusvm/base/result.h"
#include "gpusvm/mm/vma.h"

namespace gpusvm::devfs {

class Process;

class File {
 public:
  virtual ~File() = default;  // the driver's release
  // One request on this file. `caller` is the process issuing the ioctl (current), which is
  // not necessarily the one that opened the file. arg points to the request's argument
  // struct in the caller's memory. Context: no gpusvm lock held; may sleep. Returns 0 or a
  // negative errno (-EINVAL for an unknown request).
  virtual int ioctl(Process& caller, unsigned long request, void* arg) = 0;
  // Optional (file_operations.mmap): sets up `vma`, a new mapping of this file in caller's
  // address space (caller.mm()), typically by inserting pages with mm::vm_insert_page.
  // Context: caller's mmap lock held for write, no other gpusvm lock; may allocate; must not
  // take the mmap lock or call into gpusvm/mm functions that do. Returns 0 or a negative
  // errno, after which the mapping is removed again. The default refuses: -ENODEV, as Linux
  // for a file without an mmap op.
  virtual int mmap(Process& caller, mm::Vma& vma) {
    (void)caller;
    (void)vma;
    return -ENODEV;
  }
};

class Device {
 public:
  virtual ~Device() = default;
  // Opens the device for `opener` (the file captures opener's address space, as a DRM file
  // captures current->mm). Context: no gpusvm lock held; may sleep.
  virtual Result<std::shared_ptr<File>> open(Process& opener) = 0;
};

}  // namespace gpusvm::devfs
