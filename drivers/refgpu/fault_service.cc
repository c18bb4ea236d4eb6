// The fault service: Vm::handle_fault (the Xe loop of xe_svm_handle_pagefault /
// __xe_svm_handle_pagefault), the commit of PTEs, and FaultService's handler threads with
// duplicate-fault chaining (see fault_service.h and vm.h).
#include "drivers/refgpu/fault_service.h"

#include <algorithm>
#include <chrono>
#include <thread>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/sched_point.h"
#include "drivers/refgpu/vm.h"

namespace gpusvm::refgpu {

namespace {
// Between get_pages and the commit's notifier lock: where an invalidation makes the commit
// see !pages_valid (race tests stop here).
GPUSVM_SCHED_POINT(g_sp_fault_got_pages, "refgpu.fault.got_pages");
// A handler that has popped a fault and registered it in flight, before it services it
// (duplicate-fault tests stop here so that the duplicate arrives while it is in flight).
GPUSVM_SCHED_POINT(g_sp_fault_in_flight, "refgpu.fault.in_flight");

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// The largest leaf that fits at va/addr with `left` bytes to go.
uint64_t leaf_for(uint64_t va, uint64_t addr, uint64_t left) {
  for (uint64_t l : {kSZ2M, kSZ64K}) {
    if (left >= l && (va % l) == 0 && (addr % l) == 0) return l;
  }
  return kSZ4K;
}

// Backoff after a lost race (another device migrating, -EBUSY collisions): grows with the
// attempt, bounded, so two devices fighting over one range cannot livelock in lockstep.
void backoff(int attempt) {
  std::this_thread::sleep_for(std::chrono::microseconds(50u << std::min(attempt, 6)));
}
}  // namespace

bool Vm::atomic_allowed(uint32_t policy, Target target) const {
  switch (policy) {
    case REFGPU_ATOMIC_CPU:
      return false;
    case REFGPU_ATOMIC_GLOBAL:
      return target == Target::kVram;
    default:  // DEVICE, UNDEFINED: VRAM, or system memory when the device can
      return target == Target::kVram || cfg_.smem_atomics;
  }
}

int Vm::commit_locked(svm::Range* range, bool write, uint32_t atomic_policy, bool exclusive) {
  ScopedStatTimer t(&stats_.bind_ns);
  // Page-table nodes for the worst case (4 KiB leaves) before the notifier lock: nothing
  // allocates under it.
  Result<PtReservation> res = pt_.reserve(range->start(), range->end(), kSZ4K);
  if (!res) return res.error();
  g_sp_fault_got_pages.reach();
  bool replaced = false;
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    svm::Pages& pages = range->pages(0);
    if (!gpusvm_->pages_valid(pages)) return -EAGAIN;
    uint64_t va = range->start();
    for (uint32_t e = 0; e < pages.nr_addrs() && va < range->end(); e++) {
      const svm::PagemapAddr& a = pages.addr(e);
      const uint64_t bytes = std::min<uint64_t>(mm::kPageSize << a.order, range->end() - va);
      const Target target = a.proto == svm::PagemapAddrProto::kSystem ? Target::kSystem : Target::kVram;
      uint8_t perms = 0;
      if (write && a.dir == svm::DmaDirection::kBidirectional) {
        perms |= kPermWrite;
        // DEVICE on system memory: atomic only over pages the device holds exclusively.
        const bool atomic = target == Target::kSystem && atomic_policy == REFGPU_ATOMIC_DEVICE
                                ? exclusive
                                : atomic_allowed(atomic_policy, target);
        if (atomic) perms |= kPermAtomic;
      }
      for (uint64_t off = 0; off < bytes;) {
        const uint64_t leaf = leaf_for(va + off, a.addr + off, bytes - off);
        Result<bool> m = pt_.map(&*res, va + off, va + off + leaf, leaf, target, a.addr + off, perms);
        if (!m) return m.error();  // -EAGAIN: the table changed; reserve again
        replaced |= *m;
        off += leaf;
      }
      va += bytes;
    }
    if (va != range->end()) return -EAGAIN;
    // Replaced leaves (a remap for write, a new placement) must not be reached through old
    // TLB entries: invalidate while the pages are still known valid.
    if (replaced) {
      tlb_.invalidate(range->start(), range->end());
      stats_.tlb_invalidations.add();
      stats_.tlb_invalidated_bytes.add(range->size());
    }
  }
  return 0;
}

