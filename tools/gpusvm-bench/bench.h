// gpusvm-bench: the case registry and the helpers every case family shares.
//
// A case family lives in its own .cc file (walk.cc, cpu_fault.cc, ...) and registers its
// cases with a static Registrar:
//
//     const Registrar kWalk4k({.name = "walk-4k", .family = "walk", .summary = "...",
//                              .default_size = 1ULL << 30, .run = run_walk_4k});
//
// `gpusvm-bench --case walk` runs every case of the family, `--case walk-4k` just that one.
// A case returns one Report: exactly one measured figure for gpusvm ("ours") and one for the
// baseline measured in the same run on the same data, and their ratio, always oriented so
// that ratio > 1 means ours is better (DESIGN.md §10). A case that sweeps a parameter (the
// thp-migration sizes) sets run_many instead and returns one such Report per point, each marked
// with sweep_point() so tools/plot draws the points as curves. A case that finds wrong data, a
// failed call or an mm::check problem throws Failure: a benchmark of a broken walk is worthless.
#pragma once

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::bench {

// Command-line settings a case sees.
struct Options {
  uint64_t size = 0;  // bytes; 0 = the case's default_size
  int repeat = 3;     // timed runs; the reported figure is their median
  // The refgpu cases' device backend (drivers/refgpu/backend.h): "host" or "vulkan", and on
  // Vulkan the device selector (index or name substring; empty: the backend's default).
  std::string backend = "host";
  std::string vulkan_device;
};

// A figure with its unit ("ns/page", "GiB/s").
struct Figure {
  double value = 0;
  std::string unit;
};

// Structured data a report may carry besides its figure, for tools/plot (docs/benchmarks.md,
// "JSON output" gives the JSON shape of each).
//
// A point of a sweep across reports: every report of one run_many call that names the same
// sweep is one point of one curve (ours and baseline against x), e.g. thp-migration's
// "sys2dev thp" at 512 KiB ... 16 MiB.
struct SweepPoint {
  std::string name;     // the curve within the family: "sys2dev thp"
  std::string x_label;  // what is swept: "buffer size", "request size"
  double x = 0;         // its value at this report
  std::string x_unit;   // "B": the plot's x axis is bytes (log scale)
};

// A curve inside one report: (x, y) points with their units. A histogram is a series whose
// x are the buckets' lower bounds (y: count), or metrics named hist_<lo>_<hi>_<unit>.
struct Series {
  std::string x_unit;
  std::string y_unit;
  std::vector<std::pair<double, double>> points;
};

// Where the chunks of one buffer were over a run: one row per moment (a phase, a time), one
// character per chunk_bytes of the buffer from `start`: 'S' system memory, 'V' VRAM, '.' not
// present, 'M' mixed (the chunk's pages are not all in one place).
struct ResidencyRow {
  std::string label;  // "after prefetch"
  double t_ms = 0;    // since the run started
  std::string cells;  // "SSVV..": the same length in every row
};
struct Residency {
  uint64_t start = 0;  // the buffer's address
  uint64_t chunk_bytes = 0;
  std::vector<ResidencyRow> rows;
};

struct Report {
  std::string case_name;
  Figure ours;
  std::string baseline_name;  // "plain-walk", "linux"
  Figure baseline;
  double ratio = 0;  // > 1: ours is better
  uint64_t size = 0;  // bytes measured; 0: main() fills in the case's size
  int repeat = 0;
  // Human-readable lines (printed with a leading '#') and named numbers (for --json).
  std::vector<std::string> details;
  std::vector<std::pair<std::string, double>> metrics;

  template <typename... Args>
  void detail(fmt::format_string<Args...> f, Args&&... args) {
    details.push_back(fmt::format(f, std::forward<Args>(args)...));
  }
  void metric(std::string name, double v) { metrics.emplace_back(std::move(name), v); }

  // For tools/plot (see SweepPoint, Series, Residency above); all optional.
  std::optional<SweepPoint> sweep;
  std::vector<std::pair<std::string, Series>> series;  // in the order first added
  std::optional<Residency> residency;

  // Marks this report as the point x of sweep `name` (x_unit "B": bytes).
  void sweep_point(std::string name, std::string x_label, double x, std::string x_unit = "B") {
    sweep = SweepPoint{std::move(name), std::move(x_label), x, std::move(x_unit)};
  }
  // The series `name`, created with these units on first use (later units are ignored).
  Series& series_named(const std::string& name, std::string x_unit, std::string y_unit);
  // Appends (x, y) to series `name` (created with empty units if new).
  void point(const std::string& name, double x, double y) { series_named(name, "", "").points.emplace_back(x, y); }
};

// A verification failure: the case stops and the program exits non-zero.
class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Failure(fmt::format(f, std::forward<Args>(args)...));
}

// Throws Failure(what: errno name) unless rc == 0.
void require_ok(int rc, const std::string& what);

struct Case {
  std::string name;     // "walk-4k"
  std::string family;   // "walk": selects every case of the family
  std::string summary;  // one line for --list
  uint64_t default_size = 0;
  // Exactly one of run / run_many is set. run_many returns one Report per measured point,
  // each with its own case_name and size, printed in order.
  std::function<Report(const Options& opt, uint64_t size)> run;
  std::function<std::vector<Report>(const Options& opt, uint64_t size)> run_many;
};

std::vector<Case>& registry();

struct Registrar {
  explicit Registrar(Case c) { registry().push_back(std::move(c)); }
};

// ---- shared helpers ----

inline uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

double median(std::vector<double> v);
// "1.23 1.25 1.31" (the runs, for the detail lines: how noisy the median is).
std::string runs_string(const std::vector<double>& v);
// "1 GiB", "256 MiB", "12 KiB", "100 B".
std::string human_bytes(uint64_t bytes);

// A simulated machine: PhysMem (THP mode madvise) and one address space.
struct Machine {
  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<mm::AddressSpace> as;
  static Machine create(uint64_t ram_bytes, mm::ThpMode thp = mm::ThpMode::kMadvise);
};

// Anonymous private read-write mapping with a THP hint (MADV_HUGEPAGE or MADV_NOHUGEPAGE).
mm::Va map_anon(mm::AddressSpace& as, uint64_t len, int thp_advice);

// Runs mm::check over the whole machine; throws Failure with the report when it finds a
// problem, otherwise records "mm::check <when>: ok (...)" in the report.
void check_machine(mm::PhysMem& mem, Report& report, const char* when);

// The smallest correct interval-notifier client: invalidate() takes the driver lock and
// advances the sequence, as mmu_notifier.h's protocol requires. It mirrors nothing.
class TrivialMirror : public mm::MmuIntervalNotifierOps {
 public:
  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                  uint64_t cur_seq) override;
  Mutex& lock() GPUSVM_RETURN_CAPABILITY(lock_) { return lock_; }
  uint64_t invalidations() const { return invalidations_.load(std::memory_order_relaxed); }

 private:
  Mutex lock_;  // the "driver lock" that orders set_seq against read_retry
  std::atomic<uint64_t> invalidations_{0};
};

// hmm_range_fault over [start, end) with the whole driver protocol: read_begin, mmap read
// lock, hmm_range_fault, driver lock, read_retry; -EBUSY or a collision retries. Returns the
// last hmm_range_fault result; *retries (optional) counts the retries.
int mirror_range(mm::AddressSpace& as, mm::MmuIntervalNotifier& notifier, TrivialMirror& mirror,
                 mm::Va start, mm::Va end, uint64_t default_flags, uint64_t* pfns,
                 int* retries = nullptr);

}  // namespace gpusvm::bench
