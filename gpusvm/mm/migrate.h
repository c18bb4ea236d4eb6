// migrate_vma: move the pages of a range between system memory and device-private memory
// (mm/migrate_device.c's contract).
//
// A driver migrates [start, end) of one VMA in three steps, holding the mmap lock (read):
//
//   MigrateVma m{.mm, .start, .end, .src, .dst, .pgmap_owner, .flags = SELECT_*};
//   migrate_vma_setup(&m);      // collect: lock each page that may move, replace its entry by
//                               // a migration entry (CPU accesses now wait); src[i] says what
//                               // was found; cpages counts the pages that may move
//   for each i with src[i] & MIGRATE_PFN_MIGRATE:
//       allocate a destination folio, folio_lock() it, copy the data (src page or zeroes),
//       dst[i] = migrate_pfn(dst_pfn)
//   migrate_vma_pages(&m);      // commit: pages whose destination the driver did not provide,
//                               // or that cannot move, lose MIGRATE_PFN_MIGRATE in src[i]
//   migrate_vma_finalize(&m);   // map the destination (or restore the source) where the
//                               // migration entries are, unlock and release everything
//
// "0 from setup means the call ran, not that every page can move": check src[i].
//
// This is the collect-walk path ("two-step": hmm_range_fault first if pages must be faulted
// in). Pages of large folios are not collected yet (src[i] == 0); neither are pages that
// another process also maps (fork), which need an rmap-driven unmap.
#pragma once

#include <cstdint>

#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class Folio;

inline constexpr uint64_t MIGRATE_PFN_VALID = 1ULL << 0;
inline constexpr uint64_t MIGRATE_PFN_MIGRATE = 1ULL << 1;
inline constexpr uint64_t MIGRATE_PFN_WRITE = 1ULL << 3;
inline constexpr uint64_t MIGRATE_PFN_COMPOUND = 1ULL << 4;
inline constexpr unsigned MIGRATE_PFN_SHIFT = 6;

inline constexpr uint64_t migrate_pfn(Pfn pfn) { return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID; }
inline constexpr Pfn migrate_pfn_to_pfn(uint64_t mpfn) { return mpfn >> MIGRATE_PFN_SHIFT; }

enum MigrateVmaFlags : unsigned {
  MIGRATE_VMA_SELECT_SYSTEM = 1u << 0,          // collect system-memory pages (and holes)
  MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1u << 1,  // collect device-private pages of pgmap_owner
};

struct MigrateVma {
  AddressSpace* mm = nullptr;
  Va start = 0;
  Va end = 0;          // exclusive; [start, end) inside one VMA
  uint64_t* src = nullptr;  // npages words, written by setup
  uint64_t* dst = nullptr;  // npages words, written by the driver
  uint64_t npages = 0;      // set by setup
  uint64_t cpages = 0;      // set by setup: pages that may migrate
  const void* pgmap_owner = nullptr;  // tags the MIGRATE invalidation; selects device pages
  unsigned flags = 0;
  // The folio a CPU fault is migrating back (already locked and referenced by the fault
  // handler): setup neither locks nor unlocks it (the fault_page rules of migrate_to_ram).
  Folio* fault_page = nullptr;
};

// Returns 0, or -EINVAL: no mm/src/dst, unaligned or empty range, range not inside one
// anonymous VMA, no SELECT flag or unknown flags. Context: mmap lock held (asserted), no
// page-table lock; sleeps only in the invalidation callbacks.
[[nodiscard]] int migrate_vma_setup(MigrateVma* args);
void migrate_vma_pages(MigrateVma* args);
void migrate_vma_finalize(MigrateVma* args);

}  // namespace gpusvm::mm
