// Dmirror: open/release, ioctl dispatch, the mirror notifier, READ / WRITE / SNAPSHOT /
// CHECK_EXCLUSIVE / EXCLUSIVE. Migrations are in dmirror_migrate.cc.
#include "drivers/dmirror/dmirror.h"

#include <cerrno>
#include <chrono>
#include <cstring>

#include "drivers/dmirror/page_copy.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"

namespace gpusvm::dmirror {

using mm::kPageShift;
using mm::kPageSize;
using mm::Va;

namespace {

// Pages per hmm_range_fault call (test_hmm's on-stack pfn array).
constexpr uint64_t kFaultChunkPages = 32;
// HMM_RANGE_DEFAULT_TIMEOUT: budget of one chunk's -EBUSY / read_retry loop.
constexpr auto kRangeTimeout = std::chrono::milliseconds(1000);
// Fault passes of one READ/WRITE before giving up with -EBUSY (a fault pass only repeats
// when an invalidation erased entries between the fault and the copy).
constexpr int kMaxFaultPasses = 1000;
// Largest request the driver bounces (test_hmm vmallocs the bounce buffer; we cap it).
constexpr uint64_t kMaxBouncePages = 1ULL << 18;

// The file whose make_device_exclusive the current thread is running (nullptr: none).
thread_local const Dmirror* tls_exclusive = nullptr;

std::byte* frame_data(mm::PhysMem* mem, mm::Pfn pfn) { return mem->pfn_to_page(pfn)->data(); }

// EXCLUSIVE: make_device_exclusive returned, the device entry is not stored yet.
// Held: mmap read lock, the folio lock of the page.
GPUSVM_SCHED_POINT(g_sp_exclusive_made, "dmirror.exclusive.made");
// Device fault: hmm_range_fault returned 0, read_retry not checked yet. Held: nothing.
GPUSVM_SCHED_POINT(g_sp_fault_walked, "dmirror.fault.walked");

}  // namespace

Result<std::shared_ptr<Dmirror>> Dmirror::create(std::shared_ptr<DmirrorDevice> dev,
                                                 std::shared_ptr<mm::AddressSpace> mm) {
  if (!dev || !mm || mm->exited()) return Err{-EINVAL};
  std::shared_ptr<Dmirror> d(new Dmirror(std::move(dev), std::move(mm)));
  // One notifier over the whole user address space (test_hmm: [0, ULONG_MAX & PAGE_MASK)).
  if (int rc = d->notifier_.insert(d->mm_.get(), 0, mm::kTaskSize, d.get())) return Err{rc};
  return d;
}

Dmirror::~Dmirror() {
  notifier_.remove();  // no callback runs after this
  {
    MutexLock g(&mutex_);
    pt_.clear();
  }
  // As test_hmm since "evict device pages on file close": closing any file of the device
  // migrates all of its pages back to system memory (the device memory goes with them and
  // is re-created on demand).
  if (dev_->any_page_in_use()) (void)dev_->release_chunks();
}

size_t Dmirror::pt_entries() const {
  MutexLock g(&mutex_);
  return pt_.size();
}

std::optional<DptEntry> Dmirror::pt_lookup(Va va) const {
  MutexLock g(&mutex_);
  const DptEntry* e = pt_.find(va >> kPageShift);
  if (!e) return std::nullopt;
  return *e;
}

// ---- notifier ----

bool Dmirror::lock_for_invalidation(const mm::MmuNotifierRange& range) {
  if (range.blockable()) {
    mutex_.lock();
    return true;
  }
  return mutex_.try_lock();
}

bool Dmirror::invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                         uint64_t cur_seq) {
  if (!lock_for_invalidation(range)) return false;
  if (exclusive_in_this_thread() && range.event == mm::MmuNotifyEvent::kExclusive &&
      range.owner == dev_->owner()) {
    // Our own EXCLUSIVE request, before its entry is installed: the device drops its mapping
    // of the page and stores the ATOMIC one after read_retry. Setting the sequence here would
    // make that read_retry fail every time (see the design notes).
    pt_.erase_range(range.start >> kPageShift, mm::page_align_up(range.end) >> kPageShift);
    mutex_.unlock();
    return true;
  }
  // Always: a mirror fault of this file that sampled the sequence before this invalidation
  // must retry, whoever caused it (seed 001: the skip below must not break the protocol).
  n->set_seq(cur_seq);
  // Raised by a migrate_vma call of this file in this thread (its MIGRATE invalidations, and
  // e.g. the PMD split of its collection): part of the migration, which handles its pages.
  const bool ours = migrating_in_this_thread();
  const bool own_migration =
      ours && range.event == mm::MmuNotifyEvent::kMigrate && range.owner == dev_->owner();
  if (!own_migration) {
    pt_.erase_range(range.start >> kPageShift, mm::page_align_up(range.end) >> kPageShift);
  }
  if (!ours) {
    for (MigrationRecord* m : migrations_) {
      if (m->start < range.end && range.start < m->end) m->hit = true;
    }
  }
  mutex_.unlock();
  return true;
}

