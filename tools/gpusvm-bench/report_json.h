// gpusvm-bench --json: the JSON Lines records (docs/benchmarks.md, "JSON output").
//
// The first line is the run record {"run": {...}} (tool, date, host, build); then one line
// per report {"case": ..., "ok": true, ...} or per failed case {"case": ..., "ok": false,
// "error": ...}. Written with nlohmann-json: strings are escaped by the library, invalid
// UTF-8 is replaced (U+FFFD) rather than thrown on, and a non-finite number is written as null.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {

using Json = nlohmann::ordered_json;  // keys in the order written: readable lines

// The run record's object: date (UTC, ISO 8601), uname, CPUs, build type, sanitizer,
// lock-rank checking, the repeat count and the number of cases selected.
Json run_json(const Options& opt, size_t cases);
Json report_json(const Case& c, const Report& r);
Json failure_json(const Case& c, const std::string& what);

// One line of JSON Lines: compact, '\n'-terminated.
std::string json_line(const Json& j);

}  // namespace gpusvm::bench
