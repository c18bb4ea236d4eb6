// FaultQueue: where engines raise GPU faults and fault handlers service them.
//
// An engine whose access misses raises a GpuFault {vm, address, access, type} and stalls in
// raise() until a handler completes it: status 0 means "serviced, replay the access",
// a negative errno fails the job with that error (the VM stays usable). Handlers are the
// fault unit's threads (FaultHandlers below, or the driver's own): pop() the oldest pending
// fault, service it, complete() it.
//
// Design notes:
//  - A raise that no handler completes within hang_timeout() returns -ETIMEDOUT (the job
//    fails with it) rather than stalling the engine forever; shutdown(err) completes every
//    pending and later fault with err (device removal: -ENODEV).
//  - Coalescing duplicate faults on one range is the fault unit's job (it knows ranges):
//    a handler may complete several PendingFaults after one service.
//  - A ring of the last kRecords completed faults, per VM, feeds the fault-record query.
//
// Locking: one Mutex (kFaultQueueLockClass), a leaf: nothing is called under it. raise() and
// pop() sleep without it held.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "drivers/refgpu/gpu_mmu.h"

namespace gpusvm::refgpu {

struct GpuFault {
  uint32_t vm_id = 0;
  uint32_t exec_queue_id = 0;
  uint16_t engine = 0;
  uint64_t address = 0;
  Access access = Access::kRead;
  FaultType type = FaultType::kNotPresent;
};

struct FaultRecord {
  GpuFault fault;
  int status = 0;
  uint64_t timestamp_ns = 0;  // steady clock at raise
};

// What an engine calls on a fault (FaultQueue implements it; tests may too).
class FaultSink {
 public:
  virtual ~FaultSink() = default;
  // Blocks until the fault is serviced: 0 to replay, a negative errno to fail the job.
  virtual int raise(const GpuFault& fault) = 0;
};

struct PendingFault {
  GpuFault fault;
  uint64_t timestamp_ns = 0;
  std::atomic<int> status{1};  // 1 while pending; release store by complete()
};

struct FaultQueueStats {
  StatCounter raised;
  StatCounter serviced;   // completed with 0
  StatCounter failed;     // completed with an error (timeouts and shutdown included)
  StatCounter service_ns; // raise to completion
};

class FaultQueue : public FaultSink {
 public:
  static constexpr size_t kRecords = 256;

  int raise(const GpuFault& fault) override GPUSVM_EXCLUDES(lock_);
  // The oldest pending fault, or nullptr when none arrives within `timeout` or after shutdown.
  std::shared_ptr<PendingFault> pop(std::chrono::nanoseconds timeout) GPUSVM_EXCLUDES(lock_);
  void complete(const std::shared_ptr<PendingFault>& pf, int status) GPUSVM_EXCLUDES(lock_);
  void shutdown(int err) GPUSVM_EXCLUDES(lock_);
  bool is_shut_down() const GPUSVM_EXCLUDES(lock_);

  // The records of `vm_id` (0: all VMs), oldest first; with clear, they are dropped.
  std::vector<FaultRecord> records(uint32_t vm_id, bool clear) GPUSVM_EXCLUDES(lock_);
  size_t pending() const GPUSVM_EXCLUDES(lock_);
  const FaultQueueStats& stats() const { return stats_; }

 private:
  mutable Mutex lock_{&kFaultQueueLockClass};
  std::deque<std::shared_ptr<PendingFault>> queue_ GPUSVM_GUARDED_BY(lock_);  // not yet popped
  std::vector<std::shared_ptr<PendingFault>> in_service_ GPUSVM_GUARDED_BY(lock_);
  std::deque<FaultRecord> records_ GPUSVM_GUARDED_BY(lock_);
  int shutdown_err_ GPUSVM_GUARDED_BY(lock_) = 0;
  WaitQueue raised_wq_;     // handlers wait for faults
  WaitQueue completed_wq_;  // engines wait for their fault's completion
  FaultQueueStats stats_;
};

// A pool of fault-handler threads: each pops a fault, calls service(fault) and completes the
// fault with what it returned. service runs with no lock held and may sleep.
class FaultHandlers {
 public:
  FaultHandlers(FaultQueue* queue, unsigned threads, std::function<int(const GpuFault&)> service);
  ~FaultHandlers();  // stops and joins the threads (the queue stays usable)
  FaultHandlers(const FaultHandlers&) = delete;
  FaultHandlers& operator=(const FaultHandlers&) = delete;

 private:
  FaultQueue* const queue_;
  const std::function<int(const GpuFault&)> service_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace gpusvm::refgpu
