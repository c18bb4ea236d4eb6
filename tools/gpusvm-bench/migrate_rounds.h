// One timed round of the two ways data reaches VRAM, shared by the prefetch and
// fault-migrate cases (the second uses the first as its baseline in the same run): a
// prefetch round trip, and a fault-driven migration by engine jobs. Both map `size` bytes in
// a granule's layout (rt_rig.h), CPU-fill them (untimed), collect the previous round's
// garbage (untimed), time the transfer, then check placement, statistics and every byte
// (untimed) and unmap. Throws Failure on wrong data or counts.
#pragma once

#include <cstdint>

#include "tools/gpusvm-bench/rt_rig.h"

namespace gpusvm::bench {

struct PrefetchTimes {
  uint64_t to_vram_ns = 0;  // every span prefetched to VRAM (region 1)
  uint64_t to_sys_ns = 0;   // and back to system memory (region 0)
  uint64_t calls = 0;       // gpusvm_rt_prefetch calls per direction (one per span)
};
PrefetchTimes prefetch_round(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt);

struct FaultTimes {
  uint64_t ns = 0;        // first submit to the last job's fence
  uint64_t faults = 0;    // serviced faults (one per unit)
  uint64_t fault_ns = 0;  // the driver's service time, summed (VmStats::fault_ns)
  uint64_t migrate_ns = 0;
};
// One job per queue of the rig; unit i of the layout is stored to by queue i % queues, so
// neighbouring units fault on different engines at once. Preferred location: VRAM.
FaultTimes fault_round(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt);

// The untimed step before a timed one: a range-attribute query, which collects the garbage
// (ranges of unmapped memory) a previous round left, as the next fault or prefetch would.
void collect_garbage(RtRig& rig, const Layout& l);

}  // namespace gpusvm::bench
