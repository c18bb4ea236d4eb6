// A minimal device for the migration tests: device-private (or device-coherent) memory with
// host-backed storage, a free set of device frames handed out as 4 KiB or 2 MiB folios (4 KiB
// only for coherent memory), and migrate_to_ram built on migrate_vma - the shape of
// lib/test_hmm.c's dmirror, small enough to read in one go.
#pragma once

#include <atomic>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate.h"

namespace gpusvm::mm::testing {

class TestDevice : public DevPagemapOps {
 public:
  TestDevice(PhysMem* mem, uint64_t pages, DevMemoryType type = DevMemoryType::kDevicePrivate)
      : mem_(mem), select_(type == DevMemoryType::kDeviceCoherent ? MIGRATE_VMA_SELECT_DEVICE_COHERENT
                                                                  : MIGRATE_VMA_SELECT_DEVICE_PRIVATE) {
    auto pgmap = DevPagemap::create(mem, pages, this, this, /*storage=*/true, type);
    if (pgmap.ok()) {
      pgmap_ = std::move(*pgmap);
      for (uint64_t i = 0; i < pages; i++) free_.insert(pgmap_->first_pfn() + i);
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
    for (uint64_t i = 0; i < folio->nr_pages(); i++) free_.insert(folio->pfn() + i);
    freed++;
  }
  void folio_split(Folio*) override { splits++; }

  // A CPU touched one of our pages: bring back that page, or the whole 2 MiB folio when the
  // fault came through a PMD (then as 2 MiB unless THP allocation is made to fail).
  VmFault migrate_to_ram(const VmFaultInfo& vmf) override {
    cpu_faults++;
    const Va start = vmf.pmd ? pmd_align_down(vmf.address) : page_align_down(vmf.address);
    const uint64_t n = vmf.pmd ? kPagesPerPmd : 1;
    std::vector<uint64_t> src(n), dst(n);
    MigrateVma m{.mm = vmf.mm, .start = start, .end = start + n * kPageSize, .src = src.data(),
                 .dst = dst.data(), .pgmap_owner = this,
                 .flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE | (vmf.pmd ? MIGRATE_VMA_SELECT_COMPOUND : 0u),
                 .fault_page = vmf.page->head()};
    if (migrate_vma_setup(&m) != 0) return VmFault::kSigbus;
    const bool all = copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    migrate_vma_finalize(&m);
    return all ? VmFault::kOk : VmFault::kOom;
  }

  // Migrates [start, end) to device memory; returns the number of pages that moved.
  // Caller holds no lock.
  Result<uint64_t> migrate_to_device(AddressSpace& as, Va start, Va end, unsigned extra_flags = 0,
                                     MigrateWalkMode mode = MigrateWalkMode::kUnified) {
    return migrate(as, start, end, MIGRATE_VMA_SELECT_SYSTEM | extra_flags, /*to_device=*/true, mode);
  }
  Result<uint64_t> migrate_to_system(AddressSpace& as, Va start, Va end, unsigned extra_flags = 0) {
    return migrate(as, start, end, select_ | extra_flags, /*to_device=*/false, MigrateWalkMode::kUnified);
  }
  // Evicts every device page in use (migrate_device_range, as a driver that loses its memory
  // does). Returns the number of pages moved. Caller holds no lock.
  Result<uint64_t> evict_all() {
    const uint64_t n = pgmap_->nr_pages();
    std::vector<uint64_t> src(n), dst(n);
    if (int rc = migrate_device_range(mem_, src.data(), pgmap_->first_pfn(), n)) return Err{rc};
    copy_to_new_pages(src.data(), dst.data(), n, /*to_device=*/false);
    migrate_device_pages(mem_, src.data(), dst.data(), n);
    const uint64_t moved = count_moved(src.data(), n);
    migrate_device_finalize(mem_, src.data(), dst.data(), n);
    return moved;
  }

  // The driver's part between setup and pages: new locked pages (device or system) for every
  // src entry that may migrate, holding a copy of the source (or zeroes), in dst. A compound
  // entry gets one 2 MiB folio, or 512 small ones when that cannot be had (fail_thp_alloc).
  // Returns false if some page got no destination.
  bool copy_to_new_pages(const uint64_t* src, uint64_t* dst, uint64_t n, bool to_device) {
    bool all = true;
    for (uint64_t i = 0; i < n; i++) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE)) continue;
      const bool compound = src[i] & MIGRATE_PFN_COMPOUND;
      Folio* page = nullptr;
      if (compound && !fail_thp_alloc.load()) {
        page = to_device ? alloc_device_folio(kPmdOrder) : mem_->folio_alloc(kPmdOrder, /*zero=*/false);
      }
      if (page) {
        folio_lock(page);
        copy_data(page, src[i], kPagesPerPmd);
        dst[i] = migrate_pfn(page->pfn()) | MIGRATE_PFN_COMPOUND;
        i += kPagesPerPmd - 1;
        continue;
      }
      // 4 KiB destinations, for each page of a compound entry too (its tail words are 0).
      const uint64_t pages = compound ? kPagesPerPmd : 1;
      for (uint64_t j = 0; j < pages && i + j < n; j++) {
        Folio* small = to_device ? alloc_device_folio(0) : mem_->folio_alloc(0, /*zero=*/false);
        if (!small) {
          all = false;  // out of memory: this page stays where it is
          continue;
        }
        folio_lock(small);
        const uint64_t word = (src[i] & MIGRATE_PFN_VALID) ? src[i] + (j << MIGRATE_PFN_SHIFT) : 0;
        copy_data(small, word, 1);
        dst[i + j] = migrate_pfn(small->pfn());
      }
      i += pages - 1;
    }
    return all;
  }

  static uint64_t count_moved(const uint64_t* src, uint64_t n) {
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; i++) {
      if (src[i] & MIGRATE_PFN_MIGRATE) moved += (src[i] & MIGRATE_PFN_COMPOUND) ? kPagesPerPmd : 1;
    }
    return moved;
  }

  // A free device folio of the order (0 or kPmdOrder), unlocked, one reference; nullptr when
  // none is free. For tests that fill dst by hand.
  Folio* alloc_device_page(unsigned order) { return alloc_device_folio(order); }

  std::atomic<int> cpu_faults{0};
  std::atomic<int> freed{0};
  std::atomic<int> splits{0};
  std::atomic<bool> fail_thp_alloc{false};  // hand out only 4 KiB destinations
  std::atomic<int> select_violations{0};    // collected pages the select flags exclude

 private:
  // `pages` pages from src word `word` (zeroes when it has no page) into `dst`.
  void copy_data(Folio* dst, uint64_t word, uint64_t pages) {
    for (uint64_t j = 0; j < pages; j++) {
      if (word & MIGRATE_PFN_VALID) {
        std::memcpy(dst->data(j), mem_->pfn_to_page(migrate_pfn_to_pfn(word) + j)->data(), kPageSize);
      } else {
        std::memset(dst->data(j), 0, kPageSize);
      }
    }
  }

  Folio* alloc_device_folio(unsigned order) {
    std::lock_guard<std::mutex> g(lock_);
    if (order == 0) {
      // From the top, so that 2 MiB blocks stay whole at the bottom as long as possible.
      while (!free_.empty()) {
        const Pfn pfn = *free_.rbegin();
        free_.erase(pfn);
        if (Folio* f = pgmap_->folio_init(pfn, 0)) return f;
      }
      return nullptr;
    }
    for (Pfn b = pgmap_->first_pfn(); b + kPagesPerPmd <= pgmap_->first_pfn() + pgmap_->nr_pages();
         b += kPagesPerPmd) {
      auto it = free_.find(b);
      uint64_t run = 0;
      for (; it != free_.end() && *it == b + run && run < kPagesPerPmd; ++it) run++;
      if (run < kPagesPerPmd) continue;
      Folio* f = pgmap_->folio_init(b, kPmdOrder);
      if (!f) continue;
      free_.erase(free_.lower_bound(b), free_.lower_bound(b + kPagesPerPmd));
      return f;
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
    check_selected(src.data(), n, to_device);
    copy_to_new_pages(src.data(), dst.data(), n, to_device);
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    migrate_vma_pages(&m);
    const uint64_t moved = count_moved(src.data(), n);
    migrate_vma_finalize(&m);
    return moved;
  }

  // The select rules seen from the driver: a migration to the device collects only system
  // pages, one back to RAM only this device's pages. A page it never asked for is counted.
  void check_selected(const uint64_t* src, uint64_t n, bool to_device) {
    for (uint64_t i = 0; i < n; i++) {
      if (!(src[i] & MIGRATE_PFN_MIGRATE) || !(src[i] & MIGRATE_PFN_VALID)) continue;
      const Folio* folio = mem_->pfn_to_page(migrate_pfn_to_pfn(src[i]))->head();
      const bool ours = folio_is_zone_device(folio) && folio->pagemap() == pgmap_.get();
      if (to_device ? folio_is_zone_device(folio) : !ours) select_violations++;
    }
  }

  PhysMem* mem_;
  const unsigned select_;  // the SELECT flag of this device's memory kind
  std::unique_ptr<DevPagemap> pgmap_;
  std::mutex lock_;
  std::set<Pfn> free_;  // guarded by lock_
};

}  // namespace gpusvm::mm::testing
