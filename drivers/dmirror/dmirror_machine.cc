#include "drivers/dmirror/dmirror_machine.h"

#include "uapi/dmirror.h"

namespace gpusvm::dmirror {

std::string unit_name(int id) { return std::string(HMM_DMIRROR_DEVICE_NAME) + std::to_string(id); }

Result<std::shared_ptr<DmirrorDevice>> add_unit(devfs::Machine& m, int id,
                                                DmirrorDevice::Config config) {
  Result<std::shared_ptr<DmirrorDevice>> dev = DmirrorDevice::create(&m.mem(), id, std::move(config));
  if (!dev) return dev;
  if (int rc = m.add_device(unit_name(id), *dev)) return Err{rc};
  return dev;
}

int add_test_hmm_units(devfs::Machine& m, std::shared_ptr<DmirrorDevice> out[4]) {
  for (int i = 0; i < 4; i++) {
    DmirrorDevice::Config cfg;
    if (i >= 2) cfg.memory_type = mm::DevMemoryType::kDeviceCoherent;
    Result<std::shared_ptr<DmirrorDevice>> dev = add_unit(m, i, std::move(cfg));
    if (!dev) return dev.error();
    if (out) out[i] = *dev;
  }
  return 0;
}

}  // namespace gpusvm::dmirror