// ---- ioctl ----

int Dmirror::ioctl(devfs::Process& caller, unsigned long request, void* arg) {
  (void)caller;  // the mirrored mm is the opener's, not the caller's (test_hmm)
  if (!arg) return -EFAULT;
  hmm_dmirror_cmd cmd;
  std::memcpy(&cmd, arg, sizeof(cmd));  // copy_from_user
  if (cmd.addr & (kPageSize - 1)) return -EINVAL;
  if (cmd.npages > (UINT64_MAX >> kPageShift) || cmd.addr >= cmd.addr + (cmd.npages << kPageShift)) {
    return -EINVAL;
  }
  cmd.cpages = 0;
  cmd.faults = 0;
  int rc;
  switch (request) {
    case HMM_DMIRROR_READ: rc = read(cmd); break;
    case HMM_DMIRROR_WRITE: rc = write(cmd); break;
    case HMM_DMIRROR_MIGRATE_TO_DEV: rc = migrate_to_dev(cmd); break;
    case HMM_DMIRROR_MIGRATE_TO_SYS: rc = migrate_to_sys(cmd); break;
    case HMM_DMIRROR_SNAPSHOT: rc = snapshot(cmd); break;
    case HMM_DMIRROR_EXCLUSIVE: rc = exclusive(cmd); break;
    case HMM_DMIRROR_CHECK_EXCLUSIVE: rc = check_exclusive(cmd); break;
    case HMM_DMIRROR_RELEASE: rc = dev_->release_chunks(); break;
    case HMM_DMIRROR_FLAGS:
      flags_.store(cmd.npages, std::memory_order_relaxed);  // a plain word: orders nothing
      rc = 0;
      break;
    default: return -EINVAL;
  }
  if (rc) return rc;
  std::memcpy(arg, &cmd, sizeof(cmd));  // copy_to_user
  return 0;
}

// ---- device faults ----

int Dmirror::range_fault(mm::HmmRange* range) {
  const auto deadline = std::chrono::steady_clock::now() + kRangeTimeout;
  uint64_t busy = 0, collisions = 0;  // for the diagnostic
  for (;;) {
    if (std::chrono::steady_clock::now() > deadline) {
      log::get().error("dmirror{}: device fault [{:#x}, {:#x}) still invalidated after {} ms: {} "
                       "hmm_range_fault -EBUSY, {} read_retry collisions, last notifier seq {}",
                       dev_->id(), range->start, range->end, kRangeTimeout.count(), busy, collisions,
                       range->notifier_seq);
      return -EBUSY;
    }
    range->notifier_seq = notifier_.read_begin();
    int rc;
    {
      ReadLock g(&mm_->mmap_lock());
      rc = mm::hmm_range_fault(range);
    }
    if (rc == -EBUSY) {
      busy++;
      continue;
    }
    if (rc) return rc;
    g_sp_fault_walked.reach();
    if (dev_->config().after_range_fault) dev_->config().after_range_fault();
    mutex_.lock();
    if (notifier_.read_retry(range->notifier_seq)) {
      mutex_.unlock();
      dev_->fault_retries.add();
      collisions++;
      continue;
    }
    return 0;  // with mutex_ held: the caller stores the result before an invalidation can run
  }
}

