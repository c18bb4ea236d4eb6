// DmirrorDevice: device memory (chunks, free list), open, the pagemap ops.
#include "drivers/dmirror/dmirror_device.h"

#include <cerrno>
#include <chrono>
#include <thread>

#include "drivers/devfs/process.h"
#include "drivers/dmirror/dmirror.h"
#include "drivers/dmirror/page_copy.h"
#include "gpusvm/mm/migrate.h"

namespace gpusvm::dmirror {

using mm::kPageSize;

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
  }
  MutexLock g(&devmem_lock_);
  chunks_.clear();  // each DevPagemap checks that none of its pages is still in use
  dying_.clear();
}

Result<std::shared_ptr<devfs::File>> DmirrorDevice::open(devfs::Process& opener) {
  Result<std::shared_ptr<Dmirror>> d = Dmirror::create(shared_from_this(), opener.mm_ref());
  if (!d) return Err{d.error()};
  return std::shared_ptr<devfs::File>(std::move(*d));
}

int DmirrorDevice::add_chunk() {
  MutexLock g(&devmem_lock_);
  if (chunks_.size() >= config_.max_chunks) return -ENOMEM;
  auto chunk = std::make_unique<Chunk>();
  Result<std::unique_ptr<mm::DevPagemap>> pgmap =
      mm::DevPagemap::create(mem_, config_.chunk_pages, owner(), this, /*storage=*/true);
  if (!pgmap) return pgmap.error();
  chunk->pgmap = std::move(*pgmap);
  {
    SpinLockGuard f(&free_lock_);
    // Pushed in reverse so that pages are handed out in pfn order.
    for (uint64_t i = config_.chunk_pages; i-- > 0;) {
      free_.push_back(FreePage{chunk.get(), chunk->pgmap->first_pfn() + i});
    }
  }
  chunks_.push_back(std::move(chunk));
  chunks_added.add();
  return 0;
}

mm::Folio* DmirrorDevice::alloc_page() {
  // Two rounds: the free list, then once more after adding a chunk.
  for (int round = 0; round < 2; round++) {
    for (;;) {
      FreePage fp;
      {
        SpinLockGuard g(&free_lock_);
        if (free_.empty()) break;
        fp = free_.back();
        free_.pop_back();
      }
      if (mm::Folio* f = fp.chunk->pgmap->folio_init(fp.pfn, 0)) {
        f->zone_device_data = fp.chunk;
        SpinLockGuard g(&free_lock_);
        fp.chunk->in_use++;
        return f;
      }
      // Cannot happen while the free list only holds free frames; skip the frame if it does.
    }
    if (round == 0 && add_chunk() != 0) return nullptr;
  }
  return nullptr;
}

void DmirrorDevice::folio_free(mm::Folio* folio) {
  auto* chunk = static_cast<Chunk*>(folio->zone_device_data);
  SpinLockGuard g(&free_lock_);
  if (!chunk->removing) {
    for (uint64_t i = 0; i < folio->nr_pages(); i++) free_.push_back(FreePage{chunk, folio->pfn() + i});
  }
  chunk->in_use -= 1;  // the last access to the chunk (see Chunk)
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
  uint64_t collected = 0;
  for (uint64_t i = 0; i < n; i++) {
    dst[i] = 0;
    if (!(src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
    collected++;
    mm::Folio* dpage = mem_->folio_alloc(0, /*zero=*/false);
    if (!dpage) continue;  // stays on the device this round; retried
    mm::folio_lock(dpage);
    dev_copy_page(dpage->data(), mem_->pfn_to_page(mm::migrate_pfn_to_pfn(src[i]))->data());
    dst[i] = mm::migrate_pfn(dpage->pfn());
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
    if (std::chrono::steady_clock::now() > deadline) return -EBUSY;
    if (int rc = mm::migrate_device_range(mem_, src.data(), chunk->pgmap->first_pfn(), n)) return rc;
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
  const mm::Va start = mm::page_align_down(vmf.address);
  uint64_t src = 0;
  uint64_t dst = 0;
  mm::MigrateVma args{.mm = vmf.mm, .start = start, .end = start + kPageSize, .src = &src,
                      .dst = &dst, .pgmap_owner = owner(),
                      .flags = mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE, .fault_page = folio};
  // No file of this device is the migrator here: every mirror erases the page (the MIGRATE
  // invalidation is not skipped by anyone), so no file keeps an entry for the moving page.
  if (mm::migrate_vma_setup(&args) != 0) return mm::VmFault::kSigbus;
  mm::VmFault ret = mm::VmFault::kOk;
  if ((src & mm::MIGRATE_PFN_MIGRATE) && (src & mm::MIGRATE_PFN_VALID)) {
    mm::Folio* dpage = mem_->folio_alloc(0, /*zero=*/false);
    if (dpage) {
      mm::folio_lock(dpage);
      dev_copy_page(dpage->data(), mem_->pfn_to_page(mm::migrate_pfn_to_pfn(src))->data());
      dst = mm::migrate_pfn(dpage->pfn()) | (src & mm::MIGRATE_PFN_WRITE);
    } else {
      ret = mm::VmFault::kOom;
    }
  }
  if (ret == mm::VmFault::kOk) mm::migrate_vma_pages(&args);
  mm::migrate_vma_finalize(&args);
  return ret;
}

}  // namespace gpusvm::dmirror
