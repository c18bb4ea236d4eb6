// gpusvm-demo host-mm: the tour of the host memory model (gpusvm/mm) and hmm_range_fault.
#pragma once

namespace gpusvm::demo {

// Runs the tour on a machine of its own and prints every step. Returns the exit status: 0
// when every check passed, 1 otherwise.
int run_host_mm_demo();

}  // namespace gpusvm::demo
