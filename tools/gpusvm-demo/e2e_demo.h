// gpusvm-demo's default command: the end-to-end workload (e2e_workload.h) on a machine of its
// own, its report on stdout and, with --json, in a file.
#pragma once

#include <cstdint>
#include <string>

namespace gpusvm::demo {

struct E2eOptions {
  std::string backend = "host";  // where refgpu0's VRAM lives and what copies: host | vulkan
  std::string vulkan_device;     // --backend vulkan: device index or name substring (backend.h)
  uint64_t vram_mib = 16;        // VRAM of refgpu0 (small: the oversubscribed phase is fast)
  std::string json;              // write the report there when not empty
};

// Sets up the machine (system memory, refgpu0, one process), runs the workload in the process,
// prints the report, writes the JSON, checks the machine's memory afterwards and tears it
// down. Returns the exit status: 0 every check passed, 1 a check failed, 2 bad options.
int run_e2e_demo(const E2eOptions& opt);

}  // namespace gpusvm::demo
