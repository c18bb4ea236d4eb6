// Process: a simulated user process - one address space (mm_struct) and one fd table - and
// the system calls on device files: open, ioctl, close (DESIGN.md §2).
//
// Ownership: the Process owns its address space through a shared_ptr; device files that
// mirror it hold a reference too (mmgrab: the AddressSpace object stays valid until the last
// file is closed, its mappings go at exit). The fd table holds shared references to Files.
//
// Exit (exit(), kill(), the end of a forked child's main, or the destructor): the address
// space exits first (RELEASE to its notifiers, then every mapping is unmapped), then the fd
// table is closed - the order of Linux's do_exit (exit_mm before exit_files). The first of
// them records how the process ended (ExitStatus); wait() reports it, as waitpid(2) does.
//
// Locking: fd_lock_ (a leaf) guards the fd table; no driver code runs under it, so a file's
// release (destructor) runs after it is dropped. status_lock_ (a leaf) guards the exit state.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "drivers/devfs/device.h"
#include "drivers/devfs/registry.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/waitqueue.h"
#include "gpusvm/mm/address_space.h"

namespace gpusvm::devfs {

// How a process ended: what waitpid(2) reports through WIFEXITED/WEXITSTATUS and
// WIFSIGNALED/WTERMSIG.
struct ExitStatus {
  enum class Kind : uint8_t { kExited, kKilled };
  Kind kind = Kind::kExited;
  int code = 0;    // kExited: the exit status, 0-255
  int signal = 0;  // kKilled: the signal that killed it (SIGKILL, SIGSEGV, SIGBUS)
  // kKilled by a fault: the negative errno of the access that faulted (-EFAULT...); 0 when
  // the signal came from kill().
  int fault = 0;

  static ExitStatus exited_with(int code) { return {Kind::kExited, code & 0xff, 0, 0}; }
  static ExitStatus killed_by(int sig, int fault = 0) { return {Kind::kKilled, 0, sig, fault}; }
  // The status of a process whose main returned rc: rc >= 0 is an exit status; a negative
  // errno is a fault that kills it as the CPU's exception would: -EFAULT (the CPU-access API's
  // SIGSEGV and SIGBUS: no VMA, no permission, no backing page) -> SIGSEGV, -EINVAL (a
  // misaligned atomic: alignment check) -> SIGBUS, anything else (-ENOMEM: the OOM killer,
  // -EBUSY: a fault that never resolved) -> SIGKILL.
  static ExitStatus from_main(int rc);
  bool exited() const { return kind == Kind::kExited; }
  bool killed() const { return kind == Kind::kKilled; }
  // "exited 0", "killed by SIGKILL", "killed by SIGSEGV (fault -EFAULT)".
  std::string to_string() const;
  bool operator==(const ExitStatus&) const = default;
};

class Process {
 public:
  // A forked child's main thread: runs with the child as the process it acts for and returns
  // what ExitStatus::from_main turns into its status (an exit status, or the negative errno
  // of the access that killed it). It must return once its process was killed: then its
  // address space is empty and every CPU access fails with -EFAULT.
  using Main = std::function<int(Process&)>;

  // A new process with an empty address space on `mem` that sees the devices of `devices`
  // (which must outlive it). Errors: -EINVAL (null argument), -ENOMEM.
  static Result<std::unique_ptr<Process>> create(mm::PhysMem* mem, DeviceRegistry* devices);
  // Kills the process if it has not ended (SIGKILL), then waits for its main thread. A main
  // that does not return within hang_timeout() is a bug: panics naming it rather than hang.
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // fork(2): a child whose address space is AddressSpace::fork() of this one and whose fd
  // table refers to the same open files (the child's dup of each fd). Errors from the mm fork.
  // The caller drives the child (it has no thread of its own) and ends it with exit/kill.
  Result<std::unique_ptr<Process>> fork();
  // fork(2), and the child runs `main` on a thread of its own (started before this returns);
  // when main returns the child ends with ExitStatus::from_main of its result. Collect it
  // with wait(). Errors: -EINVAL (null main), those of fork().
  Result<std::unique_ptr<Process>> fork(Main main);
  // exit(2) / exit_group: ends the process with exit status `code` (& 0xff): address space
  // exit, then every fd closed. Only the first of exit/kill/the end of main records the
  // status; later calls change nothing. A main thread still running sees its accesses fail
  // and must return; wait() waits for it.
  void exit(int code = 0);
  // A fatal signal from outside (kill(2)): ends the process as exit() does, with status
  // "killed by sig". Returns 0, or -EINVAL for a signal number outside 1..64.
  int kill(int sig);
  // waitpid(2): sleeps until the process ended - status recorded, teardown done, its main
  // thread (if any) returned and joined - or `timeout` passed. Returns the status, or
  // -ETIMEDOUT with nothing changed (wait again, or kill() first). The process is not reaped:
  // every later call returns the same status until the object is destroyed. Context: no
  // gpusvm lock held; may sleep. Any thread but the process's own main thread may call it.
  Result<ExitStatus> wait(std::chrono::milliseconds timeout);
  // waitpid(WNOHANG): the status once the process ended as wait() defines it, else nullopt.
  std::optional<ExitStatus> exit_status() const GPUSVM_EXCLUDES(status_lock_);

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
  // do_exit: records `status` if the process has not ended yet, then tears it down.
  void do_exit(const ExitStatus& status) GPUSVM_EXCLUDES(status_lock_, fd_lock_);
  // The main thread's body: main, then do_exit with its result.
  void run_main(const Main& main) GPUSVM_EXCLUDES(status_lock_);
  bool ended_locked() const GPUSVM_REQUIRES(status_lock_) {
    status_lock_.assert_held();
    return status_.has_value() && torn_down_ && !main_running_;
  }

  const std::shared_ptr<mm::AddressSpace> mm_;
  DeviceRegistry* const devices_;
  mutable SpinLock fd_lock_{&kFdTableLockClass};
  std::vector<std::shared_ptr<File>> fds_ GPUSVM_GUARDED_BY(fd_lock_);  // index = fd

  mutable SpinLock status_lock_{&kProcessStatusLockClass};
  std::optional<ExitStatus> status_ GPUSVM_GUARDED_BY(status_lock_);  // set once, by the first ender
  bool torn_down_ GPUSVM_GUARDED_BY(status_lock_) = false;  // mm exited and fds closed
  bool main_running_ GPUSVM_GUARDED_BY(status_lock_) = false;  // main has not returned yet
  WaitQueue ended_wq_;  // woken when torn_down_ or main_running_ changes
  // Set in fork(Main) before the child is returned and joined once (join_once_) by wait() or
  // the destructor; not touched otherwise.
  std::thread main_thread_;
  std::once_flag join_once_;
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