Result<svm::Pagemap*> Vm::placement_locked(const MemAttrs& a) {
  if (a.devmem_fd == REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM) return static_cast<svm::Pagemap*>(nullptr);
  if (a.devmem_fd == REFGPU_PREFERRED_LOC_DEFAULT_DEVICE) {
    if (cfg_.vram.empty()) return static_cast<svm::Pagemap*>(nullptr);
    svm::Pagemap* p = region_pagemap(a.region_instance == 0 ? 1 : a.region_instance);
    return p ? p : region_pagemap(1);
  }
  if (!cfg_.resolve_devmem) return Err{-EBADF};
  return cfg_.resolve_devmem(a.devmem_fd, a.region_instance);
}

int Vm::service_locked(uint64_t addr, Access access, const Placement* force,
                       const OnRange& on_range, uint64_t* range_end) {
  collect_garbage_locked();
  const GpuVma* vma = vma_at_locked(addr);
  if (!vma) return -EFAULT;
  const bool write = access != Access::kRead;
  if (write && (vma->flags & REFGPU_VM_BIND_FLAG_READONLY)) return -EFAULT;
  if (vma->kind == GpuVma::Kind::kBo) {
    // A BO binding zapped by a move of its backing: bind it again where it is now.
    if (access == Access::kAtomic &&
        !atomic_allowed(REFGPU_ATOMIC_DEVICE, vma->binding->bo()->backing() == BoBacking::kVram
                                                  ? Target::kVram
                                                  : Target::kSystem)) {
      return -EFAULT;
    }
    if (range_end) *range_end = vma->end;
    return vma->binding->bind();
  }
  const MemAttrs attrs = attrs_.at(addr);
  if (access == Access::kAtomic && attrs.atomic == REFGPU_ATOMIC_CPU) return -EFAULT;

  Placement where;
  if (force) {
    where = *force;
  } else {
    Result<svm::Pagemap*> pm = placement_locked(attrs);
    // A preferred location that went away (a peer unplugged) falls back to system memory.
    where.pagemap = pm ? *pm : nullptr;
    // Atomics that system memory cannot give force VRAM (never silently non-atomic).
    if (access == Access::kAtomic && !atomic_allowed(attrs.atomic, Target::kSystem)) {
      if (!where.pagemap) where.pagemap = region_pagemap(1);
      if (!where.pagemap) return -EFAULT;
      where.strict = true;
    }
  }
  // The GPU VA window a range may span: the GPU VMA and one attribute piece.
  const auto [as, ae] = attrs_.extent(addr);
  const uint64_t gs = std::max(vma->start, as), ge = std::min(vma->end, ae);

  svm::Ctx ctx;
  ctx.read_only = !write;
  ctx.device_private_page_owner = where.pagemap ? where.pagemap->owner() : owner();
  // The VRAM LRU learns which allocations the GPU uses (under the notifier lock: an LRU
  // bump, no allocation).
  ctx.devmem_fn = [](svm::Pagemap* pm, mm::Folio* page, uint64_t n) {
    if (auto* v = dynamic_cast<VramPagemap*>(pm->ops())) v->touch_pages(page, n);
  };
  ctx.devmem_possible = where.pagemap != nullptr;
  ctx.devmem_only = where.pagemap && where.strict;
  unsigned timeslice_ms = 0;
  bool migrated = false;
  for (int attempt = 0; attempt < kFaultAttempts; attempt++) {
    if (dying()) return -ENODEV;
    if (attempt) stats_.fault_retries.add();
    Result<svm::RangeRef> r = gpusvm_->range_find_or_insert(addr, gs, ge, ctx);
    if (!r) return r.error() == -ENOMEM ? -ENOMEM : -EFAULT;
    svm::Range* range = r->get();
    if (on_range) on_range(range->start(), range->end());
    if (range_end) *range_end = range->end();

    // Migration per policy: once, or every attempt with a growing timeslice when strict.
    if ((!migrated || ctx.devmem_only) && where.pagemap) {
      migrated = true;
      const svm::ScanResult s = gpusvm_->scan_mm(range, where.pagemap->owner(), where.pagemap);
      const bool only_system = attrs.migration_policy == REFGPU_MIGRATE_ONLY_SYSTEM_PAGES;
      const bool skip = s == svm::ScanResult::kEqual ||
                        (only_system && !force && s != svm::ScanResult::kSystem &&
                         s != svm::ScanResult::kUnpopulated);
      if (!skip) {
        ScopedStatTimer t(&stats_.migrate_ns);
        if (s != svm::ScanResult::kSystem && s != svm::ScanResult::kUnpopulated) {
          (void)gpusvm_->range_evict(range);  // another pagemap's pages: home first
        }
        const int rc = where.pagemap->populate_mm(range->start(), range->end(), cfg_.as, timeslice_ms);
        if (rc == 0) {
          stats_.migrations_to_vram.add();
        } else if (ctx.devmem_only) {
          // Lost a race with another device's migration, or VRAM is short right now: back
          // off and try again with a longer timeslice (bounded by the attempts).
          if (rc == -ENOMEM || rc == -EBUSY || rc == -EAGAIN) {
            timeslice_ms = timeslice_ms ? timeslice_ms * 2 : 1;
            backoff(attempt);
            continue;
          }
          return -EFAULT;
        }
        // Not strict: a failed migration maps system memory.
      }
    } else if (!where.pagemap && where.strict && range->pages(0).has_devmem_pages()) {
      // Prefetch to system memory: device pages come home.
      if (gpusvm_->range_evict(range) == 0) stats_.migrations_to_smem.add();
    }

    int rc;
    {
      ScopedStatTimer t(&stats_.get_pages_ns);
      rc = gpusvm_->range_get_pages(range, ctx);
    }
    if (rc == -EOPNOTSUPP) {  // mixed placement: all home, then again
      (void)gpusvm_->range_evict(range);
      migrated = false;
      continue;
    }
    if (rc == -EFAULT && range->unmapped()) {  // an UNMAP raced: collect it, look again
      collect_garbage_locked();
      continue;
    }
    if (rc == -EFAULT && ctx.devmem_only) {  // system pages where VRAM was required
      backoff(attempt);
      timeslice_ms = timeslice_ms ? timeslice_ms * 2 : 1;
      continue;
    }
    if (rc == -EBUSY) {
      backoff(attempt);
      continue;
    }
    if (rc == -EPERM) return -EFAULT;
    if (rc != 0) return rc;
    // A DEVICE atomic on pages that stayed in system memory: make them device-exclusive
    // first (vm_exclusive.cc); a CPU access then gives them back and zaps the mapping.
    const bool exclusive = access == Access::kAtomic && attrs.atomic == REFGPU_ATOMIC_DEVICE &&
                           cfg_.smem_atomics && !range->pages(0).has_devmem_pages();
    if (exclusive) {
      rc = make_exclusive_locked(range);
      if (rc == -EAGAIN) continue;
      if (rc != 0) return rc;
    }
    rc = commit_locked(range, write, attrs.atomic, exclusive);
    if (rc == -EAGAIN) continue;
    if (rc != 0) return rc;
    switch (range->size()) {
      case kSZ2M: stats_.faults_2m.add(); break;
      case kSZ64K: stats_.faults_64k.add(); break;
      default: stats_.faults_4k.add(); break;
    }
    return 0;
  }
  return -EAGAIN;
}

