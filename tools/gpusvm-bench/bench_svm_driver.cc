// The benchmark driver (bench_svm_driver.h): device memory and one device VM on gpusvm/svm.
#include "tools/gpusvm-bench/bench_svm_driver.h"

#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/format.h>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/page_state.h"

namespace gpusvm::bench {

using mm::kPageShift;
using mm::kPageSize;
using mm::kPagesPerPmd;
using mm::Va;

// ---- BenchVram ----

BenchDevmem::BenchDevmem(BenchVram* vram, mm::AddressSpace* as, uint64_t size, std::vector<mm::Pfn> pfns)
    : Devmem(vram->device(), as, vram, vram->pagemap(), size), pfns_(std::move(pfns)) {}

BenchVram::BenchVram(mm::PhysMem* mem, uint64_t nr_pages, std::string name) : mem_(mem), dev_(std::move(name), mem) {
  nr_pages_ = (nr_pages + kPagesPerPmd - 1) / kPagesPerPmd * kPagesPerPmd;
  Result<std::unique_ptr<mm::DevPagemap>> d =
      mm::DevPagemap::create(mem, nr_pages_, this, svm::pagemap_dev_pagemap_ops(), /*storage=*/true);
  if (!d) return;
  dpm_ = std::move(*d);
  blocks_.resize(nr_pages_ / kPagesPerPmd);
  for (uint64_t b = blocks_.size(); b-- > 0;) free_blocks_.push_back(b);
  Result<svm::Pagemap*> p = svm::Pagemap::create(&dev_, dpm_.get(), this);
  if (p) pagemap_ = *p;
}

BenchVram::~BenchVram() {
  if (svm::Pagemap* p = std::exchange(pagemap_, nullptr)) p->put();
  // The last reference may be a device page's; by now every page is gone (the contract),
  // so the destroy has run or is queued on the worker.
  svm::pagemap_flush_destroy_work();
}

uint64_t BenchVram::free_pages() {
  std::lock_guard<std::mutex> g(lock_);
  uint64_t n = free_blocks_.size() * kPagesPerPmd;
  for (const Block& b : blocks_) n += b.split ? b.free.size() : 0;
  return n;
}

uint64_t BenchVram::alloc_page_locked() {
  for (;;) {
    while (!partial_.empty()) {
      Block& blk = blocks_[partial_.back()];
      if (!blk.split || blk.free.empty()) {  // stale entry: emptied or whole again
        partial_.pop_back();
        continue;
      }
      const uint64_t off = blk.free.back();
      blk.free.pop_back();
      if (blk.free.empty()) partial_.pop_back();
      return off;
    }
    if (free_blocks_.empty()) return ~uint64_t{0};
    const uint64_t b = free_blocks_.back();
    free_blocks_.pop_back();
    Block& blk = blocks_[b];
    blk.split = true;
    for (uint64_t j = kPagesPerPmd; j-- > 0;) blk.free.push_back(b * kPagesPerPmd + j);
    partial_.push_back(b);
  }
}

void BenchVram::free_page_locked(uint64_t off) {
  const uint64_t b = off / kPagesPerPmd;
  Block& blk = blocks_[b];
  if (!blk.split) return;  // part of a whole block: freed with the block
  blk.free.push_back(off);
  if (blk.free.size() == 1) partial_.push_back(b);
  if (blk.free.size() == kPagesPerPmd) {  // every page back: a whole block again
    blk.split = false;
    blk.free.clear();
    free_blocks_.push_back(b);
  }
}

void BenchVram::reap_locked() {
  // A released allocation is no longer referenced by any page or by this layer once the
  // call that released it has returned to the driver: the driver thread frees it here.
  std::erase_if(devmems_, [](const std::unique_ptr<BenchDevmem>& d) { return d->released(); });
}

BenchDevmem* BenchVram::alloc_devmem(mm::AddressSpace* as, uint64_t size) {
  if (!pagemap_ || size == 0 || size % kPageSize) return nullptr;
  const uint64_t n = size >> kPageShift;
  std::vector<mm::Pfn> pfns;
  pfns.reserve(n);
  std::lock_guard<std::mutex> g(lock_);
  reap_locked();
  bool ok = true;
  while (ok && pfns.size() + kPagesPerPmd <= n && !free_blocks_.empty()) {
    const uint64_t b = free_blocks_.back();
    free_blocks_.pop_back();
    for (uint64_t j = 0; j < kPagesPerPmd; j++) pfns.push_back(b * kPagesPerPmd + j);
  }
  while (ok && pfns.size() < n) {
    const uint64_t off = alloc_page_locked();
    if (off == ~uint64_t{0}) {
      ok = false;
      break;
    }
    pfns.push_back(off);
  }
  if (!ok) {  // give back what was taken: whole blocks first, then single pages
    for (size_t i = 0; i < pfns.size(); i++) {
      const uint64_t b = pfns[i] / kPagesPerPmd;
      if (!blocks_[b].split && pfns[i] % kPagesPerPmd == 0 && i + kPagesPerPmd <= pfns.size() &&
          pfns[i + kPagesPerPmd - 1] == pfns[i] + kPagesPerPmd - 1) {
        free_blocks_.push_back(b);
        i += kPagesPerPmd - 1;
      } else {
        free_page_locked(pfns[i]);
      }
    }
    return nullptr;
  }
  for (mm::Pfn& p : pfns) p += dpm_->first_pfn();
  devmems_.push_back(std::make_unique<BenchDevmem>(this, as, size, std::move(pfns)));
  return devmems_.back().get();
}

std::byte* BenchVram::bytes(svm::DmaAddr addr) const {
  const mm::Pfn pfn = addr >> kPageShift;
  std::byte* base = dpm_->contains(pfn) ? dpm_->page_data(pfn) : mem_->ram_data(pfn);
  return base + (addr & (kPageSize - 1));
}

svm::PagemapAddr BenchVram::device_map(svm::Pagemap*, svm::Device* dev, mm::Folio* page, unsigned order,
                                       svm::DmaDirection dir) {
  if (dev != &dev_) return svm::PagemapAddr{};  // no interconnect: kDmaMappingError
  return svm::PagemapAddr{page->pfn() << kPageShift, svm::PagemapAddrProto::kDeviceLocal,
                          static_cast<uint8_t>(order), dir};
}

void BenchVram::device_unmap(svm::Pagemap*, svm::Device*, const svm::PagemapAddr&) {}

int BenchVram::populate_mm(svm::Pagemap*, Va start, Va end, mm::AddressSpace* as, unsigned timeslice_ms) {
  BenchDevmem* d = alloc_devmem(as, end - start);
  if (!d) return -ENOMEM;
  return svm::migrate_to_devmem(d, as, start, end, svm::MigrateDetails{.timeslice_ms = timeslice_ms});
}

void BenchVram::destroy(svm::Pagemap*) { destroyed_.store(true, std::memory_order_release); }

void BenchVram::devmem_release(svm::Devmem* devmem) {
  // May run from folio_free under page-table locks: the leaf allocator lock only.
  auto* d = static_cast<BenchDevmem*>(devmem);
  std::lock_guard<std::mutex> g(lock_);
  const std::vector<mm::Pfn>& pfns = d->pfns();
  for (size_t i = 0; i < pfns.size(); i++) {
    const uint64_t off = pfns[i] - dpm_->first_pfn();
    const uint64_t b = off / kPagesPerPmd;
    if (!blocks_[b].split) {  // a whole block: the next 511 frames are its own
      free_blocks_.push_back(b);
      i += kPagesPerPmd - 1;
    } else {
      free_page_locked(off);
    }
  }
  d->released_.store(true, std::memory_order_release);
}

int BenchVram::populate_devmem_pfn(svm::Devmem* devmem, uint64_t npages, uint64_t* pfns) {
  auto* d = static_cast<BenchDevmem*>(devmem);
  if (npages > d->pfns().size()) return -EINVAL;
  std::memcpy(pfns, d->pfns().data(), npages * sizeof(uint64_t));
  return 0;
}

namespace {
// Copies n pages between `dev` (the device pages, pages[0..n)) and `other` (contiguous
// bytes), in as few memcpy calls as the device pages' contiguity allows. to_dev: other ->
// pages. Returns the memcpy calls made.
uint64_t copy_run(const BenchVram& vram, mm::Folio* const* pages, std::byte* other, uint64_t n, bool to_dev) {
  uint64_t calls = 0;
  for (uint64_t j = 0; j < n;) {
    if (!pages[j]) {
      j++;
      continue;
    }
    std::byte* first = vram.bytes(pages[j]->pfn() << kPageShift);
    uint64_t k = j + 1;
    while (k < n && pages[k] && vram.bytes(pages[k]->pfn() << kPageShift) == first + ((k - j) << kPageShift)) k++;
    std::byte* o = other + (j << kPageShift);
    if (to_dev) {
      std::memcpy(first, o, (k - j) << kPageShift);
    } else {
      std::memcpy(o, first, (k - j) << kPageShift);
    }
    calls++;
    j = k;
  }
  return calls;
}
}  // namespace

int BenchVram::copy_to_devmem(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                              svm::Fence* fence) {
  if (fence) {
    if (int rc = fence->wait(hang_timeout())) return rc;
  }
  copies_to_devmem.fetch_add(1, std::memory_order_relaxed);
  uint64_t calls = 0;
  for (uint64_t i = 0; i < npages;) {
    if (addrs[i].addr == svm::kDmaMappingError) {  // a hole: the new page reads zeroes
      if (pages[i]) std::memset(bytes(pages[i]->pfn() << kPageShift), 0, kPageSize);
      i++;
      continue;
    }
    const uint64_t n = std::min<uint64_t>(uint64_t{1} << addrs[i].order, npages - i);
    calls += copy_run(*this, pages + i, bytes(addrs[i].addr), n, /*to_dev=*/true);
    i += n;
  }
  memcpy_calls.fetch_add(calls, std::memory_order_relaxed);
  return 0;
}

int BenchVram::copy_to_ram(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                           svm::Fence* fence) {
  if (fence) {
    if (int rc = fence->wait(hang_timeout())) return rc;
  }
  copies_to_ram.fetch_add(1, std::memory_order_relaxed);
  uint64_t calls = 0;
  for (uint64_t i = 0; i < npages;) {
    if (addrs[i].addr == svm::kDmaMappingError) {
      i++;
      continue;
    }
    const uint64_t n = std::min<uint64_t>(uint64_t{1} << addrs[i].order, npages - i);
    calls += copy_run(*this, pages + i, bytes(addrs[i].addr), n, /*to_dev=*/false);
    i += n;
  }
  memcpy_calls.fetch_add(calls, std::memory_order_relaxed);
  return 0;
}

// ---- BenchGpu ----

BenchGpu::BenchGpu(mm::AddressSpace* as, Options opts, int* rc) : as_(as), opts_(std::move(opts)) {
  if (opts_.vram) {
    dev_ = opts_.vram->device();  // device pages of its own vram map through device_map
  } else {
    own_dev_ = std::make_unique<svm::Device>(opts_.name, as->mem());
    dev_ = own_dev_.get();
  }
  svm::GpusvmConfig cfg{.name = opts_.name, .as = as, .mm_start = opts_.mm_start, .mm_range = opts_.mm_range,
                        .notifier_size = opts_.notifier_size, .ops = this, .chunk_sizes = opts_.chunk_sizes,
                        .devices = {dev_}, .driver_lock = &vm_lock_,
                        .migrate_owner = opts_.vram ? opts_.vram->owner() : nullptr};
  Result<std::unique_ptr<svm::Gpusvm>> g = svm::Gpusvm::init(std::move(cfg));
  *rc = g.error();
  if (g) gpusvm_ = std::move(*g);
}

BenchGpu::~BenchGpu() {
  if (gpusvm_) unbind_all();
  gpusvm_.reset();
}

void BenchGpu::zap_locked(svm::Range* range) {
  gpusvm_->notifier_lock().assert_write_held();
  auto it = pt_.find(range->start());
  if (it == pt_.end()) return;
  for (GpuPte& p : it->second.ptes) p.valid = false;
}

void BenchGpu::invalidate(svm::Gpusvm* g, svm::Notifier* notifier, const mm::MmuNotifierRange& range) {
  g->notifier_lock().assert_write_held();
  invalidations.fetch_add(1, std::memory_order_relaxed);
  svm::Ctx ctx;
  ctx.in_notifier = true;
  // The ranges of the notifier intersecting the event: its tree is stable under the
  // notifier lock. Start at the last range starting at or below range.start.
  const std::map<Va, svm::Range*>& ranges = notifier->ranges();
  auto it = ranges.upper_bound(range.start);
  if (it != ranges.begin()) --it;
  bool zapped = false;
  for (; it != ranges.end() && it->first < range.end; ++it) {
    svm::Range* r = it->second;
    if (r->end() <= range.start) continue;
    zap_locked(r);  // a range is never split: any overlap zaps all of it
    zapped = true;
    g->range_unmap_pages(r, ctx);
  }
  // One TLB flush for the event, after the zaps and before returning: once invalidate
  // returns the device must not reach the old pages.
  if (zapped) tlb_flushes.fetch_add(1, std::memory_order_relaxed);
}

int BenchGpu::commit(svm::Range* range, bool write) {
  vm_lock_.assert_held();
  // Build the PTEs before the notifier lock (nothing allocates under it). The address array
  // is stable here: get_pages, its only writer, is serialized by vm_lock.
  std::map<Va, GpuPtBlock> staging;
  GpuPtBlock& b = staging[range->start()];
  b.start = range->start();
  svm::Pages& pages = range->pages(0);
  uint32_t nr = 0;
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    if (!gpusvm_->pages_valid(pages)) return -EAGAIN;
    nr = pages.nr_addrs();
  }
  b.ptes.reserve(nr);  // reserved outside the lock
  std::map<Va, GpuPtBlock>::node_type node = staging.extract(range->start());
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    // The last check (the sequence alone is not enough: notifiers are wider than ranges).
    // An invalidation since the first look, or a new array of another size: fault again.
    if (!gpusvm_->pages_valid(pages) || pages.nr_addrs() != nr) return -EAGAIN;
    std::vector<GpuPte>& ptes = node.mapped().ptes;
    uint64_t covered = 0;
    for (uint32_t e = 0; e < nr; e++) {
      const svm::PagemapAddr& a = pages.addr(e);
      ptes.push_back({.addr = a.addr, .order = a.order, .valid = true,
                      .write = write && a.dir == svm::DmaDirection::kBidirectional,
                      .devmem = a.proto != svm::PagemapAddrProto::kSystem});
      covered += uint64_t{1} << a.order;
    }
    if (covered != range->npages()) return -EAGAIN;
    auto it = pt_.find(range->start());
    if (it != pt_.end()) {
      std::swap(it->second, node.mapped());  // no allocation: the old PTEs leave with node
    } else {
      pt_.insert(std::move(node));
    }
  }
  commits.fetch_add(1, std::memory_order_relaxed);
  return 0;
}

