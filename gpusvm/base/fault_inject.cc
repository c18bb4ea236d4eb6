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
  FaultPoint* find(std::string_view name) {
    for (FaultPoint* p : points) {
      if (name == p->name_) return p;
    }
    return nullptr;
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
    fail = hit >= nth && (times == 0 || hit < nth + times);
  }
  if (fail) failures_.fetch_add(1, std::memory_order_relaxed);
  return fail;
}

namespace fault_inject {

int arm(std::string_view name, const Spec& spec) {
  if (spec.probability < 0.0 || spec.probability > 1.0 || (spec.probability == 0.0 && spec.nth == 0)) {
    return -EINVAL;
  }
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  FaultPoint* p = r.find(name);
  if (!p) return -ENOENT;
  p->armed_.store(false, std::memory_order_relaxed);
  const uint64_t threshold = spec.probability <= 0.0   ? 0
                             : spec.probability >= 1.0 ? UINT64_MAX
                                                       : static_cast<uint64_t>(
                                                             std::ldexp(spec.probability, 64));
  // relaxed: published by the release store of armed_ below.
  p->nth_.store(spec.nth, std::memory_order_relaxed);
  p->times_.store(spec.times, std::memory_order_relaxed);
  p->seed_.store(spec.seed, std::memory_order_relaxed);
  p->threshold_.store(threshold, std::memory_order_relaxed);
  p->hits_.store(0, std::memory_order_relaxed);
  p->failures_.store(0, std::memory_order_relaxed);
  p->armed_.store(true, std::memory_order_release);
  return 0;
}

void disarm(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  if (FaultPoint* p = r.find(name)) p->armed_.store(false, std::memory_order_relaxed);
}

void disarm_all() {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  for (FaultPoint* p : r.points) p->armed_.store(false, std::memory_order_relaxed);
}

uint64_t hits(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  FaultPoint* p = r.find(name);
  return p ? p->hits_.load(std::memory_order_relaxed) : 0;
}

uint64_t failures(std::string_view name) {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  FaultPoint* p = r.find(name);
  return p ? p->failures_.load(std::memory_order_relaxed) : 0;
}

std::vector<std::string> points() {
  FaultRegistry& r = FaultRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  std::vector<std::string> names;
  for (FaultPoint* p : r.points) names.emplace_back(p->name_);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  return names;
}

ScopedArm::ScopedArm(std::string_view name, const Spec& spec)
    : name_(name), status_(arm(name, spec)) {}

ScopedArm::~ScopedArm() { disarm(name_); }

}  // namespace fault_inject
}  // namespace gpusvm
