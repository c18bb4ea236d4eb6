// Machine: one simulated computer - physical memory, "/dev" (the device registry), the devices
// in it and the processes running on it - with the teardown in the only order that works.
// A program or a test framework other than GoogleTest sets one up in a few lines:
//
//   Result<std::unique_ptr<devfs::Machine>> m = devfs::Machine::create({.ram_bytes = 256ULL << 20});
//   if (!m || !dmirror::add_unit(**m, 0)) return 1;  // "hmm_dmirror0" (drivers/dmirror)
//   Result<devfs::Process*> p = (*m)->create_process();
//   Result<int> fd = devfs::open(dmirror::unit_name(0), **p);
//   ... mmap, CPU accesses, ioctls; (*m)->fork(**p, main) and child->wait(timeout) ...
//   // ~Machine: processes end, devices go, memory last
// tests/install/consumer/main.cc is a complete program.
//
// Teardown (shutdown(), or the destructor), in order:
//   1. exit_processes(): every process still running is killed (newest first, so forked
//      children go before their parents) and waited for; its address space exits (device
//      pages mapped there are freed or migrated back) and its fds close (driver release);
//   2. remove_devices(): every device is unregistered (newest first) and the machine drops
//      its reference; a device nobody else holds is destroyed here, after every process that
//      could map its memory is gone;
//   3. the PhysMem goes with the Machine, after everything that held its frames.
// The steps are public so a harness can check the machine between them (mm::check after the
// processes exited, "no device page in use" before the devices go).
//
// Ownership: the Machine owns its PhysMem, its processes (create_process, fork) and a
// reference to each device; Process pointers it returns stay valid until it is destroyed
// (an ended process stays as a zombie whose status wait() reports).
//
// Locking: lock_ (a leaf) guards the process and device lists; no process or driver code runs
// under it. The calls may be made from several threads, except the teardown steps, which the
// caller must not race with create_process/fork/add_device.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "drivers/devfs/device.h"
#include "drivers/devfs/process.h"
#include "drivers/devfs/registry.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::devfs {


class Machine {
 public:
  // A machine with the memory `mem` describes, no device and no process. Errors:
  // PhysMem::create's (-EINVAL for a bad size, -ENOMEM).
  static Result<std::unique_ptr<Machine>> create(const mm::PhysMem::Config& mem);
  ~Machine();  // shutdown()
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  mm::PhysMem& mem() { return *mem_; }
  DeviceRegistry& devices() { return devices_; }

  // Registers `dev` as "/dev/<name>"; the machine keeps a reference until remove_devices().
  // Errors: DeviceRegistry::add's (-EINVAL, -EEXIST).
  [[nodiscard]] int add_device(std::string name, std::shared_ptr<Device> dev)
      GPUSVM_EXCLUDES(lock_);
  // A new process with an empty address space (a program started by init). Errors:
  // Process::create's (-ENOMEM).
  Result<Process*> create_process() GPUSVM_EXCLUDES(lock_);
  // fork(2) of `parent` (a process of this machine); the machine owns the child. With a main,
  // the child runs it on a thread of its own (Process::fork(Main)); collect its status with
  // child->wait(). Errors: Process::fork's.
  Result<Process*> fork(Process& parent, Process::Main main = nullptr) GPUSVM_EXCLUDES(lock_);

  // Teardown step 1: kills every process that has not ended (newest first) and waits for each
  // up to `timeout`. Returns 0, or -ETIMEDOUT when a process's main thread did not return in
  // time (that process stays; the destructor waits for it again and panics if it never ends).
  // Context: no gpusvm lock held; may sleep.
  int exit_processes(std::chrono::milliseconds timeout = std::chrono::seconds(30))
      GPUSVM_EXCLUDES(lock_);
  // Teardown step 2: unregisters every device added with add_device (newest first) and drops
  // the machine's references. Call after exit_processes(). Context: as above.
  void remove_devices() GPUSVM_EXCLUDES(lock_);
  // Both steps. Idempotent. Returns exit_processes()'s result.
  int shutdown() GPUSVM_EXCLUDES(lock_);

 private:
  explicit Machine(std::unique_ptr<mm::PhysMem> mem) : mem_(std::move(mem)) {}
  Process* adopt(std::unique_ptr<Process> p) GPUSVM_EXCLUDES(lock_);

  // Declared first: destroyed last, after the processes and the devices.
  const std::unique_ptr<mm::PhysMem> mem_;
  DeviceRegistry devices_;
  SpinLock lock_{&kMachineLockClass};
  std::vector<std::unique_ptr<Process>> processes_ GPUSVM_GUARDED_BY(lock_);  // creation order
  std::vector<std::pair<std::string, std::shared_ptr<Device>>> added_ GPUSVM_GUARDED_BY(lock_);
};

}  // namespace gpusvm::devfs
