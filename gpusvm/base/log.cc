#include "gpusvm/base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>

namespace gpusvm::log {

spdlog::logger& get() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::stderr_color_mt("gpusvm");
    const char* env = std::getenv("GPUSVM_LOG");
    l->set_level(env ? spdlog::level::from_str(env) : spdlog::level::warn);
    l->set_pattern("[%H:%M:%S.%e] [%^%l%$] [tid %t] %v");
    return l;
  }();
  return *logger;
}

}  // namespace gpusvm::log
