#include "tools/gpusvm-demo/e2e_residency.h"

#include <algorithm>
#include <cerrno>

namespace gpusvm::demo {

namespace {

char cell(const gpusvm_rt_residency& r) {
  if (r.system == r.pages) return 'S';
  if (r.device == r.pages) return 'V';
  if (r.exclusive == r.pages) return 'A';
  if (r.none == r.pages) return '.';
  return '+';
}

}  // namespace

Result<std::string> residency_row(const rt::Context& ctx, rt::Va addr, uint64_t len, uint64_t chunk) {
  if (chunk == 0) return Err{-EINVAL};
  std::string row;
  for (uint64_t off = 0; off < len; off += chunk) {
    Result<gpusvm_rt_residency> r = ctx.residency(addr + off, std::min(chunk, len - off));
    if (!r) return Err{r.error()};
    row += cell(*r);
  }
  return row;
}

}  // namespace gpusvm::demo
