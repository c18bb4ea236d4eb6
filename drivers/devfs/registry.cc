#include "drivers/devfs/registry.h"

#include <cerrno>

namespace gpusvm::devfs {

int DeviceRegistry::add(std::string name, std::shared_ptr<Device> dev) {
  if (name.empty() || !dev) return -EINVAL;
  SpinLockGuard g(&lock_);
  return devices_.emplace(std::move(name), std::move(dev)).second ? 0 : -EEXIST;
}

int DeviceRegistry::remove(std::string_view name) {
  std::shared_ptr<Device> dropped;  // released after the lock: a driver may go with it
  SpinLockGuard g(&lock_);
  auto it = devices_.find(name);
  if (it == devices_.end()) return -ENOENT;
  dropped = std::move(it->second);
  devices_.erase(it);
  return 0;
}

std::shared_ptr<Device> DeviceRegistry::find(std::string_view name) const {
  SpinLockGuard g(&lock_);
  auto it = devices_.find(name);
  return it == devices_.end() ? nullptr : it->second;
}

}  // namespace gpusvm::devfs
