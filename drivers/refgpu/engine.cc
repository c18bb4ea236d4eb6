#include "drivers/refgpu/engine.h"

#include <algorithm>
#include <cerrno>

namespace gpusvm::refgpu {

bool ExecQueue::Job::ready() const {
  return std::all_of(deps.begin(), deps.end(), [](const std::shared_ptr<Fence>& d) { return d->signaled(); });
}

int ExecQueue::Job::dep_error() const {
  for (const auto& d : deps) {
    if (d->status() < 0) return d->status();
  }
  return 0;
}

void ExecQueue::Job::finish(int status) {
  hold.reset();
  work = nullptr;
  fence->signal(status);
}

Result<std::shared_ptr<Fence>> ExecQueue::submit(uint64_t batch_va, std::vector<std::shared_ptr<Fence>> deps,
                                                 std::shared_ptr<void> hold) {
  if (batch_va % 8) return Err{-EINVAL};
  return push({.batch_va = batch_va, .deps = std::move(deps), .hold = std::move(hold)});
}

Result<std::shared_ptr<Fence>> ExecQueue::submit_work(std::function<int()> fn, std::vector<std::shared_ptr<Fence>> deps) {
  if (!fn) return Err{-EINVAL};
  return push({.deps = std::move(deps), .work = std::move(fn)});
}

bool ExecQueue::idle() const {
  MutexLock g(&lock_);
  return jobs_.empty() && !running_;
}

Result<std::shared_ptr<Fence>> ExecQueue::push(Job job) {
  for (const auto& d : job.deps) {
    if (!d) return Err{-EINVAL};
  }
  auto fence = std::make_shared<Fence>();
  job.fence = fence;
  // The callbacks go on before the job is visible: a dependency signaling at any point after
  // the push either finds its callback (which kicks the engine) or is seen signaled by the
  // engine's scan after the kick below.
  std::shared_ptr<EngineKick> k = engine_->kick_;
  for (const auto& d : job.deps) (void)d->add_callback([k](int) { k->kick(); });
  {
    MutexLock g(&lock_);
    if (dead_) return Err{dead_};
    jobs_.push_back(std::move(job));
  }
  engine_->kick();
  return fence;
}

size_t ExecQueue::queued() const {
  MutexLock g(&lock_);
  return jobs_.size();
}

Engine::Engine(uint16_t instance, FaultSink* faults) : instance_(instance), faults_(faults) {
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() { stop(-ENODEV); }

Result<std::shared_ptr<ExecQueue>> Engine::create_queue(uint32_t id, GpuMmu* mmu) {
  MutexLock g(&lock_);
  if (stopped_) return Err{-ENODEV};
  std::shared_ptr<ExecQueue> q(new ExecQueue(this, id, mmu));
  queues_.push_back(q);
  return q;
}

// Marks the queue dead, fails its queued jobs, and asks its running job to stop.
void Engine::kill_queue(ExecQueue* q, int err) {
  std::deque<ExecQueue::Job> cancelled;
  {
    MutexLock g(&q->lock_);
    if (!q->dead_) q->dead_ = err;
    cancelled.swap(q->jobs_);
    q->abort_.store(err, std::memory_order_relaxed);  // relaxed: a stop request, polled
  }
  for (auto& j : cancelled) j.finish(err);
}

int Engine::destroy_queue(const std::shared_ptr<ExecQueue>& q) {
  {
    MutexLock g(&lock_);
    auto it = std::find(queues_.begin(), queues_.end(), q);
    if (it == queues_.end()) return -ENOENT;
    queues_.erase(it);
  }
  kill_queue(q.get(), -ECANCELED);
  // The running job stops at its next instruction, or when its fault completes.
  const bool idle = idle_wq_.wait_for(
      [&] {
        MutexLock g(&q->lock_);
        return !q->running_;
      },
      hang_timeout());
  if (!idle) panic("refgpu engine " + std::to_string(instance_) + ": exec queue " + std::to_string(q->id()) +
                   " still running a job after destroy (a fault nobody completes?)");
  return 0;
}

void Engine::set_fence_write_hook(std::function<void()> fn) {
  MutexLock g(&lock_);
  fence_hook_ = std::move(fn);
}

void Engine::begin_stop(int err) {
  MutexLock g(&lock_);
  if (!stopped_) stopped_ = err < 0 ? err : -ENODEV;
}

void Engine::stop(int err) {
  std::vector<std::shared_ptr<ExecQueue>> queues;
  {
    MutexLock g(&lock_);
    if (!stopped_) stopped_ = err < 0 ? err : -ENODEV;
    queues = queues_;
  }
  for (auto& q : queues) kill_queue(q.get(), err < 0 ? err : -ENODEV);
  kick();
  if (thread_.joinable()) thread_.join();
}

bool Engine::next_job(std::shared_ptr<ExecQueue>* out, ExecQueue::Job* job) {
  MutexLock g(&lock_);
  if (stopped_) return false;
  for (size_t n = 0; n < queues_.size(); n++) {
    const size_t i = (rr_ + n) % queues_.size();
    ExecQueue* q = queues_[i].get();
    MutexLock qg(&q->lock_);
    // Only the front job: a queue is in order, so a job blocked on a dependency holds back
    // the ones behind it (and no other queue).
    if (q->jobs_.empty() || q->dead_ || !q->jobs_.front().ready()) continue;
    *job = std::move(q->jobs_.front());
    q->jobs_.pop_front();
    q->running_ = true;
    *out = queues_[i];
    rr_ = i + 1;
    return true;
  }
  out->reset();
  return true;
}

void Engine::run() {
  for (;;) {
    // acquire: pairs with the release in submit()/stop(), so a job queued before the bump is
    // seen by next_job() after it.
    const uint64_t seen = kick_->work.load(std::memory_order_acquire);
    std::shared_ptr<ExecQueue> q;
    ExecQueue::Job job{};
    if (!next_job(&q, &job)) return;
    if (!q) {
      // Idle: sleep until new work; the bounded wait just loops (an idle engine is no hang).
      (void)kick_->wq.wait_for([&] { return kick_->work.load(std::memory_order_acquire) != seen; },
                               std::chrono::milliseconds(100));
      continue;
    }
    JobContext ctx;
    ctx.mmu = q->mmu();
    ctx.faults = faults_;
    ctx.exec_queue_id = q->id();
    ctx.engine = instance_;
    ctx.stats = &stats_.isa;
    ctx.abort = &q->abort_;
    {
      MutexLock g(&lock_);
      ctx.on_fence_write = fence_hook_;
    }
    // A failed dependency fails the job without running it.
    const int dep_err = job.dep_error();
    const int r = dep_err ? dep_err : job.work ? job.work() : execute_batch(ctx, job.batch_va);
    stats_.jobs.add();
    if (r) stats_.job_errors.add();
    if (dep_err) stats_.dep_errors.add();
    job.finish(r);
    {
      MutexLock g(&q->lock_);
      q->running_ = false;
    }
    idle_wq_.wake_all();
  }
}

}  // namespace gpusvm::refgpu
