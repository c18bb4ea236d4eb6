// Dmirror migrations: MIGRATE_TO_DEV, MIGRATE_TO_SYS and the owner-skip bookkeeping (see
// the design notes in dmirror.h and docs/dmirror.md).
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "drivers/dmirror/dmirror.h"
#include "drivers/dmirror/page_copy.h"

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
  for (uint64_t i = 0; i < args.npages; i++) {
    if (args.src[i] & mm::MIGRATE_PFN_MIGRATE) pt_.erase((args.start >> kPageShift) + i);
  }
}

void Dmirror::map_migrated(const mm::MigrateVma& args, const MigrationRecord& rec) {
  mutex_.assert_held();
  if (rec.hit) return;  // a foreign invalidation overlapped: the next access faults instead
  for (uint64_t i = 0; i < args.npages; i++) {
    if (!(args.src[i] & mm::MIGRATE_PFN_MIGRATE) || !(args.dst[i] & mm::MIGRATE_PFN_VALID)) continue;
    const uint8_t tags = (args.dst[i] & mm::MIGRATE_PFN_WRITE) ? kDptWrite : 0;
    pt_.store((args.start >> kPageShift) + i, DptEntry{mm::migrate_pfn_to_pfn(args.dst[i]), tags});
  }
}

// System -> device for one chunk of one VMA. Context: mmap lock held (read).
int Dmirror::migrate_chunk_to_dev(mm::MigrateVma* args) {
  MigrationRecord rec{args->start, args->end, false};
  {
    MutexLock g(&mutex_);
    migrations_.push_back(&rec);
  }
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
  // The device stops using the sources before their bytes are copied.
  unmap_collected(*args);
  mm::PhysMem* mem = dev_->mem();
  for (uint64_t i = 0; i < args->npages; i++) {
    if (!(args->src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    mm::Folio* spage = (args->src[i] & mm::MIGRATE_PFN_VALID)
                           ? mem->pfn_to_page(mm::migrate_pfn_to_pfn(args->src[i]))
                           : nullptr;
    if (spage && spage->pagemap()) continue;  // SELECT_SYSTEM never collects device pages
    if (consume_fail_alloc()) continue;       // FAIL_ALLOC: this page stays where it is
    mm::Folio* dpage = dev_->alloc_page();
    if (!dpage) continue;  // device memory exhausted: this page stays
    mm::folio_lock(dpage);
    if (spage) {
      dev_copy_page(dpage->data(), spage->data());
    } else {
      dev_clear_page(dpage->data());  // a hole or the zero page
    }
    args->dst[i] = mm::migrate_pfn(dpage->pfn()) | (args->src[i] & mm::MIGRATE_PFN_WRITE);
  }
  {
    MigratorScope s(this);
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
  bool oom = false;
  for (uint64_t i = 0; i < args->npages && !oom; i++) {
    if (!(args->src[i] & mm::MIGRATE_PFN_MIGRATE) || !(args->src[i] & mm::MIGRATE_PFN_VALID)) continue;
    mm::Folio* spage = mem->pfn_to_page(mm::migrate_pfn_to_pfn(args->src[i]));
    mm::Folio* dpage = consume_fail_alloc() ? nullptr : mem->folio_alloc(0, /*zero=*/false);
    if (!dpage) {
      oom = true;
      break;
    }
    mm::folio_lock(dpage);
    dev_copy_page(dpage->data(), spage->data());
    args->dst[i] = mm::migrate_pfn(dpage->pfn()) | (args->src[i] & mm::MIGRATE_PFN_WRITE);
  }
  if (oom) {
    // Nothing of the chunk moves: give back the pages allocated so far, restore every source.
    for (uint64_t i = 0; i < args->npages; i++) {
      if (!(args->dst[i] & mm::MIGRATE_PFN_VALID)) continue;
      mm::Folio* dpage = mem->pfn_to_page(mm::migrate_pfn_to_pfn(args->dst[i]));
      mm::folio_unlock(dpage);
      dpage->put();
      args->dst[i] = 0;
    }
    mm::migrate_vma_finalize(args);
    return -ENOMEM;
  }
  {
    MigratorScope s(this);
    mm::migrate_vma_pages(args);
  }
  for (uint64_t i = 0; i < args->npages; i++) {
    const uint64_t both = mm::MIGRATE_PFN_VALID | mm::MIGRATE_PFN_MIGRATE;
    if ((args->src[i] & both) == both) ++*moved;
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
  std::vector<uint64_t> src(kMigrateChunkPages), dst(kMigrateChunkPages);
  {
    ReadLock g(&mm_->mmap_lock());
    mm_->mmap_assert_locked();
    for (Va addr = start; addr < end;) {
      const mm::Vma* vma = mm_->find_vma(addr);
      if (!vma || addr < vma->start || !(vma->flags & mm::VM_READ)) return -EINVAL;
      const Va next = std::min({end, addr + kMigrateChunkPages * kPageSize, vma->end});
      mm::MigrateVma args{.mm = mm_.get(), .start = addr, .end = next, .src = src.data(),
                          .dst = dst.data(), .pgmap_owner = dev_->owner(),
                          .flags = mm::MIGRATE_VMA_SELECT_SYSTEM};
      if (int rc = migrate_chunk_to_dev(&args)) return rc;
      addr = next;
    }
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
  std::vector<uint64_t> src(kMigrateChunkPages), dst(kMigrateChunkPages);
  uint64_t moved = 0;
  ReadLock g(&mm_->mmap_lock());
  mm_->mmap_assert_locked();
  for (Va addr = start; addr < end;) {
    const mm::Vma* vma = mm_->find_vma(addr);
    if (!vma || addr < vma->start || !(vma->flags & mm::VM_READ)) return -EINVAL;
    const Va next = std::min({end, addr + kMigrateChunkPages * kPageSize, vma->end});
    mm::MigrateVma args{.mm = mm_.get(), .start = addr, .end = next, .src = src.data(),
                        .dst = dst.data(), .pgmap_owner = dev_->owner(),
                        .flags = mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE};
    if (int rc = migrate_chunk_to_sys(&args, &moved)) return rc;
    addr = next;
  }
  cmd.cpages = moved;
  return 0;
}

}  // namespace gpusvm::dmirror
