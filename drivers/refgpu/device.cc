// RefgpuDevice: creation, the fault service, removal and statistics (see device.h).
#include "drivers/refgpu/device.h"

#include <cerrno>

#include "drivers/devfs/process.h"
#include "drivers/refgpu/file.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/log.h"

namespace gpusvm::refgpu {

Result<std::shared_ptr<RefgpuDevice>> RefgpuDevice::create(mm::PhysMem* mem, const DeviceConfig& cfg) {
  if (!mem || cfg.num_engines == 0 || cfg.num_engines > 16 || cfg.vram_sizes.size() > 15 ||
      cfg.va_bits < 32 || cfg.va_bits > 48)
    return Err{-EINVAL};
  std::shared_ptr<RefgpuDevice> dev(new RefgpuDevice(mem, cfg));
  for (size_t i = 0; i < cfg.vram_sizes.size(); i++) {
    auto r = VramRegion::create(static_cast<uint16_t>(i + 1), cfg.vram_sizes[i]);
    if (!r) return Err{r.error()};
    dev->vram_.push_back(std::move(*r));
  }
  VramArena* arena = dev->vram_.empty() ? nullptr : &dev->vram_[0]->arena();
  dev->resolver_ = std::make_unique<HostMemoryResolver>(mem, arena);
  dev->copy_ = std::make_unique<CopyEngine>(mem, arena, std::make_unique<HostCopyBackend>());
  for (uint16_t i = 0; i < cfg.num_engines; i++) {
    dev->engines_.push_back(std::make_unique<Engine>(i, &dev->faults_));
    // Every FENCE_WRITE may satisfy a wait_user_fence: wake the waiters (they re-read).
    RefgpuDevice* d = dev.get();
    dev->engines_.back()->set_fence_write_hook([d] { d->ufence_wq_.wake_all(); });
  }
  RefgpuDevice* d = dev.get();
  dev->handlers_ = std::make_unique<FaultHandlers>(&dev->faults_, cfg.fault_threads ? cfg.fault_threads : 1,
                                                   [d](const GpuFault& f) { return d->service_fault(f); });
  return dev;
}

RefgpuDevice::~RefgpuDevice() {
  unplug();
  handlers_.reset();  // joins the handler threads before the queue they pop from goes
}

Result<std::shared_ptr<devfs::File>> RefgpuDevice::open(devfs::Process& opener) {
  if (!enter()) return Err{-ENODEV};
  std::shared_ptr<devfs::File> f = std::make_shared<RefgpuFile>(shared_from_this(), opener.mm_ref());
  exit();
  return f;
}

bool RefgpuDevice::enter() {
  in_flight_.fetch_add(1);  // seq_cst: ordered before the load of removed_
  if (removed_.load()) {
    exit();
    return false;
  }
  return true;
}

void RefgpuDevice::exit() {
  if (in_flight_.fetch_sub(1) == 1) drain_wq_.wake_all();
}

void RefgpuDevice::unplug() {
  if (removed_.exchange(true)) return;  // seq_cst: ordered before the load of in_flight_
  // Faults first: an engine stalled in FaultQueue::raise resumes with -ENODEV and its job
  // ends, so stop() below does not wait for a fault nobody will service.
  faults_.shutdown(-ENODEV);
  for (auto& e : engines_) e->stop(-ENODEV);
  ufence_wq_.wake_all();
  if (!drain_wq_.wait_for([this] { return in_flight_.load() == 0; }, hang_timeout()))
    log::get().error("refgpu: unplug: {} ioctls still in flight after {} ms", in_flight_.load(),
                     hang_timeout().count());
}

// The fault unit's service. Nothing binds memory into a VM yet (the VM layer's fault service
// replaces this): a fault has no mirror or BO to map, and fails its job as Xe fails a fault
// outside every VMA.
int RefgpuDevice::service_fault(const GpuFault& f) {
  (void)f;
  return -EFAULT;
}

void RefgpuDevice::read_stats(__u64 v[REFGPU_STAT_COUNT]) const {
  for (size_t i = 0; i < REFGPU_STAT_COUNT; i++) v[i] = 0;
  // Fault sizes come with the VM layer's service (it knows the range size); every fault is
  // counted as 4K until then: the fault unit maps nothing larger.
  v[REFGPU_STAT_FAULTS_4K] = faults_.stats().raised.get();
  v[REFGPU_STAT_VALID_FAULTS] = stats_.valid_faults.get();
  v[REFGPU_STAT_FAULT_ERRORS] = faults_.stats().failed.get();
  v[REFGPU_STAT_FAULT_US] = faults_.stats().service_ns.get() / 1000;
  v[REFGPU_STAT_COPY_BYTES_TO_VRAM] = copy_->stats().bytes_to_vram.get();
  v[REFGPU_STAT_COPY_BYTES_TO_SMEM] = copy_->stats().bytes_to_ram.get();
  v[REFGPU_STAT_COPY_US] = (copy_->stats().ns_to_vram.get() + copy_->stats().ns_to_ram.get()) / 1000;
  v[REFGPU_STAT_TLB_INVALIDATIONS] = stats_.tlb_invalidations.get();
  v[REFGPU_STAT_TLB_INVALIDATED_PAGES] = stats_.tlb_invalidated_pages.get();
  for (const auto& e : engines_) {
    v[REFGPU_STAT_JOBS] += e->stats().jobs.get();
    v[REFGPU_STAT_JOB_ERRORS] += e->stats().job_errors.get();
  }
}

}  // namespace gpusvm::refgpu