void BenchGpu::gc_range(svm::Range* range) {
  vm_lock_.assert_held();
  std::map<Va, GpuPtBlock>::node_type node;
  {
    WriteLock nl(&gpusvm_->notifier_lock());
    zap_locked(range);
    auto it = pt_.find(range->start());
    if (it != pt_.end()) node = pt_.extract(it);
  }
  tlb_flushes.fetch_add(1, std::memory_order_relaxed);
  // A partial unmap leaves device memory behind in the part still mapped: bring it back.
  if (range->partial_unmap() && range->pages(0).has_devmem_pages()) (void)gpusvm_->range_evict(range);
}  // node (the old PTEs) is freed here, outside the notifier lock

size_t BenchGpu::collect_garbage_locked() {
  vm_lock_.assert_held();
  const size_t n = gpusvm_->garbage_collector([this](svm::Range* r) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
    gc_range(r);  // garbage_collector calls it with vm_lock held (asserted there)
  });
  gc_removed.fetch_add(n, std::memory_order_relaxed);
  return n;
}

size_t BenchGpu::collect_garbage() {
  MutexLock g(&vm_lock_);
  return collect_garbage_locked();
}

int BenchGpu::fault(Va addr, bool write, Placement placement) {
  MutexLock g(&vm_lock_);
  collect_garbage_locked();
  svm::Ctx ctx;
  ctx.read_only = !write;
  ctx.device_private_page_owner = opts_.vram ? opts_.vram->owner() : nullptr;
  ctx.devmem_possible = placement == Placement::kDevmem && opts_.vram;
  bool migrated = false;
  for (int attempt = 0; attempt < 64; attempt++) {
    Result<svm::RangeRef> r = gpusvm_->range_find_or_insert(addr, 0, ~Va{0}, ctx);
    if (!r) return r.error();
    svm::Range* range = r->get();
    if (ctx.devmem_possible && !migrated) {
      migrated = true;  // once per fault: a failure falls back to system memory
      // Skip a migration that is already done (scan_mm does not fault).
      if (gpusvm_->scan_mm(range, opts_.vram->owner(), opts_.vram->pagemap()) != svm::ScanResult::kEqual) {
        if (opts_.vram->pagemap()->populate_mm(range->start(), range->end(), as_, 0) == 0) {
          migrations.fetch_add(1, std::memory_order_relaxed);
        } else {
          migration_failures.fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
    int rc = gpusvm_->range_get_pages(range, ctx);
    if (rc == -EOPNOTSUPP) {  // mixed placement: bring it all back and retry
      (void)gpusvm_->range_evict(range);
      continue;
    }
    if (rc == -EFAULT && range->unmapped()) {  // an UNMAP raced the fault
      collect_garbage_locked();
      continue;
    }
    if (rc != 0) return rc;
    rc = commit(range, write);
    if (rc == -EAGAIN) {  // invalidated since get_pages: fault again
      eagain.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    return rc;
  }
  return -EAGAIN;
}

const GpuPte* BenchGpu::lookup_locked(Va addr, uint64_t* offset) {
  auto it = pt_.upper_bound(addr);
  if (it == pt_.begin()) return nullptr;
  --it;
  uint64_t idx = (addr - it->first) >> kPageShift;
  for (const GpuPte& p : it->second.ptes) {
    const uint64_t n = uint64_t{1} << p.order;
    if (idx < n) {
      if (!p.valid) return nullptr;
      *offset = (idx << kPageShift) + (addr & (kPageSize - 1));
      return &p;
    }
    idx -= n;
  }
  return nullptr;
}

Result<uint64_t> BenchGpu::gpu_load(Va addr) {
  MutexLock g(&vm_lock_);
  ReadLock nl(&gpusvm_->notifier_lock());
  uint64_t off = 0;
  const GpuPte* p = lookup_locked(addr, &off);
  if (!p) return Err{-EFAULT};
  uint64_t v;
  const svm::DmaAddr a = p->addr + off;
  std::memcpy(&v, opts_.vram ? opts_.vram->bytes(a) : as_->mem()->ram_data(a >> kPageShift) + (a & (kPageSize - 1)),
              sizeof(v));
  return v;
}

int BenchGpu::gpu_store(Va addr, uint64_t value) {
  MutexLock g(&vm_lock_);
  ReadLock nl(&gpusvm_->notifier_lock());
  uint64_t off = 0;
  const GpuPte* p = lookup_locked(addr, &off);
  if (!p || !p->write) return -EFAULT;
  const svm::DmaAddr a = p->addr + off;
  std::memcpy(opts_.vram ? opts_.vram->bytes(a) : as_->mem()->ram_data(a >> kPageShift) + (a & (kPageSize - 1)),
              &value, sizeof(value));
  return 0;
}

uint64_t BenchGpu::check_ptes(std::string* first) {
  MutexLock g(&vm_lock_);
  // Copy the valid PTEs out under the notifier lock, compare after it (query_page takes the
  // mmap lock, which ranks above the notifier lock).
  struct Seen {
    Va va;
    svm::DmaAddr addr;
    bool write;
  };
  std::vector<Seen> seen;
  {
    ReadLock nl(&gpusvm_->notifier_lock());
    for (auto& [start, b] : pt_) {
      Va va = start;
      for (const GpuPte& p : b.ptes) {
        const uint64_t n = uint64_t{1} << p.order;
        if (p.valid) {
          for (uint64_t k = 0; k < n; k++) seen.push_back({va + (k << kPageShift), p.addr + (k << kPageShift), p.write});
        }
        va += n << kPageShift;
      }
    }
  }
  uint64_t bad = 0;
  for (const Seen& e : seen) {
    const mm::PageState st = mm::query_page(*as_, e.va);
    mm::Pfn pfn = st.pfn;
    // query_page gives the head pfn for a PMD-level device-private entry: offset it.
    if (st.kind == mm::PageKind::kSoftLeaf && st.large && pfn % kPagesPerPmd == 0) {
      pfn += (e.va & (mm::kPmdSize - 1)) >> kPageShift;
    }
    const bool present = st.kind == mm::PageKind::kSmall || st.kind == mm::PageKind::kThpPte ||
                         st.kind == mm::PageKind::kThpPmd ||
                         (st.kind == mm::PageKind::kSoftLeaf && (st.leaf == mm::SoftLeafType::kDevicePrivateRead ||
                                                           st.leaf == mm::SoftLeafType::kDevicePrivateWrite));
    const bool same = present && (pfn << kPageShift) == e.addr;
    const bool write_ok = !e.write || st.writable;
    if (!same || !write_ok) {
      if (bad++ == 0 && first) {
        *first = fmt::format("GPU PTE at {:#x} -> {:#x}{} but the CPU has {} pfn {:#x}{}", e.va, e.addr,
                             e.write ? " (write)" : "", mm::page_kind_name(st.kind), pfn, st.writable ? " (write)" : "");
      }
    }
  }
  return bad;
}

void BenchGpu::unbind_all() {
  MutexLock g(&vm_lock_);
  collect_garbage_locked();
  std::vector<svm::RangeRef> all;
  gpusvm_->for_each_range(0, ~Va{0}, [&](svm::Range* r) {
    r->get();
    all.emplace_back(r);
  });
  for (svm::RangeRef& r : all) {
    gc_range(r.get());
    gpusvm_->range_remove(r.get());
  }
}

}  // namespace gpusvm::bench
