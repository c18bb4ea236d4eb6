// The system-allocator suite's rig: a machine with refgpu devices and one process, and the
// runtime opened in it. Tests go through the runtime only (runtime.hpp); the rig reaches the
// machine for what a program cannot do itself (fork, exit, mm::check, device removal).
#pragma once

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/refgpu/device.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/runtime.hpp"

namespace gpusvm::sysalloc {

// Bound for every job and fence wait of the suite.
inline constexpr int64_t kWaitNs = 20'000'000'000;

struct RigConfig {
  uint64_t ram = 192ull << 20;
  uint64_t vram = 16ull << 20;
  uint16_t engines = 2;
  uint32_t va_bits = 48;
  unsigned devices = 1;
};

class Rig {
 public:
  explicit Rig(RigConfig c = {}) : cfg(c) {
    auto m = devfs::Machine::create({.ram_bytes = c.ram});
    EXPECT_TRUE(m.ok()) << m.error();
    machine = std::move(*m);
    for (unsigned i = 0; i < c.devices; ++i) {
      refgpu::DeviceConfig dc;
      dc.vram_sizes = {c.vram};
      dc.num_engines = c.engines;
      dc.va_bits = c.va_bits;
      auto d = refgpu::RefgpuDevice::create(&machine->mem(), dc);
      EXPECT_TRUE(d.ok()) << d.error();
      EXPECT_EQ(machine->add_device("refgpu" + std::to_string(i), *d), 0);
    }
    auto p = machine->create_process();
    EXPECT_TRUE(p.ok());
    proc = *p;
  }
  ~Rig() {
    close();
    machine->shutdown();
  }
  // Opens device 0, a context and one queue per engine. Returns 0 or the runtime's error.
  int open() {
    auto d = rt::Device::open(*proc, 0);
    if (!d) return d.error();
    dev = std::move(*d);
    auto c = rt::Context::create(dev);
    if (!c) return c.error();
    ctx = std::move(*c);
    for (uint16_t e = 0; e < cfg.engines; ++e) {
      auto q = rt::Queue::create(ctx, e);
      if (!q) return q.error();
      queues.push_back(std::move(*q));
    }
    return 0;
  }
  // Ends the handles; `clean`: each destroy must succeed (false after the process or the
  // device went away under them).
  void close(bool clean = true) {
    queues.clear();
    const int c = ctx.reset();
    const int d = dev.reset();
    if (clean) {
      EXPECT_EQ(c, 0);
      EXPECT_EQ(d, 0);
    }
  }
  // Submits cb on queue qi and waits (bounded). Returns the job's status.
  int run(const rt::CmdBuf& cb, size_t qi = 0) {
    auto f = queues.at(qi).submit(cb);
    if (!f) return f.error();
    return f->wait(kWaitNs);
  }
  uint64_t stat(int idx) {
    auto s = dev.stats();
    EXPECT_TRUE(s.ok());
    return s.ok() ? (*s)[idx] : 0;
  }
  void check_mm() {
    const mm::CheckReport r = mm::check(proc->mm());
    EXPECT_TRUE(r.ok()) << r.to_string();
  }

  RigConfig cfg;
  std::unique_ptr<devfs::Machine> machine;
  devfs::Process* proc = nullptr;
  rt::Device dev;
  rt::Context ctx;
  std::vector<rt::Queue> queues;
};

// A call run on a thread of its own (a teardown that must block while a fault is held),
// with a bounded wait for its return. The destructor joins: what the call waits on inside
// the driver is itself bounded (hang_timeout()), so a join cannot hang CI.
class Async {
 public:
  explicit Async(std::function<void()> fn)
      : t_([this, fn = std::move(fn)] {
          fn();
          done_.store(true, std::memory_order_release);
        }) {}
  ~Async() {
    if (t_.joinable()) t_.join();
  }
  Async(const Async&) = delete;
  Async& operator=(const Async&) = delete;
  bool done() const { return done_.load(std::memory_order_acquire); }
  // True once the call returned (joined), false if it did not within `timeout`.
  [[nodiscard]] bool wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!done() && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (!done()) return false;
    t_.join();
    return true;
  }

 private:
  std::atomic<bool> done_{false};
  std::thread t_;
};

// Values 0..n-1 scrambled by `seed`: what the CPU or the GPU writes, so every byte is checked.
inline uint32_t pattern(uint64_t i, uint32_t seed) { return static_cast<uint32_t>(i * 2654435761u) ^ seed; }

}  // namespace gpusvm::sysalloc
