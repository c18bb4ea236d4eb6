// Logging through spdlog. Include only from .cc files (spdlog is heavy to compile).
// The level comes from GPUSVM_LOG (trace, debug, info, warn, error, critical, off); default warn.
#pragma once

#include <spdlog/spdlog.h>

namespace gpusvm::log {

spdlog::logger& get();

}  // namespace gpusvm::log
