// BenchDevice: the device-private memory provider of the migration benchmarks (migrate.cc).
//
// The shape of lib/test_hmm.c's dmirror memory side, as a driver would write it against
// gpusvm/mm: a DevPagemap with host storage (the "device" copies bytes with memcpy), an
// allocator that hands out 2 MiB device folios and 4 KiB device folios from 2 MiB blocks, and
// migrate_to_ram built on migrate_vma with fault_page.
//
// Compound (2 MiB) migration: when migrate_vma_setup reports a src word with
// MIGRATE_PFN_COMPOUND (the first of 512 words; the other 511 are 0), the driver allocates a
// 2 MiB destination (a device folio of order kPmdOrder, or a system THP), copies 2 MiB and sets
// dst = migrate_pfn(pfn) | MIGRATE_PFN_COMPOUND (tails 0); without a 2 MiB destination it
// fills 512 small destinations instead. The collection asks for compound source pages with
// MIGRATE_VMA_SELECT_COMPOUND when gpusvm/mm/migrate.h declares it (kSelectCompound below is
// 0 otherwise, and the mm collects a THP as 512 4 KiB pages after splitting it).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate.h"
#include "tools/gpusvm-bench/bench.h"

// The fallback for MIGRATE_VMA_SELECT_COMPOUND. It sits in the global namespace, so the
// unqualified lookup in compound_probe below (which sees gpusvm::mm's names as members of
// gpusvm) finds it only when migrate.h does not declare the flag: no #ifdef, and the bench
// picks the flag up the moment the mm layer has it.
namespace {
[[maybe_unused]] inline constexpr unsigned MIGRATE_VMA_SELECT_COMPOUND = 0;
}  // namespace

namespace gpusvm::bench {
namespace compound_probe {
using namespace gpusvm::mm;  // NOLINT(google-build-using-namespace): the lookup above needs it
inline constexpr unsigned kSelectCompound = MIGRATE_VMA_SELECT_COMPOUND;
}  // namespace compound_probe

// MIGRATE_VMA_SELECT_COMPOUND, or 0 when this mm has no compound migration yet.
inline constexpr unsigned kSelectCompound = compound_probe::kSelectCompound;

class BenchDevice : public mm::DevPagemapOps {
 public:
  // What one migration did. pages: 4 KiB pages that moved (a compound entry counts 512).
  struct Moved {
    uint64_t pages = 0;
    uint64_t compound_src = 0;  // src entries with MIGRATE_PFN_COMPOUND
    uint64_t compound_dst = 0;  // 2 MiB destinations allocated
    uint64_t small_dst = 0;     // 4 KiB destinations allocated
    uint64_t no_dst = 0;        // pages left where they were (no destination memory)
  };

  // Registers `pages` device frames (rounded up to 512) with host storage on `mem`.
  // Throws Failure when the pagemap cannot be created.
  BenchDevice(mm::PhysMem* mem, uint64_t pages) : mem_(mem) {
    pages = (pages + mm::kPagesPerPmd - 1) / mm::kPagesPerPmd * mm::kPagesPerPmd;
    Result<std::unique_ptr<mm::DevPagemap>> pgmap =
        mm::DevPagemap::create(mem, pages, this, this, /*storage=*/true);
    if (!pgmap) fail("DevPagemap::create({} pages): {}", pages, errno_describe(pgmap.error()));
    pgmap_ = std::move(*pgmap);
    blocks_.resize(pages / mm::kPagesPerPmd);
    for (uint64_t b = blocks_.size(); b-- > 0;) free_blocks_.push_back(b);
  }
  BenchDevice(const BenchDevice&) = delete;
  BenchDevice& operator=(const BenchDevice&) = delete;
  // Every device folio must have been freed (migrated back or unmapped) before: the
  // DevPagemap's destructor panics otherwise.
  ~BenchDevice() override = default;

  const void* owner() const { return this; }
  mm::DevPagemap& pgmap() { return *pgmap_; }
  uint64_t total_pages() const { return pgmap_->nr_pages(); }
  uint64_t free_pages() {
    std::lock_guard<std::mutex> g(lock_);
    uint64_t n = free_blocks_.size() * mm::kPagesPerPmd;
    for (const Block& b : blocks_) n += b.split ? b.free.size() : 0;
    return n;
  }
  uint64_t cpu_faults() const { return cpu_faults_.load(std::memory_order_relaxed); }

