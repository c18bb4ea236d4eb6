// FaultService: the fault unit's handler threads (xe_gt_pagefault.c's worker pool) on top of
// a FaultQueue: each pops the oldest fault, finds its VM and runs Vm::handle_fault, then
// completes it.
//
// Duplicate faults on one range are chained onto the one in flight: a handler that pops a
// fault whose VM has a service in flight covering its address (same range, access no
// stronger) does not service it again; it is completed with the first one's status when that
// service ends (one service, all replayed). A fault that arrives before the first service
// knows its range is keyed by the 4 KiB page until then.
//
// Locking: lock_ (kRefgpuFaultChainLockClass) guards the in-flight table; it is a leaf taken
// under nothing else, and FaultQueue::complete runs after it is dropped.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/stats.h"
#include "drivers/refgpu/fault_queue.h"

namespace gpusvm::refgpu {

class Vm;

struct FaultServiceStats {
  StatCounter services;   // handle_fault calls
  StatCounter chained;    // faults completed by another fault's service
};

class FaultService {
 public:
  // find_vm: the VM of an id, held alive by the returned shared_ptr (nullptr: -ENOENT, the
  // fault fails with -EFAULT: the VM is gone).
  using FindVm = std::function<std::shared_ptr<Vm>(uint32_t vm_id)>;
  FaultService(FaultQueue* queue, unsigned threads, FindVm find_vm);
  ~FaultService();  // stops and joins the threads; faults still queued stay in the queue
  FaultService(const FaultService&) = delete;
  FaultService& operator=(const FaultService&) = delete;

  const FaultServiceStats& stats() const { return stats_; }

 private:
  struct InFlight {
    uint32_t vm_id;
    uint64_t start, end;  // the page, then the range once known
    Access access;
    std::vector<std::shared_ptr<PendingFault>> chained;
  };
  void run();
  void serve(const std::shared_ptr<PendingFault>& pf);

  FaultQueue* const queue_;
  const FindVm find_vm_;
  Mutex lock_{&kRefgpuFaultChainLockClass};
  std::vector<std::shared_ptr<InFlight>> in_flight_ GPUSVM_GUARDED_BY(lock_);
  std::atomic<bool> stop_{false};
  FaultServiceStats stats_;
  std::vector<std::thread> threads_;
};

}  // namespace gpusvm::refgpu
