// Statistics counters.
//
// A StatCounter is a monotonically increasing 64-bit count (events, bytes, nanoseconds).
// Updates are relaxed atomics: counters order nothing and are read for reporting only, after
// the work they count has been joined. Layers group their counters in a struct generated from
// an X-macro list so they can be enumerated by name (see gpusvm/mm/mm_stats.h).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace gpusvm {

class StatCounter {
 public:
  void add(uint64_t n = 1) { v_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t get() const { return v_.load(std::memory_order_relaxed); }
  void reset() { v_.store(0, std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

// Adds the nanoseconds of its lifetime to a counter.
class ScopedStatTimer {
 public:
  explicit ScopedStatTimer(StatCounter* ns) : ns_(ns), start_(std::chrono::steady_clock::now()) {}
  ~ScopedStatTimer() {
    ns_->add(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                       std::chrono::steady_clock::now() - start_)
                                       .count()));
  }
  ScopedStatTimer(const ScopedStatTimer&) = delete;
  ScopedStatTimer& operator=(const ScopedStatTimer&) = delete;

 private:
  StatCounter* ns_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace gpusvm
