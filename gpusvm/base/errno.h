// Status codes: 0 for success, a negative errno otherwise (the kernel convention, so a
// driver developer reads gpusvm's contracts exactly like kernel-doc).
#pragma once

#include <cerrno>
#include <string>

namespace gpusvm {

// "EFAULT" for -EFAULT or EFAULT; "OK" for 0; "E?" for codes without a name here.
const char* errno_name(int err);

// "-EFAULT (Bad address)".
std::string errno_describe(int err);

}  // namespace gpusvm
