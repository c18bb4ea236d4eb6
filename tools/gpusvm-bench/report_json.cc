// gpusvm-bench --json records (report_json.h).
#include "tools/gpusvm-bench/report_json.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <ctime>

#include "gpusvm/base/lock.h"

#ifndef GPUSVM_BENCH_BUILD_TYPE
#define GPUSVM_BENCH_BUILD_TYPE "unknown"
#endif
#ifndef GPUSVM_BENCH_SANITIZE
#define GPUSVM_BENCH_SANITIZE ""
#endif

namespace gpusvm::bench {
namespace {

std::string utc_now_iso8601() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Json figure_json(const Figure& f) { return Json{{"value", f.value}, {"unit", f.unit}}; }

Json series_json(const Report& r) {
  Json out = Json::object();
  for (const auto& [name, s] : r.series) {
    Json points = Json::array();
    for (const auto& [x, y] : s.points) points.push_back(Json{{"x", x}, {"y", y}});
    out[name] = Json{{"x_unit", s.x_unit}, {"y_unit", s.y_unit}, {"points", std::move(points)}};
  }
  return out;
}

Json residency_json(const Residency& res) {
  Json rows = Json::array();
  for (const ResidencyRow& row : res.rows) {
    rows.push_back(Json{{"label", row.label}, {"t_ms", row.t_ms}, {"cells", row.cells}});
  }
  return Json{{"start", res.start},
              {"chunk_bytes", res.chunk_bytes},
              {"legend", Json{{"S", "system"}, {"V", "VRAM"}, {".", "not present"}, {"M", "mixed"}}},
              {"rows", std::move(rows)}};
}

}  // namespace

Json run_json(const Options& opt, size_t cases) {
  utsname u{};
  ::uname(&u);
  return Json{{"run",
               Json{{"tool", "gpusvm-bench"},
                    {"date", utc_now_iso8601()},
                    {"uname", Json{{"sysname", u.sysname},
                                   {"release", u.release},
                                   {"version", u.version},
                                   {"machine", u.machine}}},
                    {"cpus", ::sysconf(_SC_NPROCESSORS_ONLN)},
                    {"build_type", GPUSVM_BENCH_BUILD_TYPE},
                    {"sanitizer", GPUSVM_BENCH_SANITIZE},
                    {"lock_rank_checks", lockdep::rank_checks_enabled()},
                    {"repeat", opt.repeat},
                    {"size", opt.size},
                    {"backend", opt.backend},
                    {"cases", cases}}}};
}

Json report_json(const Case& c, const Report& r) {
  Json j{{"case", r.case_name},
         {"family", c.family},
         {"ok", true},
         {"size", r.size},
         {"repeat", r.repeat},
         {"ours", figure_json(r.ours)},
         {"baseline", Json{{"name", r.baseline_name}, {"value", r.baseline.value}, {"unit", r.baseline.unit}}},
         {"ratio", r.ratio}};
  Json metrics = Json::object();
  for (const auto& [name, v] : r.metrics) metrics[name] = v;
  j["metrics"] = std::move(metrics);
  if (r.sweep) j["sweep"] = Json{{"name", r.sweep->name}, {"x_label", r.sweep->x_label}, {"x", r.sweep->x}, {"x_unit", r.sweep->x_unit}};
  if (!r.series.empty()) j["series"] = series_json(r);
  if (r.residency) j["residency"] = residency_json(*r.residency);
  j["details"] = r.details;
  return j;
}

Json failure_json(const Case& c, const std::string& what) {
  return Json{{"case", c.name}, {"family", c.family}, {"ok", false}, {"error", what}};
}

std::string json_line(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n";
}

}  // namespace gpusvm::bench