void Dmirror::store_range_locked(const mm::HmmRange& range) {
  mutex_.assert_held();
  const uint64_t n = (range.end - range.start) >> kPageShift;
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t w = range.hmm_pfns[i];
    // A fault was requested for every page, so hmm_range_fault succeeded only if each is VALID.
    if (!(w & mm::HMM_PFN_VALID) || (w & mm::HMM_PFN_ERROR)) {
      panic("dmirror: hmm_range_fault returned 0 with a page not VALID");
    }
    const uint8_t tags = (w & mm::HMM_PFN_WRITE) ? kDptWrite : 0;
    pt_.store((range.start >> kPageShift) + i, DptEntry{mm::hmm_pfn_to_pfn(w), tags});
  }
}

Va Dmirror::own_read_only_page(const mm::HmmRange& range) const {
  const uint64_t n = (range.end - range.start) >> kPageShift;
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t w = range.hmm_pfns[i];
    if (w & mm::HMM_PFN_WRITE) continue;
    const mm::Folio* page = dev_->mem()->pfn_to_page(mm::hmm_pfn_to_pfn(w));
    if (page && mm::folio_is_device_private(page) && dev_->owns(page)) return range.start + (i << kPageShift);
  }
  return 0;
}

int Dmirror::fault(Va start, Va end, bool write) {
  if (mm_->exited()) return -EFAULT;  // mmget_not_zero failed: nothing left to fault
  uint64_t pfns[kFaultChunkPages];
  int moved_back = 0;
  for (Va addr = start; addr < end;) {
    const Va next = std::min(end, addr + kFaultChunkPages * kPageSize);
    mm::HmmRange range{.notifier = &notifier_,
                       .start = addr,
                       .end = next,
                       .hmm_pfns = pfns,
                       .default_flags = mm::HMM_PFN_REQ_FAULT | (write ? mm::HMM_PFN_REQ_WRITE : 0),
                       .pfn_flags_mask = 0,
                       .dev_private_owner = dev_->owner()};
    if (int rc = range_fault(&range)) return rc;
    if (const Va ro = write ? own_read_only_page(range) : 0) {
      mutex_.unlock();
      if (++moved_back > kMaxFaultPasses) return -EBUSY;
      hmm_dmirror_cmd one{};
      one.addr = ro;
      one.npages = 1;
      if (int rc = migrate_to_sys(one)) return rc;
      continue;  // fault the chunk again: the page is system memory now
    }
    store_range_locked(range);
    mutex_.unlock();
    addr = next;
  }
  return 0;
}

bool Dmirror::fault_passes_exhausted(int pass, std::chrono::steady_clock::time_point deadline, Va at,
                                     Va end, const char* what) const {
  if (pass < kMaxFaultPasses && std::chrono::steady_clock::now() <= deadline) return false;
  log::get().error("dmirror{}: {} [{:#x}, {:#x}): entries still erased between fault and copy "
                   "after {} fault passes", dev_->id(), what, at, end, pass);
  return true;
}

int Dmirror::do_read_locked(Va end, Bounce* b) {
  mutex_.assert_held();
  for (Va va = b->addr + (b->cpages << kPageShift); va < end; va += kPageSize) {
    const DptEntry* e = pt_.find(va >> kPageShift);
    if (!e) return -ENOENT;
    dev_read_page(b->buf.data() + (va - b->addr), frame_data(dev_->mem(), e->pfn));
    b->cpages++;
  }
  return 0;
}

