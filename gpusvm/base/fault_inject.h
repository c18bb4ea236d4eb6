// Named fault-injection points.
//
// Product code declares a point at namespace scope next to the operation that can fail:
//
//   GPUSVM_FAULT_POINT(g_fail_alloc_folio, "mm.alloc_folio");
//   ...
//   if (g_fail_alloc_folio.should_fail()) return nullptr;   // behaves like a real failure
//
// Tests arm a point by name: fail the Nth hit (optionally for several hits in a row), or fail
// each hit with a seeded probability (deterministic per hit index, so a run is replayable).
// A disarmed point costs one relaxed atomic load.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gpusvm {

class FaultPoint {
 public:
  explicit FaultPoint(const char* name);
  // Unregisters the point, so a point with automatic storage (a test's own) leaves no
  // dangling entry behind.
  ~FaultPoint();
  FaultPoint(const FaultPoint&) = delete;
  FaultPoint& operator=(const FaultPoint&) = delete;

  // True when this hit should fail. Thread-safe.
  bool should_fail() {
    // relaxed: arming happens before the operation under test starts (a test step), and a
    // hit racing with arm/disarm may go either way by design.
    if (!armed_.load(std::memory_order_relaxed)) return false;
    return should_fail_slow();
  }
  const char* name() const { return name_; }

 private:
  friend struct FaultRegistry;
  bool should_fail_slow();

  const char* name_;
  std::atomic<bool> armed_{false};
  std::atomic<uint64_t> hits_{0};      // hits since armed
  std::atomic<uint64_t> failures_{0};  // failures injected since armed
  // Spec. Atomic because a test may re-arm a point while other threads still hit it; arm()
  // publishes a new spec with a release store of armed_.
  std::atomic<uint64_t> nth_{0};
  std::atomic<uint64_t> times_{1};
  std::atomic<uint64_t> threshold_{0};  // probability scaled to 2^64 - 1; 0 = use nth_
  std::atomic<uint64_t> seed_{0};
};

#define GPUSVM_FAULT_POINT(var, name) ::gpusvm::FaultPoint var(name)

namespace fault_inject {

struct Spec {
  // Fail the nth hit counted from arming (1-based), and the `times - 1` hits after it;
  // times == 0 fails every hit from the nth on. Ignored when probability > 0.
  uint64_t nth = 1;
  uint64_t times = 1;
  // When > 0: fail each hit with this probability, decided by hashing (seed, hit index).
  double probability = 0.0;
  uint64_t seed = 0;
};

// Several points may share a name (one failure site reached from several places): arm() and
// disarm() act on each of them, each counts its own hits, and hits()/failures() are the sums.

// Arms the point called `name`. Returns 0, -ENOENT for an unknown name, -EINVAL for a bad spec
// (probability outside [0, 1] or NaN; nth == 0 without a probability). A failed arm() leaves
// the point as it was.
[[nodiscard]] int arm(std::string_view name, const Spec& spec);
void disarm(std::string_view name);
void disarm_all();
// Hits and injected failures since the point was last armed (0 for an unknown name).
uint64_t hits(std::string_view name);
uint64_t failures(std::string_view name);
// Names of every registered point, sorted.
std::vector<std::string> points();

// Arms on construction, disarms on destruction (a test step).
class ScopedArm {
 public:
  ScopedArm(std::string_view name, const Spec& spec);
  ~ScopedArm();
  ScopedArm(const ScopedArm&) = delete;
  ScopedArm& operator=(const ScopedArm&) = delete;
  int status() const { return status_; }

 private:
  std::string name_;
  int status_;
};

}  // namespace fault_inject
}  // namespace gpusvm
