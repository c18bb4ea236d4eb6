#include "gpusvm/base/sched_point.h"

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <map>
#include <mutex>

#include "gpusvm/base/lock.h"

namespace gpusvm {
namespace sched_point {

// What one Pause asked for and what the points saw. Shared by the Pause and by every thread
// stopped at one of its points, so a thread still waking up never touches freed state.
struct ArmState {
  explicit ArmState(Spec s) : spec(std::move(s)) {}
  const Spec spec;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t hits = 0;       // guarded by mu
  uint64_t stopped = 0;    // guarded by mu: threads that stopped, in all
  bool released = false;   // guarded by mu
};

namespace {
thread_local std::string tl_thread_name;
}  // namespace

void set_thread_name(std::string_view name) { tl_thread_name = name; }

}  // namespace sched_point

struct SchedRegistry {
  std::mutex mu;
  std::vector<SchedPoint*> points;                                        // guarded by mu
  std::map<std::string, std::shared_ptr<sched_point::ArmState>, std::less<>> armed;  // by mu

  static SchedRegistry& get() {
    static SchedRegistry* r = new SchedRegistry;  // never destroyed: points outlive main()
    return *r;
  }
  // Sets the armed flag of every point called `name`; returns how many there are. Under mu.
  int set_armed(std::string_view name, bool on) {
    int n = 0;
    for (SchedPoint* p : points) {
      if (name != p->name_) continue;
      // release: pairs with nothing on the fast path (relaxed there); the slow path takes mu.
      p->armed_.store(on, std::memory_order_release);
      n++;
    }
    return n;
  }
};

SchedPoint::SchedPoint(const char* name) : name_(name) {
  SchedRegistry& r = SchedRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  r.points.push_back(this);
  // A point constructed while its name is armed (a test's own point) joins that Pause.
  if (r.armed.count(name_)) armed_.store(true, std::memory_order_relaxed);
}

SchedPoint::~SchedPoint() {
  SchedRegistry& r = SchedRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  std::erase(r.points, this);
}

void SchedPoint::reach_slow() {
  std::shared_ptr<sched_point::ArmState> st;
  {
    SchedRegistry& r = SchedRegistry::get();
    std::lock_guard<std::mutex> g(r.mu);
    auto it = r.armed.find(std::string_view(name_));
    if (it == r.armed.end()) return;  // disarmed meanwhile
    st = it->second;
  }
  if (lockdep::spin_locks_held() > 0) return;  // never stop a spinning lock's holder
  const sched_point::Spec& spec = st->spec;
  if (!spec.thread.empty() && sched_point::tl_thread_name != spec.thread) return;
  std::unique_lock<std::mutex> l(st->mu);
  const uint64_t hit = ++st->hits;
  if (!spec.stop || st->released || hit < spec.nth || hit - spec.nth >= spec.stops) return;
  st->stopped++;
  st->cv.notify_all();
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  while (!st->released) {
    if (st->cv.wait_until(l, deadline) == std::cv_status::timeout && !st->released) {
      l.unlock();
      panic(std::string("sched point ") + name_ + ": a thread stopped here was not released within " +
            std::to_string(hang_timeout().count()) + " ms (a test forgot Pause::release?)");
    }
  }
}

namespace sched_point {

std::vector<std::string> points() {
  SchedRegistry& r = SchedRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  std::vector<std::string> names;
  for (const SchedPoint* p : r.points) names.emplace_back(p->name());
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

Pause::Pause(std::string_view name, Spec spec)
    : name_(name), state_(std::make_shared<ArmState>(std::move(spec))) {
  SchedRegistry& r = SchedRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  if (r.armed.count(name_)) {
    status_ = -EBUSY;
    return;
  }
  r.armed.emplace(name_, state_);
  if (r.set_armed(name_, true) == 0) {
    r.armed.erase(name_);
    status_ = -ENOENT;
  }
}

Pause::~Pause() {
  if (status_ == 0) {
    SchedRegistry& r = SchedRegistry::get();
    std::lock_guard<std::mutex> g(r.mu);
    r.armed.erase(name_);
    r.set_armed(name_, false);
  }
  release();
}

bool Pause::wait_reached(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> l(state_->mu);
  return state_->cv.wait_for(l, timeout, [&] { return state_->stopped > 0; });
}

void Pause::release() {
  std::lock_guard<std::mutex> l(state_->mu);
  state_->released = true;
  state_->cv.notify_all();
}

uint64_t Pause::hits() const {
  std::lock_guard<std::mutex> l(state_->mu);
  return state_->hits;
}

uint64_t Pause::stopped() const {
  std::lock_guard<std::mutex> l(state_->mu);
  return state_->stopped;
}

}  // namespace sched_point
}  // namespace gpusvm
