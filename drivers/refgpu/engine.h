// Engines and exec queues: worker threads that run jobs (batches) through the ISA interpreter.
//
// Design notes:
//  - An ExecQueue belongs to one engine and one VM (its GpuMmu); its jobs run in submission
//    order, one at a time. An engine serves its queues round-robin, one job per turn, so a
//    queue stalled on a fault holds its engine (as a stalled hardware context holds its
//    engine until the fault is serviced), and other engines go on.
//  - A job ends by signalling its fence: 0, or the interpreter's error (an error fence). The
//    queue and its VM stay usable after a failed job.
//  - Dependencies (the exec ioctl's in-fences, drm_sched_job_add_dependency): a job runs
//    only once every fence it depends on has signaled; the queue's later jobs wait behind it
//    (a queue stays in order). Each dependency gets a callback that wakes the engine, so
//    submit() never waits. A dependency that signaled an error fails the job with that
//    error without running it (its out-fences see the error), as drm_sched's entity kill
//    path propagates a dependency's error and Xe's run_job skips a job whose fence already
//    carries one. Cancellation and device removal fail blocked jobs like queued ones.
//  - A job is a batch, or host work (submit_work: a vm_bind whose in-fences were pending,
//    run on the device's bind engine in the engine thread, with the same ordering,
//    dependencies, cancellation and fence as a batch).
//  - A job may carry `hold`: what must stay pinned while it may run (the BOs it may touch:
//    the model's dma-resv fence). It is released before the job's fence signals, so
//    whoever sees the fence signaled sees the hold gone.
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
  // deps: fences the job waits for (see above; null entries are not allowed: -EINVAL).
  // hold: released (reset) right before the job's fence signals, whatever the outcome.
  Result<std::shared_ptr<Fence>> submit(uint64_t batch_va, std::vector<std::shared_ptr<Fence>> deps = {},
                                        std::shared_ptr<void> hold = {}) GPUSVM_EXCLUDES(lock_);
  // Queues host work: fn() runs in the engine thread with no lock held once deps signaled;
  // its result is the fence's status. Released (destroyed) before the fence signals. Errors
  // as submit().
  Result<std::shared_ptr<Fence>> submit_work(std::function<int()> fn, std::vector<std::shared_ptr<Fence>> deps = {})
      GPUSVM_EXCLUDES(lock_);
  size_t queued() const GPUSVM_EXCLUDES(lock_);
  // No job queued and none running.
  bool idle() const GPUSVM_EXCLUDES(lock_);

 private:
  friend class Engine;
  struct Job {
    uint64_t batch_va = 0;
    std::shared_ptr<Fence> fence;
    std::vector<std::shared_ptr<Fence>> deps;
    std::shared_ptr<void> hold;
    std::function<int()> work;  // host work instead of a batch
    // Every dependency signaled (acquire loads).
    bool ready() const;
    // The first dependency error, or 0.
    int dep_error() const;
    // Releases the hold and the work, then signals the fence.
    void finish(int status);
  };
  ExecQueue(Engine* engine, uint32_t id, GpuMmu* mmu) : engine_(engine), id_(id), mmu_(mmu) {}
  Result<std::shared_ptr<Fence>> push(Job job) GPUSVM_EXCLUDES(lock_);

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
  StatCounter dep_errors;  // jobs failed without running: a dependency signaled an error
};

// What wakes an engine's thread: a work counter and its wait queue. Shared (not a member of
// the Engine) because dependency callbacks may run after the engine is gone (a fence from
// elsewhere signaled late): they keep this alive and touch nothing else.
struct EngineKick {
  std::atomic<uint64_t> work{0};  // bumped on every submit/stop/dependency signal
  WaitQueue wq;
  void kick() {
    work.fetch_add(1, std::memory_order_release);  // pairs with the acquire in Engine::run()
    wq.wake_all();
  }
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
  // stop()'s first half: no job starts from now on (the running one goes on until stop()).
  // Removal calls it on every engine before it stops any, so that a fence failed by one
  // engine's stop cannot release a dependency-blocked job, or one behind it, on another.
  void begin_stop(int err = -ENODEV) GPUSVM_EXCLUDES(lock_);
  const EngineStats& stats() const { return stats_; }

 private:
  friend class ExecQueue;
  void run();
  // The next job round-robin, marking its queue running; false when stopping.
  bool next_job(std::shared_ptr<ExecQueue>* q, ExecQueue::Job* job) GPUSVM_EXCLUDES(lock_);
  void kick() { kick_->kick(); }
  static void kill_queue(ExecQueue* q, int err);

  const uint16_t instance_;
  FaultSink* const faults_;
  mutable Mutex lock_{&kEngineLockClass};
  std::vector<std::shared_ptr<ExecQueue>> queues_ GPUSVM_GUARDED_BY(lock_);
  size_t rr_ GPUSVM_GUARDED_BY(lock_) = 0;
  int stopped_ GPUSVM_GUARDED_BY(lock_) = 0;
  std::function<void()> fence_hook_ GPUSVM_GUARDED_BY(lock_);
  const std::shared_ptr<EngineKick> kick_ = std::make_shared<EngineKick>();  // the thread sleeps here
  WaitQueue idle_wq_;   // destroy_queue() waits here for a running job to end
  EngineStats stats_;
  std::thread thread_;
};

}  // namespace gpusvm::refgpu
