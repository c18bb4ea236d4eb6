// LogCapture: records what gpusvm logs while it lives, so a test can assert on a diagnostic
// (a timed-out wait must name its lock or entry). Include from test .cc files only (spdlog).
//
// Not thread-safe against logging threads while it attaches or detaches (spdlog's sink list
// is a plain vector): construct it before the threads under test start, destroy it after
// they were joined.
#pragma once

#include <spdlog/sinks/ringbuffer_sink.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "gpusvm/base/log.h"

namespace gpusvm::testing_util {

class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(256)) {
    sink_->set_pattern("%v");
    log::get().sinks().push_back(sink_);
  }
  ~LogCapture() {
    auto& sinks = log::get().sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  std::vector<std::string> lines() { return sink_->last_formatted(); }
  // The first recorded line containing every one of `parts`, or "" when none does.
  std::string find(const std::vector<std::string>& parts) {
    for (const std::string& l : lines()) {
      bool all = true;
      for (const std::string& p : parts) all = all && l.find(p) != std::string::npos;
      if (all) return l;
    }
    return "";
  }
  std::string all() {
    std::string s;
    for (const std::string& l : lines()) s += l + "\n";
    return s;
  }

 private:
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
};

}  // namespace gpusvm::testing_util
