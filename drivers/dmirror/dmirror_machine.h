// dmirror units on a devfs::Machine: the setup of lib/test_hmm.c's module load, for programs
// and test harnesses (see drivers/devfs/machine.h).
#pragma once

#include <memory>
#include <string>

#include "drivers/devfs/machine.h"
#include "drivers/dmirror/dmirror_device.h"
#include "gpusvm/base/result.h"

namespace gpusvm::dmirror {

// The device file name of unit `id`: "hmm_dmirror<id>" (HMM_DMIRROR_DEVICE_NAME).
std::string unit_name(int id);

// Creates dmirror unit `id` on the machine's memory and registers it as unit_name(id); the
// machine keeps a reference until its remove_devices(). Returns the device (the caller may
// keep it to look at its statistics), or DmirrorDevice::create's errors (-EINVAL, -ENOMEM,
// -ENOSPC) or the registry's (-EEXIST).
Result<std::shared_ptr<DmirrorDevice>> add_unit(devfs::Machine& m, int id,
                                                DmirrorDevice::Config config = {});

// test_hmm's four units: 0 and 1 device-private, 2 and 3 device-coherent. `out` (may be
// null) receives them. Returns 0 or add_unit's error (the units added before stay).
[[nodiscard]] int add_test_hmm_units(devfs::Machine& m, std::shared_ptr<DmirrorDevice> out[4]);

}  // namespace gpusvm::dmirror