int Dmirror::do_write_locked(Va end, Bounce* b) {
  mutex_.assert_held();
  for (Va va = b->addr + (b->cpages << kPageShift); va < end; va += kPageSize) {
    const DptEntry* e = pt_.find(va >> kPageShift);
    if (!e || !(e->tags & kDptWrite)) return -ENOENT;
    dev_write_page(frame_data(dev_->mem(), e->pfn), b->buf.data() + (va - b->addr));
    b->cpages++;
  }
  return 0;
}

int Dmirror::read(hmm_dmirror_cmd& cmd) {
  if (cmd.npages > kMaxBouncePages) return -ENOMEM;
  void* out = reinterpret_cast<void*>(static_cast<uintptr_t>(cmd.ptr));
  if (!out) return -EFAULT;
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  Bounce b{start, std::vector<std::byte>(cmd.npages << kPageShift)};
  int rc = -EBUSY;
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (int pass = 0; pass <= kMaxFaultPasses; pass++) {
    {
      MutexLock g(&mutex_);
      rc = do_read_locked(end, &b);
    }
    if (rc != -ENOENT) break;
    if (fault_passes_exhausted(pass, deadline, start + (b.cpages << kPageShift), end, "READ")) {
      rc = -EBUSY;
      break;
    }
    rc = fault(start + (b.cpages << kPageShift), end, /*write=*/false);
    if (rc) break;
    cmd.faults++;
    rc = -EBUSY;
  }
  if (rc == 0) std::memcpy(out, b.buf.data(), b.buf.size());  // copy_to_user
  cmd.cpages = b.cpages;
  return rc;
}

int Dmirror::write(hmm_dmirror_cmd& cmd) {
  if (cmd.npages > kMaxBouncePages) return -ENOMEM;
  const void* in = reinterpret_cast<const void*>(static_cast<uintptr_t>(cmd.ptr));
  if (!in) return -EFAULT;
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  Bounce b{start, std::vector<std::byte>(cmd.npages << kPageShift)};
  std::memcpy(b.buf.data(), in, b.buf.size());  // copy_from_user
  int rc = -EBUSY;
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (int pass = 0; pass <= kMaxFaultPasses; pass++) {
    {
      MutexLock g(&mutex_);
      rc = do_write_locked(end, &b);
    }
    if (rc != -ENOENT) break;
    if (fault_passes_exhausted(pass, deadline, start + (b.cpages << kPageShift), end, "WRITE")) {
      rc = -EBUSY;
      break;
    }
    rc = fault(start + (b.cpages << kPageShift), end, /*write=*/true);
    if (rc) break;
    cmd.faults++;
    rc = -EBUSY;
  }
  cmd.cpages = b.cpages;
  return rc;
}

// ---- snapshot ----

// The temporary notifier of one snapshot chunk: any invalidation of the chunk invalidates the
// whole snapshot, so its callback only advances the sequence (under the file's mutex, which
// orders it against read_retry).
class Dmirror::SnapshotInterval final : public mm::MmuIntervalNotifierOps {
 public:
  explicit SnapshotInterval(Dmirror* d) : d_(d) {}
  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                  uint64_t cur_seq) override {
    if (!d_->lock_for_invalidation(range)) return false;
    n->set_seq(cur_seq);
    d_->mutex_.unlock();
    return true;
  }

 private:
  Dmirror* const d_;
};

