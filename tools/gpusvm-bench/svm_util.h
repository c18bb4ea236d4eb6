// Helpers of the svm case families (svm_*.cc): page tags written by the CPU and checked on the
// device side or back on the CPU.
#pragma once

#include <cstdint>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/cpu_access.h"
#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {

// The tag of the page at va (its first word; the last word holds ~tag), salted per run.
inline uint64_t page_tag(mm::Va va, uint64_t salt = 0) {
  return (mm::page_align_down(va) * 0x9e3779b97f4a7c15ULL) ^ (salt * 0xc2b2ae3d27d4eb4fULL) ^ 0x5a5a;
}

// CPU-writes the tags of every page of [base, base + len).
inline void write_tags(mm::AddressSpace& as, mm::Va base, uint64_t len, uint64_t salt = 0) {
  for (mm::Va va = base; va < base + len; va += mm::kPageSize) {
    int rc = mm::cpu::store<uint64_t>(as, va, page_tag(va, salt));
    if (rc == 0) rc = mm::cpu::store<uint64_t>(as, va + mm::kPageSize - 8, ~page_tag(va, salt));
    if (rc != 0) require_ok(rc, fmt::format("cpu::store at {:#x}", va));
  }
}

// CPU-reads the tags of every page of [base, base + len); fails naming the first bad page.
inline void check_tags(mm::AddressSpace& as, mm::Va base, uint64_t len, uint64_t salt, const char* when) {
  for (mm::Va va = base; va < base + len; va += mm::kPageSize) {
    Result<uint64_t> a = mm::cpu::load<uint64_t>(as, va);
    Result<uint64_t> z = mm::cpu::load<uint64_t>(as, va + mm::kPageSize - 8);
    if (!a || !z || *a != page_tag(va, salt) || *z != ~page_tag(va, salt)) {
      fail("{}: page {:#x} reads {} / {}, expected {:#x} / {:#x}", when, va,
           a ? fmt::format("{:#x}", *a) : std::string("error"), z ? fmt::format("{:#x}", *z) : std::string("error"),
           page_tag(va, salt), ~page_tag(va, salt));
    }
  }
}

}  // namespace gpusvm::bench
