// RefgpuDevice: creation, the fault service, removal and statistics (see device.h).
#include "drivers/refgpu/device.h"

#include <algorithm>
#include <cerrno>

#include "drivers/devfs/process.h"
#include "drivers/refgpu/file.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/log.h"

namespace gpusvm::refgpu {

Result<std::shared_ptr<RefgpuDevice>> RefgpuDevice::create(mm::PhysMem* mem, const DeviceConfig& cfg) {
  if (!mem || cfg.num_engines == 0 || cfg.num_engines > 16 || cfg.vram_sizes.size() > 15 ||
      cfg.va_bits < 32 || cfg.va_bits > 48 || cfg.copy_threads > kMaxCopyThreads)
    return Err{-EINVAL};
  std::shared_ptr<RefgpuDevice> dev(new RefgpuDevice(mem, cfg));
  auto backend = open_backend(cfg.backend);
  if (!backend) return Err{backend.error()};
  dev->backend_ = std::move(*backend);
  dev->dma_ = std::make_unique<svm::Device>(REFGPU_DEVICE_NAME, mem);  // DMA window = all of RAM
  for (size_t i = 0; i < cfg.vram_sizes.size(); i++) {
    auto r = VramRegion::create(*dev->backend_, static_cast<uint16_t>(i + 1), cfg.vram_sizes[i]);
    if (!r) return Err{r.error()};
    dev->vram_.push_back(std::move(*r));
  }
  VramArena* arena = dev->vram_.empty() ? nullptr : &dev->vram_[0]->arena();
  dev->resolver_ = std::make_unique<HostMemoryResolver>(mem, arena);
  auto copy = dev->backend_->make_copy(mem, cfg.copy_threads, cfg.copy_threshold_bytes);
  if (!copy) return Err{copy.error()};
  dev->copy_ = std::make_unique<CopyEngine>(mem, arena, std::move(*copy));
  if (!dev->vram_.empty()) {
    auto pm = VramPagemap::create(mem, dev->dma_.get(), dev->vram_[0].get(), dev->copy_.get(), {});
    if (!pm) return Err{pm.error()};
    dev->vram_pm_ = std::move(*pm);
  }
  for (uint16_t i = 0; i < cfg.num_engines; i++) {
    dev->engines_.push_back(std::make_unique<Engine>(i, &dev->faults_));
    // Every FENCE_WRITE may satisfy a wait_user_fence: wake the waiters (they re-read).
    RefgpuDevice* d = dev.get();
    dev->engines_.back()->set_fence_write_hook([d] { d->wake_ufence_waiters(); });
  }
  // Instance numbers after the compute engines'; no fault sink (it runs no batches).
  dev->bind_engine_ = std::make_unique<Engine>(cfg.num_engines, nullptr);
  RefgpuDevice* d = dev.get();
  dev->service_ = std::make_unique<FaultService>(&dev->faults_, cfg.fault_threads ? cfg.fault_threads : 1,
                                                 [d](uint32_t asid) { return d->find_vm(asid); });
  return dev;
}

RefgpuDevice::~RefgpuDevice() {
  unplug();
  service_.reset();  // joins the handler threads before the queue they pop from goes
  engines_.clear();
  bind_engine_.reset();
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
  // No job starts anywhere from here on, then every engine kills its queues: a fence one
  // engine fails must not let a dependent job (or one behind it) start on another.
  for (auto& e : engines_) e->begin_stop(-ENODEV);
  if (bind_engine_) bind_engine_->begin_stop(-ENODEV);
  for (auto& e : engines_) e->stop(-ENODEV);
  if (bind_engine_) bind_engine_->stop(-ENODEV);
  wake_ufence_waiters();
  if (!drain_wq_.wait_for([this] { return in_flight_.load() == 0; }, hang_timeout()))
    log::get().error("refgpu: unplug: {} ioctls still in flight after {} ms", in_flight_.load(),
                     hang_timeout().count());
}

std::vector<VramPagemap*> RefgpuDevice::vram_pagemaps() const {
  if (!vram_pm_) return {};
  return {vram_pm_.get()};
}

void RefgpuDevice::register_vm(uint32_t asid, std::weak_ptr<Vm> vm) {
  MutexLock g(&vms_lock_);
  vms_[asid] = std::move(vm);
}

void RefgpuDevice::unregister_vm(uint32_t asid) {
  MutexLock g(&vms_lock_);
  vms_.erase(asid);
}

std::shared_ptr<Vm> RefgpuDevice::find_vm(uint32_t asid) {
  MutexLock g(&vms_lock_);
  auto it = vms_.find(asid);
  return it == vms_.end() ? nullptr : it->second.lock();
}

namespace {
// A VM's counters as REFGPU_STAT_* values (the ones a VM counts).
void vm_values(const VmStats& s, uint64_t v[REFGPU_STAT_COUNT]) {
  v[REFGPU_STAT_FAULTS_4K] = s.faults_4k.get();
  v[REFGPU_STAT_FAULTS_64K] = s.faults_64k.get();
  v[REFGPU_STAT_FAULTS_2M] = s.faults_2m.get();
  v[REFGPU_STAT_VALID_FAULTS] = s.valid_faults.get();
  v[REFGPU_STAT_FAULT_ERRORS] = s.fault_errors.get();
  v[REFGPU_STAT_FAULT_US] = s.fault_ns.get() / 1000;
  v[REFGPU_STAT_MIGRATIONS_TO_VRAM] = s.migrations_to_vram.get();
  v[REFGPU_STAT_MIGRATIONS_TO_SMEM] = s.migrations_to_smem.get();
  v[REFGPU_STAT_MIGRATE_US] = s.migrate_ns.get() / 1000;
  v[REFGPU_STAT_GET_PAGES_US] = s.get_pages_ns.get() / 1000;
  v[REFGPU_STAT_BIND_US] = s.bind_ns.get() / 1000;
  v[REFGPU_STAT_TLB_INVALIDATIONS] = s.tlb_invalidations.get();
  v[REFGPU_STAT_TLB_INVALIDATED_PAGES] = s.tlb_invalidated_bytes.get() / 4096;
}
}  // namespace

void RefgpuDevice::retire_vm_stats(const VmStats& s) {
  uint64_t v[REFGPU_STAT_COUNT] = {};
  vm_values(s, v);
  for (size_t i = 0; i < REFGPU_STAT_COUNT; i++) stats_.vm_counters[i].add(v[i]);
}

void RefgpuDevice::read_stats(__u64 v[REFGPU_STAT_COUNT]) {
  for (size_t i = 0; i < REFGPU_STAT_COUNT; i++) v[i] = stats_.vm_counters[i].get();
  std::vector<std::shared_ptr<Vm>> live;
  {
    MutexLock g(&vms_lock_);
    for (auto& [asid, w] : vms_)
      if (auto vm = w.lock()) live.push_back(std::move(vm));
  }
  for (const auto& vm : live) {
    uint64_t x[REFGPU_STAT_COUNT] = {};
    vm_values(vm->stats(), x);
    for (size_t i = 0; i < REFGPU_STAT_COUNT; i++) v[i] += x[i];
  }
  // Faults the unit failed before any VM saw them (VM gone, device removed, timeouts).
  v[REFGPU_STAT_FAULT_ERRORS] = std::max<uint64_t>(v[REFGPU_STAT_FAULT_ERRORS], faults_.stats().failed.get());
  v[REFGPU_STAT_COPY_BYTES_TO_VRAM] = copy_->stats().bytes_to_vram.get();
  v[REFGPU_STAT_COPY_BYTES_TO_SMEM] = copy_->stats().bytes_to_ram.get();
  v[REFGPU_STAT_COPY_US] = (copy_->stats().ns_to_vram.get() + copy_->stats().ns_to_ram.get()) / 1000;
  if (vram_pm_) {
    v[REFGPU_STAT_EVICTIONS] = vram_pm_->stats().evictions.get();
    v[REFGPU_STAT_MIGRATE_COPIES_TO_VRAM] = vram_pm_->stats().migrations_to_vram.get();
    v[REFGPU_STAT_MIGRATE_COPIES_TO_SMEM] = vram_pm_->stats().migrations_to_ram.get();
  }
  for (const auto& e : engines_) {
    v[REFGPU_STAT_JOBS] += e->stats().jobs.get();
    v[REFGPU_STAT_JOB_ERRORS] += e->stats().job_errors.get();
  }
}

}  // namespace gpusvm::refgpu
