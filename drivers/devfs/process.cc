#include "drivers/devfs/process.h"

#include <cerrno>

namespace gpusvm::devfs {

Result<std::unique_ptr<Process>> Process::create(mm::PhysMem* mem, DeviceRegistry* devices) {
  if (!mem || !devices) return Err{-EINVAL};
  Result<std::unique_ptr<mm::AddressSpace>> as = mm::AddressSpace::create(mem);
  if (!as) return Err{as.error()};
  return std::unique_ptr<Process>(
      new Process(std::shared_ptr<mm::AddressSpace>(std::move(*as)), devices));
}

Process::~Process() { exit(); }

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

void Process::exit() {
  mm_->exit();
  std::vector<std::shared_ptr<File>> closing;
  {
    SpinLockGuard g(&fd_lock_);
    closing.swap(fds_);
  }
  // Released here, outside fd_lock_: the last reference runs the driver's release.
  closing.clear();
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
                            [&](mm::Vma& vma) { return file->mmap(p, vma); }, offset);
}

int close(Process& p, int fd) {
  std::shared_ptr<File> file = p.fd_remove(fd);
  if (!file) return -EBADF;
  file.reset();  // release, unless an ioctl in flight or a forked fd still holds it
  return 0;
}

}  // namespace gpusvm::devfs
