// gpusvm-demo (the end-to-end workload): a residency row of a buffer, one char per chunk,
// read with gpusvm_rt_query_residency (the process's page table: the pagemap view).
#pragma once

#include <cstdint>
#include <string>

#include "gpusvm/base/result.h"
#include "gpusvm/runtime.hpp"

namespace gpusvm::demo {

// One char per `chunk` bytes of [addr, addr + len) (the last chunk may be shorter), chosen
// from the chunk's page counts: 'S' every page in system memory, 'V' every page in VRAM,
// 'A' every page a system page a device holds exclusively (atomics), '.' none populated,
// '+' a mix. Errors: the query's (-EINVAL for a zero chunk).
Result<std::string> residency_row(const rt::Context& ctx, rt::Va addr, uint64_t len, uint64_t chunk);

}  // namespace gpusvm::demo
