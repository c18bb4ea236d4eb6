// gpusvm-demo (the end-to-end workload): the readable report and the JSON file.
#include "tools/gpusvm-demo/e2e_report.h"

#include <fmt/format.h>

#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>

#include "uapi/refgpu.h"

namespace gpusvm::demo {

namespace {

uint64_t at(const std::vector<uint64_t>& v, int i) { return static_cast<size_t>(i) < v.size() ? v[i] : 0; }

std::string mib(uint64_t bytes) { return fmt::format("{:.1f}", static_cast<double>(bytes) / (1 << 20)); }

uint64_t buffer_bytes(const Report& r, const std::string& name) {
  for (const BufferInfo& b : r.buffers) {
    if (b.name == name) return b.bytes;
  }
  return 0;
}

std::vector<uint64_t> totals(const Report& r) {
  std::vector<uint64_t> t(r.stat_names.size(), 0);
  for (const PhaseResult& p : r.phases) {
    for (size_t i = 0; i < p.stats.size() && i < t.size(); ++i) t[i] += p.stats[i];
  }
  return t;
}

void print_row(const std::string& name, double ms, const std::vector<uint64_t>& s) {
  fmt::print("  {:<14}{:>9.1f}{:>7}{:>6}{:>5}{:>8}{:>8}{:>8}{:>8}{:>10}{:>7}{:>6}\n", name, ms,
             at(s, REFGPU_STAT_FAULTS_4K), at(s, REFGPU_STAT_FAULTS_64K), at(s, REFGPU_STAT_FAULTS_2M),
             at(s, REFGPU_STAT_MIGRATE_COPIES_TO_VRAM), mib(at(s, REFGPU_STAT_COPY_BYTES_TO_VRAM)),
             at(s, REFGPU_STAT_MIGRATE_COPIES_TO_SMEM), mib(at(s, REFGPU_STAT_COPY_BYTES_TO_SMEM)),
             mib(at(s, REFGPU_STAT_COPY_BYTES_TO_VRAM) + at(s, REFGPU_STAT_COPY_BYTES_TO_SMEM)),
             at(s, REFGPU_STAT_EVICTIONS), at(s, REFGPU_STAT_JOBS));
}

nlohmann::ordered_json stats_json(const Report& r, const std::vector<uint64_t>& s) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (size_t i = 0; i < s.size() && i < r.stat_names.size(); ++i) j[r.stat_names[i]] = s[i];
  return j;
}

}  // namespace

const std::vector<std::pair<char, const char*>>& residency_legend() {
  static const std::vector<std::pair<char, const char*>> kLegend = {
      {'S', "every page in system memory"},
      {'V', "every page in VRAM (device-private entries)"},
      {'A', "every page a system page held exclusively by the device (atomics)"},
      {'.', "no page populated"},
      {'+', "a mix of the above"},
  };
  return kLegend;
}

void print_report(const Report& r) {
  fmt::print("report (device statistics moved by each phase; migrations are copy runs, MiB their bytes)\n");
  fmt::print("  {:<14}{:>9}{:>7}{:>6}{:>5}{:>16}{:>16}{:>10}{:>7}{:>6}\n", "", "", "GPU faults", "", "",
             "to VRAM", "to system", "copied", "", "");
  fmt::print("  {:<14}{:>9}{:>7}{:>6}{:>5}{:>8}{:>8}{:>8}{:>8}{:>10}{:>7}{:>6}\n", "phase", "ms", "4K", "64K", "2M", "n",
             "MiB", "n", "MiB", "MiB", "evict", "jobs");
  for (const PhaseResult& p : r.phases) print_row(p.name, p.ms, p.stats);
  double ms = 0;
  for (const PhaseResult& p : r.phases) ms += p.ms;
  print_row("total", ms, totals(r));
  fmt::print("\nresidency of buffer '{}' ({} KiB), one char per {} KiB:", r.residency_buffer,
             buffer_bytes(r, r.residency_buffer) >> 10, r.residency_chunk >> 10);
  for (const auto& [c, what] : residency_legend()) fmt::print(" {} {};", c, what);
  fmt::print("\n");
  for (const ResidencyRow& row : r.residency) fmt::print("  {:<14}{:<30} {}\n", row.phase, row.moment, row.cells);
  fmt::print("\n");
}

int write_json(const Report& r, const std::string& path) {
  nlohmann::ordered_json j;
  j["schema"] = "gpusvm-demo/1";
  j["backend"] = r.backend;
  j["ok"] = r.failure.empty();
  j["failure"] = r.failure.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(r.failure);
  j["total_ms"] = r.total_ms;
  j["machine"] = {{"ram_bytes", r.ram_bytes}, {"vram_bytes", r.vram_bytes}, {"engines", r.engines}};
  j["buffers"] = nlohmann::ordered_json::array();
  for (const BufferInfo& b : r.buffers) {
    j["buffers"].push_back({{"name", b.name}, {"addr", b.addr}, {"bytes", b.bytes}, {"how", b.how}});
  }
  j["phases"] = nlohmann::ordered_json::array();
  for (const PhaseResult& p : r.phases) {
    j["phases"].push_back({{"name", p.name}, {"what", p.what}, {"ms", p.ms}, {"stats", stats_json(r, p.stats)}});
  }
  j["totals"] = stats_json(r, totals(r));
  nlohmann::ordered_json res;
  res["buffer"] = r.residency_buffer;
  res["bytes"] = buffer_bytes(r, r.residency_buffer);
  res["chunk_bytes"] = r.residency_chunk;
  res["legend"] = nlohmann::ordered_json::object();
  for (const auto& [c, what] : residency_legend()) res["legend"][std::string(1, c)] = what;
  res["rows"] = nlohmann::ordered_json::array();
  for (const ResidencyRow& row : r.residency) {
    res["rows"].push_back({{"phase", row.phase}, {"moment", row.moment}, {"cells", row.cells}});
  }
  j["residency"] = std::move(res);
  std::ofstream out(path);
  if (!out) {
    const int e = errno;
    return e ? -e : -EIO;
  }
  out << j.dump(2) << "\n";
  out.close();
  return out ? 0 : -EIO;
}

}  // namespace gpusvm::demo
