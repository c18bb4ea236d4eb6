// Dmirror migrations: MIGRATE_TO_DEV, MIGRATE_TO_SYS and the owner-skip bookkeeping (see
// the design notes in dmirror.h and docs/dmirror.md).
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "drivers/dmirror/dmirror.h"
#include "drivers/dmirror/migrate_copy.h"
#include "gpusvm/base/sched_point.h"

namespace gpusvm::dmirror {

using mm::kPageShift;
using mm::kPageSize;
using mm::Va;

namespace {

// Pages per migrate_vma call (test_hmm: 512, one PMD).
constexpr uint64_t kMigrateChunkPages = 512;
constexpr uint64_t kMaxBouncePages = 1ULL << 18;

// The file whose migration the current thread is running (nullptr: none).
thread_local const Dmirror* tls_migrating = nullptr;

// MIGRATE_TO_DEV: migrate_vma_setup collected the chunk (its MIGRATE invalidation has run),
// the device has not unmapped or copied anything yet. Held: mmap read lock, the collected
// folios' locks.
GPUSVM_SCHED_POINT(g_sp_to_dev_collected, "dmirror.migrate_to_dev.collected");

// test_hmm's per-VMA, per-chunk loop: calls migrate(args) for each piece of [start, end) that
// lies in one readable VMA and one chunk, selecting `flags` for `owner`. A hole or a VMA
// without VM_READ is -EINVAL. Context: the mmap lock held (read).
template <typename Fn>
int for_each_migrate_chunk(mm::AddressSpace& mm, Va start, Va end, const void* owner, unsigned flags,
                           Fn&& migrate) {
  mm.mmap_assert_locked();
  std::vector<uint64_t> src(kMigrateChunkPages), dst(kMigrateChunkPages);
  for (Va addr = start; addr < end;) {
    const mm::Vma* vma = mm.find_vma(addr);
    if (!vma || addr < vma->start || !(vma->flags & mm::VM_READ)) return -EINVAL;
    const Va next = std::min({end, addr + kMigrateChunkPages * kPageSize, vma->end});
    mm::MigrateVma args{.mm = &mm, .start = addr, .end = next, .src = src.data(),
                        .dst = dst.data(), .pgmap_owner = owner, .flags = flags};
    if (int rc = migrate(&args)) return rc;
    addr = next;
  }
  return 0;
}

}  // namespace

class Dmirror::MigratorScope {
 public:
  explicit MigratorScope(const Dmirror* d) : prev_(tls_migrating) { tls_migrating = d; }
  ~MigratorScope() { tls_migrating = prev_; }
  MigratorScope(const MigratorScope&) = delete;
  MigratorScope& operator=(const MigratorScope&) = delete;

