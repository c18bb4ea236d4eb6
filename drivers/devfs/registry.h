// DeviceRegistry: the simulated "/dev" of a machine, device name -> driver.
//
// Locking: lock_ (a leaf: nothing is called while it is held) guards the name map. Removing a
// name does not close files already open on the device: they keep the Device alive.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "drivers/devfs/device.h"
#include "gpusvm/base/lock_order.h"

namespace gpusvm::devfs {


class DeviceRegistry {
 public:
  // Registers `dev` under `name`. Errors: -EINVAL (empty name, null device), -EEXIST.
  [[nodiscard]] int add(std::string name, std::shared_ptr<Device> dev) GPUSVM_EXCLUDES(lock_);
  // Unregisters `name`; returns -ENOENT if it is not registered.
  [[nodiscard]] int remove(std::string_view name) GPUSVM_EXCLUDES(lock_);
  // The device registered under `name`, or null.
  std::shared_ptr<Device> find(std::string_view name) const GPUSVM_EXCLUDES(lock_);

 private:
  mutable SpinLock lock_{&kDeviceRegistryLockClass};
  std::map<std::string, std::shared_ptr<Device>, std::less<>> devices_ GPUSVM_GUARDED_BY(lock_);
};

}  // namespace gpusvm::devfs
