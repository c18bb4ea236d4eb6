// gpusvm-bench: benchmarks of gpusvm against a baseline measured in the same run.
//
//   gpusvm-bench [--case NAME ...] [--json] [--size BYTES] [--repeat N] [--list]
//
// Every case prints '#' detail lines and exactly one
//   result <case> ours=<value><unit> baseline=<name>:<value><unit> ratio=<x>
// line (ratio > 1: ours is better), or with --json JSON Lines: a run record, then one object
// per report (report_json.h; the shape is in docs/benchmarks.md).
// Exit status: 0 when every case ran and verified its data, 1 when one failed, 2 on bad
// arguments.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/report_json.h"

namespace gpusvm::bench {
namespace {

// Values shown with enough digits to compare: 3 significant digits at least.
std::string show(double v) {
  if (v >= 100) return fmt::format("{:.0f}", v);
  if (v >= 10) return fmt::format("{:.1f}", v);
  return fmt::format("{:.2f}", v);
}

void print_human(const Case& c, const Report& r) {
  std::printf("# --- %s: %s\n", r.case_name.c_str(), c.summary.c_str());
  for (const std::string& d : r.details) std::printf("# %s\n", d.c_str());
  std::printf("result %s ours=%s%s baseline=%s:%s%s ratio=%.2f\n", r.case_name.c_str(),
              show(r.ours.value).c_str(), r.ours.unit.c_str(), r.baseline_name.c_str(),
              show(r.baseline.value).c_str(), r.baseline.unit.c_str(), r.ratio);
  std::fflush(stdout);
}

void print_json(const Json& j) {
  std::fputs(json_line(j).c_str(), stdout);
  std::fflush(stdout);
}

void print_failure(const Case& c, const std::string& what, bool json) {
  if (json) {
    print_json(failure_json(c, what));
  } else {
    std::printf("# --- %s: FAILED\n", c.name.c_str());
    std::fflush(stdout);
  }
  std::fprintf(stderr, "gpusvm-bench: case %s FAILED: %s\n", c.name.c_str(), what.c_str());
}

int run(int argc, char** argv) {
  CLI::App app{"gpusvm-bench: gpusvm figures next to a baseline measured in the same run.\n"
               "Each case prints '# ' detail lines and one line\n"
               "  result <case> ours=<value><unit> baseline=<name>:<value><unit> ratio=<x>\n"
               "where ratio > 1 always means gpusvm is better."};
  std::vector<std::string> selected;
  Options opt;
  bool json = false, list = false;
  app.add_option("--case", selected,
                 "cases or case families to run (repeatable; default: all). See --list");
  app.add_flag("--json", json,
               "print JSON Lines instead of text: a {\"run\": ...} record, then one object per report "
               "(for tools/plot/gpusvm-plot)");
  app.add_option("--size", opt.size,
                 "bytes of memory per case (suffixes k/m/g = KiB/MiB/GiB; rounded up to 2 MiB; "
                 "default: per case)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--repeat", opt.repeat, "timed runs per case; the median is reported")
      ->check(CLI::Range(1, 1000));
  app.add_option("--backend", opt.backend,
                 "the refgpu cases' device backend: 'host' (VRAM in host memory, memcpy copies; baselines:\n"
                 "memcpy) or 'vulkan' (DEVICE_LOCAL memory, a transfer queue; baselines: the same bytes in\n"
                 "one vkCmdCopyBuffer region). Cases without a refgpu device ignore it")
      ->check(CLI::IsMember({"host", "vulkan"}))
      ->capture_default_str();
  app.add_option("--vulkan-device", opt.vulkan_device,
                 "with --backend vulkan: the device by index or name substring (default: a discrete GPU, "
                 "else the first)");
  app.add_flag("--list", list, "list the cases and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help is a ParseError that exits 0
  }

  std::vector<Case>& cases = registry();
  if (list) {
    for (const Case& c : cases) {
      std::printf("%-24s %-14s default size %-8s %s\n", c.name.c_str(), c.family.c_str(),
                  human_bytes(c.default_size).c_str(), c.summary.c_str());
    }
    return 0;
  }

  // Selection: names or families, in the order given; every case at most once.
  std::vector<const Case*> to_run;
  auto add = [&](const Case& c) {
    for (const Case* t : to_run) {
      if (t == &c) return;
    }
    to_run.push_back(&c);
  };
  if (selected.empty()) {
    for (const Case& c : cases) add(c);
  }
  for (const std::string& name : selected) {
    bool found = false;
    for (const Case& c : cases) {
      if (c.name == name || c.family == name) {
        add(c);
        found = true;
      }
    }
    if (!found) {
      std::fprintf(stderr, "gpusvm-bench: unknown case '%s'; cases:", name.c_str());
      for (const Case& c : cases) std::fprintf(stderr, " %s", c.name.c_str());
      std::fprintf(stderr, " (families:");
      std::string last;
      for (const Case& c : cases) {
        if (c.family != last) std::fprintf(stderr, " %s", c.family.c_str());
        last = c.family;
      }
      std::fprintf(stderr, ")\n");
      return 2;
    }
  }

  const Json header = run_json(opt, to_run.size());
  if (json) {
    print_json(header);
  } else {
    const Json& h = header["run"];
    std::printf("# gpusvm-bench: %zu case(s), median of %d run(s), refgpu backend %s; host: %ld CPUs, %s %s; build %s%s%s\n",
                to_run.size(), opt.repeat, opt.backend.c_str(), h["cpus"].get<long>(),
                h["uname"]["sysname"].get<std::string>().c_str(),
                h["uname"]["release"].get<std::string>().c_str(),
                h["build_type"].get<std::string>().c_str(),
                h["sanitizer"].get<std::string>().empty() ? "" : ", sanitizer ",
                h["sanitizer"].get<std::string>().c_str());
    std::fflush(stdout);
  }
  int failed = 0;
  for (const Case* c : to_run) {
    const uint64_t size = opt.size ? opt.size : c->default_size;
    try {
      std::vector<Report> reports;
      if (c->run_many) {
        reports = c->run_many(opt, size);
      } else {
        reports.push_back(c->run(opt, size));
      }
      for (Report& r : reports) {
        if (r.size == 0) r.size = mm::pmd_align_up(size);
        r.repeat = opt.repeat;
        if (r.case_name.empty()) r.case_name = c->name;
        if (json) {
          print_json(report_json(*c, r));
        } else {
          print_human(*c, r);
        }
      }
    } catch (const std::exception& e) {
      print_failure(*c, e.what(), json);
      failed++;
    }
  }
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace gpusvm::bench

int main(int argc, char** argv) { return gpusvm::bench::run(argc, argv); }
