#include "drivers/refgpu/fault_queue.h"

#include <algorithm>
#include <cerrno>

namespace gpusvm::refgpu {

namespace {
uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}
}  // namespace

int FaultQueue::raise(const GpuFault& fault) {
  auto pf = std::make_shared<PendingFault>();
  pf->fault = fault;
  pf->timestamp_ns = now_ns();
  stats_.raised.add();
  {
    MutexLock g(&lock_);
    if (shutdown_err_) {
      stats_.failed.add();
      return shutdown_err_;
    }
    queue_.push_back(pf);
  }
  raised_wq_.wake_all();
  // acquire: pairs with the release store in complete(): the service's page-table update is
  // visible to the replay.
  const bool done = completed_wq_.wait_for(
      [&] { return pf->status.load(std::memory_order_acquire) != 1; }, hang_timeout());
  if (!done) {
    // Nobody serviced it: take it back so a late complete() finds nothing to do, and fail.
    complete(pf, -ETIMEDOUT);
  }
  return pf->status.load(std::memory_order_acquire);
}

std::shared_ptr<PendingFault> FaultQueue::pop(std::chrono::nanoseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    {
      MutexLock g(&lock_);
      if (shutdown_err_) return nullptr;
      if (!queue_.empty()) {
        std::shared_ptr<PendingFault> pf = queue_.front();
        queue_.pop_front();
        in_service_.push_back(pf);
        return pf;
      }
    }
    const auto left = deadline - std::chrono::steady_clock::now();
    if (left <= std::chrono::nanoseconds(0)) return nullptr;
    (void)raised_wq_.wait_for([&] { return pending() > 0 || is_shut_down(); }, left);
  }
}

void FaultQueue::complete(const std::shared_ptr<PendingFault>& pf, int status) {
  {
    MutexLock g(&lock_);
    if (pf->status.load(std::memory_order_relaxed) != 1) return;  // already completed (under lock_)
    auto q = std::find(queue_.begin(), queue_.end(), pf);
    if (q != queue_.end()) queue_.erase(q);
    auto s = std::find(in_service_.begin(), in_service_.end(), pf);
    if (s != in_service_.end()) in_service_.erase(s);
    records_.push_back({pf->fault, status, pf->timestamp_ns});
    if (records_.size() > kRecords) records_.pop_front();
    // release: pairs with the acquire in raise().
    pf->status.store(status > 0 ? 0 : status, std::memory_order_release);
  }
  (status == 0 ? stats_.serviced : stats_.failed).add();
  stats_.service_ns.add(now_ns() - pf->timestamp_ns);
  completed_wq_.wake_all();
}

void FaultQueue::shutdown(int err) {
  std::vector<std::shared_ptr<PendingFault>> all;
  {
    MutexLock g(&lock_);
    shutdown_err_ = err < 0 ? err : -ENODEV;
    all.assign(queue_.begin(), queue_.end());
    all.insert(all.end(), in_service_.begin(), in_service_.end());
  }
  for (const auto& pf : all) complete(pf, err < 0 ? err : -ENODEV);
  raised_wq_.wake_all();
}

bool FaultQueue::is_shut_down() const {
  MutexLock g(&lock_);
  return shutdown_err_ != 0;
}

std::vector<FaultRecord> FaultQueue::records(uint32_t vm_id, bool clear) {
  MutexLock g(&lock_);
  std::vector<FaultRecord> out;
  for (auto it = records_.begin(); it != records_.end();) {
    if (vm_id == 0 || it->fault.vm_id == vm_id) {
      out.push_back(*it);
      if (clear) {
        it = records_.erase(it);
        continue;
      }
    }
    ++it;
  }
  return out;
}

size_t FaultQueue::pending() const {
  MutexLock g(&lock_);
  return queue_.size();
}

FaultHandlers::FaultHandlers(FaultQueue* queue, unsigned threads, std::function<int(const GpuFault&)> service)
    : queue_(queue), service_(std::move(service)) {
  for (unsigned i = 0; i < threads; i++) {
    threads_.emplace_back([this] {
      while (!stop_.load(std::memory_order_relaxed)) {  // relaxed: a stop flag, joined below
        std::shared_ptr<PendingFault> pf = queue_->pop(std::chrono::milliseconds(20));
        if (!pf) continue;
        queue_->complete(pf, service_(pf->fault));
      }
    });
  }
}

FaultHandlers::~FaultHandlers() {
  stop_.store(true, std::memory_order_relaxed);
  for (std::thread& t : threads_) t.join();
}

}  // namespace gpusvm::refgpu
