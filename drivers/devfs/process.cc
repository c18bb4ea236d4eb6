#include "drivers/devfs/process.h"

#include <cerrno>
#include <csignal>
#include <cstring>

#include <fmt/format.h>

#include "gpusvm/base/errno.h"

namespace gpusvm::devfs {

ExitStatus ExitStatus::from_main(int rc) {
  if (rc >= 0) return exited_with(rc);
  const int sig = rc == -EFAULT ? SIGSEGV : rc == -EINVAL ? SIGBUS : SIGKILL;
  return killed_by(sig, rc);
}

std::string ExitStatus::to_string() const {
  if (exited()) return fmt::format("exited {}", code);
  const char* name = sigabbrev_np(signal);
  std::string s = fmt::format("killed by {}", name ? fmt::format("SIG{}", name) : std::to_string(signal));
  if (fault) s += fmt::format(" (fault {})", errno_name(fault));
  return s;
}

Result<std::unique_ptr<Process>> Process::create(mm::PhysMem* mem, DeviceRegistry* devices) {
  if (!mem || !devices) return Err{-EINVAL};
  Result<std::unique_ptr<mm::AddressSpace>> as = mm::AddressSpace::create(mem);
  if (!as) return Err{as.error()};
  return std::unique_ptr<Process>(
      new Process(std::shared_ptr<mm::AddressSpace>(std::move(*as)), devices));
}

Process::~Process() {
  (void)kill(SIGKILL);  // nothing happens if it already ended
  // Bounded: a main that ignores its death would otherwise hang the caller forever.
  Result<ExitStatus> st = wait(hang_timeout());
  if (!st) panic("devfs: a process's main thread did not return after the process was killed");
}

Result<std::unique_ptr<Process>> Process::fork() {
  Result<std::unique_ptr<mm::AddressSpace>> child_mm = mm_->fork();
  if (!child_mm) return Err{child_mm.error()};
  std::unique_ptr<Process> child(
      new Process(std::shared_ptr<mm::AddressSpace>(std::move(*child_mm)), devices_));
  std::vector<std::shared_ptr<File>> copy;
  {
    SpinLockGuard g(&fd_lock_);
    copy = fds_;
  }
  SpinLockGuard g(&child->fd_lock_);
  child->fds_ = std::move(copy);
  return child;
}

Result<std::unique_ptr<Process>> Process::fork(Main main) {
  if (!main) return Err{-EINVAL};
  Result<std::unique_ptr<Process>> child = fork();
  if (!child) return child;
  Process* c = child->get();
  {
    SpinLockGuard g(&c->status_lock_);
    c->main_running_ = true;
  }
  c->main_thread_ = std::thread([c, main = std::move(main)] { c->run_main(main); });
  return child;
}

void Process::run_main(const Main& main) {
  const int rc = main(*this);
  do_exit(ExitStatus::from_main(rc));  // no-op if it was killed or exited meanwhile
  {
    SpinLockGuard g(&status_lock_);
    main_running_ = false;
  }
  ended_wq_.wake_all();
}

void Process::exit(int code) { do_exit(ExitStatus::exited_with(code)); }

int Process::kill(int sig) {
  if (sig < 1 || sig > 64) return -EINVAL;
  do_exit(ExitStatus::killed_by(sig));
  return 0;
}

void Process::do_exit(const ExitStatus& status) {
  {
    SpinLockGuard g(&status_lock_);
    if (status_) return;  // the first ender tears down; wait() waits for it to finish
    status_ = status;
  }
  mm_->exit();
  std::vector<std::shared_ptr<File>> closing;
  {
    SpinLockGuard g(&fd_lock_);
    closing.swap(fds_);
  }
  // Released here, outside fd_lock_: the last reference runs the driver's release.
  closing.clear();
  {
    SpinLockGuard g(&status_lock_);
    torn_down_ = true;
  }
  ended_wq_.wake_all();
}

Result<ExitStatus> Process::wait(std::chrono::milliseconds timeout) {
  const bool ended = ended_wq_.wait_for(
      [&] {
        SpinLockGuard g(&status_lock_);
        return ended_locked();
      },
      timeout);
  if (!ended) return Err{-ETIMEDOUT};
  // main returned: the join only waits for its thread to finish returning.
  std::call_once(join_once_, [&] {
    if (main_thread_.joinable()) main_thread_.join();
  });
  SpinLockGuard g(&status_lock_);
  return *status_;
}

std::optional<ExitStatus> Process::exit_status() const {
  SpinLockGuard g(&status_lock_);
  if (!ended_locked()) return std::nullopt;
  return status_;
}

Result<int> Process::fd_install(std::shared_ptr<File> file) {
  SpinLockGuard g(&fd_lock_);
  for (size_t i = 0; i < fds_.size(); i++) {
    if (!fds_[i]) {
      fds_[i] = std::move(file);
      return static_cast<int>(i);
    }
  }
  if (fds_.size() >= kMaxFds) return Err{-EMFILE};
  fds_.push_back(std::move(file));
  return static_cast<int>(fds_.size() - 1);
}

std::shared_ptr<File> Process::fd_get(int fd) const {
  SpinLockGuard g(&fd_lock_);
  if (fd < 0 || static_cast<size_t>(fd) >= fds_.size()) return nullptr;
  return fds_[fd];
}

std::shared_ptr<File> Process::fd_remove(int fd) {
  SpinLockGuard g(&fd_lock_);
  if (fd < 0 || static_cast<size_t>(fd) >= fds_.size()) return nullptr;
  return std::move(fds_[fd]);
}

Result<int> open(std::string_view name, Process& p) {
  std::shared_ptr<Device> dev = p.devices().find(name);
  if (!dev) return Err{-ENOENT};
  Result<std::shared_ptr<File>> file = dev->open(p);
  if (!file) return Err{file.error()};
  return p.fd_install(std::move(*file));
}

int ioctl(Process& p, int fd, unsigned long request, void* arg) {
  std::shared_ptr<File> file = p.fd_get(fd);
  if (!file) return -EBADF;
  return file->ioctl(p, request, arg);
}

Result<mm::Va> mmap(Process& p, mm::Va addr, uint64_t len, int prot, int flags, int fd,
                    uint64_t offset) {
  std::shared_ptr<File> file = p.fd_get(fd);
  if (!file) return Err{-EBADF};
  return p.mm().mmap_device(addr, len, prot, flags, file.get(),
                            [&](mm::Vma& vma) {
                              // File::mmap's contract; the hook is reached through a
                              // std::function, which the analysis cannot follow.
                              p.mm().mmap_assert_write_locked();
                              return file->mmap(p, vma);
                            },
                            offset);
}

int close(Process& p, int fd) {
  std::shared_ptr<File> file = p.fd_remove(fd);
  if (!file) return -EBADF;
  file.reset();  // release, unless an ioctl in flight or a forked fd still holds it
  return 0;
}

}  // namespace gpusvm::devfs
