// gpusvm-demo, part 2: a device migration round trip through the dmirror device.
#pragma once

#include <functional>
#include <string>

namespace gpusvm::demo {

// expect(ok, what, why): prints a checked line and counts failures; returns ok.
using ExpectFn = std::function<bool(bool, const std::string&, const std::string&)>;

// Runs the scenario; failed checks are reported through `expect`. Returns non-zero only when
// the machine could not be set up.
int run_migration_demo(const ExpectFn& expect);

}  // namespace gpusvm::demo