 private:
  const Dmirror* const prev_;
};

bool Dmirror::migrating_in_this_thread() const { return tls_migrating == this; }

bool Dmirror::consume_fail_alloc() {
  uint64_t f = flags_.load(std::memory_order_relaxed);
  while (f & HMM_DMIRROR_FLAG_FAIL_ALLOC) {
    // relaxed: the flag word orders nothing; the exchange only makes the shot one-shot.
    if (flags_.compare_exchange_weak(f, f & ~HMM_DMIRROR_FLAG_FAIL_ALLOC, std::memory_order_relaxed)) {
      return true;
    }
  }
  return false;
}

void Dmirror::unmap_collected(const mm::MigrateVma& args) {
  MutexLock g(&mutex_);
  for (uint64_t i = 0; i < args.npages; i += src_pages(args.src[i])) {
    if (!(args.src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    const uint64_t first = (args.start >> kPageShift) + i;
    pt_.erase_range(first, first + src_pages(args.src[i]));
  }
}

void Dmirror::map_migrated(const mm::MigrateVma& args, const MigrationRecord& rec) {
  mutex_.assert_held();
  if (rec.hit) return;  // a foreign invalidation overlapped: the next access faults instead
  for (uint64_t i = 0; i < args.npages; i += src_pages(args.src[i])) {
    if (!(args.src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    const uint64_t first = (args.start >> kPageShift) + i;
    if (args.dst[i] & mm::MIGRATE_PFN_COMPOUND) {  // one 2 MiB destination
      const uint8_t tags = (args.dst[i] & mm::MIGRATE_PFN_WRITE) ? kDptWrite : 0;
      for (uint64_t j = 0; j < mm::kPagesPerPmd; j++) {
        pt_.store(first + j, DptEntry{mm::migrate_pfn_to_pfn(args.dst[i]) + j, tags});
      }
      continue;
    }
    for (uint64_t j = 0; j < src_pages(args.src[i]); j++) {  // one or 512 small destinations
      const uint64_t d = args.dst[i + j];
      if (!(d & mm::MIGRATE_PFN_VALID)) continue;
      const uint8_t tags = (d & mm::MIGRATE_PFN_WRITE) ? kDptWrite : 0;
      pt_.store(first + j, DptEntry{mm::migrate_pfn_to_pfn(d), tags});
    }
  }
}

// System -> device for one chunk of one VMA. Context: mmap lock held (read).
int Dmirror::migrate_chunk_to_dev(mm::MigrateVma* args) {
  MigrationRecord rec{args->start, args->end, false};
  {
    MutexLock g(&mutex_);
    migrations_.push_back(&rec);
  }
  // The record sees only invalidations whose callback runs from now on. One that called us
  // before may still be changing the chunk's page tables: a migration in another thread
  // invalidates its whole range first and collects page by page afterwards, so it could take
  // - and free - the device page stored below without calling us again. read_begin() waits
  // until every invalidation that reached this notifier has ended. Sleeping here with the
  // mmap lock held (read) is safe: no invalidation waits for an mmap-lock reader, and this
  // thread holds no folio lock yet.
  (void)notifier_.read_begin();
  int rc;
  {
    MigratorScope s(this);
    rc = mm::migrate_vma_setup(args);
  }
  if (rc) {
    MutexLock g(&mutex_);
    migrations_.erase(std::find(migrations_.begin(), migrations_.end(), &rec));
    return rc;
  }
  g_sp_to_dev_collected.reach();
  // The device stops using the sources before their bytes are copied.
  unmap_collected(*args);
  mm::PhysMem* mem = dev_->mem();
  for (uint64_t i = 0; i < args->npages; i += src_pages(args->src[i])) {
    if (!(args->src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    if ((args->src[i] & mm::MIGRATE_PFN_VALID) &&
        mem->pfn_to_page(mm::migrate_pfn_to_pfn(args->src[i]))->pagemap()) {
      continue;  // SELECT_SYSTEM never collects device pages
    }
    // FAIL_ALLOC: an order-0 page stays where it is; a compound one gets 512 small pages.
    // Device memory exhausted: the page stays.
    (void)alloc_and_copy(*dev_, MigrateTarget::kDevice, args->src, args->dst, i, consume_fail_alloc());
  }
  {
    MigratorScope s(this);
    args->mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    mm::migrate_vma_pages(args);
  }
  {
    MutexLock g(&mutex_);
    map_migrated(*args, rec);
    migrations_.erase(std::find(migrations_.begin(), migrations_.end(), &rec));
  }
  mm::migrate_vma_finalize(args);
  return 0;
}

// Device -> system for one chunk of one VMA. Context: mmap lock held (read).
int Dmirror::migrate_chunk_to_sys(mm::MigrateVma* args, uint64_t* moved) {
  int rc;
  {
    MigratorScope s(this);
    rc = mm::migrate_vma_setup(args);
  }
  if (rc) return rc;
  unmap_collected(*args);
  mm::PhysMem* mem = dev_->mem();
  constexpr uint64_t kValidMigrate = mm::MIGRATE_PFN_VALID | mm::MIGRATE_PFN_MIGRATE;
  for (uint64_t i = 0; i < args->npages; i += src_pages(args->src[i])) {
    if ((args->src[i] & kValidMigrate) != kValidMigrate) continue;
    if (!alloc_and_copy(*dev_, MigrateTarget::kSystem, args->src, args->dst, i, consume_fail_alloc())) {
      // Out of memory: nothing of the chunk moves; give back what was allocated.
      for (uint64_t k = 0; k < args->npages; k++) {
        if (!(args->dst[k] & mm::MIGRATE_PFN_VALID)) continue;
        mm::Folio* d = mem->pfn_to_page(mm::migrate_pfn_to_pfn(args->dst[k]));
        args->dst[k] = 0;
        mm::folio_unlock(d);
        d->put();
      }
      mm::migrate_vma_finalize(args);
      return -ENOMEM;
    }
  }
  {
    MigratorScope s(this);
    args->mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    mm::migrate_vma_pages(args);
  }
  for (uint64_t i = 0; i < args->npages; i += src_pages(args->src[i])) {
    if ((args->src[i] & kValidMigrate) == kValidMigrate) *moved += src_pages(args->src[i]);
  }
  mm::migrate_vma_finalize(args);
  return 0;
}

int Dmirror::migrate_to_dev(hmm_dmirror_cmd& cmd) {
  if (cmd.npages > kMaxBouncePages) return -ENOMEM;
  void* out = reinterpret_cast<void*>(static_cast<uintptr_t>(cmd.ptr));
  if (!out) return -EFAULT;
  if (mm_->exited()) return -EINVAL;  // mmget_not_zero
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  {
    ReadLock g(&mm_->mmap_lock());
    const int rc = for_each_migrate_chunk(
        *mm_, start, end, dev_->owner(), mm::MIGRATE_VMA_SELECT_SYSTEM | mm::MIGRATE_VMA_SELECT_COMPOUND,
        [this](mm::MigrateVma* args) { return migrate_chunk_to_dev(args); });
    if (rc) return rc;
  }
  // Read the range back through the device page table: cpages counts what the device can
  // read now (pages already on the device included), and a page it cannot is -ENOENT.
  Bounce b{start, std::vector<std::byte>(cmd.npages << kPageShift)};
  int rc;
  {
    MutexLock g(&mutex_);
    rc = do_read_locked(end, &b);
  }
  if (rc == 0) std::memcpy(out, b.buf.data(), b.buf.size());
  cmd.cpages = b.cpages;
  return rc;
}

int Dmirror::migrate_to_sys(hmm_dmirror_cmd& cmd) {
  if (mm_->exited()) return -EINVAL;  // mmget_not_zero
  const Va start = cmd.addr;
  const Va end = start + (cmd.npages << kPageShift);
  uint64_t moved = 0;
  ReadLock g(&mm_->mmap_lock());
  const int rc = for_each_migrate_chunk(
      *mm_, start, end, dev_->owner(), dev_->select_device_flag() | mm::MIGRATE_VMA_SELECT_COMPOUND,
      [this, &moved](mm::MigrateVma* args) { return migrate_chunk_to_sys(args, &moved); });
  if (rc) return rc;
  cmd.cpages = moved;
  return 0;
}

}  // namespace gpusvm::dmirror
