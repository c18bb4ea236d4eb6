// gpusvm-demo: with no subcommand, the end-to-end workload through the runtime (e2e_*.cc):
// a program mallocs buffers, runs jobs that fault them into VRAM, prefetches, oversubscribes
// VRAM, advises, uses device atomics, and checks every byte on the CPU after each phase;
// then a report of faults, migrations, copies, time and residency. Subcommands keep the
// earlier tours: `host-mm` (the host memory model and hmm_range_fault) and `dmirror` (a
// migration round trip through the dmirror test device).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <string>

#include "tools/gpusvm-demo/e2e_demo.h"
#include "tools/gpusvm-demo/host_mm_demo.h"
#include "tools/gpusvm-demo/migrate_demo.h"

namespace {

// The dmirror tour's checks: one line each, failures counted.
int run_dmirror() {
  int failures = 0;
  const int rc = gpusvm::demo::run_migration_demo([&](bool ok, const std::string& what, const std::string& why) {
    if (ok) {
      fmt::print("      ok    {}\n", what);
    } else {
      fmt::print("      FAIL  {}{}\n", what, why.empty() ? "" : " (" + why + ")");
      failures++;
    }
    return ok;
  });
  if (rc != 0 || failures) {
    fmt::print("FAILED: {} check(s){}\n", failures, rc ? ", the machine could not be set up" : "");
    return 1;
  }
  fmt::print("all checks passed\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "gpusvm-demo: with no subcommand, an end-to-end workload through the allocator runtime: malloc'd\n"
      "buffers (one THP-backed), a fault-mode context mirroring the address space, jobs that fault,\n"
      "a prefetch to VRAM, a working set of 150 % of VRAM (eviction), preferred-location advice and\n"
      "device atomics, the CPU checking every byte after each phase; then a report: time per phase,\n"
      "GPU faults by size, migrations each way (copy runs and bytes), evictions, jobs, and a residency\n"
      "picture of one buffer (S system, V VRAM, A device-exclusive, . not present, + mixed).\n"
      "Exits non-zero if any check fails.\n\n"
      "--json FILE writes the report as JSON (schema \"gpusvm-demo/1\", docs/demo.md):\n"
      "  {schema, backend, ok, failure, total_ms, machine: {ram_bytes, vram_bytes, engines},\n"
      "   buffers: [{name, addr, bytes, how}], phases: [{name, what, ms, stats: {<stat>: delta}}],\n"
      "   totals: {<stat>: sum}, residency: {buffer, bytes, chunk_bytes, legend: {<char>: meaning},\n"
      "   rows: [{phase, moment, cells}]}}   cells: one char per chunk_bytes of the buffer, in address order"};
  gpusvm::demo::E2eOptions opt;
  app.add_option("--backend", opt.backend,
                 "where refgpu0's VRAM lives and what copies it: 'host' (host memory, memcpy) or 'vulkan'\n"
                 "(DEVICE_LOCAL memory and a transfer queue of a Vulkan device; lavapipe without a GPU)")
      ->capture_default_str();
  app.add_option("--vulkan-device", opt.vulkan_device,
                 "with --backend vulkan: the device by index ('0') or name substring ('llvmpipe');\n"
                 "default: GPUSVM_VULKAN_DEVICE, else a discrete GPU, else the first device");
  app.add_option("--vram-mib", opt.vram_mib, "VRAM of the device in MiB (even, 4..256)")->capture_default_str();
  app.add_option("--json", opt.json, "write the report as JSON to this file");
  app.require_subcommand(0, 1);
  CLI::App* host_mm = app.add_subcommand(
      "host-mm", "the host memory model tour: faults, THPs, fork, mprotect, hmm_range_fault, mm::check");
  CLI::App* dmirror = app.add_subcommand(
      "dmirror", "a device migration round trip through the dmirror test device (lib/test_hmm.c)");
  CLI11_PARSE(app, argc, argv);
  if (host_mm->parsed()) return gpusvm::demo::run_host_mm_demo();
  if (dmirror->parsed()) return run_dmirror();
  return gpusvm::demo::run_e2e_demo(opt);
}
