// gpusvm-demo's default command: the "kernel" side of the end-to-end workload. It boots the
// simulated machine (memory, the refgpu device, a process), hands the process to the program
// (e2e_workload.cc, runtime only), then checks what the program left behind (mm::check of
// the process's address space, VRAM all free after the program closed the device).
#include "tools/gpusvm-demo/e2e_demo.h"

#include <fmt/format.h>

#include <chrono>
#include <memory>
#include <string_view>

#include "drivers/devfs/machine.h"
#include "drivers/refgpu/device.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/mm/check.h"
#include "tools/gpusvm-demo/e2e_report.h"
#include "tools/gpusvm-demo/e2e_workload.h"

namespace gpusvm::demo {

namespace {

constexpr uint64_t kMiB = 1ull << 20;

int fail(std::string_view what, int rc) {
  fmt::print(stderr, "gpusvm-demo: {}: {}\n", what, errno_describe(rc));
  return 1;
}

}  // namespace

int run_e2e_demo(const E2eOptions& opt) {
  Result<refgpu::BackendKind> kind = refgpu::parse_backend_kind(opt.backend);
  if (!kind || *kind == refgpu::BackendKind::kAuto) {
    fmt::print(stderr, "gpusvm-demo: unknown backend '{}' (host or vulkan)\n", opt.backend);
    return 2;
  }
  if (opt.vram_mib < 4 || opt.vram_mib % 2 || opt.vram_mib > 256) {
    fmt::print(stderr, "gpusvm-demo: --vram-mib must be even, 4..256 (got {})\n", opt.vram_mib);
    return 2;
  }
  const auto t0 = std::chrono::steady_clock::now();
  Report rep;
  // System memory: the buffers, the 150 % working set and the device's copies fit twice.
  rep.ram_bytes = 128 * kMiB + 4 * opt.vram_mib * kMiB;
  Result<std::unique_ptr<devfs::Machine>> m =
      devfs::Machine::create({.ram_bytes = rep.ram_bytes, .thp = mm::ThpMode::kMadvise});
  if (!m) return fail("machine", m.error());
  refgpu::DeviceConfig dc;
  dc.vram_sizes = {opt.vram_mib * kMiB};
  dc.backend = {.kind = *kind, .vulkan_device = opt.vulkan_device};
  // No fallback: a backend that cannot be opened (no Vulkan driver, no such device) fails here.
  Result<std::shared_ptr<refgpu::RefgpuDevice>> d = refgpu::RefgpuDevice::create(&(*m)->mem(), dc);
  if (!d) return fail(fmt::format("refgpu device on backend '{}'", opt.backend), d.error());
  rep.backend = (*d)->backend().description();
  if (int rc = (*m)->add_device("refgpu0", *d)) return fail("add refgpu0", rc);
  Result<devfs::Process*> p = (*m)->create_process();
  if (!p) return fail("process", p.error());

  fmt::print("gpusvm demo: an end-to-end workload through the runtime (backend '{}')\n"
             "machine: {} MiB of system memory (THP policy \"madvise\"), refgpu0 with {} MiB of VRAM\n",
             rep.backend, rep.ram_bytes / kMiB, opt.vram_mib);
  int rc = run_workload(**p, &rep);

  // What the program left behind: a consistent address space, and no VRAM in use once it
  // closed its device.
  const mm::CheckReport chk = mm::check((*p)->mm());
  if (!chk.ok() && rep.failure.empty()) rep.failure = "mm::check after the program: " + chk.to_string();
  const uint64_t vram_used = (*d)->vram_region(0).used();
  if (vram_used != 0 && rep.failure.empty()) {
    rep.failure = fmt::format("{} bytes of VRAM still in use after the program closed the device", vram_used);
  }
  if (!rep.failure.empty()) rc = 1;
  (*m)->shutdown();
  rep.total_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  print_report(rep);
  if (!opt.json.empty()) {
    if (int jrc = write_json(rep, opt.json)) {
      fmt::print(stderr, "gpusvm-demo: writing {}: {}\n", opt.json, errno_describe(jrc));
      rc = 1;
    } else {
      fmt::print("report written to {}\n", opt.json);
    }
  }
  if (rc) {
    fmt::print("FAILED: {}\n", rep.failure);
    return 1;
  }
  fmt::print("all checks passed: every byte verified after each phase, mm::check clean, VRAM free again ({:.2f} s)\n",
             rep.total_ms / 1000);
  return 0;
}

}  // namespace gpusvm::demo
