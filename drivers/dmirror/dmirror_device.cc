// DmirrorDevice: device memory (chunks, free list), open, the pagemap ops.
#include "drivers/dmirror/dmirror_device.h"

#include <cerrno>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "drivers/devfs/process.h"
#include "drivers/dmirror/dmirror.h"
#include "drivers/dmirror/migrate_copy.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/migrate.h"

namespace gpusvm::dmirror {

using mm::kPageSize;

namespace {
// RELEASE: migrate_device_range collected a chunk's pages (migration entries installed),
// nothing copied yet. Held: the collected device folios' locks.
GPUSVM_SCHED_POINT(g_sp_release_collected, "dmirror.release.collected");

// RELEASE could not evict every page of `pgmap` within hang_timeout(): names the first
// pages still in use (their lock holder is usually who keeps them).
void log_busy_pages(int id, mm::DevPagemap& pgmap) {
  std::string busy;
  int shown = 0;
  uint64_t in_use = 0;
  for (mm::Pfn pfn = pgmap.first_pfn(); pfn < pgmap.first_pfn() + pgmap.nr_pages(); pfn++) {
    const mm::Folio* f = pgmap.pfn_to_page(pfn);
    if (!f->is_head() || f->refcount() == 0) continue;
    in_use++;
    if (shown++ < 4) busy += std::string(busy.empty() ? "" : "; ") + mm::folio_describe(f);
  }
  log::get().error("dmirror{}: release: {} device folios still in use after {} ms, e.g. {}", id,
                   in_use, hang_timeout().count(), busy);
}

}  // namespace

Result<std::shared_ptr<DmirrorDevice>> DmirrorDevice::create(mm::PhysMem* mem, int id, Config config) {
  if (!mem || config.chunk_pages == 0 || config.chunk_pages % mm::kPagesPerPmd != 0 ||
      config.max_chunks == 0) {
    return Err{-EINVAL};
  }
  std::shared_ptr<DmirrorDevice> dev(new DmirrorDevice(mem, id, config));
  if (int rc = dev->add_chunk()) return Err{rc};
  return dev;
}

DmirrorDevice::~DmirrorDevice() {
  {
    SpinLockGuard g(&free_lock_);
    free_.clear();
    free_huge_.clear();
  }
  MutexLock g(&devmem_lock_);
  chunks_.clear();  // each DevPagemap checks that none of its pages is still in use
  dying_.clear();
}

Result<std::shared_ptr<devfs::File>> DmirrorDevice::open(devfs::Process& opener) {
  Result<std::shared_ptr<Dmirror>> d = Dmirror::create(shared_from_this(), opener.mm_ref());
  if (!d) return Err{d.error()};
  {
    MutexLock g(&devmem_lock_);
    std::erase_if(files_, [](const std::weak_ptr<Dmirror>& f) { return f.expired(); });
    files_.push_back(*d);
  }
  return std::shared_ptr<devfs::File>(std::move(*d));
}

std::vector<std::string> DmirrorDevice::check_mirrors() {
  std::vector<std::shared_ptr<Dmirror>> files;
  {
    // Copied out: check_mirror takes the mmap lock, which ranks before devmem_lock_.
    MutexLock g(&devmem_lock_);
    for (const std::weak_ptr<Dmirror>& f : files_) {
      if (std::shared_ptr<Dmirror> file = f.lock()) files.push_back(std::move(file));
    }
  }
  std::vector<std::string> problems;
  for (const std::shared_ptr<Dmirror>& f : files) {
    for (std::string& p : f->check_mirror()) problems.push_back(std::move(p));
  }
  return problems;
}

int DmirrorDevice::add_chunk() {
  MutexLock g(&devmem_lock_);
  if (chunks_.size() >= config_.max_chunks) return -ENOMEM;
  auto chunk = std::make_unique<Chunk>();
  Result<std::unique_ptr<mm::DevPagemap>> pgmap =
      mm::DevPagemap::create(mem_, config_.chunk_pages, owner(), this, /*storage=*/true, config_.memory_type);
  if (!pgmap) return pgmap.error();
  chunk->pgmap = std::move(*pgmap);
  {
    SpinLockGuard f(&free_lock_);
    // Pushed in reverse so that blocks are handed out in pfn order.
    for (uint64_t i = config_.chunk_pages; i >= mm::kPagesPerPmd; i -= mm::kPagesPerPmd) {
      free_huge_.push_back(FreePage{chunk.get(), chunk->pgmap->first_pfn() + i - mm::kPagesPerPmd});
    }
  }
  chunks_.push_back(std::move(chunk));
  chunks_added.add();
  return 0;
}

bool DmirrorDevice::take_free(unsigned order, FreePage* out) {
  SpinLockGuard g(&free_lock_);
  if (order == 0 && free_.empty() && !free_huge_.empty()) {
    // Break a block into pages (pushed in reverse: handed out in pfn order).
    const FreePage block = free_huge_.back();
    free_huge_.pop_back();
    for (uint64_t i = mm::kPagesPerPmd; i-- > 0;) free_.push_back(FreePage{block.chunk, block.pfn + i});
  }
  std::vector<FreePage>& list = order ? free_huge_ : free_;
  if (list.empty()) return false;
  *out = list.back();
  list.pop_back();
  out->chunk->in_use += 1ULL << order;
  return true;
}

mm::Folio* DmirrorDevice::alloc_folio(unsigned order) {
  // Two rounds: the free lists, then once more after adding a chunk.
  for (int round = 0; round < 2; round++) {
    FreePage fp;
    if (take_free(order, &fp)) {
      mm::Folio* f = fp.chunk->pgmap->folio_init(fp.pfn, order);
      if (!f) panic("dmirror: free device frames in use at pfn " + std::to_string(fp.pfn));
      f->zone_device_data = fp.chunk;
      return f;
    }
    if (round == 0 && add_chunk() != 0) return nullptr;
  }
  return nullptr;
}

mm::Folio* DmirrorDevice::alloc_page() { return alloc_folio(0); }
mm::Folio* DmirrorDevice::alloc_huge() { return alloc_folio(mm::kPmdOrder); }

void DmirrorDevice::folio_free(mm::Folio* folio) {
  auto* chunk = static_cast<Chunk*>(folio->zone_device_data);
  const uint64_t n = folio->nr_pages();
  SpinLockGuard g(&free_lock_);
  if (!chunk->removing) (n > 1 ? free_huge_ : free_).push_back(FreePage{chunk, folio->pfn()});
  chunk->in_use -= n;  // the last access to the chunk (see Chunk)
}

void DmirrorDevice::folio_split(mm::Folio* folio) {
  void* chunk = folio->zone_device_data;
  mm::DevPagemap* pgmap = folio->pagemap();
  for (uint64_t i = 1; i < mm::kPagesPerPmd; i++) pgmap->pfn_to_page(folio->pfn() + i)->zone_device_data = chunk;
}

bool DmirrorDevice::any_page_in_use() const {
  MutexLock g(&devmem_lock_);
  SpinLockGuard f(&free_lock_);
  for (const auto& c : chunks_) {
    if (c->in_use) return true;
  }
  return !dying_.empty();
}

uint64_t DmirrorDevice::evict_copy(uint64_t* src, uint64_t* dst, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) dst[i] = 0;
  uint64_t collected = 0;
  for (uint64_t i = 0; i < n; i += src_pages(src[i])) {
    if (!(src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    collected += src_pages(src[i]);
    // No memory: the page stays on the device this round and is collected again.
    (void)alloc_and_copy(*this, MigrateTarget::kSystem, src, dst, i, /*fail=*/false);
  }
  return collected;
}

int DmirrorDevice::evict_chunk(Chunk* chunk) {
  const uint64_t n = chunk->pgmap->nr_pages();
  std::vector<uint64_t> src(n), dst(n);
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (;;) {
    {
      SpinLockGuard g(&free_lock_);
      if (chunk->in_use == 0) return 0;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      log_busy_pages(id_, *chunk->pgmap);
      return -EBUSY;
    }
    if (int rc = mm::migrate_device_range(mem_, src.data(), chunk->pgmap->first_pfn(), n)) return rc;
    g_sp_release_collected.reach();
    const uint64_t collected = evict_copy(src.data(), dst.data(), n);
    mm::migrate_device_pages(mem_, src.data(), dst.data(), n);
    mm::migrate_device_finalize(mem_, src.data(), dst.data(), n);
    // Pages in use but not collected are busy (a migration or a fault holds them): let their
    // owner finish, then collect again.
    if (collected == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

int DmirrorDevice::release_chunks() {
  std::vector<std::unique_ptr<Chunk>> taken;
  {
    MutexLock g(&devmem_lock_);
    SpinLockGuard f(&free_lock_);
    for (auto& c : chunks_) c->removing = true;
    free_.clear();  // every chunk goes, so every free page goes
    free_huge_.clear();
    taken.swap(dying_);
    for (auto& c : chunks_) taken.push_back(std::move(c));
    chunks_.clear();
  }
  // No lock held: eviction locks folios and takes page-table locks of any address space.
  int rc = 0;
  std::vector<std::unique_ptr<Chunk>> busy;
  for (auto& c : taken) {
    if (int e = evict_chunk(c.get())) {
      rc = e;
      busy.push_back(std::move(c));
    }
  }
  taken.clear();  // empty chunks: their pagemaps unregister
  if (!busy.empty()) {
    MutexLock g(&devmem_lock_);
    for (auto& c : busy) dying_.push_back(std::move(c));
  }
  return rc;
}

uint64_t DmirrorDevice::pages_in_use() const {
  MutexLock g(&devmem_lock_);
  uint64_t n = 0;
  for (const auto& c : chunks_) n += c->pgmap->folios_in_use();
  return n;
}

size_t DmirrorDevice::chunk_count() const {
  MutexLock g(&devmem_lock_);
  return chunks_.size();
}

mm::VmFault DmirrorDevice::migrate_to_ram(const mm::VmFaultInfo& vmf) {
  cpu_faults.add();
  mm::Folio* folio = vmf.page->head();
  // A fault through a device-private PMD migrates the whole 2 MiB folio, else one page.
  const uint64_t n = vmf.pmd ? mm::kPagesPerPmd : 1;
  const mm::Va start = vmf.pmd ? mm::pmd_align_down(vmf.address) : mm::page_align_down(vmf.address);
  std::vector<uint64_t> src(n), dst(n);
  mm::MigrateVma args{.mm = vmf.mm, .start = start, .end = start + n * kPageSize, .src = src.data(),
                      .dst = dst.data(), .pgmap_owner = owner(),
                      .flags = mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE | mm::MIGRATE_VMA_SELECT_COMPOUND,
                      .fault_page = folio};
  // No file of this device is the migrator here: every mirror erases the range (nobody skips
  // this MIGRATE invalidation), so no file keeps an entry for the moving pages.
  if (mm::migrate_vma_setup(&args) != 0) return mm::VmFault::kSigbus;
  constexpr uint64_t kValidMigrate = mm::MIGRATE_PFN_VALID | mm::MIGRATE_PFN_MIGRATE;
  for (uint64_t i = 0; i < n; i += src_pages(src[i])) {
    if ((src[i] & kValidMigrate) != kValidMigrate) continue;
    if (!alloc_and_copy(*this, MigrateTarget::kSystem, src.data(), dst.data(), i, /*fail=*/false)) {
      for (uint64_t k = 0; k < n; k++) {
        if (!(dst[k] & mm::MIGRATE_PFN_VALID)) continue;
        mm::Folio* d = mem_->pfn_to_page(mm::migrate_pfn_to_pfn(dst[k]));
        dst[k] = 0;
        mm::folio_unlock(d);
        d->put();
      }
      mm::migrate_vma_finalize(&args);
      return mm::VmFault::kOom;
    }
  }
  args.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
  mm::migrate_vma_pages(&args);
  mm::migrate_vma_finalize(&args);
  return mm::VmFault::kOk;
}

}  // namespace gpusvm::dmirror
