// gpusvm-microbench: Google Benchmark timings of single operations (docs/benchmarks.md,
// "Micro-benchmarks"). Each benchmark checks what the operation did (the block sizes, the
// leaf found, the pfn walked, the invalidation delivered); a wrong result is reported with
// fail(), which marks the benchmark as errored and makes the program exit 1, so the ctest
// smoke run fails on wrong data as the gpusvm-bench smoke runs do. Times are never asserted.
#pragma once

#include <benchmark/benchmark.h>
#include <fmt/format.h>

#include <string>

namespace gpusvm::microbench {

// Records the failure (exit status 1 at the end) and stops the benchmark's loop with the
// message (Google Benchmark's SkipWithError). Call from inside a benchmark function; return
// right after it.
void fail(benchmark::State& state, const std::string& what);
bool any_failed();

// fail() unless rc == 0; returns whether rc == 0.
bool ok(benchmark::State& state, int rc, const char* what);

}  // namespace gpusvm::microbench
