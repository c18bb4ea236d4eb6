// A minimal device for the migration tests: device-private memory with host-backed storage,
// a free list of device frames, and migrate_to_ram built on migrate_vma - the shape of
// lib/test_hmm.c's dmirror, small enough to read in one go.
#pragma once

#include <cstring>
#include <mutex>
#include <vector>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate.h"

namespace gpusvm::mm::testing {

class TestDevice : public DevPagemapOps {
 public:
  TestDevice(PhysMem* mem, uint64_t pages) : mem_(mem) {
    auto pgmap = DevPagemap::create(mem, pages, this, this, /*storage=*/true);
    if (pgmap.ok()) {
      pgmap_ = std::move(*pgmap);
      for (uint64_t i = pages; i-- > 0;) free_.push_back(pgmap_->first_pfn() + i);
    }
  }
  bool ok() const { return pgmap_ != nullptr; }
  DevPagemap* pgmap() { return pgmap_.get(); }
  size_t free_pages() {
    std::lock_guard<std::mutex> g(lock_);
    return free_.size();
  }

  void folio_free(Folio* folio) override {
    std::lock_guard<std::mutex> g(lock_);
    free_.push_back(folio->pfn());
    freed++;
  }

  VmFault migrate_to_ram(const VmFaultInfo& vmf) override {
    cpu_faults++;
    uint64_t src = 0, dst = 0;
    MigrateVma m{.mm = vmf.mm, .start = page_align_down(vmf.address),
                 .end = page_align_down(vmf.address) + kPageSize, .src = &src, .dst = &dst,
                 .pgmap_owner = this, .flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
                 .fault_page = vmf.page->head()};
    if (migrate_vma_setup(&m) != 0) return VmFault::kSigbus;
    VmFault r = VmFault::kOk;
    if (src & MIGRATE_PFN_MIGRATE) {
      Folio* page = mem_->folio_alloc(0, /*zero=*/false);
      if (page) {
        folio_lock(page);
        std::memcpy(page->data(), mem_->pfn_to_page(migrate_pfn_to_pfn(src))->data(), kPageSize);
        dst = migrate_pfn(page->pfn());
      } else {
        r = VmFault::kOom;
      }
    }
    migrate_vma_pages(&m);
    migrate_vma_finalize(&m);
    return r;
  }

  // Migrates [start, end) to device memory; returns the number of pages that moved.
  // Caller holds no lock.
  Result<uint64_t> migrate_to_device(AddressSpace& as, Va start, Va end, unsigned extra_flags = 0,
                                     MigrateWalkMode mode = MigrateWalkMode::kUnified) {
    return migrate(as, start, end, MIGRATE_VMA_SELECT_SYSTEM | extra_flags, /*to_device=*/true, mode);
  }
  Result<uint64_t> migrate_to_system(AddressSpace& as, Va start, Va end) {
    return migrate(as, start, end, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, /*to_device=*/false,
                   MigrateWalkMode::kUnified);
  }
  // Evicts every device page in use (migrate_device_range, as a driver that loses its memory
  // does). Returns the number of pages moved. Caller holds no lock.
  Result<uint64_t> evict_all() {
    const uint64_t n = pgmap_->nr_pages();
    std::vector<uint64_t> src(n), dst(n);
    if (int rc = migrate_device_range(mem_, src.data(), pgmap_->first_pfn(), n)) return Err{rc};
    for (uint64_t i = 0; i < n; i++) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
      Folio* page = mem_->folio_alloc(0, /*zero=*/false);
      if (!page) continue;
      folio_lock(page);
      std::memcpy(page->data(), mem_->pfn_to_page(migrate_pfn_to_pfn(src[i]))->data(), kPageSize);
      dst[i] = migrate_pfn(page->pfn());
    }
    migrate_device_pages(mem_, src.data(), dst.data(), n);
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; i++) moved += (src[i] & MIGRATE_PFN_MIGRATE) ? 1 : 0;
    migrate_device_finalize(mem_, src.data(), dst.data(), n);
    return moved;
  }

  std::atomic<int> cpu_faults{0};
  std::atomic<int> freed{0};

 private:
  Folio* alloc_device_page() {
    std::lock_guard<std::mutex> g(lock_);
    while (!free_.empty()) {
      const Pfn pfn = free_.back();
      free_.pop_back();
      if (Folio* f = pgmap_->folio_init(pfn, 0)) return f;
    }
    return nullptr;
  }

  Result<uint64_t> migrate(AddressSpace& as, Va start, Va end, unsigned select, bool to_device,
                           MigrateWalkMode mode) {
    const uint64_t n = (end - start) >> kPageShift;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m{.mm = &as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
                 .pgmap_owner = this, .flags = select, .walk_mode = mode};
    ReadLock g(&as.mmap_lock());
    if (int rc = migrate_vma_setup(&m)) return Err{rc};
    for (uint64_t i = 0; i < n; i++) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
      Folio* page = to_device ? alloc_device_page() : mem_->folio_alloc(0, /*zero=*/false);
      if (!page) continue;  // out of memory: this page stays where it is
      folio_lock(page);
      if (src[i] & MIGRATE_PFN_VALID) {
        std::memcpy(page->data(), mem_->pfn_to_page(migrate_pfn_to_pfn(src[i]))->data(), kPageSize);
      } else {
        std::memset(page->data(), 0, kPageSize);
      }
      dst[i] = migrate_pfn(page->pfn());
    }
    migrate_vma_pages(&m);
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; i++) moved += (src[i] & MIGRATE_PFN_MIGRATE) ? 1 : 0;
    migrate_vma_finalize(&m);
    return moved;
  }

  PhysMem* mem_;
  std::unique_ptr<DevPagemap> pgmap_;
  std::mutex lock_;
  std::vector<Pfn> free_;  // guarded by lock_
};

}  // namespace gpusvm::mm::testing