  // Migrates [start, end) (page aligned, inside one anonymous VMA) to device memory
  // (to_device) or back to system memory, the whole migrate_vma sequence under the mmap lock
  // (read): setup, destinations and copies, pages, finalize. Throws Failure when setup fails.
  // Caller holds no lock.
  // compound: ask for whole 2 MiB folios (kSelectCompound; no effect when this mm lacks it).
  Moved migrate(mm::AddressSpace& as, mm::Va start, mm::Va end, bool to_device, bool compound = true) {
    const uint64_t n = (end - start) >> mm::kPageShift;
    src_.assign(n, 0);
    dst_.assign(n, 0);
    mm::MigrateVma m{.mm = &as, .start = start, .end = end, .src = src_.data(), .dst = dst_.data(),
                     .pgmap_owner = this,
                     .flags = (to_device ? mm::MIGRATE_VMA_SELECT_SYSTEM
                                         : mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE) |
                              (compound ? kSelectCompound : 0u)};
    ReadLock g(&as.mmap_lock());
    if (int rc = mm::migrate_vma_setup(&m)) {  // the message is built only on failure: timed path
      require_ok(rc, fmt::format("migrate_vma_setup [{:#x}, {:#x}) {}", start, end,
                                 to_device ? "to device" : "to system"));
    }
    Moved r = fill_dst(src_.data(), dst_.data(), n, to_device);
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    mm::migrate_vma_pages(&m);
    r.pages = moved_pages(src_.data(), n);
    mm::migrate_vma_finalize(&m);
    return r;
  }

  // The driver's part between setup and pages: for every src word that may migrate, a new
  // locked destination (device memory when to_device, else system memory) holding a copy of
  // the source, or zeroes when the source is a hole or the zero page. See the file comment for
  // compound entries. A page without destination memory stays where it is (dst 0).
  Moved fill_dst(const uint64_t* src, uint64_t* dst, uint64_t n, bool to_device) {
    Moved r;
    for (uint64_t i = 0; i < n; i++) {
      if (!(src[i] & mm::MIGRATE_PFN_MIGRATE)) continue;
      if (src[i] & mm::MIGRATE_PFN_COMPOUND) {
        r.compound_src++;
        const uint64_t nr = std::min<uint64_t>(mm::kPagesPerPmd, n - i);
        if (mm::Folio* big = alloc(to_device, mm::kPmdOrder)) {
          mm::folio_lock(big);
          copy_pages(src[i], big, nr);
          dst[i] = mm::migrate_pfn(big->pfn()) | mm::MIGRATE_PFN_COMPOUND;
          r.compound_dst++;
        } else {
          // No 2 MiB destination: 512 small ones (the mm splits the source).
          for (uint64_t j = 0; j < nr; j++) {
            mm::Folio* page = alloc(to_device, 0);
            if (!page) {
              r.no_dst++;
              continue;
            }
            mm::folio_lock(page);
            copy_pages((src[i] & mm::MIGRATE_PFN_VALID) ? mm::migrate_pfn(mm::migrate_pfn_to_pfn(src[i]) + j)
                                                       : 0,
                       page, 1);
            dst[i + j] = mm::migrate_pfn(page->pfn());
            r.small_dst++;
          }
        }
        i += nr - 1;  // the tails' words are 0
        continue;
      }
      mm::Folio* page = alloc(to_device, 0);
      if (!page) {
        r.no_dst++;
        continue;
      }
      mm::folio_lock(page);
      copy_pages(src[i], page, 1);
      dst[i] = mm::migrate_pfn(page->pfn());
      r.small_dst++;
    }
    return r;
  }

  // 4 KiB pages still marked MIGRATE in src after migrate_vma_pages (a compound word: 512).
  static uint64_t moved_pages(const uint64_t* src, uint64_t n) {
    uint64_t moved = 0;
    for (uint64_t i = 0; i < n; i++) {
      if (src[i] & mm::MIGRATE_PFN_MIGRATE) moved += (src[i] & mm::MIGRATE_PFN_COMPOUND) ? mm::kPagesPerPmd : 1;
    }
    return moved;
  }

  // ---- DevPagemapOps ----

  // May run under page-table locks: only the allocator's mutex, never held across anything
  // that takes another lock.
  void folio_free(mm::Folio* folio) override {
    std::lock_guard<std::mutex> g(lock_);
    const uint64_t off = folio->pfn() - pgmap_->first_pfn();
    const uint64_t b = off / mm::kPagesPerPmd;
    Block& blk = blocks_[b];
    if (folio->order() == mm::kPmdOrder) {
      blk.split = false;
      blk.free.clear();
      free_blocks_.push_back(b);
      return;
    }
    blk.free.push_back(folio->pfn());
    if (blk.free.size() == 1) partial_.push_back(b);
    if (blk.free.size() == mm::kPagesPerPmd) {  // every 4 KiB page back: a whole block again
      blk.split = false;
      blk.free.clear();
      free_blocks_.push_back(b);
    }
  }

