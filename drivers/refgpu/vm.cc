// Vm: creation, teardown, the invalidate callback, zaps, garbage collection, and the PTE
// check (see vm.h). Bind ops are in vm_bind.cc, madvise in vm_bind.cc, the fault
// service in fault_service.cc.
#include "drivers/refgpu/vm.h"

#include <cinttypes>
#include <cstdio>
#include <utility>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/page_state.h"

namespace gpusvm::refgpu {

namespace {
constexpr uint32_t kKnownVmFlags = REFGPU_VM_CREATE_FLAG_LR_MODE |
                                   REFGPU_VM_CREATE_FLAG_FAULT_MODE |
                                   REFGPU_VM_CREATE_FLAG_NO_VM_OVERCOMMIT;
// The CPU's user address space the mirror covers (x86-64 4-level: 47 bits).
constexpr uint64_t kMirrorRange = 1ull << 47;
}  // namespace

Vm::Vm(VmConfig cfg)
    : cfg_(std::move(cfg)), tlb_(cfg_.tlb_entries), mmu_(cfg_.id, &pt_, &tlb_, cfg_.mem) {}

Result<std::unique_ptr<Vm>> Vm::create(VmConfig cfg) {
  if (cfg.id == 0 || !cfg.mem || (cfg.flags & ~kKnownVmFlags)) return Err{-EINVAL};
  const bool fault = cfg.flags & REFGPU_VM_CREATE_FLAG_FAULT_MODE;
  if (fault && !(cfg.flags & REFGPU_VM_CREATE_FLAG_LR_MODE)) return Err{-EINVAL};
  if (fault && (!cfg.as || !cfg.device)) return Err{-EINVAL};
  for (VramPagemap* p : cfg.vram) {
    if (!p || p->device() != cfg.device) return Err{-EINVAL};
  }
  std::unique_ptr<Vm> vm(new Vm(std::move(cfg)));
  if (fault) {
    svm::GpusvmConfig g{.name = "refgpu.vm" + std::to_string(vm->cfg_.id),
                        .as = vm->cfg_.as,
                        .mm_start = 0,
                        .mm_range = kMirrorRange,
                        .ops = vm.get(),
                        .devices = {vm->cfg_.device},
                        .driver_lock = &vm->lock_,
                        .migrate_owner = vm->owner()};
    Result<std::unique_ptr<svm::Gpusvm>> r = svm::Gpusvm::init(std::move(g));
    if (!r) return Err{r.error()};
    vm->gpusvm_ = std::move(*r);
  }
  return vm;
}

Vm::~Vm() {
  dying_.store(true, std::memory_order_release);
  {
    // BO bindings first: no move notification may reach this VM after it is gone.
    MutexLock g(&lock_);
    for (auto& [s, v] : vmas_) {
      if (v.binding) v.binding->unbind();
    }
  }
  if (gpusvm_) {
    MutexLock g(&lock_);
    collect_garbage_locked();
    // Ranges alive: zap, bring device pages home (the process keeps its data), remove.
    (void)remove_ranges_locked(0, ~0ull, /*evict=*/true);
    vmas_.clear();
  }
  // Whatever is still in the page table (nothing in fault mode after the above) goes with
  // it; the TLB is dropped so that no stale translation survives a VM-id reuse.
  (void)pt_.zap(0, GpuPageTable::kVaLimit);
  tlb_.invalidate_all();
  // fini: no notifier callback runs after this.
  gpusvm_.reset();
}

const GpuVma* Vm::vma_at_locked(uint64_t va) const {
  auto it = vmas_.upper_bound(va);
  if (it == vmas_.begin()) return nullptr;
  --it;
  return it->second.end > va ? &it->second : nullptr;
}

std::vector<GpuVma> Vm::vmas(uint64_t start, uint64_t end) {
  MutexLock g(&lock_);
  std::vector<GpuVma> out;
  for (auto& [s, v] : vmas_) {
    if (v.end > start && s < end) out.push_back(v);
  }
  return out;
}

void Vm::zap(uint64_t start, uint64_t end) {
  const auto [zs, ze] = pt_.zap(start, end);
  if (ze <= zs) return;
  // Exactly the extent the zap cleared; returns once no access through it is in flight.
  tlb_.invalidate(zs, ze);
  stats_.tlb_invalidations.add();
  stats_.tlb_invalidated_bytes.add(ze - zs);
}

void Vm::invalidate(svm::Gpusvm* g, svm::Notifier* notifier, const mm::MmuNotifierRange& range) {
  g->notifier_lock().assert_write_held();
  stats_.invalidate_callbacks.add();
  if (own_exclusive_invalidation(range)) {
    // Our own conversion of a page to device-exclusive, which the commit after it maps
    // atomic: the pages must stay valid (vm_exclusive.cc). Their frames do not change.
    stats_.exclusive_skipped_invalidations.add();
    return;
  }
  svm::Ctx ctx;
  ctx.in_notifier = true;
  // Ranges are never split: any overlap zaps the whole range (it faults back in).
  auto it = notifier->ranges().upper_bound(range.start);
  if (it != notifier->ranges().begin()) --it;
  for (; it != notifier->ranges().end() && it->first < range.end; ++it) {
    svm::Range* r = it->second;
    if (r->end() <= range.start) continue;
    zap(r->start(), r->end());
    g->range_unmap_pages(r, ctx);
  }
}

void Vm::gc_range_locked(svm::Range* range) {
  zap(range->start(), range->end());
  // A partial unmap leaves device memory behind in the part still mapped: bring it home.
  if (range->partial_unmap() && range->pages(0).has_devmem_pages()) {
    if (gpusvm_->range_evict(range) == 0) stats_.migrations_to_smem.add();
  }
  // MADVISE_AUTORESET: what the CPU unmapped gets the default attributes back.
  if (!range->partial_unmap()) {
    const GpuVma* v = vma_at_locked(range->start());
    if (v && (v->flags & REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET)) {
      attrs_.reset(range->start(), range->end());
    }
  }
}

void Vm::collect_garbage_locked() {
  if (!gpusvm_) return;
  stats_.gc_removed.add(gpusvm_->garbage_collector([this](svm::Range* r) {
    lock_.assert_held();
    gc_range_locked(r);
  }));
}

int Vm::remove_ranges_locked(uint64_t start, uint64_t end, bool evict) {
  if (!gpusvm_) return 0;
  std::vector<svm::RangeRef> found;
  gpusvm_->for_each_range(start, end, [&](svm::Range* r) {
    r->get();
    found.emplace_back(r);
  });
  if (found.empty()) return 0;
  if (!evict) return -EBUSY;
  for (svm::RangeRef& r : found) {
    zap(r->start(), r->end());
    if (r->pages(0).has_devmem_pages() || r->pages(0).has_dma_mapping()) {
      // Device pages go home; the CPU keeps the data. A failed eviction (collisions for the
      // whole budget) leaves the pages to come home by CPU fault.
      if (gpusvm_->range_evict(r.get()) == 0 && r->pages(0).has_devmem_pages()) {
        stats_.migrations_to_smem.add();
      }
    }
    gpusvm_->range_remove(r.get());
  }
  return 0;
}

int Vm::check_ptes() {
  MutexLock g(&lock_);
  std::vector<GpuLeaf> leaves;
  pt_.walk(0, GpuPageTable::kVaLimit, [&](const GpuLeaf& l) { leaves.push_back(l); });
  int bad = 0;
  auto report = [&](uint64_t va, const char* what, uint64_t word, int rc) {
    if (bad++ < 5) {
      std::fprintf(stderr, "refgpu vm%u: GPU PTE at 0x%" PRIx64 ": %s (CPU 0x%" PRIx64 ", rc %d)\n",
                   cfg_.id, va, what, word, rc);
    }
  };
  const void* owner = this->owner();
  for (const GpuLeaf& l : leaves) {
    for (uint64_t va = l.va; va < l.va + l.size; va += mm::kPageSize) {
      if (const GpuVma* v = vma_at_locked(va); v && v->kind == GpuVma::Kind::kBo) {
        continue;  // a BO's page: not the CPU's (bo_test checks those against the backing)
      }
      if (!gpusvm_) {
        report(va, "a leaf in a VM without a mirror", 0, 0);
        continue;
      }
      svm::Notifier* n = gpusvm_->notifier_find(va, va + 1);
      if (!n || !gpusvm_->range_find(n, va, va + 1)) {
        report(va, "no range", 0, 0);
        continue;
      }
      uint64_t word = 0;
      int rc = -EBUSY;
      for (int tries = 0; tries < 100 && rc == -EBUSY; tries++) {
        mm::HmmRange hr{.notifier = n->interval(), .notifier_seq = n->interval()->read_begin(),
                        .start = va, .end = va + mm::kPageSize, .hmm_pfns = &word,
                        .dev_private_owner = owner};
        ReadLock mmap(&cfg_.as->mmap_lock());
        rc = mm::hmm_range_fault(&hr);
      }
      const uint64_t off = va - l.va;
      if (rc == 0 && !(word & mm::HMM_PFN_VALID) && l.target == Target::kSystem) {
        // A page the device holds exclusively (DEVICE atomics, vm_exclusive.cc): the CPU
        // entry is device-exclusive for the leaf's frame.
        const mm::PageState s = mm::query_page(*cfg_.as, va);
        if (s.kind == mm::PageKind::kSoftLeaf && s.leaf == mm::SoftLeafType::kDeviceExclusive &&
            (s.pfn << mm::kPageShift) == l.addr + off) {
          continue;
        }
      }
      if ((l.perms & kPermAtomic) && l.target == Target::kSystem &&
          attrs_.at(va).atomic == REFGPU_ATOMIC_DEVICE) {
        report(va, "atomic on system memory under DEVICE without a device-exclusive entry", word, rc);
      } else if (rc != 0 || !(word & mm::HMM_PFN_VALID)) {
        report(va, "the CPU has no page", word, rc);
      } else if (l.target == Target::kSystem &&
                 (mm::hmm_pfn_to_pfn(word) << mm::kPageShift) != l.addr + off) {
        report(va, "another system page", word, rc);
      } else if (l.target == Target::kVram && cfg_.vram.size() == 1 &&
                 mm::hmm_pfn_to_pfn(word) != cfg_.vram[0]->offset_to_pfn(l.addr + off)) {
        report(va, "another VRAM page", word, rc);
      } else if ((l.perms & kPermWrite) && !(word & mm::HMM_PFN_WRITE)) {
        report(va, "writable on the GPU, read-only on the CPU", word, rc);
      }
    }
  }
  return bad;
}

}  // namespace gpusvm::refgpu
