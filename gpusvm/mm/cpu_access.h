// The CPU-access API: what a CPU thread of the simulated process does with a load, a store or
// an atomic. Each access walks the page table, takes a fault exactly when a CPU would (not
// present, write to read-only, non-present soft leaf) and touches the real frame bytes.
//
// Exactness: the access to a page's bytes happens under that page's page-table lock (the PTE
// lock, or the PMD lock for a PMD-mapped THP). Anything that changes an entry (zap, COW,
// migration) holds the same lock, so an access either completes before the change or sees
// the new entry: the model needs no TLB and cannot observe a stale translation.
//
// All functions may be called from many threads at once, take the mmap lock (read) per page
// and must be called with no gpusvm lock held. Errors: -EFAULT (SIGSEGV/SIGBUS: no VMA, no
// permission), -ENOMEM (fault could not allocate), -EINVAL (misaligned atomic, len overflow),
// -EBUSY (fault retry budget exhausted: a bug or a livelock, reported with the address),
// -ETIMEDOUT (the fault waited hang_timeout() for a folio lock: logged naming the folio).
#pragma once

#include <cstddef>
#include <cstdint>

#include "gpusvm/base/result.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;

namespace cpu {

[[nodiscard]] int copy_out(AddressSpace& mm, Va va, void* dst, size_t len);      // load
[[nodiscard]] int copy_in(AddressSpace& mm, Va va, const void* src, size_t len);  // store
// Fills [va, va + len) with byte c.
[[nodiscard]] int memset(AddressSpace& mm, Va va, int c, size_t len);

template <typename T>
Result<T> load(AddressSpace& mm, Va va) {
  T v{};
  int rc = copy_out(mm, va, &v, sizeof(T));
  if (rc) return Err{rc};
  return v;
}

template <typename T>
[[nodiscard]] int store(AddressSpace& mm, Va va, T v) {
  return copy_in(mm, va, &v, sizeof(T));
}

// 64-bit atomics on a naturally aligned address; they fault for write like a locked
// instruction. Return the old value.
Result<uint64_t> atomic_fetch_add(AddressSpace& mm, Va va, uint64_t delta);
Result<uint64_t> atomic_cmpxchg(AddressSpace& mm, Va va, uint64_t expected, uint64_t desired);
Result<uint64_t> atomic_exchange(AddressSpace& mm, Va va, uint64_t value);

}  // namespace cpu
}  // namespace gpusvm::mm
