#include "gpusvm/base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace gpusvm::log {

namespace {

// spdlog's from_str() maps an unknown name to "off", which would silently hide every message
// (a typo such as GPUSVM_LOG=WARN or =verbose). Names are case-insensitive here, and an
// unknown one keeps the default (warn) and says so.
spdlog::level::level_enum level_from_env(const char* env) {
  if (!env || !*env) return spdlog::level::warn;
  std::string name(env);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  spdlog::level::level_enum level = spdlog::level::from_str(name);
  if (level == spdlog::level::off && name != "off") {
    std::fprintf(stderr,
                 "gpusvm: unknown GPUSVM_LOG level '%s' (trace, debug, info, warn, error, "
                 "critical, off); using warn\n",
                 env);
    return spdlog::level::warn;
  }
  return level;
}

}  // namespace

spdlog::logger& get() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto l = spdlog::stderr_color_mt("gpusvm");
    l->set_level(level_from_env(std::getenv("GPUSVM_LOG")));
    l->set_pattern("[%H:%M:%S.%e] [%^%l%$] [tid %t] %v");
    return l;
  }();
  return *logger;
}

}  // namespace gpusvm::log
