// VramStats: what one VRAM region's memory manager did (the VRAM part of Xe's GT stats:
// svm_*_migrate_*, evictions). Counters are relaxed atomics (StatCounter): readable at any
// time, exact once the operations they count have returned.
#pragma once

#include "gpusvm/base/stats.h"

namespace gpusvm::refgpu {

struct VramStats {
  // Allocations (svm VramAllocations and BO backings) handed out, and their bytes.
  StatCounter allocations;
  StatCounter allocated_bytes;
  // Allocation requests that failed for good (after eviction attempts, or injected).
  StatCounter allocation_failures;
  // Buddy allocations that found no room and made the allocator evict (each retry counts).
  StatCounter allocation_retries;
  // LRU entries evicted (svm allocations to system memory, VRAM BOs to their shmem
  // backing), their bytes, and eviction attempts that gave up on an entry (busy, error).
  StatCounter evictions;
  StatCounter evicted_bytes;
  StatCounter eviction_skips;
  // Copy-engine runs of the migrations, each way: runs, bytes, nanoseconds.
  StatCounter migrations_to_vram;
  StatCounter bytes_to_vram;
  StatCounter ns_to_vram;
  StatCounter migrations_to_ram;
  StatCounter bytes_to_ram;
  StatCounter ns_to_ram;
  // LRU bumps from get_pages' devmem_fn.
  StatCounter lru_touches;
};

}  // namespace gpusvm::refgpu
