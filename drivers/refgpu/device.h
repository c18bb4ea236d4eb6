// RefgpuDevice: one reference GPU as a devfs device ("/dev/refgpu<N>"), the drm_device of
// the driver: its VRAM regions, copy engine, engines, fault unit, configuration and
// statistics, and the device-removal protocol (drm_dev_enter/exit/unplug).
//
// Design notes:
//  - Everything a file reaches lives in the device; files (RefgpuFile, file.h) hold a
//    shared_ptr to it, so it outlives every open file and every ioctl in flight.
//  - Removal (unplug(), drm_dev_unplug): marks the device gone, so that every later ioctl is
//    -ENODEV (enter() fails); shuts the fault queue down with -ENODEV (an engine stalled on a
//    fault resumes and fails its job) and stops every engine with -ENODEV (queued jobs are
//    cancelled with -ENODEV, every fence completes and its callbacks run: user fences are
//    written, waiters wake); wakes user-fence waiters, which see the device gone; then waits
//    for the ioctls in flight to leave (synchronize_srcu), bounded by hang_timeout().
//    Open files stay valid: their release works on a removed device.
//  - The fault unit: a FaultService pool (fault_service.h) over the FaultQueue; it finds a
//    fault's VM by its device-wide id (asid) in the device's VM table, which holds weak
//    references: a VM being destroyed is not found (the fault fails with -EFAULT).
//  - Device memory: VRAM region 1 is registered as an svm device pagemap (VramPagemap) and
//    is where VMs migrate to; the HostMemoryResolver engines translate through resolves
//    that region. Further regions are reported by the query (sizes, use) and have their own
//    buddy, but no VM places memory in them yet.
//
// Locking: vms_lock_ (kRefgpuDeviceVmsLockClass, a leaf) guards the VM table; nothing is
// called under it. in_flight_/removed_ are seq_cst atomics (the enter/unplug handshake is
// Dekker's: each side stores its flag, then loads the other's).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "drivers/devfs/device.h"
#include "drivers/refgpu/backend.h"
#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/engine.h"
#include "drivers/refgpu/fault_queue.h"
#include "drivers/refgpu/fault_service.h"
#include "drivers/refgpu/vm.h"
#include "drivers/refgpu/vram_pagemap.h"
#include "drivers/refgpu/vram_region.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/svm/device.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/base/waitqueue.h"
#include "uapi/refgpu.h"

namespace gpusvm::mm {
class PhysMem;
}

namespace gpusvm::refgpu {

// The most copy worker threads a device may ask for (DeviceConfig::copy_threads).
inline constexpr unsigned kMaxCopyThreads = 64;

struct DeviceConfig {
  uint32_t va_bits = 48;
  // VRAM region sizes in bytes (non-zero multiples of 2 MiB), instances 1.. in order.
  std::vector<uint64_t> vram_sizes = {64ull << 20};
  uint16_t num_engines = 2;       // compute engines, instances 0..
  unsigned fault_threads = 2;
  // Whether device atomics on system memory work (device-exclusive entries); reported as
  // REFGPU_CONFIG_FLAG_HAS_SMEM_ATOMICS.
  bool smem_atomics = true;
  // Where VRAM lives and what copies (backend.h): kAuto takes GPUSVM_REFGPU_BACKEND, else
  // host; reported by the query as drm_refgpu_query_config::backend.
  BackendConfig backend;
  // The copy engine's host backend (HostCopyBackend): extra worker threads besides the
  // caller (0: the caller copies alone), and the request size from which the workers help
  // (smaller requests are copied by the caller: the hand-off costs more than it gains).
  unsigned copy_threads = 0;
  uint64_t copy_threshold_bytes = 1 << 20;
};

// Counters of VMs destroyed so far (REFGPU_STAT_* are the device's lifetime totals: live VMs
// are summed at the query, destroyed ones were folded in here by retire_vm_stats).
struct DeviceStats {
  StatCounter vm_counters[REFGPU_STAT_COUNT];
};

class RefgpuDevice final : public devfs::Device, public std::enable_shared_from_this<RefgpuDevice> {
 public:
  // A device on `mem` (the machine's PhysMem: system memory the device reaches by DMA
  // address). Errors: -EINVAL (null mem, no engine, more than 15 VRAM regions or 16 engines,
  // a bad region size, va_bits outside 32..48, copy_threads above kMaxCopyThreads, a bad
  // GPUSVM_REFGPU_BACKEND), -ENOMEM, and the backend's errors (open_backend: -ENODEV no Vulkan
  // driver or device, -EOPNOTSUPP).
  static Result<std::shared_ptr<RefgpuDevice>> create(mm::PhysMem* mem, const DeviceConfig& cfg);
  ~RefgpuDevice() override;  // unplug()
  RefgpuDevice(const RefgpuDevice&) = delete;
  RefgpuDevice& operator=(const RefgpuDevice&) = delete;

  // devfs::Device: a new RefgpuFile for opener. -ENODEV after unplug(), -ENOMEM.
  Result<std::shared_ptr<devfs::File>> open(devfs::Process& opener) override;

  // drm_dev_enter/exit: an ioctl runs between them. enter() is false once removed.
  [[nodiscard]] bool enter();
  void exit();
  bool removed() const { return removed_.load(); }
  // Device removal with jobs in flight (see the design notes). Idempotent. Context: no gpusvm
  // lock held, not from an ioctl of this device; may sleep.
  void unplug();

