#include "drivers/devfs/machine.h"

#include <cerrno>
#include <csignal>

namespace gpusvm::devfs {

Result<std::unique_ptr<Machine>> Machine::create(const mm::PhysMem::Config& mem) {
  Result<std::unique_ptr<mm::PhysMem>> m = mm::PhysMem::create(mem);
  if (!m) return Err{m.error()};
  return std::unique_ptr<Machine>(new Machine(std::move(*m)));
}

Machine::~Machine() { (void)shutdown(); }

int Machine::add_device(std::string name, std::shared_ptr<Device> dev) {
  if (int rc = devices_.add(name, dev)) return rc;
  SpinLockGuard g(&lock_);
  added_.emplace_back(std::move(name), std::move(dev));
  return 0;
}

Process* Machine::adopt(std::unique_ptr<Process> p) {
  Process* raw = p.get();
  SpinLockGuard g(&lock_);
  processes_.push_back(std::move(p));
  return raw;
}

Result<Process*> Machine::create_process() {
  Result<std::unique_ptr<Process>> p = Process::create(mem_.get(), &devices_);
  if (!p) return Err{p.error()};
  return adopt(std::move(*p));
}

Result<Process*> Machine::fork(Process& parent, Process::Main main) {
  Result<std::unique_ptr<Process>> child = main ? parent.fork(std::move(main)) : parent.fork();
  if (!child) return Err{child.error()};
  return adopt(std::move(*child));
}

int Machine::exit_processes(std::chrono::milliseconds timeout) {
  // A snapshot: killing and waiting run driver code (file release), never under lock_.
  std::vector<Process*> procs;
  {
    SpinLockGuard g(&lock_);
    for (const std::unique_ptr<Process>& p : processes_) procs.push_back(p.get());
  }
  int rc = 0;
  for (auto it = procs.rbegin(); it != procs.rend(); ++it) {
    (void)(*it)->kill(SIGKILL);  // no-op for a process that already ended
    if (!(*it)->wait(timeout)) rc = -ETIMEDOUT;
  }
  return rc;
}

void Machine::remove_devices() {
  std::vector<std::pair<std::string, std::shared_ptr<Device>>> added;
  {
    SpinLockGuard g(&lock_);
    added.swap(added_);
  }
  for (auto it = added.rbegin(); it != added.rend(); ++it) {
    (void)devices_.remove(it->first);  // -ENOENT if the caller removed it already
    it->second.reset();  // the device's destructor runs here if nobody else holds it
  }
}

int Machine::shutdown() {
  const int rc = exit_processes();
  remove_devices();
  return rc;
}

}  // namespace gpusvm::devfs