  // A CPU touched one of our pages: migrate it back with fault_page = vmf.page (locked and
  // referenced by the fault handler). A 2 MiB device folio goes back whole when its aligned
  // 2 MiB lies in the VMA, else the page alone.
  mm::VmFault migrate_to_ram(const mm::VmFaultInfo& vmf) override {
    cpu_faults_.fetch_add(1, std::memory_order_relaxed);
    mm::Folio* folio = vmf.page->head();
    mm::Va start = mm::page_align_down(vmf.address), end = start + mm::kPageSize;
    if (folio->large()) {
      vmf.mm->mmap_assert_locked();  // the fault handler's (read)
      const mm::Vma* vma = vmf.mm->vma_lookup(vmf.address);
      const mm::Va hs = mm::pmd_align_down(vmf.address);
      if (vma && vma->start <= hs && hs + mm::kPmdSize <= vma->end) {
        start = hs;
        end = hs + mm::kPmdSize;
      }
    }
    const uint64_t n = (end - start) >> mm::kPageShift;
    std::vector<uint64_t> src(n), dst(n);
    mm::MigrateVma m{.mm = vmf.mm, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
                     .pgmap_owner = this,
                     .flags = mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE | kSelectCompound,
                     .fault_page = folio};
    if (mm::migrate_vma_setup(&m) != 0) return mm::VmFault::kSigbus;
    const Moved r = fill_dst(src.data(), dst.data(), n, /*to_device=*/false);
    m.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    mm::migrate_vma_pages(&m);
    mm::migrate_vma_finalize(&m);
    return r.no_dst ? mm::VmFault::kOom : mm::VmFault::kOk;
  }

 private:
  struct Block {
    bool split = false;          // handed out as 4 KiB pages
    std::vector<mm::Pfn> free;   // split: its free 4 KiB pages
  };

  // A new device folio of `order` (refcount 1), or a system folio when !to_device.
  mm::Folio* alloc(bool to_device, unsigned order) {
    if (!to_device) return mem_->folio_alloc(order, /*zero=*/false);
    std::lock_guard<std::mutex> g(lock_);
    if (order == mm::kPmdOrder) {
      if (free_blocks_.empty()) return nullptr;
      const uint64_t b = free_blocks_.back();
      free_blocks_.pop_back();
      return pgmap_->folio_init(pgmap_->first_pfn() + b * mm::kPagesPerPmd, mm::kPmdOrder);
    }
    for (;;) {
      while (!partial_.empty()) {
        Block& blk = blocks_[partial_.back()];
        if (!blk.split || blk.free.empty()) {  // stale: emptied, or whole again meanwhile
          partial_.pop_back();
          continue;
        }
        const mm::Pfn pfn = blk.free.back();
        blk.free.pop_back();
        if (blk.free.empty()) partial_.pop_back();
        return pgmap_->folio_init(pfn, 0);
      }
      if (free_blocks_.empty()) return nullptr;
      const uint64_t b = free_blocks_.back();
      free_blocks_.pop_back();
      Block& blk = blocks_[b];
      blk.split = true;
      const mm::Pfn first = pgmap_->first_pfn() + b * mm::kPagesPerPmd;
      for (uint64_t j = mm::kPagesPerPmd; j-- > 0;) blk.free.push_back(first + j);
      partial_.push_back(b);
    }
  }

  // Copies nr pages from the source of mpfn (zeroes when it has no MIGRATE_PFN_VALID: a hole
  // or the zero page) into the folio `to`, in one memcpy.
  void copy_pages(uint64_t mpfn, mm::Folio* to, uint64_t nr) {
    std::byte* d = to->data(0);
    if (!(mpfn & mm::MIGRATE_PFN_VALID)) {
      std::memset(d, 0, nr << mm::kPageShift);
      return;
    }
    mm::Folio* from = mem_->pfn_to_page(mm::migrate_pfn_to_pfn(mpfn));
    const std::byte* s = from->data(0);
    // Both sides are frames of one arena (RAM or the pagemap's storage): contiguous.
    std::memcpy(d, s, nr << mm::kPageShift);
  }

  mm::PhysMem* mem_;
  std::unique_ptr<mm::DevPagemap> pgmap_;
  std::mutex lock_;
  std::vector<Block> blocks_;          // guarded by lock_
  std::vector<uint64_t> free_blocks_;  // whole free 2 MiB blocks; guarded by lock_
  std::vector<uint64_t> partial_;      // split blocks that may have free pages; guarded by lock_
  std::vector<uint64_t> src_, dst_;    // migrate()'s arrays (one migration at a time)
  std::atomic<uint64_t> cpu_faults_{0};
};

}  // namespace gpusvm::bench