  const DeviceConfig& config() const { return cfg_; }
  Backend& backend() { return *backend_; }
  mm::PhysMem& mem() { return *mem_; }
  uint64_t va_limit() const { return 1ull << cfg_.va_bits; }
  size_t num_engines() const { return engines_.size(); }
  Engine* engine(size_t i) { return engines_[i].get(); }
  // The engine that runs deferred vm_binds (a bind whose in-fences had not all signaled):
  // one queue per VM (FileVm::bind_queue), host work only, not visible in the query.
  Engine* bind_engine() { return bind_engine_.get(); }
  size_t num_vram_regions() const { return vram_.size(); }
  VramRegion& vram_region(size_t i) { return *vram_[i]; }  // instance i + 1
  CopyEngine& copy_engine() { return *copy_; }
  svm::Device& dma_device() { return *dma_; }
  // The device pagemaps VMs migrate to (region 1's), for VmConfig::vram.
  std::vector<VramPagemap*> vram_pagemaps() const;
  FaultQueue& fault_queue() { return faults_; }
  // The fault unit's counters (services, faults chained onto a service in flight).
  const FaultServiceStats& fault_service_stats() const { return service_->stats(); }
  // Folds a VM's counters into the device's totals (at its destruction).
  void retire_vm_stats(const VmStats& s);
  // The resolver engines translate through (system memory by DMA address, the first VRAM
  // region by offset).
  MemoryResolver* resolver() { return resolver_.get(); }
  // Fills values[REFGPU_STAT_*] from every part of the device.
  void read_stats(__u64 values[REFGPU_STAT_COUNT]) GPUSVM_EXCLUDES(vms_lock_);

  // A device-wide VM id (address-space id) for a new VM: 1.., never reused.
  uint32_t alloc_asid() { return next_asid_.fetch_add(1) + 1; }
  // The VM table the fault service looks faults up in. `vm` aliases an owner that keeps the
  // Vm and what it points to (the address space) alive. Context: no lock held.
  void register_vm(uint32_t asid, std::weak_ptr<Vm> vm) GPUSVM_EXCLUDES(vms_lock_);
  void unregister_vm(uint32_t asid) GPUSVM_EXCLUDES(vms_lock_);
  std::shared_ptr<Vm> find_vm(uint32_t asid) GPUSVM_EXCLUDES(vms_lock_);

  // User-fence waiters (wait_user_fence) sleep on ufence_wq_; woken after every FENCE_WRITE
  // of an engine, every user fence the driver writes at a job's end, and at unplug. A waiter
  // reads ufence_seq() before it checks its fence and then sleeps until the sequence moves
  // (wait_ufence_change), so a wake-up between its check and its sleep is not lost: it would
  // otherwise sleep a whole poll slice (1 ms) after its fence signalled.
  // Context: wake_ufence_waiters may be called from any thread, locks held or not (a leaf).
  void wake_ufence_waiters() {
    ufence_seq_.fetch_add(1);  // seq_cst: after the fence write, before the wake-up
    ufence_wq_.wake_all();
  }
  uint64_t ufence_seq() const { return ufence_seq_.load(); }
  // Sleeps until ufence_seq() != seen or the timeout passes. May sleep; no lock held.
  void wait_ufence_change(uint64_t seen, std::chrono::nanoseconds timeout) {
    (void)ufence_wq_.wait_for([&] { return ufence_seq_.load() != seen; }, timeout);
  }

 private:
  RefgpuDevice(mm::PhysMem* mem, const DeviceConfig& cfg) : mem_(mem), cfg_(cfg) {}

  mm::PhysMem* const mem_;
  const DeviceConfig cfg_;
  // Declaration order is teardown order reversed: the fault service and engines go first,
  // then the pagemap (it evicts what is left in VRAM), the copy engine, the regions, and the
  // DMA identity last (every mapping of it gone).
  std::shared_ptr<Backend> backend_;  // outlives the regions and the copy engine on it
  std::unique_ptr<svm::Device> dma_;
  std::vector<std::unique_ptr<VramRegion>> vram_;
  std::unique_ptr<HostMemoryResolver> resolver_;
  std::unique_ptr<CopyEngine> copy_;
  std::unique_ptr<VramPagemap> vram_pm_;  // region 1's (null without VRAM)
  FaultQueue faults_;
  std::vector<std::unique_ptr<Engine>> engines_;
  std::unique_ptr<Engine> bind_engine_;
  std::unique_ptr<FaultService> service_;
  Mutex vms_lock_{&kRefgpuDeviceVmsLockClass};
  std::map<uint32_t, std::weak_ptr<Vm>> vms_ GPUSVM_GUARDED_BY(vms_lock_);
  DeviceStats stats_;
  WaitQueue ufence_wq_;
  std::atomic<uint64_t> ufence_seq_{0};  // bumped by every wake_ufence_waiters
  std::atomic<uint32_t> next_asid_{0};
  std::atomic<bool> removed_{false};
  std::atomic<int64_t> in_flight_{0};
  WaitQueue drain_wq_;  // unplug() waits here for in_flight_ to reach 0
};

}  // namespace gpusvm::refgpu
