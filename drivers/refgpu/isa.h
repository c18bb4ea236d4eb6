// The ISA interpreter: executes one batch (uapi/refgpu.h's command stream) through the GPU MMU.
//
// Every access - the instruction fetch included - goes through GpuMmu::translate() with the
// TLB's access lock held shared for the translation and the access (tlb.h). A miss raises a
// GpuFault through the job's FaultSink with no lock held and stalls until it is serviced;
// then the same access is translated again (the replay). An access that still faults after
// kMaxReplays services fails the job with -EFAULT, as does a fault the sink fails (its errno).
//
// Data accesses follow the hardware model of the rest of gpusvm: naturally aligned 4- and
// 8-byte accesses are single-copy atomic (relaxed std::atomic_ref), ATOMIC instructions are
// real read-modify-write atomics on the target bytes, FENCE_WRITE is a release store after a
// release fence. MEMSET and COPY move bytes in page-sized chunks, each chunk translated.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

#include "gpusvm/base/stats.h"
#include "drivers/refgpu/fault_queue.h"
#include "drivers/refgpu/gpu_mmu.h"

namespace gpusvm::refgpu {

struct IsaStats {
  StatCounter instructions;
  StatCounter faults;    // faults raised
  StatCounter replays;   // accesses replayed after a serviced fault
  StatCounter bytes_read;
  StatCounter bytes_written;
};

struct JobContext {
  GpuMmu* mmu = nullptr;
  FaultSink* faults = nullptr;   // null: every fault fails the job (no fault mode)
  uint32_t exec_queue_id = 0;
  uint16_t engine = 0;
  IsaStats* stats = nullptr;     // optional
  // Optional: called after each FENCE_WRITE (wakes user-fence waiters).
  std::function<void()> on_fence_write;
  // Optional: when it reads a negative errno, the job stops at the next instruction (or
  // poll) with that error (queue destruction, device removal).
  const std::atomic<int>* abort = nullptr;
};

inline constexpr unsigned kMaxReplays = 16;

// Runs the batch at batch_va to BATCH_END. Returns 0 or the job's negative errno (see the
// ISA section of uapi/refgpu.h). Context: no lock held; may sleep (faults, LOAD_COMPARE WAIT).
[[nodiscard]] int execute_batch(JobContext& ctx, uint64_t batch_va);

}  // namespace gpusvm::refgpu
