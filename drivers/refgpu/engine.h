// Engines and exec queues: worker threads that run jobs (batches) through the ISA interpreter.
//
// Design notes:
//  - An ExecQueue belongs to one engine and one VM (its GpuMmu); its jobs run in submission
//    order, one at a time. An engine serves its queues round-robin, one job per turn, so a
//    queue stalled on a fault holds its engine (as a stalled hardware context holds its
//    engine until the fault is serviced), and other engines go on.
//  - A job ends by signalling its fence: 0, or the interpreter's error (an error fence). The
//    queue and its VM stay usable after a failed job.
//  - destroy_queue(): jobs not started are cancelled (-ECANCELED); the running one is told to
//    stop at its next instruction (-ECANCELED) and waited for. stop() (device removal) does
//    the same for every queue with -ENODEV and joins the thread: every fence completes.
//    The fault sink must fail the faults of a stopping engine (FaultQueue::shutdown).
//
// Locking: Engine::lock_ (kEngineLockClass: its list of queues) -> ExecQueue::lock_
// (kExecQueueLockClass: its jobs). Jobs run with no lock held.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "drivers/refgpu/fence.h"
#include "drivers/refgpu/isa.h"

namespace gpusvm::refgpu {

class Engine;

class ExecQueue {
 public:
  uint32_t id() const { return id_; }
  GpuMmu* mmu() const { return mmu_; }
  // Queues a job running the batch at batch_va. Errors: -ECANCELED when the queue was
  // destroyed, -ENODEV when its engine stopped, -EINVAL for a misaligned batch.
  // The engine object must outlive every submit() call (the device holds a reference across
  // an ioctl); a stopped engine is fine, a destroyed one is not.
  Result<std::shared_ptr<Fence>> submit(uint64_t batch_va) GPUSVM_EXCLUDES(lock_);
  size_t queued() const GPUSVM_EXCLUDES(lock_);

 private:
  friend class Engine;
  struct Job {
    uint64_t batch_va;
    std::shared_ptr<Fence> fence;
  };
  ExecQueue(Engine* engine, uint32_t id, GpuMmu* mmu) : engine_(engine), id_(id), mmu_(mmu) {}

  Engine* const engine_;
  const uint32_t id_;
  GpuMmu* const mmu_;
  mutable Mutex lock_{&kExecQueueLockClass};
  std::deque<Job> jobs_ GPUSVM_GUARDED_BY(lock_);
  int dead_ GPUSVM_GUARDED_BY(lock_) = 0;  // 0, or the errno later submits get
  bool running_ GPUSVM_GUARDED_BY(lock_) = false;
  // The running job's stop request (0 or a negative errno), read by the interpreter.
  std::atomic<int> abort_{0};
};

struct EngineStats {
  IsaStats isa;
  StatCounter jobs;
  StatCounter job_errors;
};

class Engine {
 public:
  // `faults` may be null (no fault mode: a fault fails the job with -EFAULT).
  Engine(uint16_t instance, FaultSink* faults);
  ~Engine();  // stop(-ENODEV)
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  uint16_t instance() const { return instance_; }
  // A queue for jobs on `mmu`'s VM. -ENODEV once stopped.
  Result<std::shared_ptr<ExecQueue>> create_queue(uint32_t id, GpuMmu* mmu) GPUSVM_EXCLUDES(lock_);
  // Cancels the queue's jobs and waits for its running job to end. -ENOENT if not ours.
  [[nodiscard]] int destroy_queue(const std::shared_ptr<ExecQueue>& q) GPUSVM_EXCLUDES(lock_);
  // Called after every FENCE_WRITE of a job on this engine (user-fence waiters).
  void set_fence_write_hook(std::function<void()> fn) GPUSVM_EXCLUDES(lock_);
  // Device removal: every queue dies with `err`, every fence completes; joins the thread.
  void stop(int err = -ENODEV) GPUSVM_EXCLUDES(lock_);
  const EngineStats& stats() const { return stats_; }

 private:
  friend class ExecQueue;
  void run();
  // The next job round-robin, marking its queue running; false when stopping.
  bool next_job(std::shared_ptr<ExecQueue>* q, ExecQueue::Job* job) GPUSVM_EXCLUDES(lock_);
  void kick() { wq_.wake_all(); }
  static void kill_queue(ExecQueue* q, int err);

  const uint16_t instance_;
  FaultSink* const faults_;
  mutable Mutex lock_{&kEngineLockClass};
  std::vector<std::shared_ptr<ExecQueue>> queues_ GPUSVM_GUARDED_BY(lock_);
  size_t rr_ GPUSVM_GUARDED_BY(lock_) = 0;
  int stopped_ GPUSVM_GUARDED_BY(lock_) = 0;
  std::function<void()> fence_hook_ GPUSVM_GUARDED_BY(lock_);
  std::atomic<uint64_t> work_{0};  // bumped on every submit/stop; the thread's wake condition
  WaitQueue wq_;        // the engine thread sleeps here
  WaitQueue idle_wq_;   // destroy_queue() waits here for a running job to end
  EngineStats stats_;
  std::thread thread_;
};

}  // namespace gpusvm::refgpu
