// gpusvm-microbench: see microbench.h. The benchmarks register themselves (BENCHMARK in
// refgpu_ops.cc and mm_ops.cc); this main runs them with Google Benchmark's flags
// (--benchmark_filter, --benchmark_min_time, --benchmark_format=json, ...) and exits 1 if any
// of them found a wrong result.
#include <atomic>
#include <cstdio>

#include "gpusvm/base/errno.h"
#include "tools/gpusvm-microbench/microbench.h"

namespace gpusvm::microbench {
namespace {
std::atomic<bool> g_failed{false};
}  // namespace

void fail(benchmark::State& state, const std::string& what) {
  g_failed.store(true, std::memory_order_relaxed);  // read once, after every benchmark ran
  std::fprintf(stderr, "gpusvm-microbench: FAILED: %s\n", what.c_str());
  state.SkipWithError(what.c_str());
}

bool any_failed() { return g_failed.load(std::memory_order_relaxed); }

bool ok(benchmark::State& state, int rc, const char* what) {
  if (rc == 0) return true;
  fail(state, fmt::format("{}: {}", what, errno_describe(rc)));
  return false;
}

}  // namespace gpusvm::microbench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return gpusvm::microbench::any_failed() ? 1 : 0;
}
