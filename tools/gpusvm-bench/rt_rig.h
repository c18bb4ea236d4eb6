// The rig of the runtime-driven refgpu cases (prefetch, fault-migrate, stride, fault-storm,
// fault-latency): a devfs machine with one refgpu device and one process that opens it
// through the runtime (gpusvm/runtime.hpp) as a program does: a context mirroring the whole
// address space, exec queues, mappings, advice, prefetches and jobs all through the runtime.
// The rig runs one empty job per queue when it is created, so that the runtime's internal
// heap (batches and fence slots) is bound before any measured job.
// The rig reaches the driver only for what a program cannot see: the VM's own timers
// (VmStats) and the fault unit's counters (services, chained faults), and mm::check.
//
// Also here: the granularity layouts. The range a fault or a prefetch creates is the largest
// chunk (2 MiB, 64 KiB, 4 KiB) that fits in the CPU VMA, so the mapping picks the range size:
//   2m:  a 2 MiB aligned MADV_HUGEPAGE span (the CPU's writes make THPs);
//   64k: 1 MiB MADV_NOHUGEPAGE VMAs, a read-only 1 MiB VMA between each two;
//   4k:  32 KiB MADV_NOHUGEPAGE VMAs likewise.
// Every case fills its data with a pattern (a hash of each qword's address and a salt) and
// reads every byte back on the CPU after the run (device pages come home for the read).
//
// Errors: every helper throws Failure (bench.h) naming the call and the errno.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/refgpu/device.h"
#include "drivers/refgpu/file.h"
#include "drivers/refgpu/vm.h"
#include "gpusvm/runtime.hpp"
#include "tools/gpusvm-bench/bench.h"
#include "uapi/refgpu.h"

namespace gpusvm::bench {

// Bound of every fence wait of these cases.
inline constexpr int64_t kRtWaitNs = 60'000'000'000;

struct RtRigConfig {
  uint64_t ram = 256ull << 20;
  uint64_t vram = 64ull << 20;  // rounded up to 2 MiB
  uint16_t engines = 1;
  uint16_t queues_per_engine = 1;
  unsigned fault_threads = 1;
  unsigned copy_threads = 0;  // DeviceConfig::copy_threads
  refgpu::BackendConfig backend{.kind = refgpu::BackendKind::kHost};
};

// The device backend --backend / --vulkan-device name.
refgpu::BackendConfig backend_config(const Options& opt);

class RtRig {
 public:
  explicit RtRig(const RtRigConfig& cfg);
  ~RtRig();
  RtRig(const RtRig&) = delete;
  RtRig& operator=(const RtRig&) = delete;

  const RtRigConfig& config() const { return cfg_; }
  rt::Context& ctx() { return ctx_; }
  rt::Device& dev() { return dev_; }
  // Queue q of engine e (queues_per_engine per engine).
  rt::Queue& queue(size_t e, size_t q = 0) { return queues_.at(e * cfg_.queues_per_engine + q); }
  size_t num_queues() const { return queues_.size(); }
  refgpu::RefgpuDevice& device() { return *device_; }
  bool vulkan() const { return device_->backend().kind() == refgpu::BackendKind::kVulkan; }
  refgpu::Vm& vm() { return *vm_->vm; }
  mm::AddressSpace& as() { return proc_->mm(); }
  mm::PhysMem& mem() { return machine_->mem(); }
  // REFGPU_STAT_* through the runtime (gpusvm_rt_device_stats).
  std::vector<uint64_t> stats();

  // Waits (bounded) for f; throws with the job's error (and its fault) unless it completed.
  static void wait(const rt::Fence& f, const char* what);
  // Submits cb on queue qi and waits for it; returns the wall time (ns) of submit + wait.
  uint64_t run(const rt::CmdBuf& cb, size_t qi = 0);
  // The last n fault records of the device ("addr access status" each): failure diagnostics.
  std::string recent_faults(size_t n = 8);
  // Prefetch [addr, addr + len) to region (0 system, 1 VRAM), waited for.
  void prefetch(mm::Va addr, uint64_t len, uint32_t region);

 private:
  RtRigConfig cfg_;
  std::unique_ptr<devfs::Machine> machine_;
  std::shared_ptr<refgpu::RefgpuDevice> device_;
  devfs::Process* proc_ = nullptr;
  rt::Device dev_;
  rt::Context ctx_;
  std::vector<rt::Queue> queues_;
  std::shared_ptr<refgpu::FileVm> vm_;  // the context's VM (its VmStats)
};

// ---- granularity layouts ----

struct Granule {
  const char* name;  // "2m", "64k", "4k"
  uint64_t unit;     // bytes of one range
  uint64_t piece;    // read-write VMA size (0: one THP mapping)
  bool thp;
};
inline constexpr std::array<Granule, 3> kGranules = {{{"2m", 2ull << 20, 0, true},
                                                      {"64k", 64ull << 10, 1ull << 20, false},
                                                      {"4k", 4096, 32ull << 10, false}}};

struct Layout {
  mm::Va base = 0;
  uint64_t len = 0;
  std::vector<std::pair<mm::Va, mm::Va>> spans;  // read-write: the data
  uint64_t bytes() const;
  std::vector<mm::Va> units(uint64_t unit) const;  // the start of every unit of every span
};

// Maps `size` bytes of data in granule g's layout (through the runtime: mmap, madvise_host,
// mprotect). Nothing is populated.
Layout map_layout(RtRig& rig, const Granule& g, uint64_t size);
void unmap_layout(RtRig& rig, const Layout& l);

// The pattern qword at va for `salt`, and the value a GPU store of these cases writes there.
inline uint64_t pattern_at(mm::Va va, uint64_t salt) {
  return (va * 0x9e3779b97f4a7c15ULL) ^ (salt * 0xc2b2ae3d27d4eb4fULL) ^ 0xb3a5;
}
inline uint64_t gpu_value_at(mm::Va va, uint64_t salt) { return ~pattern_at(va, salt) ^ 0x6770; }

// CPU-writes the pattern into every span (gpusvm_rt_write).
void fill_layout(RtRig& rig, const Layout& l, uint64_t salt);
// CPU-reads every byte of every span and compares: the pattern, except the qwords at
// `gpu_stored` (sorted), which must hold gpu_value_at. Throws naming the first bad qword.
void check_layout(RtRig& rig, const Layout& l, uint64_t salt, std::span<const mm::Va> gpu_stored, const char* when);
// Throws unless every page of every span is where `device` says (VRAM or system memory),
// read from the process page table (gpusvm_rt_query_residency).
void check_residency(RtRig& rig, const Layout& l, bool device, const char* when);

// ---- statistics helpers ----

// Percentile p (0..100) of v (nearest rank); 0 for an empty v.
double percentile(std::vector<double> v, double p);
// Adds lat_p50/p90/p99_ns and log2 buckets hist_<lo>_<hi>_us (lo, hi in µs; the first bucket
// is hist_0_1_us) of the samples (ns) to rep's metrics, with `prefix` before each name.
void latency_metrics(Report& rep, const std::string& prefix, const std::vector<double>& ns);

}  // namespace gpusvm::bench
