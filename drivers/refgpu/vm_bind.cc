// Vm bind ops (MAP with CPU_ADDR_MIRROR, UNMAP, PREFETCH), madvise and the range-attribute
// query (see vm.h; xe_vm.c's vm_bind_ioctl_ops and xe_vm_madvise.c in shape).
#include <algorithm>

#include "gpusvm/base/errno.h"
#include "drivers/refgpu/vm.h"

namespace gpusvm::refgpu {

namespace {
constexpr uint32_t kKnownBindFlags = REFGPU_VM_BIND_FLAG_READONLY | REFGPU_VM_BIND_FLAG_IMMEDIATE |
                                     REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR |
                                     REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET |
                                     REFGPU_VM_BIND_FLAG_EVICT;

bool span_ok(uint64_t addr, uint64_t range) {
  return range != 0 && (addr % kSZ4K) == 0 && (range % kSZ4K) == 0 &&
         addr < GpuPageTable::kVaLimit && range <= GpuPageTable::kVaLimit - addr;
}
}  // namespace

int Vm::validate_op_locked(const BindOp& op) {
  if (op.flags & ~kKnownBindFlags) return -EINVAL;
  if (!span_ok(op.addr, op.range)) return -EINVAL;
  const uint64_t end = op.addr + op.range;
  switch (op.op) {
    case REFGPU_VM_BIND_OP_MAP: {
      if (op.flags & REFGPU_VM_BIND_FLAG_EVICT) return -EINVAL;
      auto it = vmas_.lower_bound(op.addr);
      const GpuVma* before = it != vmas_.begin() && std::prev(it)->second.end > op.addr
                                 ? &std::prev(it)->second
                                 : nullptr;
      const bool overlaps_after = it != vmas_.end() && it->first < end;
      if (op.flags & REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR) {
        if (op.bo || op.bo_offset || !fault_mode()) return -EINVAL;
        if (before || overlaps_after) return -EINVAL;
        return 0;
      }
      // A buffer object: over nothing, or inside one mirror region.
      if (!op.bo || (op.flags & REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET)) return -EINVAL;
      if ((op.bo_offset % kSZ4K) || op.bo_offset > op.bo->size() ||
          op.range > op.bo->size() - op.bo_offset) {
        return -EINVAL;
      }
      if (before) {
        if (before->kind != GpuVma::Kind::kMirror || before->end < end) return -EINVAL;
      } else if (overlaps_after) {
        if (it->first != op.addr || it->second.kind != GpuVma::Kind::kMirror || it->second.end < end) {
          return -EINVAL;
        }
      }
      return 0;
    }
    case REFGPU_VM_BIND_OP_UNMAP:
      if (op.flags & ~(REFGPU_VM_BIND_FLAG_EVICT | REFGPU_VM_BIND_FLAG_IMMEDIATE)) return -EINVAL;
      if (op.bo || op.bo_offset) return -EINVAL;
      // BO bindings are unmapped whole.
      for (auto& [s, v] : vmas_) {
        if (v.kind == GpuVma::Kind::kBo && v.end > op.addr && s < end &&
            (s < op.addr || v.end > end)) {
          return -EINVAL;
        }
      }
      return 0;
    case REFGPU_VM_BIND_OP_PREFETCH: {
      if (op.flags & ~REFGPU_VM_BIND_FLAG_IMMEDIATE) return -EINVAL;
      if (op.bo || op.bo_offset) return -EINVAL;
      if (!fault_mode() || !attrs_.covers(op.addr, end)) return -EINVAL;
      const uint32_t r = op.prefetch_region;
      if (r != REFGPU_CONSULT_MEM_ADVISE_PREF_LOC && r > cfg_.vram.size()) return -EINVAL;
      return 0;
    }
    default:
      return -EINVAL;
  }
}

int Vm::prefetch_locked(uint64_t start, uint64_t end, uint32_t region) {
  uint64_t addr = start;
  while (addr < end) {
    Placement where;
    if (region == REFGPU_CONSULT_MEM_ADVISE_PREF_LOC) {
      Result<svm::Pagemap*> pm = placement_locked(attrs_.at(addr));
      if (!pm) return pm.error();
      where = {*pm, true};
    } else {
      where = {region_pagemap(region), true};
    }
    uint64_t range_end = 0;
    // A prefetch maps for write where the mirror allows it (what a later store needs).
    const GpuVma* v = vma_at_locked(addr);
    const Access access =
        v && (v->flags & REFGPU_VM_BIND_FLAG_READONLY) ? Access::kRead : Access::kWrite;
    int rc = service_locked(addr, access, &where, {}, &range_end);
    if (rc == -EFAULT && access == Access::kWrite) {
      // A read-only CPU mapping: prefetch it for reads.
      rc = service_locked(addr, Access::kRead, &where, {}, &range_end);
    }
    if (rc != 0) return rc;
    addr = std::max(range_end, addr + kSZ4K);
  }
  return 0;
}

int Vm::apply_op_locked(const BindOp& op) {
  const uint64_t end = op.addr + op.range;
  switch (op.op) {
    case REFGPU_VM_BIND_OP_MAP:
      if (op.bo) return map_bo_locked(op);
      vmas_[op.addr] = GpuVma{.start = op.addr, .end = end, .kind = GpuVma::Kind::kMirror,
                              .flags = op.flags & (REFGPU_VM_BIND_FLAG_READONLY |
                                                   REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET)};
      attrs_.insert(op.addr, end, op.flags & REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET);
      return 0;
    case REFGPU_VM_BIND_OP_UNMAP: {
      collect_garbage_locked();
      // Mirrored memory the GPU still has ranges in is busy unless the caller evicts.
      if (int rc = remove_ranges_locked(op.addr, end, op.flags & REFGPU_VM_BIND_FLAG_EVICT)) {
        return rc;
      }
      // Trim or split the GPU VMAs the span covers; BO bindings go whole.
      std::vector<GpuVma> keep, returned;
      for (auto it = vmas_.begin(); it != vmas_.end();) {
        GpuVma& v = it->second;
        if (v.end <= op.addr || v.start >= end) {
          ++it;
          continue;
        }
        if (v.kind == GpuVma::Kind::kBo) {
          v.binding->unbind();
          if (v.carved) returned.push_back(v);
        } else {
          if (v.start < op.addr) keep.push_back({v.start, op.addr, v.kind, v.flags});
          if (v.end > end) keep.push_back({end, v.end, v.kind, v.flags});
        }
        it = vmas_.erase(it);
      }
      for (const GpuVma& v : keep) vmas_[v.start] = v;
      attrs_.remove(op.addr, end);
      zap(op.addr, end);
      // A BO carved out of a mirror gives its VA back to the system allocator.
      for (const GpuVma& v : returned) {
        insert_mirror_locked(v.start, v.end, v.mirror_flags);
        attrs_.insert(v.start, v.end, v.mirror_flags & REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET);
      }
      return 0;
    }
    case REFGPU_VM_BIND_OP_PREFETCH:
      return prefetch_locked(op.addr, end, op.prefetch_region);
    default:
      return -EINVAL;
  }
}

void Vm::insert_mirror_locked(uint64_t start, uint64_t end, uint32_t flags) {
  auto next = vmas_.find(end);
  if (next != vmas_.end() && next->second.kind == GpuVma::Kind::kMirror && next->second.flags == flags) {
    end = next->second.end;
    vmas_.erase(next);
  }
  auto prev = vmas_.lower_bound(start);
  if (prev != vmas_.begin()) {
    --prev;
    if (prev->second.end == start && prev->second.kind == GpuVma::Kind::kMirror &&
        prev->second.flags == flags) {
      prev->second.end = end;
      return;
    }
  }
  vmas_[start] = GpuVma{.start = start, .end = end, .kind = GpuVma::Kind::kMirror, .flags = flags};
}

int Vm::map_bo_locked(const BindOp& op) {
  const uint64_t end = op.addr + op.range;
  GpuVma bo{.start = op.addr, .end = end, .kind = GpuVma::Kind::kBo,
            .flags = op.flags & REFGPU_VM_BIND_FLAG_READONLY};
  // Carved out of a mirror: the GPU must have no ranges there (Xe refuses the same way).
  auto it = vmas_.upper_bound(op.addr);
  GpuVma* mirror = nullptr;
  if (it != vmas_.begin() && std::prev(it)->second.end > op.addr) mirror = &std::prev(it)->second;
  if (mirror) {
    collect_garbage_locked();
    if (gpusvm_ && gpusvm_->has_mapping(op.addr, end)) return -EBUSY;
  }
  bo.binding = std::make_shared<BoBinding>(this, op.bo, op.addr, end, op.bo_offset,
                                           op.flags & REFGPU_VM_BIND_FLAG_READONLY);
  if (int rc = bo.binding->bind()) {
    bo.binding->unbind();
    return rc;
  }
  if (mirror) {
    const GpuVma m = *mirror;
    bo.carved = true;
    bo.mirror_flags = m.flags;
    vmas_.erase(m.start);
    if (m.start < op.addr) vmas_[m.start] = GpuVma{m.start, op.addr, m.kind, m.flags};
    if (m.end > end) vmas_[end] = GpuVma{end, m.end, m.kind, m.flags};
    attrs_.remove(op.addr, end);
  }
  vmas_[op.addr] = bo;
  return 0;
}

int Vm::bind(std::span<const BindOp> ops) {
  if (dying()) return -ENODEV;
  MutexLock g(&lock_);
  // Validate every op against the VMAs as the earlier ops of the array leave them: MAPs in
  // one array must not overlap each other either.
  std::vector<std::pair<uint64_t, uint64_t>> new_maps;
  for (const BindOp& op : ops) {
    if (int rc = validate_op_locked(op)) return rc;
    if (op.op == REFGPU_VM_BIND_OP_MAP) {
      for (auto [s, e] : new_maps) {
        if (op.addr < e && s < op.addr + op.range) return -EINVAL;
      }
      new_maps.emplace_back(op.addr, op.addr + op.range);
    }
  }
  for (const BindOp& op : ops) {
    if (int rc = apply_op_locked(op)) return rc;
  }
  return 0;
}

// ---- madvise ----

int Vm::madvise_preferred_loc(uint64_t start, uint64_t range, int32_t devmem_fd,
                              uint16_t migration_policy, uint16_t region_instance) {
  if (!span_ok(start, range)) return -EINVAL;
  if (migration_policy > REFGPU_MIGRATE_ONLY_SYSTEM_PAGES) return -EINVAL;
  if (devmem_fd < REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM) return -EINVAL;
  if (devmem_fd == REFGPU_PREFERRED_LOC_DEFAULT_DEVICE && region_instance > cfg_.vram.size()) {
    return -EINVAL;
  }
  if (devmem_fd == REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM && region_instance != 0) return -EINVAL;
  if (devmem_fd > 0) {
    if (!cfg_.resolve_devmem) return -EBADF;
    Result<svm::Pagemap*> pm = cfg_.resolve_devmem(devmem_fd, region_instance);
    if (!pm) return pm.error();  // -EBADF, -ENOLINK, -EINVAL
  }
  MutexLock g(&lock_);
  // Ranges a munmap left behind are collected first: their MADVISE_AUTORESET must not run
  // after this advice (at the next fault) and undo it on memory mapped there since.
  collect_garbage_locked();
  const uint64_t end = start + range;
  if (!attrs_.covers(start, end)) return -EINVAL;
  attrs_.set(start, end, [&](MemAttrs* a) {
    a->devmem_fd = devmem_fd;
    a->migration_policy = migration_policy;
    a->region_instance = region_instance;
  });
  // Mappings placed elsewhere than the new advice fault back in with it (xe_vm_madvise
  // invalidates the ranges whose placement no longer matches).
  Result<svm::Pagemap*> want = placement_locked(attrs_.at(start));
  gpusvm_->for_each_range(start, end, [&](svm::Range* r) {
    svm::Pagemap* have = r->pages(0).has_devmem_pages() ? r->pages(0).pagemap() : nullptr;
    if (!want || have != *want) zap(r->start(), r->end());
  });
  return 0;
}

int Vm::madvise_atomic(uint64_t start, uint64_t range, uint32_t val) {
  if (!span_ok(start, range) || val > REFGPU_ATOMIC_CPU) return -EINVAL;
  MutexLock g(&lock_);
  collect_garbage_locked();  // as in madvise_preferred_loc
  const uint64_t end = start + range;
  if (!attrs_.covers(start, end)) return -EINVAL;
  attrs_.set(start, end, [&](MemAttrs* a) { a->atomic = val; });
  // Leaves whose atomic bit no longer matches the policy are zapped; they fault back in.
  // DEVICE on system memory wants the bit only over device-exclusive pages, which a leaf
  // mapped under another policy is not: every atomic system leaf goes.
  std::vector<std::pair<uint64_t, uint64_t>> stale;
  pt_.walk(start, end, [&](const GpuLeaf& l) {
    const bool has = l.perms & kPermAtomic;
    const bool mismatch = val == REFGPU_ATOMIC_DEVICE && l.target == Target::kSystem
                              ? has
                              : has != atomic_allowed(val, l.target);
    if (mismatch && (l.perms & kPermWrite)) {
      stale.emplace_back(l.va, l.va + l.size);
    }
  });
  for (auto [s, e] : stale) zap(s, e);
  return 0;
}

Result<uint32_t> Vm::query_mem_range_attrs_count(uint64_t start, uint64_t range) {
  if (!span_ok(start, range)) return Err{-EINVAL};
  MutexLock g(&lock_);
  collect_garbage_locked();  // the query reports the advice after pending autoresets
  return static_cast<uint32_t>(attrs_.count(start, start + range));
}

Result<uint32_t> Vm::query_mem_range_attrs(uint64_t start, uint64_t range,
                                           std::span<MemAttrRange> out) {
  if (!span_ok(start, range)) return Err{-EINVAL};
  MutexLock g(&lock_);
  collect_garbage_locked();
  std::vector<MemAttrRange> v = attrs_.query(start, start + range);
  if (v.size() > out.size()) return Err{-ENOSPC};
  std::copy(v.begin(), v.end(), out.begin());
  return static_cast<uint32_t>(v.size());
}

}  // namespace gpusvm::refgpu
