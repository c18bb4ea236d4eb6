// The allocate-and-copy step of every dmirror migration (to the device, to system memory,
// CPU faults, eviction): for one collected source, allocate destination memory, lock it and
// copy (or clear) the data, and fill dst.
#pragma once

#include <cstdint>

#include "gpusvm/mm/migrate.h"

namespace gpusvm::dmirror {

class DmirrorDevice;

enum class MigrateTarget { kDevice, kSystem };

// Pages covered by src word i: 512 for a compound source (its tails are 0), else 1.
inline uint64_t src_pages(uint64_t src) {
  return (src & mm::MIGRATE_PFN_COMPOUND) ? mm::kPagesPerPmd : 1;
}

// src[i] has MIGRATE_PFN_MIGRATE. Provides its destination in `target` memory:
//  - order 0: one page in dst[i]; none when `fail` (FAIL_ALLOC) or memory is exhausted;
//  - compound (512 pages): one 2 MiB folio in dst[i] with MIGRATE_PFN_COMPOUND, or - when
//    `fail` or no 2 MiB folio is available - 512 small pages in dst[i..i+511] (the core then
//    splits the source, or inserts 512 pages for a hole); none if those run out either.
// Destinations are locked, hold the data of the source (zeroes for a hole or the zero page),
// and carry MIGRATE_PFN_WRITE when the source does. Returns false when no destination was
// provided (dst[i..] left 0). Context: may hold folio locks; takes no dmirror file lock.
bool alloc_and_copy(DmirrorDevice& dev, MigrateTarget target, const uint64_t* src, uint64_t* dst,
                    uint64_t i, bool fail);

}  // namespace gpusvm::dmirror
