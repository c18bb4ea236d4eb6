// Named schedule points: deterministic interleavings for race tests.
//
// A race lives in a window where code has dropped a lock and will later act on what it read
// under it. Product code marks such a window with a point, declared at namespace scope like a
// fault-injection point:
//
//   GPUSVM_SCHED_POINT(g_sp_pmd_decided, "mm.hmm.pmd_decided");
//   ...
//   g_sp_pmd_decided.reach();   // unarmed: one relaxed load and a predictable branch
//
// A test stops a thread there, acts from its own thread while the window is open, then lets
// the stopped thread go on:
//
//   sched_point::Pause pause("mm.hmm.pmd_decided");   // arm: the next hit stops
//   std::thread t([&] { ... the operation that reaches the point ... });
//   ASSERT_TRUE(pause.wait_reached());                 // bounded; false on timeout
//   ... act in the window ...
//   pause.release();
//   t.join();
//
// Contracts:
//  - A point stops at most `spec.stops` hits (default one), so the test thread's own
//    operations may pass the same point without stopping themselves. `spec.thread` limits
//    stopping to threads that called set_thread_name() with that name.
//  - A stopped thread never waits forever: if nobody releases it within hang_timeout() it
//    panics naming the point (a test that forgot release() fails instead of hanging CI).
//  - ~Pause releases and disarms, so a failing ASSERT cannot leave a thread stopped.
//  - A thread never stops while it holds a SpinLock (its spinning waiters would burn a core
//    and could be the very thread the test needs): such a hit is neither counted nor
//    stopped. So a site reached both with and without a spin lock (a lookup helper) marks
//    its window with a plain reach(), and only the hits outside spin locks take part.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace gpusvm {

class SchedPoint {
 public:
  explicit SchedPoint(const char* name);
  ~SchedPoint();
  SchedPoint(const SchedPoint&) = delete;
  SchedPoint& operator=(const SchedPoint&) = delete;

  // Marks the point. Stops the calling thread when a test armed the point and this hit is
  // one it asked for. May sleep (only when armed).
  void reach() {
    // relaxed: a test arms before it starts the operation under test (a happens-before edge
    // through thread creation or a lock); a hit racing with arm/disarm may go either way.
    if (__builtin_expect(armed_.load(std::memory_order_relaxed), 0)) reach_slow();
  }
  const char* name() const { return name_; }

 private:
  friend struct SchedRegistry;
  void reach_slow();

  const char* name_;
  std::atomic<bool> armed_{false};
};

#define GPUSVM_SCHED_POINT(var, name) ::gpusvm::SchedPoint var(name)

namespace sched_point {

struct Spec {
  // Stop the nth hit counted from arming (1-based) and the `stops - 1` hits after it.
  uint64_t nth = 1;
  uint64_t stops = 1;
  // Only hits from threads named so (set_thread_name) count and stop; empty: any thread.
  std::string thread;
  // False: count hits, never stop (does a scenario reach the point at all?).
  bool stop = true;
};

// Names the calling thread for Spec::thread (thread-local; empty clears it).
void set_thread_name(std::string_view name);

// Names of every registered point, sorted and without duplicates.
std::vector<std::string> points();

struct ArmState;

// Arms every point called `name` on construction, disarms on destruction. Several points may
// share a name (one window reached from several places): they share one Pause.
class Pause {
 public:
  explicit Pause(std::string_view name, Spec spec = {});
  ~Pause();
  Pause(const Pause&) = delete;
  Pause& operator=(const Pause&) = delete;

  // -ENOENT when no point has the name (a typo would otherwise make the test vacuous),
  // -EBUSY when another Pause already arms it, else 0.
  int status() const { return status_; }
  // Waits until a thread is stopped at the point; false when none got there in `timeout`.
  [[nodiscard]] bool wait_reached(std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // Lets the stopped thread(s) go on; later hits are counted but no longer stop.
  void release();
  // Hits counted since arming (all threads matching the filter), and how many stopped.
  uint64_t hits() const;
  uint64_t stopped() const;

 private:
  std::string name_;
  std::shared_ptr<ArmState> state_;
  int status_ = 0;
};

}  // namespace sched_point
}  // namespace gpusvm
