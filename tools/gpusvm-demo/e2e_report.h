// gpusvm-demo (the end-to-end workload): what a run measured, and its two renderings: the
// readable report on stdout and the JSON file of --json (shape in docs/demo.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gpusvm::demo {

// One phase of the workload: what it did, how long it took (wall clock, including the CPU
// verification) and how far each device statistic moved (indexed by enum drm_refgpu_stat).
struct PhaseResult {
  std::string name;
  std::string what;
  double ms = 0;
  std::vector<uint64_t> stats;
};

// One row of the residency picture: the watched buffer at one moment of one phase, one char
// per chunk (residency_legend()).
struct ResidencyRow {
  std::string phase;
  std::string moment;
  std::string cells;
};

struct BufferInfo {
  std::string name;
  uint64_t addr = 0;
  uint64_t bytes = 0;
  std::string how;  // how it was allocated
};

struct Report {
  std::string backend;
  uint64_t ram_bytes = 0;
  uint64_t vram_bytes = 0;
  uint32_t engines = 0;
  std::vector<BufferInfo> buffers;
  std::vector<std::string> stat_names;  // gpusvm_rt_device_stat_name of each index
  std::vector<PhaseResult> phases;
  // The residency picture: which buffer, the chunk each char stands for, the rows in order.
  std::string residency_buffer;
  uint64_t residency_chunk = 0;
  std::vector<ResidencyRow> residency;
  std::string failure;  // empty: every check passed
  double total_ms = 0;
};

// The legend of the residency chars, one "c: meaning" per entry.
const std::vector<std::pair<char, const char*>>& residency_legend();

// The readable report: a table of the phases (time, faults by size, migrations each way with
// their bytes, evictions, jobs) with totals, then the residency picture.
void print_report(const Report& r);

// Writes the report as JSON to `path`. Returns 0 or a negative errno (-EIO: write failed).
int write_json(const Report& r, const std::string& path);

}  // namespace gpusvm::demo
