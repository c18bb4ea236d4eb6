// gpusvm-demo (the end-to-end workload): the program. It runs in a simulated process and
// uses the GPU through the runtime only (gpusvm/runtime.hpp, i.e. the uapi's ioctls), as a
// CUDA-managed-memory or SYCL-USM program would: malloc'd buffers, a fault-mode context that
// mirrors the whole address space, jobs, prefetch, advice, CPU verification of every byte.
#pragma once

#include "drivers/devfs/process.h"
#include "tools/gpusvm-demo/e2e_report.h"

namespace gpusvm::demo {

// Runs every phase in `proc` (which must see a refgpu0 with VRAM) and fills *report; prints
// one progress block per phase. Returns 0 when every check passed, 1 at the first failed one
// (report->failure says which). May sleep; every wait is bounded.
int run_workload(devfs::Process& proc, Report* report);

}  // namespace gpusvm::demo
