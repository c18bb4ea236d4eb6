// A small GPU driver on the public svm API (gpusvm/svm): what the svm benchmarks (svm.cc) and
// the driver-integration example (tools/svm-example) run on. It is written as a real driver
// would be (docs/driver-integration.md walks through it), not from the test doubles in
// tests/svm:
//
//  - BenchVram: the device memory. An mm::DevPagemap with host storage (the "device" copies
//    with memcpy), the svm Pagemap over it, and an allocator handing out aligned 2 MiB blocks
//    for every full 2 MiB of an allocation and 4 KiB pages from split blocks for the rest, so
//    THP sources get compound destinations. PagemapOps (device_map, populate_mm, destroy) and
//    DevmemOps (populate_devmem_pfn, copy_to_devmem, copy_to_ram, devmem_release).
//  - BenchGpu: one device VM. A VM lock (the Gpusvm driver lock), a GPU page table with one
//    PTE per address-array entry (a 2 MiB entry is one huge PTE, as GPUs have), the
//    invalidate op (zap, TLB flush, unmap_pages) and a page-fault handler in
//    xe_svm_handle_pagefault's shape (garbage collector, range_find_or_insert, migrate when
//    the policy says so, get_pages, reserve PT memory, notifier lock, pages_valid, commit or
//    -EAGAIN and retry). gpu_load / gpu_store access memory through that page table only.
//
// Locking (gpusvm/base/lock_order.h): vm_lock (gpusvm_driver_lock) -> mmap lock (inside the
// svm and mm calls only) -> the Gpusvm notifier lock. The GPU page table changes with the
// notifier lock held for write (invalidate, GC) or held for read together with vm_lock
// (commit; commits are serialized by vm_lock). The VRAM allocator's lock is a leaf (a plain
// std::mutex, never held across any call): devmem_release may run from folio_free under
// page-table locks.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/gpusvm.h"
#include "gpusvm/svm/pagemap.h"

namespace gpusvm::bench {

class BenchVram;

// One device allocation (a driver's buffer object): its frames in address order.
class BenchDevmem : public svm::Devmem {
 public:
  BenchDevmem(BenchVram* vram, mm::AddressSpace* as, uint64_t size, std::vector<mm::Pfn> pfns);
  const std::vector<mm::Pfn>& pfns() const { return pfns_; }
  bool released() const { return released_.load(std::memory_order_acquire); }

 private:
  friend class BenchVram;
  const std::vector<mm::Pfn> pfns_;
  std::atomic<bool> released_{false};
};

class BenchVram final : public svm::PagemapOps, public svm::DevmemOps {
 public:
  // nr_pages device frames (rounded up to 512). Check ok() after construction.
  BenchVram(mm::PhysMem* mem, uint64_t nr_pages, std::string name);
  // Drops the driver's pagemap reference and waits for its destroy. Every device page must
  // be gone by then (migrated back or unmapped).
  ~BenchVram() override;
  BenchVram(const BenchVram&) = delete;
  BenchVram& operator=(const BenchVram&) = delete;

  bool ok() const { return pagemap_ != nullptr; }
  svm::Device* device() { return &dev_; }
  svm::Pagemap* pagemap() { return pagemap_; }
  mm::DevPagemap* dev_pagemap() { return dpm_.get(); }
  const void* owner() const { return this; }
  uint64_t total_pages() const { return nr_pages_; }
  uint64_t free_pages();

  // A new allocation of `size` bytes (multiple of 4 KiB) for a range of `as`, or nullptr
  // when the memory is exhausted. Allocations whose pages were all released are freed here
  // (the caller's thread, after the migration or unmap that released them has returned).
  BenchDevmem* alloc_devmem(mm::AddressSpace* as, uint64_t size);
  // The bytes behind an address this device hands out or is given (a DMA address of a
  // system page, or a device address of its own memory: both pfn << 12 in the model).
  std::byte* bytes(svm::DmaAddr addr) const;

  // Statistics.
  std::atomic<uint64_t> copies_to_devmem{0}, copies_to_ram{0}, memcpy_calls{0};

  // svm::PagemapOps. device_map works for this device only (no interconnect peers).
  svm::PagemapAddr device_map(svm::Pagemap* pagemap, svm::Device* dev, mm::Folio* page,
                              unsigned order, svm::DmaDirection dir) override;
  void device_unmap(svm::Pagemap* pagemap, svm::Device* dev, const svm::PagemapAddr& addr) override;
  int populate_mm(svm::Pagemap* pagemap, mm::Va start, mm::Va end, mm::AddressSpace* as,
                  unsigned timeslice_ms) override;
  void destroy(svm::Pagemap* pagemap) override;
  // svm::DevmemOps.
  void devmem_release(svm::Devmem* devmem) override;
  int populate_devmem_pfn(svm::Devmem* devmem, uint64_t npages, uint64_t* pfns) override;
  int copy_to_devmem(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                     svm::Fence* pre_migrate_fence) override;
  int copy_to_ram(mm::Folio* const* pages, const svm::PagemapAddr* addrs, uint64_t npages,
                  svm::Fence* pre_migrate_fence) override;

 private:
  struct Block {
    bool split = false;         // handed out as 4 KiB pages
    std::vector<mm::Pfn> free;  // split: its free pages (frame offsets)
  };
  // Frame offset of one free page, or ~0 (allocator lock held).
  uint64_t alloc_page_locked();
  void free_page_locked(uint64_t off);
  void reap_locked();

