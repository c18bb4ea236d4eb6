// Gpusvm: init/fini, notifiers, ranges, lookups, invalidation and the garbage collector.
// get_pages and the mapping side live in get_pages.cc; range_evict and scan_mm in scan_mm.cc.
#include "gpusvm/svm/gpusvm.h"

#include <bit>
#include <string>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/vma.h"

namespace gpusvm::svm {
namespace {
GPUSVM_FAULT_POINT(g_fail_notifier_alloc, "svm.notifier_alloc");
GPUSVM_FAULT_POINT(g_fail_range_alloc, "svm.range_alloc");
GPUSVM_FAULT_POINT(g_fail_check_pages_alloc, "svm.check_pages_alloc");

// The entry of an ordered map of non-overlapping intervals (keyed by start, value with
// end()) with the lowest start intersecting [start, end): the last one starting at or before
// start, if it reaches past start, else the first starting inside. O(log n).
template <typename Map>
typename Map::mapped_type interval_first(const Map& map, mm::Va start, mm::Va end) {
  auto it = map.upper_bound(start);
  if (it != map.begin()) {
    auto prev = std::prev(it);
    if (prev->second->end() > start) return prev->second;
  }
  if (it != map.end() && it->first < end) return it->second;
  return nullptr;
}
}  // namespace

Range* GpusvmOps::range_alloc(Gpusvm*) { return new (std::nothrow) Range(); }
void GpusvmOps::range_free(Range* range) { delete range; }
Notifier* GpusvmOps::notifier_alloc(Gpusvm*) { return new (std::nothrow) Notifier(); }
void GpusvmOps::notifier_free(Notifier* notifier) { delete notifier; }

const char* scan_result_name(ScanResult r) {
  switch (r) {
    case ScanResult::kUnpopulated: return "unpopulated";
    case ScanResult::kEqual: return "equal";
    case ScanResult::kOther: return "other";
    case ScanResult::kSystem: return "system";
    case ScanResult::kMixedDevice: return "mixed_device";
    case ScanResult::kMixed: return "mixed";
  }
  return "?";
}

// --- Range ---------------------------------------------------------------------------

Range::~Range() = default;

void Range::put() {
  // acq_rel: the thread freeing the range sees every write made by earlier holders.
  if (refcount_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  // The tree's reference went with range_remove, which unmapped every Pages object, so the
  // Gpusvm is not needed here (it may be gone: ranges outlive fini). ~Pages checks it.
  ops_->range_free(this);
}

uint64_t Range::metadata_bytes() const {
  uint64_t bytes = sizeof(*this);
  for (const auto& p : pages_) bytes += sizeof(p) + p->metadata_bytes();
  return bytes;
}

// --- init / fini -----------------------------------------------------------------------

Result<std::unique_ptr<Gpusvm>> Gpusvm::init(GpusvmConfig cfg) {
  if (cfg.chunk_sizes.empty()) cfg.chunk_sizes = {2ULL << 20, 64ULL << 10, 4ULL << 10};
  if (cfg.as) {
    if (!cfg.ops || cfg.devices.empty()) return Err{-EINVAL};
    if (cfg.mm_range == 0 || cfg.mm_start + cfg.mm_range < cfg.mm_start) return Err{-EINVAL};
    if ((cfg.mm_start | cfg.mm_range) & (mm::kPageSize - 1)) return Err{-EINVAL};
    if (!std::has_single_bit(cfg.notifier_size)) return Err{-EINVAL};
    for (size_t i = 0; i < cfg.chunk_sizes.size(); i++) {
      const uint64_t c = cfg.chunk_sizes[i];
      if (!std::has_single_bit(c) || c < mm::kPageSize) return Err{-EINVAL};
      if (i > 0 && c >= cfg.chunk_sizes[i - 1]) return Err{-EINVAL};
    }
    if (cfg.chunk_sizes.back() != mm::kPageSize) return Err{-EINVAL};
    if (cfg.chunk_sizes.front() > cfg.notifier_size) return Err{-EINVAL};
  }
  for (Device* d : cfg.devices) {
    if (!d) return Err{-EINVAL};
  }
  std::unique_ptr<Gpusvm> g(new (std::nothrow) Gpusvm(std::move(cfg)));
  if (!g) return Err{-ENOMEM};
  return g;
}

Gpusvm::~Gpusvm() {
  // Unregister every notifier first: after remove() no invalidation runs, so the ranges can
  // be torn down without the notifier lock racing a callback.
  for (auto& [start, n] : notifiers_) n->notifier_.remove();
  while (!notifiers_.empty()) {
    Notifier* n = notifiers_.begin()->second;
    // range_remove frees the notifier with its last range; an empty one is freed here.
    if (n->ranges_.empty()) {
      notifier_destroy(n);
      continue;
    }
    range_remove_internal(n->ranges_.begin()->second);
  }
  // Ranges the GC still holds (removed already, or removed above) drop their queue reference.
  Range* head;
  {
    WriteLock g(&notifier_lock_);
    head = gc_head_;
    gc_head_ = nullptr;
    for (Range* r = head; r; r = r->gc_next_) r->gc_queued_ = false;
  }
  while (head) {
    Range* next = head->gc_next_;
    head->gc_next_ = nullptr;
    head->put();
    head = next;
  }
}

void Gpusvm::assert_driver_lock_held(const char* where) const {
  if (cfg_.driver_lock && !lockdep::held(cfg_.driver_lock)) {
    panic(std::string("gpusvm ") + cfg_.name + ": " + where + " without the driver lock");
  }
}

// --- notifiers --------------------------------------------------------------------------

Result<Notifier*> Gpusvm::notifier_create(mm::Va fault_addr) {
  if (g_fail_notifier_alloc.should_fail()) return Err{-ENOMEM};
  Notifier* n = cfg_.ops->notifier_alloc(this);
  if (!n) return Err{-ENOMEM};
  n->gpusvm_ = this;
  n->start_ = fault_addr & ~(cfg_.notifier_size - 1);
  n->end_ = n->start_ + cfg_.notifier_size;
  const int rc = n->notifier_.insert(cfg_.as, n->start_, cfg_.notifier_size, n);
  if (rc != 0) {
    cfg_.ops->notifier_free(n);
    return Err{rc == -EINVAL && cfg_.as->exited() ? -EFAULT : rc};
  }
  // The tree node is allocated here, before the notifier lock (a map insert allocates).
  std::map<mm::Va, Notifier*> node_source;
  node_source.emplace(n->start_, n);
  {
    WriteLock g(&notifier_lock_);
    notifiers_.insert(node_source.extract(node_source.begin()));
  }
  nr_notifiers_.fetch_add(1, std::memory_order_relaxed);
  return n;
}

void Gpusvm::notifier_destroy(Notifier* n) {
  n->notifier_.remove();
  std::map<mm::Va, Notifier*>::node_type node;  // freed after the lock
  {
    WriteLock g(&notifier_lock_);
    node = notifiers_.extract(n->start_);
  }
  nr_notifiers_.fetch_sub(1, std::memory_order_relaxed);
  cfg_.ops->notifier_free(n);
}

Notifier* Gpusvm::notifier_find(mm::Va start, mm::Va end) const {
  assert_driver_lock_held("notifier_find");
  return interval_first(notifiers_, start, end);
}

// --- ranges ---------------------------------------------------------------------------

Range* Gpusvm::range_find(Notifier* notifier, mm::Va start, mm::Va end) const {
  assert_driver_lock_held("range_find");
  return interval_first(notifier->ranges_, start, end);
}

bool Gpusvm::has_mapping(mm::Va start, mm::Va end) const {
  bool found = false;
  for_each_range(start, end, [&](Range*) { found = true; });
  return found;
}

void Gpusvm::assert_tree_lock_held(const char* where) const {
  if (notifier_lock_.held_by_me()) return;  // read or write
  if (cfg_.driver_lock && lockdep::held(cfg_.driver_lock)) return;
  if (!cfg_.driver_lock) {
    panic(std::string("gpusvm ") + cfg_.name + ": " + where + " without the notifier lock");
  }
  panic(std::string("gpusvm ") + cfg_.name + ": " + where + " without the driver lock or the notifier lock");
}

void Gpusvm::for_each_range(mm::Va start, mm::Va end, FunctionRef<void(Range*)> fn) const {
  assert_tree_lock_held("for_each_range");
  auto nit = notifiers_.upper_bound(start);
  if (nit != notifiers_.begin()) --nit;
  for (; nit != notifiers_.end() && nit->first < end; ++nit) {
    const Notifier* n = nit->second;
    if (n->end_ <= start) continue;
    auto rit = n->ranges_.upper_bound(start);
    if (rit != n->ranges_.begin() && std::prev(rit)->second->end_ > start) --rit;
    for (; rit != n->ranges_.end() && rit->first < end; ++rit) fn(rit->second);
  }
}

void Gpusvm::for_each_range(const Notifier* n, mm::Va start, mm::Va end,
                            FunctionRef<void(Range*)> fn) const {
  assert_tree_lock_held("for_each_range");
  auto rit = n->ranges_.upper_bound(start);
  if (rit != n->ranges_.begin() && std::prev(rit)->second->end_ > start) --rit;
  for (; rit != n->ranges_.end() && rit->first < end; ++rit) fn(rit->second);
}

mm::Va Gpusvm::find_vma_start(mm::Va start, mm::Va end) const {
  if (!cfg_.as || cfg_.as->exited()) return ~mm::Va{0};
  ReadLock g(&cfg_.as->mmap_lock());
  const mm::Vma* vma = cfg_.as->find_vma(start);
  if (!vma || vma->start >= end) return ~mm::Va{0};
  return vma->start;
}

bool Gpusvm::check_pages(Notifier* notifier, mm::Va start, mm::Va end, const void* owner) {
  const uint64_t npages = (end - start) >> mm::kPageShift;
  if (g_fail_check_pages_alloc.should_fail()) return false;  // as kvmalloc failing: no
  std::vector<uint64_t> pfns(npages, 0);
  mm::HmmRange r{.notifier = &notifier->notifier_, .notifier_seq = notifier->notifier_.read_begin(),
                 .start = start, .end = end, .hmm_pfns = pfns.data(),
                 // Our own device pages are present too (drm_gpusvm_check_pages passes the
                 // owner): a range migrated to VRAM keeps its chunk size on a re-fault.
                 .dev_private_owner = owner};
  if (mm::hmm_range_fault(&r) != 0) return false;
  for (uint64_t w : pfns) {
    if (!(w & mm::HMM_PFN_VALID)) return false;
  }
  return true;
}

uint64_t Gpusvm::range_chunk_size(Notifier* notifier, const mm::Vma& vma, mm::Va fault_addr,
                                  mm::Va gpuva_start, mm::Va gpuva_end, const Ctx& ctx) {
  for (const uint64_t chunk : cfg_.chunk_sizes) {
    const mm::Va start = fault_addr & ~(chunk - 1);
    const mm::Va end = start + chunk;
    if (start < vma.start || end > vma.end) continue;
    if (start < notifier->start_ || end > notifier->end_) continue;
    if (start < gpuva_start || end > gpuva_end) continue;
    if (start < mm_start() || end > mm_end()) continue;
    // A 4 KiB chunk around an address no range covers cannot overlap one.
    if (chunk != mm::kPageSize && interval_first(notifier->ranges_, start, end)) continue;
    // Small chunks only over what the CPU faulted in: a range must not cover pages the CPU
    // never touched and the device would fault in for nothing (drm_gpusvm_check_pages).
    if (chunk <= ctx.check_pages_threshold && chunk != mm::kPageSize &&
        !check_pages(notifier, start, end, ctx.device_private_page_owner)) {
      continue;
    }
    return chunk;
  }
  return 0;
}

Result<Range*> Gpusvm::range_create(Notifier* notifier, mm::Va start, mm::Va end) {
  if (g_fail_range_alloc.should_fail()) return Err{-ENOMEM};
  Range* r = cfg_.ops->range_alloc(this);
  if (!r) return Err{-ENOMEM};
  r->gpusvm_ = this;
  r->ops_ = cfg_.ops;
  r->notifier_ = notifier;
  r->start_ = start;
  r->end_ = end;
  r->pages_.reserve(cfg_.devices.size());
  for (Device* d : cfg_.devices) r->pages_.push_back(std::make_unique<Pages>(d));
  return r;
}

Result<RangeRef> Gpusvm::range_find_or_insert(mm::Va fault_addr, mm::Va gpuva_start,
                                              mm::Va gpuva_end, const Ctx& ctx) {
  assert_driver_lock_held("range_find_or_insert");
  if (!cfg_.as) return Err{-EINVAL};  // pages-only mode has no ranges
  if (fault_addr < mm_start() || fault_addr >= mm_end()) return Err{-EINVAL};
  if (gpuva_start >= gpuva_end || fault_addr < gpuva_start || fault_addr >= gpuva_end) {
    return Err{-EINVAL};
  }
  mm::AddressSpace* as = cfg_.as;
  if (as->exited()) return Err{-EFAULT};
  fault_addr &= ~(mm::kPageSize - 1);

  Notifier* notifier = interval_first(notifiers_, fault_addr, fault_addr + 1);
  bool notifier_new = false;
  // Allocated before the locks: the tree node of the new range (nothing allocates under the
  // notifier lock). A node of a temporary map is moved into the notifier's tree.
  std::map<mm::Va, Range*> node_source;
  int err = 0;
  Range* range = nullptr;
  {
    ReadLock mmap(&as->mmap_lock());
    const mm::Vma* vma = as->vma_lookup(fault_addr);
    if (as->exited()) {
      err = -EFAULT;
    } else if (!vma) {
      err = -ENOENT;
    } else if (vma->flags & (mm::VM_IO | mm::VM_PFNMAP)) {
      err = -EIO;
    } else if (!ctx.read_only && !(vma->flags & mm::VM_WRITE)) {
      err = -EPERM;
    }
    if (err == 0 && !notifier) {
      Result<Notifier*> n = notifier_create(fault_addr);
      if (!n) {
        err = n.error();
      } else {
        notifier = *n;
        notifier_new = true;
      }
    }
    if (err == 0) {
      if (Range* found = interval_first(notifier->ranges_, fault_addr, fault_addr + 1)) {
        found->get();
        return RangeRef(found);
      }
      const uint64_t chunk =
          range_chunk_size(notifier, *vma, fault_addr, gpuva_start, gpuva_end, ctx);
      if (chunk == 0) {
        err = -EINVAL;
      } else {
        const mm::Va start = fault_addr & ~(chunk - 1);
        Result<Range*> r = range_create(notifier, start, start + chunk);
        if (!r) {
          err = r.error();
        } else {
          range = *r;
          node_source.emplace(start, range);
        }
      }
    }
  }
  if (err != 0) {
    if (notifier_new) notifier_destroy(notifier);
    return Err{err};
  }
  auto node = node_source.extract(node_source.begin());
  range->get();  // the caller's reference; the tree keeps the initial one
  {
    WriteLock g(&notifier_lock_);
    notifier->ranges_.insert(std::move(node));
    range->inserted_.store(true, std::memory_order_release);
  }
  nr_ranges_.fetch_add(1, std::memory_order_relaxed);
  return RangeRef(range);
}

void Gpusvm::range_remove(Range* range) {
  assert_driver_lock_held("range_remove");
  range_remove_internal(range);
}

void Gpusvm::range_remove_internal(Range* range) {
  if (!range->inserted()) return;
  Notifier* n = range->notifier_.load(std::memory_order_relaxed);
  // Destroyed after the lock is dropped (nothing is freed under the notifier lock).
  std::map<mm::Va, Range*>::node_type node;
  std::vector<std::unique_ptr<PagemapAddr[]>> old_addrs(range->pages_.size());
  {
    WriteLock g(&notifier_lock_);
    auto it = n->ranges_.find(range->start_);
    if (it == n->ranges_.end() || it->second != range) {
      panic("gpusvm " + cfg_.name + ": range_remove of a range not in its notifier");
    }
    range->inserted_.store(false, std::memory_order_release);
    // The driver zapped its PTEs before (the upstream contract); mappings left are dropped.
    for (size_t i = 0; i < range->pages_.size(); i++) {
      Pages* p = range->pages_[i].get();
      unmap_pages_locked(p);
      old_addrs[i] = std::move(p->addrs_);
      p->nr_addrs_ = 0;
    }
    node = n->ranges_.extract(it);
    // Detached: the notifier goes with its last range, the Gpusvm may go with fini.
    range->notifier_.store(nullptr, std::memory_order_release);
    range->gpusvm_.store(nullptr, std::memory_order_release);
  }
  nr_ranges_.fetch_sub(1, std::memory_order_relaxed);
  if (n->ranges_.empty()) notifier_destroy(n);
  range->put();  // the tree's reference
}

// --- invalidation ----------------------------------------------------------------------

bool Notifier::invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                          uint64_t cur_seq) {
  // The driver's invalidate takes sleeping locks of its own; a non-blockable range (the
  // OOM-reaper case) is refused and retried by mm.
  if (!range.blockable()) return false;
  gpusvm_->notifier_invalidate(this, n, range, cur_seq);
  return true;
}

void Gpusvm::notifier_invalidate(Notifier* notifier, mm::MmuIntervalNotifier* n,
                                 const mm::MmuNotifierRange& range, uint64_t cur_seq) {
  WriteLock g(&notifier_lock_);
  // Every invalidation bumps the sequence, the driver's own migrations included: a get_pages
  // of this notifier in flight must retry whatever the event.
  n->set_seq(cur_seq);
  const mm::Va start = std::max(range.start, notifier->start_);
  const mm::Va end = std::min(range.end, notifier->end_);
  const bool own_migrate = range.event == mm::MmuNotifyEvent::kMigrate && cfg_.migrate_owner &&
                           range.owner == cfg_.migrate_owner;
  // Ranges of this notifier intersecting the event (the tree cannot change: we hold the
  // notifier lock for write).
  auto first = notifier->ranges_.upper_bound(start);
  if (first != notifier->ranges_.begin() && std::prev(first)->second->end_ > start) --first;
  for (auto it = first; it != notifier->ranges_.end() && it->first < end; ++it) {
    it->second->stats_.invalidations.add();
  }
  // The driver's own migration (tagged with its owner) needs no device work when it zapped
  // and unmapped the ranges before migrating, as a driver does. The skip is decided here and
  // not trusted blindly: the same owner tags a CPU fault's migrate_to_ram of our device
  // pages, which the GPU may still map. Every committed GPU PTE has a mapped Pages behind it
  // (the commit checks pages_valid under this lock; invalidate zaps before it unmaps), so
  // "no intersecting Pages is mapped" means "no PTE to zap".
  bool mapped = false;
  if (own_migrate) {
    for (auto it = first; it != notifier->ranges_.end() && it->first < end && !mapped; ++it) {
      for (auto& p : it->second->pages_) mapped |= p->has_dma_mapping();
    }
  }
  if (own_migrate && !mapped) {
    skipped_invalidations_.add();
  } else {
    cfg_.ops->invalidate(this, notifier, range);
  }
  if (range.event != mm::MmuNotifyEvent::kUnmap) return;
  // drm_gpusvm_range_set_unmapped: the CPU range is gone (or part of it); queue the range to
  // the garbage collector with a reference. Linking is allocation-free.
  for (auto it = first; it != notifier->ranges_.end() && it->first < end; ++it) {
    Range* r = it->second;
    const bool partial = range.start > r->start_ || range.end < r->end_;
    for (auto& p : r->pages_) {
      p->set_flag(pages_flags::kUnmapped | (partial ? pages_flags::kPartialUnmap : 0));
    }
    if (r->gc_queued_) continue;
    r->gc_queued_ = true;
    r->get();
    r->gc_next_ = gc_head_;
    gc_head_ = r;
  }
}

size_t Gpusvm::garbage_collector(const std::function<void(Range*)>& fn) {
  assert_driver_lock_held("garbage_collector");
  size_t removed = 0;
  for (;;) {
    Range* r;
    {
      WriteLock g(&notifier_lock_);
      r = gc_head_;
      if (!r) break;
      gc_head_ = r->gc_next_;
      r->gc_next_ = nullptr;
      r->gc_queued_ = false;
    }
    if (r->inserted()) {
      if (fn) fn(r);
      range_remove(r);
      removed++;
    }
    r->put();  // the queue's reference
  }
  return removed;
}

}  // namespace gpusvm::svm