uint8_t Dmirror::snapshot_entry(uint64_t w) const {
  if (w & mm::HMM_PFN_ERROR) return HMM_DMIRROR_PROT_ERROR;
  if (!(w & mm::HMM_PFN_VALID)) return HMM_DMIRROR_PROT_NONE;
  const mm::Pfn pfn = mm::hmm_pfn_to_pfn(w);
  const mm::Folio* page = dev_->mem()->pfn_to_page(pfn);
  uint8_t perm = HMM_DMIRROR_PROT_NONE;
  if (page && mm::folio_is_device_coherent(page)) {
    perm = dev_->owns(page) ? HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL : HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE;
  } else if (page && mm::folio_is_device_private(page)) {
    perm = dev_->owns(page) ? HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL : HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE;
  } else if (dev_->mem()->is_zero_pfn(pfn)) {
    perm = HMM_DMIRROR_PROT_ZERO;
  }
  perm |= (w & mm::HMM_PFN_WRITE) ? HMM_DMIRROR_PROT_WRITE : HMM_DMIRROR_PROT_READ;
  const unsigned order = mm::hmm_pfn_to_map_order(w);
  if (order + kPageShift == mm::kPmdShift) perm |= HMM_DMIRROR_PROT_PMD;
  else if (order + kPageShift == mm::kPudShift) perm |= HMM_DMIRROR_PROT_PUD;
  return perm;
}

int Dmirror::snapshot(hmm_dmirror_cmd& cmd) {
  auto* out = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(cmd.ptr));
  if (!out) return -EFAULT;
  if (mm_->exited()) return -EINVAL;  // mmget_not_zero
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  uint64_t pfns[kFaultChunkPages];
  SnapshotInterval ops(this);
  for (Va addr = start; addr < end;) {
    const Va next = std::min(end, addr + kFaultChunkPages * kPageSize);
    // A temporary notifier on exactly this chunk: it sees every invalidation of the chunk,
    // whatever the file's own notifier's callback does with it.
    mm::MmuIntervalNotifier chunk;
    if (int rc = chunk.insert(mm_.get(), addr, next - addr, &ops)) return rc;
    mm::HmmRange range{.notifier = &chunk,
                       .start = addr,
                       .end = next,
                       .hmm_pfns = pfns,
                       .default_flags = 0,
                       .pfn_flags_mask = 0,
                       .dev_private_owner = dev_->owner()};
    const auto deadline = std::chrono::steady_clock::now() + kRangeTimeout;
    int rc;
    for (;;) {
      if (std::chrono::steady_clock::now() > deadline) {
        log::get().error("dmirror{}: SNAPSHOT [{:#x}, {:#x}) still invalidated after {} ms (last "
                         "notifier seq {})", dev_->id(), addr, next, kRangeTimeout.count(),
                         range.notifier_seq);
        rc = -EBUSY;
        break;
      }
      range.notifier_seq = chunk.read_begin();
      {
        ReadLock g(&mm_->mmap_lock());
        rc = mm::hmm_range_fault(&range);
      }
      if (rc == -EBUSY) continue;
      if (rc) break;
      MutexLock g(&mutex_);
      if (chunk.read_retry(range.notifier_seq)) continue;
      for (uint64_t i = 0; i < (next - addr) >> kPageShift; i++) out[i] = snapshot_entry(pfns[i]);
      break;
    }
    chunk.remove();
    if (rc) return rc;
    out += (next - addr) >> kPageShift;
    cmd.cpages += (next - addr) >> kPageShift;
    addr = next;
  }
  return 0;
}

// ---- exclusive access ----

int Dmirror::exclusive(hmm_dmirror_cmd& cmd) {
  if (cmd.npages > kMaxBouncePages) return -ENOMEM;
  void* out = reinterpret_cast<void*>(static_cast<uintptr_t>(cmd.ptr));
  if (!out) return -EFAULT;
  if (mm_->exited()) return -EINVAL;  // mmget_not_zero
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  int rc = 0;
  {
    ReadLock g(&mm_->mmap_lock());
    for (Va va = start; va < end && rc == 0; va += kPageSize) rc = exclusive_page(va);
  }
  if (rc) return rc;
  // Read the range back through the device page table for verification.
  Bounce b{start, std::vector<std::byte>(cmd.npages << kPageShift)};
  {
    MutexLock g(&mutex_);
    rc = do_read_locked(end, &b);
  }
  if (rc == 0) std::memcpy(out, b.buf.data(), b.buf.size());
  cmd.cpages = b.cpages;
  return rc;
}

