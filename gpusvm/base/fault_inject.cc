#include "gpusvm/base/fault_inject.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <mutex>

namespace gpusvm {

struct FaultRegistry {
  std::mutex mu;
  std::vector<FaultPoint*> points;

  static FaultRegistry& get() {
    static FaultRegistry* r = new FaultRegistry;  // never destroyed: points outlive main()
    return *r;
  }
  // Calls fn on every point called `name`; returns how many there were. Under mu.
  template <typename Fn>
  int for_each_named(std::string_view name, Fn fn) {
    int n = 0;
    for (FaultPoint* p : points) {
      if (name == p->name_) {
        fn(p);
        n++;
      }
    }
    return n;
  }

  // FaultPoint's state is private to it and to this registry (its friend); the free functions
  // of fault_inject go through these.
  static void arm_one(FaultPoint* p, const fault_inject::Spec& spec, uint64_t threshold) {
    p->armed_.store(false, std::memory_order_relaxed);
    // relaxed: published by the release store of armed_ below.
    p->nth_.store(spec.nth, std::memory_order_relaxed);
    p->times_.store(spec.times, std::memory_order_relaxed);
    p->seed_.store(spec.seed, std::memory_order_relaxed);
    p->threshold_.store(threshold, std::memory_order_relaxed);
    p->hits_.store(0, std::memory_order_relaxed);
    p->failures_.store(0, std::memory_order_relaxed);
    p->armed_.store(true, std::memory_order_release);
  }
  static void disarm_one(FaultPoint* p) { p->armed_.store(false, std::memory_order_relaxed); }
  static uint64_t hits_of(const FaultPoint* p) { return p->hits_.load(std::memory_order_relaxed); }
  static uint64_t failures_of(const FaultPoint* p) {
    return p->failures_.load(std::memory_order_relaxed);
  }
};

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
}  // namespace

FaultPoint::FaultPoint(const char* name) : name_(name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  r.points.push_back(this);
}

FaultPoint::~FaultPoint() {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  std::erase(r.points, this);
}

bool FaultPoint::should_fail_slow() {
  // acquire: pairs with the release in arm(), so the spec fields are visible.
  if (!armed_.load(std::memory_order_acquire)) return false;
  uint64_t hit = hits_.fetch_add(1, std::memory_order_relaxed) + 1;
  // relaxed: ordered by the acquire of armed_ above.
  const uint64_t threshold = threshold_.load(std::memory_order_relaxed);
  const uint64_t nth = nth_.load(std::memory_order_relaxed);
  const uint64_t times = times_.load(std::memory_order_relaxed);
  bool fail;
  if (threshold != 0) {
    fail = splitmix64(seed_.load(std::memory_order_relaxed) ^ splitmix64(hit)) <= threshold;
  } else {
    // hit - nth rather than hit < nth + times: no overflow for a huge nth or times.
    fail = hit >= nth && (times == 0 || hit - nth < times);
  }
  if (fail) failures_.fetch_add(1, std::memory_order_relaxed);
  return fail;
}

namespace fault_inject {

int arm(std::string_view name, const Spec& spec) {
  // Written so that a NaN probability fails the range check.
  if (!(spec.probability >= 0.0 && spec.probability <= 1.0) ||
      (spec.probability == 0.0 && spec.nth == 0)) {
    return -EINVAL;
  }
  // Probability scaled to 2^64 - 1; at least 1, since threshold 0 selects the nth mode (a
  // probability too small to represent must not turn into "fail the nth hit").
  uint64_t threshold = 0;
  if (spec.probability >= 1.0) {
    threshold = UINT64_MAX;
  } else if (spec.probability > 0.0) {
    threshold = std::max<uint64_t>(1, static_cast<uint64_t>(std::ldexp(spec.probability, 64)));
  }
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  int n = r.for_each_named(
      name, [&](FaultPoint* p) { FaultRegistry::arm_one(p, spec, threshold); });
  return n > 0 ? 0 : -ENOENT;
}

void disarm(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  r.for_each_named(name, FaultRegistry::disarm_one);
}

void disarm_all() {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  for (FaultPoint* p : r.points) FaultRegistry::disarm_one(p);
}

uint64_t hits(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  uint64_t sum = 0;
  r.for_each_named(name, [&](FaultPoint* p) { sum += FaultRegistry::hits_of(p); });
  return sum;
}

uint64_t failures(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  uint64_t sum = 0;
  r.for_each_named(name, [&](FaultPoint* p) { sum += FaultRegistry::failures_of(p); });
  return sum;
}

std::vector<std::string> points() {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  std::vector<std::string> names;
  for (FaultPoint* p : r.points) names.emplace_back(p->name());
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

ScopedArm::ScopedArm(std::string_view name, const Spec& spec)
    : name_(name), status_(arm(name, spec)) {}

ScopedArm::~ScopedArm() { disarm(name_); }

}  // namespace fault_inject
}  // namespace gpusvm
