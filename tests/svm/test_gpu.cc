#include "tests/svm/test_gpu.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <utility>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/hmm.h"

namespace gpusvm::svm::testing {
namespace {
// Between get_pages and commit (the window pages_valid closes): tests invalidate here.
GPUSVM_SCHED_POINT(g_sp_before_commit, "svm_test.gpu.before_commit");
}  // namespace

TestGpu::TestGpu(mm::AddressSpace* as, Options opts, int* rc) : as_(as), opts_(std::move(opts)) {
  device_ptrs_ = opts_.use_devices;
  for (int i = static_cast<int>(device_ptrs_.size()); i < opts_.devices; i++) {
    devices_.push_back(std::make_unique<Device>(opts_.name + "." + std::to_string(i), as_->mem()));
    device_ptrs_.push_back(devices_.back().get());
  }
  GpusvmConfig cfg{.name = opts_.name, .as = as, .mm_start = opts_.mm_start,
                   .mm_range = opts_.mm_range, .notifier_size = opts_.notifier_size, .ops = this,
                   .chunk_sizes = opts_.chunk_sizes, .driver_lock = &vm_lock_,
                   .migrate_owner = opts_.owner};
  cfg.devices = device_ptrs_;
  Result<std::unique_ptr<Gpusvm>> g = Gpusvm::init(std::move(cfg));
  *rc = g.error();
  if (g) gpusvm_ = std::move(*g);
}

TestGpu::~TestGpu() {
  if (gpusvm_) unbind_all();
  gpusvm_.reset();
}

void TestGpu::zap_locked(Range* range) {
  // The GPU page table changes under the notifier lock held for write here.
  gpusvm_->notifier_lock().assert_write_held();
  auto it = ptes_.find(range->start());
  if (it == ptes_.end()) return;
  for (GpuPte& p : it->second.ptes) p.valid = false;
}

void TestGpu::invalidate(Gpusvm* g, Notifier* notifier, const mm::MmuNotifierRange& range) {
  g->notifier_lock().assert_write_held();
  invalidations.fetch_add(1, std::memory_order_relaxed);
  Ctx ctx;
  ctx.in_notifier = true;
  // Whole ranges: a range is never split, so any overlap zaps all of it. The walk holds the
  // notifier lock only (no driver lock in a notifier callback), as xe_svm_invalidate does.
  g->for_each_range(notifier, range.start, range.end, [&](Range* r) {
    zap_locked(r);
    // (TLB flush: the model GPU has no TLB; zapped PTEs are never used again.)
    g->range_unmap_pages(r, ctx);
  });
}

int TestGpu::commit(Range* range, bool write) {
  vm_lock_.assert_held();
  // Reserve and build the PTEs before the notifier lock (nothing allocates under it). The
  // address array is stable here: get_pages, the only writer of it, is serialized by vm_lock.
  std::map<mm::Va, GpuPteBlock> staging;
  GpuPteBlock& b = staging[range->start()];
  b.start = range->start();
  b.ptes.resize(range->npages());
  Pages& pages = range->pages(0);
  uint64_t idx = 0;
  for (uint32_t e = 0; e < pages.nr_addrs(); e++) {
    const PagemapAddr& a = pages.addr(e);
    for (uint64_t k = 0; k < (uint64_t{1} << a.order) && idx < b.ptes.size(); k++, idx++) {
      b.ptes[idx] = {.addr = a.addr + (k << mm::kPageShift), .valid = true,
                     .write = write && a.dir == DmaDirection::kBidirectional,
                     .devmem = a.proto != PagemapAddrProto::kSystem};
    }
  }
  std::map<mm::Va, GpuPteBlock>::node_type node = staging.extract(range->start());
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    for (size_t i = 0; i < range->nr_pages_objects(); i++) {
      if (!gpusvm_->pages_valid(range->pages(i))) return -EAGAIN;  // retry the fault
    }
    if (idx != b.ptes.size()) return -EAGAIN;
    auto it = ptes_.find(range->start());
    if (it != ptes_.end()) {
      // Same key: swap the contents (no allocation), the old PTEs leave with the node.
      std::swap(it->second, node.mapped());
    } else {
      ptes_.insert(std::move(node));
    }
  }
  commits.fetch_add(1, std::memory_order_relaxed);
  return 0;
}

void TestGpu::gc_range(Range* range) {
  vm_lock_.assert_held();
  std::map<mm::Va, GpuPteBlock>::node_type node;
  {
    WriteLock nl(&gpusvm_->notifier_lock());
    zap_locked(range);
    auto it = ptes_.find(range->start());
    if (it != ptes_.end()) node = ptes_.extract(it);
  }
  // A partial unmap leaves device memory behind in the part still mapped: bring it back.
  if (range->partial_unmap() && range->pages(0).has_devmem_pages()) {
    (void)gpusvm_->range_evict(range);
  }
}