int Vm::handle_fault(const GpuFault& fault, const OnRange& on_range) {
  if (dying()) return -ENODEV;
  if (!fault_mode()) return handle_fault_no_mirror(fault);
  const uint64_t t0 = now_ns();
  MutexLock g(&lock_);
  // A fault another service already satisfied (a duplicate that was not chained, or one
  // raced by a concurrent bind) needs nothing but the replay.
  if (std::optional<GpuLeaf> l = pt_.lookup(fault.address)) {
    const bool ok = fault.access == Access::kRead ||
                    (fault.access == Access::kWrite && (l->perms & kPermWrite)) ||
                    (fault.access == Access::kAtomic && (l->perms & kPermAtomic));
    if (ok) {
      stats_.valid_faults.add();
      return 0;
    }
  }
  const int rc = service_locked(fault.address, fault.access, nullptr, on_range, nullptr);
  if (rc != 0) stats_.fault_errors.add();
  stats_.fault_ns.add(now_ns() - t0);
  return rc;
}

// ---- FaultService ----

FaultService::FaultService(FaultQueue* queue, unsigned threads, FindVm find_vm)
    : queue_(queue), find_vm_(std::move(find_vm)) {
  for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { run(); });
}

FaultService::~FaultService() {
  stop_.store(true, std::memory_order_release);
  for (std::thread& t : threads_) t.join();
}