class Dmirror::ExclusiveScope {
 public:
  explicit ExclusiveScope(const Dmirror* d) : prev_(tls_exclusive) { tls_exclusive = d; }
  ~ExclusiveScope() { tls_exclusive = prev_; }
  ExclusiveScope(const ExclusiveScope&) = delete;
  ExclusiveScope& operator=(const ExclusiveScope&) = delete;

 private:
  const Dmirror* const prev_;
};

bool Dmirror::exclusive_in_this_thread() const { return tls_exclusive == this; }

int Dmirror::fault_in_writable(Va va) {
  mm_->mmap_assert_locked();
  uint64_t pfn = 0;
  mm::HmmRange range{.notifier = &notifier_,
                     .start = va,
                     .end = va + kPageSize,
                     .hmm_pfns = &pfn,
                     .default_flags = mm::HMM_PFN_REQ_FAULT | mm::HMM_PFN_REQ_WRITE,
                     .pfn_flags_mask = 0,
                     .dev_private_owner = dev_->owner()};
  range.notifier_seq = notifier_.read_begin();
  const int rc = mm::hmm_range_fault(&range);
  return rc == -EBUSY ? 0 : rc;  // invalidated meanwhile: the caller's sequence check retries
}

// The protocol, step by step (why each one):
//   1. seq = read_begin()        waits out invalidations in flight that reached us
//   2. make_device_exclusive     the PTE becomes a device-exclusive entry for page F, F is
//                                returned locked (the CPU, a migration and fork cannot take
//                                it back without the folio lock)
//   3. mutex; read_retry(seq)    a zap (MADV_DONTNEED needs neither the folio lock nor more
//                                than the mmap read lock) may have removed the entry after
//                                step 2 and left F to our reference alone: its invalidation
//                                set the sequence under this mutex before the zap, so we
//                                see it here, drop F and start over
//   4. store ATOMIC entry        no invalidation since step 1: F still backs va, and the
//                                next one erases the entry under this mutex
// A retry's step 2 would first give the page back to the CPU (it is device-exclusive from
// the previous attempt), a CLEAR invalidation that moves the sequence again: a retry faults
// the page in writable before step 1.
int Dmirror::exclusive_page(Va va) {
  mm_->mmap_assert_locked();
  const auto deadline = std::chrono::steady_clock::now() + kRangeTimeout;
  for (int attempt = 0;; attempt++) {
    if (std::chrono::steady_clock::now() > deadline) {
      log::get().error("dmirror EXCLUSIVE {:#x}: invalidated on each of {} attempts in {} ms", va,
                       attempt, kRangeTimeout.count());
      return -EBUSY;
    }
    if (attempt > 0) {
      if (int rc = fault_in_writable(va)) return rc;
    }
    const uint64_t seq = notifier_.read_begin();
    Result<mm::Folio*> page = Err{-EINVAL};
    {
      ExclusiveScope s(this);
      page = mm::make_device_exclusive(*mm_, va, dev_->owner());
    }
    if (!page) return page.error();
    mm::Folio* folio = (*page)->head();
    g_sp_exclusive_made.reach();
    bool stored = false;
    {
      MutexLock m(&mutex_);
      if (!notifier_.read_retry(seq)) {
        pt_.store(va >> kPageShift, DptEntry{(*page)->pfn(), kDptWrite | kDptAtomic});
        stored = true;
      }
    }
    mm::folio_unlock(folio);
    folio->put();
    if (stored) return 0;
    dev_->fault_retries.add();
  }
}

int Dmirror::check_exclusive(hmm_dmirror_cmd& cmd) {
  const Va end = cmd.addr + (cmd.npages << kPageShift);
  MutexLock g(&mutex_);
  return pt_.any_tagged(cmd.addr >> kPageShift, end >> kPageShift, kDptAtomic) ? -EPERM : 0;
}

}  // namespace gpusvm::dmirror