  mm::PhysMem* const mem_;
  uint64_t nr_pages_ = 0;
  svm::Device dev_;
  std::unique_ptr<mm::DevPagemap> dpm_;
  svm::Pagemap* pagemap_ = nullptr;  // the driver's reference
  std::atomic<bool> destroyed_{false};
  std::mutex lock_;  // the allocator (leaf: see the file comment)
  std::vector<Block> blocks_;                          // lock_
  std::vector<uint64_t> free_blocks_;                  // whole free blocks; lock_
  std::vector<uint64_t> partial_;                      // split blocks maybe with free pages; lock_
  std::vector<std::unique_ptr<BenchDevmem>> devmems_;  // live allocations; lock_
};

// One GPU PTE: 2^order pages from addr (a huge PTE for a 2 MiB entry).
struct GpuPte {
  svm::DmaAddr addr = svm::kDmaMappingError;
  uint8_t order = 0;
  bool valid = false;
  bool write = false;
  bool devmem = false;
};

// The PTEs of one range, in VA order.
struct GpuPtBlock {
  mm::Va start = 0;
  std::vector<GpuPte> ptes;
};

class BenchGpu : public svm::GpusvmOps {
 public:
  struct Options {
    std::string name = "gpu0";
    mm::Va mm_start = 0;
    uint64_t mm_range = 1ULL << 47;
    uint64_t notifier_size = svm::kDefaultNotifierSize;
    std::vector<uint64_t> chunk_sizes;  // empty: 2 MiB, 64 KiB, 4 KiB
    BenchVram* vram = nullptr;          // device memory, or null (system memory only)
  };
  // What a fault does about placement.
  enum class Placement : uint8_t { kSystem, kDevmem };

  // Creates the Gpusvm (init's error in *rc).
  BenchGpu(mm::AddressSpace* as, Options opts, int* rc);
  ~BenchGpu() override;  // unbind_all, then Gpusvm fini
  BenchGpu(const BenchGpu&) = delete;
  BenchGpu& operator=(const BenchGpu&) = delete;

  svm::Gpusvm* gpusvm() { return gpusvm_.get(); }
  svm::Device* device() { return dev_; }
  Mutex& vm_lock() GPUSVM_RETURN_CAPABILITY(vm_lock_) { return vm_lock_; }

  // The GPU page fault at addr. Takes vm_lock. 0 or a negative errno:
  //   range_find_or_insert's errors (-EINVAL, -EFAULT, -ENOENT, -EPERM, -EIO, -ENOMEM),
  //   get_pages' errors (-EFAULT, -EPERM, -EBUSY, -ENOMEM), -EAGAIN after 64 lost commits.
  // kDevmem migrates the range to vram first (a failed migration falls back to system
  // memory, as xe does).
  [[nodiscard]] int fault(mm::Va addr, bool write, Placement placement = Placement::kSystem);
  // 8 bytes at addr through the GPU page table: -EFAULT when no valid (writable) PTE covers
  // it. Takes vm_lock and the notifier lock (read).
  Result<uint64_t> gpu_load(mm::Va addr);
  [[nodiscard]] int gpu_store(mm::Va addr, uint64_t value);
  // Checks every valid GPU PTE against the CPU page table (call when nothing runs: no CPU
  // or GPU activity in flight): the CPU maps that address to the same frame (system pages)
  // or to a device-private entry of the same frame (device pages), writable if the PTE is.
  // Returns the mismatches; *first describes the first one. Takes vm_lock.
  uint64_t check_ptes(std::string* first);
  // Removes every range (zap, evict what a partial unmap left, remove). Takes vm_lock.
  void unbind_all();
  // Runs the garbage collector. Takes vm_lock. Returns the ranges removed.
  size_t collect_garbage();

  // svm::GpusvmOps. Notifier lock held for write (asserted).
  void invalidate(svm::Gpusvm* gpusvm, svm::Notifier* notifier,
                  const mm::MmuNotifierRange& range) override;

  std::atomic<uint64_t> invalidations{0}, tlb_flushes{0}, commits{0}, eagain{0}, gc_removed{0},
      migrations{0}, migration_failures{0};

 private:
  // Builds the PTEs of range (vm_lock held), commits them under the notifier lock if
  // pages_valid: 0 or -EAGAIN.
  int commit(svm::Range* range, bool write) GPUSVM_REQUIRES(vm_lock_);
  void zap_locked(svm::Range* range);
  void gc_range(svm::Range* range) GPUSVM_REQUIRES(vm_lock_);
  size_t collect_garbage_locked() GPUSVM_REQUIRES(vm_lock_);
  // The valid PTE covering addr (notifier lock held), or nullptr.
  const GpuPte* lookup_locked(mm::Va addr, uint64_t* offset);

  mm::AddressSpace* const as_;
  const Options opts_;
  Mutex vm_lock_{&svm::kGpusvmDriverLockClass};
  std::unique_ptr<svm::Device> own_dev_;  // the DMA device when there is no vram
  svm::Device* dev_ = nullptr;
  std::unique_ptr<svm::Gpusvm> gpusvm_;
  // The GPU page table by range start (see the file comment for its locking).
  std::map<mm::Va, GpuPtBlock> pt_;
};

}  // namespace gpusvm::bench