int TestGpu::fault(mm::Va addr, bool write, Ctx ctx) {
  MutexLock g(&vm_lock_);
  gc_removed.fetch_add(gpusvm_->garbage_collector([this](Range* r) { gc_range(r); }),
                       std::memory_order_relaxed);
  if (!write) ctx.read_only = true;
  if (!ctx.device_private_page_owner) ctx.device_private_page_owner = opts_.owner;
  for (int attempt = 0; attempt < 256; attempt++) {
    Result<RangeRef> r = gpusvm_->range_find_or_insert(addr, 0, ~mm::Va{0}, ctx);
    if (!r) return r.error();
    Range* range = r->get();
    int rc = gpusvm_->range_get_pages(range, ctx);
    if (rc == -EOPNOTSUPP) {
      (void)gpusvm_->range_evict(range);  // mixed placement: bring it all back and retry
      continue;
    }
    if (rc == -EFAULT && range->unmapped()) {
      // An UNMAP raced the fault: collect it and look again (the VMA may be gone: -ENOENT).
      gc_removed.fetch_add(gpusvm_->garbage_collector([this](Range* x) { gc_range(x); }),
                           std::memory_order_relaxed);
      continue;
    }
    if (rc != 0) return rc;
    if (const int us = commit_delay_us.load(std::memory_order_relaxed)) {
      std::this_thread::sleep_for(std::chrono::microseconds(us));
    }
    g_sp_before_commit.reach();
    rc = commit(range, write);
    if (rc == -EAGAIN) {
      eagain.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    return rc;
  }
  return -EAGAIN;
}

Result<uint64_t> TestGpu::gpu_load(mm::Va addr) {
  MutexLock g(&vm_lock_);
  ReadLock nl(&gpusvm_->notifier_lock());
  auto it = ptes_.upper_bound(addr);
  if (it == ptes_.begin()) return Err{-EFAULT};
  --it;
  const uint64_t i = (addr - it->first) >> mm::kPageShift;
  if (i >= it->second.ptes.size() || !it->second.ptes[i].valid) return Err{-EFAULT};
  const GpuPte& p = it->second.ptes[i];
  if (p.devmem) return Err{-EOPNOTSUPP};
  uint64_t v;
  std::memcpy(&v, as_->mem()->ram_data(p.addr >> mm::kPageShift) + (addr & (mm::kPageSize - 1)),
              sizeof(v));
  return v;
}

int TestGpu::gpu_store(mm::Va addr, uint64_t value) {
  MutexLock g(&vm_lock_);
  ReadLock nl(&gpusvm_->notifier_lock());
  auto it = ptes_.upper_bound(addr);
  if (it == ptes_.begin()) return -EFAULT;
  --it;
  const uint64_t i = (addr - it->first) >> mm::kPageShift;
  if (i >= it->second.ptes.size() || !it->second.ptes[i].valid) return -EFAULT;
  const GpuPte& p = it->second.ptes[i];
  if (!p.write) return -EFAULT;
  if (p.devmem) return -EOPNOTSUPP;
  std::memcpy(as_->mem()->ram_data(p.addr >> mm::kPageShift) + (addr & (mm::kPageSize - 1)),
              &value, sizeof(value));
  return 0;
}

uint64_t TestGpu::valid_ptes() {
  MutexLock g(&vm_lock_);
  ReadLock nl(&gpusvm_->notifier_lock());
  uint64_t n = 0;
  for (auto& [start, b] : ptes_) {
    for (const GpuPte& p : b.ptes) n += p.valid;
  }
  return n;
}

int TestGpu::check_ptes() {
  MutexLock g(&vm_lock_);
  int bad = 0;
  // Copy the PTEs out under the notifier lock; compare with the CPU without it (quiescent).
  std::vector<std::pair<mm::Va, GpuPte>> valid;
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    for (auto& [start, b] : ptes_) {
      for (size_t i = 0; i < b.ptes.size(); i++) {
        if (b.ptes[i].valid) valid.emplace_back(start + (i << mm::kPageShift), b.ptes[i]);
      }
    }
  }
  for (auto& [va, pte] : valid) {
    Notifier* n = gpusvm_->notifier_find(va, va + 1);
    Range* r = n ? gpusvm_->range_find(n, va, va + 1) : nullptr;
    if (!r) {
      if (bad++ < 5) ADD_FAILURE() << std::hex << "GPU PTE at " << va << " without a range";
      continue;
    }
    uint64_t word = 0;
    int rc = -EBUSY;
    for (int tries = 0; tries < 100 && rc == -EBUSY; tries++) {
      mm::HmmRange hr{.notifier = n->interval(), .notifier_seq = n->interval()->read_begin(),
                      .start = va, .end = va + mm::kPageSize, .hmm_pfns = &word,
                      .dev_private_owner = opts_.owner};
      ReadLock mmap(&as_->mmap_lock());
      rc = mm::hmm_range_fault(&hr);
    }
    const bool present = rc == 0 && (word & mm::HMM_PFN_VALID);
    const bool same = present && (pte.devmem || (mm::hmm_pfn_to_pfn(word) << mm::kPageShift) == pte.addr);
    const bool write_ok = !pte.write || (word & mm::HMM_PFN_WRITE);
    if (!present || !same || !write_ok) {
      if (bad++ < 5) {
        ADD_FAILURE() << std::hex << "GPU PTE at " << va << " -> " << pte.addr
                      << (pte.write ? " rw" : " ro") << " but the CPU has " << word
                      << " (rc " << std::dec << rc << ")";
      }
    }
  }
  return bad;
}

void TestGpu::unbind_all() {
  MutexLock g(&vm_lock_);
  gc_removed.fetch_add(gpusvm_->garbage_collector([this](Range* r) { gc_range(r); }),
                       std::memory_order_relaxed);
  std::vector<RangeRef> all;
  gpusvm_->for_each_range(0, ~mm::Va{0}, [&](Range* r) {
    r->get();
    all.emplace_back(r);
  });
  for (RangeRef& r : all) {
    gc_range(r.get());
    gpusvm_->range_remove(r.get());
  }
}

}  // namespace gpusvm::svm::testing