void FaultService::run() {
  sched_point::set_thread_name("refgpu-fault");
  while (!stop_.load(std::memory_order_acquire)) {
    std::shared_ptr<PendingFault> pf = queue_->pop(std::chrono::milliseconds(20));
    if (pf) serve(pf);
  }
}

void FaultService::serve(const std::shared_ptr<PendingFault>& pf) {
  const GpuFault& f = pf->fault;
  std::shared_ptr<InFlight> mine;
  {
    MutexLock g(&lock_);
    for (const std::shared_ptr<InFlight>& e : in_flight_) {
      if (e->vm_id == f.vm_id && e->start <= f.address && f.address < e->end &&
          static_cast<int>(f.access) <= static_cast<int>(e->access)) {
        e->chained.push_back(pf);  // one service, all replayed
        stats_.chained.add();
        return;
      }
    }
    mine = std::make_shared<InFlight>();
    mine->vm_id = f.vm_id;
    mine->start = f.address & ~(kSZ4K - 1);
    mine->end = mine->start + kSZ4K;
    mine->access = f.access;
    in_flight_.push_back(mine);
  }
  g_sp_fault_in_flight.reach();
  stats_.services.add();
  int rc = -EFAULT;  // the VM is gone
  if (std::shared_ptr<Vm> vm = find_vm_(f.vm_id)) {
    rc = vm->handle_fault(f, [this, &mine](uint64_t s, uint64_t e) {
      MutexLock g(&lock_);
      mine->start = s;
      mine->end = e;
    });
  }
  std::vector<std::shared_ptr<PendingFault>> chained;
  {
    MutexLock g(&lock_);
    in_flight_.erase(std::find(in_flight_.begin(), in_flight_.end(), mine));
    chained.swap(mine->chained);
  }
  queue_->complete(pf, rc);
  // A success is shared: the range is bound for every access up to this one's. A failure is
  // not: it may be this fault's own (an atomic under the CPU policy, a write to a read-only
  // VMA) and say nothing about a lesser access chained to it, so those are serviced on their
  // own (they may chain onto a service started since).
  for (const std::shared_ptr<PendingFault>& c : chained) {
    if (rc == 0) {
      queue_->complete(c, rc);
    } else {
      serve(c);
    }
  }
}

}  // namespace gpusvm::refgpu
