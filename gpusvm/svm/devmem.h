// Devmem: one device-memory allocation backing a range (drm_pagemap_devmem), its driver ops,
// and the migrations between it and system memory (drm_pagemap_migrate_to_devmem,
// drm_pagemap_evict_to_ram; the CPU-fault migrate_to_ram is in pagemap_dev_ops.cc).
//
// Ownership (as the kernel): the driver creates a Devmem (usually embedded in its buffer
// object) and hands its reference to migrate_to_devmem, which consumes it even on error. Each
// device page then holds a reference on the allocation's zdd (pagemap_zdd.h); when the last
// page is freed the zdd goes, `detached` completes and ops->devmem_release is called (maybe
// from folio_free, under page-table locks: it must not sleep). The Devmem holds a Pagemap
// reference from construction; this layer drops it right after devmem_release returns,
// through a pointer read before the call. The Devmem object itself stays the driver's, and
// devmem_release may free it (as Xe's drops the bo embedding it): nothing here touches the
// Devmem once devmem_release was called (tests/svm/pagemap_release_test.cc, under ASan). The
// one exception is evict_to_ram, whose caller keeps the Devmem valid across the call (the
// kernel's caller holds a bo reference for the same reason).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

#include "gpusvm/base/waitqueue.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/types.h"
#include "gpusvm/svm/device.h"
#include "gpusvm/svm/pagemap.h"

namespace gpusvm::mm {
class AddressSpace;
}

namespace gpusvm::svm {

class Devmem;

// A one-shot completion (the part of struct dma_fence / struct completion this layer needs):
// pre_migrate_fence is signalled when the device memory may be written (a clear or an
// eviction of its previous contents finished); `detached` when every page has gone.
class Fence {
 public:
  void signal() {
    signaled_.store(true, std::memory_order_release);
    wq_.wake_all();
  }
  bool signaled() const { return signaled_.load(std::memory_order_acquire); }
  // Returns 0 once signalled, -ETIME after `timeout`. May sleep (no spin lock held).
  int wait(std::chrono::nanoseconds timeout) {
    return wq_.wait_for([this] { return signaled(); }, timeout) ? 0 : -ETIME;
  }

 private:
  std::atomic<bool> signaled_{false};
  WaitQueue wq_;
};

// Driver callbacks of a device allocation (drm_pagemap_devmem_ops).
//
// Address arrays: pages[i] is the device page of page i (every page of the range, tails of a
// 2 MiB folio included; nullptr for a page that is not copied). addrs[] holds, at the first
// page of each entry, where the other side of 2^order pages starts (entries of the pages
// inside an entry are unused): a DMA address for system memory (PagemapAddrProto::kSystem),
// a device address for device memory. For copy_to_devmem the entries follow the source
// folios, for copy_to_ram the destination folios; a source entry whose addr is
// kDmaMappingError is a hole: the destination pages are zero-filled.
class DevmemOps {
 public:
  virtual ~DevmemOps() = default;
  // Every page of the allocation was freed. May run from folio_free with page-table locks
  // held: must not sleep or take locks ranked below the zone lock. Required.
  virtual void devmem_release(Devmem* devmem) = 0;
  // Fills pfns[0, npages) with the device pfns of the allocation's frames, in address order
  // (frames of a 2 MiB block contiguous and aligned, so that THPs get compound
  // destinations). The frames must be free. Returns 0 or a negative errno. May sleep.
  virtual int populate_devmem_pfn(Devmem* devmem, uint64_t npages, uint64_t* pfns) = 0;
  // Copies into device pages pages[] from addrs[] (system or peer memory). Waits for
  // pre_migrate_fence (may be null) first, or pipelines behind it. Context: the mmap lock
  // (read) of the migrating address space and the folio locks of every page moving are held;
  // may sleep. Returns 0 or a negative errno (the migration is then rolled back).
  virtual int copy_to_devmem(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages,
                             Fence* pre_migrate_fence) = 0;
  // Copies from device pages pages[] to addrs[] (system memory, or a peer's device memory
  // when this device is the source of a device-to-device migration). Context as
  // copy_to_devmem, but without an mmap lock for eviction. Returns 0 or a negative errno.
  virtual int copy_to_ram(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages,
                          Fence* pre_migrate_fence) = 0;
};

// drm_pagemap_migrate_details.
struct MigrateDetails {
  // How long the pages stay in device memory before a CPU fault may take them back (the
  // kernel's livelock guard between a CPU and a GPU touching the same range).
  unsigned timeslice_ms = 0;
  // Pages already in this pagemap are migrated again (into the new allocation) instead of
  // failing the all-or-nothing check with -EBUSY.
  bool can_migrate_same_pagemap = false;
  // Device pages of a peer pagemap (same owner group) are copied by the peer (its
  // copy_to_ram into our pages), not pulled by the destination device.
  bool source_peer_migrates = true;
};

// The clock of the residency timeslice: steady_clock, unless a test installed its own so that
// the test, not the machine's speed, decides when a timeslice expires (a loaded TSan run
// must not turn "before expiry" into "after"). An atomic function pointer: read locklessly
// by every migration and CPU fault; tests install it before the migration under test.
using TimesliceClock = std::chrono::steady_clock::time_point (*)();
std::chrono::steady_clock::time_point timeslice_now();
// Installs `clock` (nullptr: steady_clock again) and returns the one it replaced.
TimesliceClock set_timeslice_clock(TimesliceClock clock);

class Devmem {
 public:
  // drm_pagemap_devmem_init: an allocation of `size` bytes (a multiple of 4 KiB) of
  // `pagemap`'s memory for the range of `as` it will back, copied by `dev`. Takes a reference
  // on `pagemap`. pre_migrate_fence may be null.
  Devmem(Device* dev, mm::AddressSpace* as, DevmemOps* ops, Pagemap* pagemap, uint64_t size,
         std::shared_ptr<Fence> pre_migrate_fence = nullptr);
  virtual ~Devmem() = default;
  Devmem(const Devmem&) = delete;
  Devmem& operator=(const Devmem&) = delete;

  Device* device() const { return dev_; }
  mm::AddressSpace* mm() const { return mm_; }
  DevmemOps* ops() const { return ops_; }
  Pagemap* pagemap() const { return pagemap_; }
  uint64_t size() const { return size_; }
  uint64_t npages() const { return size_ >> mm::kPageShift; }
  Fence* pre_migrate_fence() const { return pre_migrate_fence_.get(); }
  // Completed when the last page of the allocation went (before devmem_release).
  Fence& detached() { return detached_; }
  // A CPU fault before this time (timeslice_now()) leaves the pages where they are
  // (migrate_to_ram).
  std::chrono::steady_clock::time_point timeslice_expiration() const {
    return std::chrono::steady_clock::time_point(
        std::chrono::steady_clock::duration(timeslice_expiration_.load(std::memory_order_acquire)));
  }

  // For migrate_to_devmem, once the copy is done: the pages stay at least `ms` (the
  // fence was waited for or pipelined behind and is dropped).
  void migration_done(std::chrono::milliseconds ms) {
    pre_migrate_fence_.reset();
    timeslice_expiration_.store((timeslice_now() + ms).time_since_epoch().count(),
                                std::memory_order_release);
  }

 private:

  Device* const dev_;
  mm::AddressSpace* const mm_;
  DevmemOps* const ops_;
  Pagemap* const pagemap_;
  const uint64_t size_;
  // Written by the migration (before it publishes the pages), then only read.
  std::shared_ptr<Fence> pre_migrate_fence_;
  Fence detached_;
  std::atomic<std::chrono::steady_clock::rep> timeslice_expiration_{0};
};

// Migrates [start, end) of `as` (page aligned, inside one anonymous VMA) into `devmem`, all or
// nothing. One unified walk (hmm_range_fault's walk with fault and migrate: the walk faults
// what is missing and installs migration entries as it goes; migrate_vma_setup with
// MIGRATE_VMA_FAULT) collects system pages, holes, and device-private pages of the pagemap's
// owner (our own and our owner group's peers'); another owner's device pages are faulted back
// to system memory by the walk (their migrate_to_ram) and moved from there. A THP or a 2 MiB
// device folio gets a compound destination when populate_devmem_pfn gave an aligned 2 MiB
// block for it.
//
// Consumes the caller's devmem reference even on error: on an error before any page was
// committed, no page of the range is in `devmem` and devmem_release has been called by the
// time it returns.
// Returns 0 (also when every page already was in this pagemap: nothing to do), or
//   -EINVAL     unaligned or empty range, range not inside one VMA, null argument
//   -ENOENT     no VMA at start
//   -EFAULT     the address space has exited
//   -EBUSY      not an anonymous VMA; not every page could be collected (pinned, under
//               another migration, raced); pages already in this pagemap without
//               can_migrate_same_pagemap; not every collected page could be committed by
//               migrate_vma_pages (a race after the copy: the pages that moved stay in
//               device memory, consistent, as upstream - the caller evicts or retries)
//   -ENOMEM     bookkeeping allocation failed
//   -EOPNOTSUPP devmem ops missing
//   or the walk's, populate_devmem_pfn's, a DMA map's (-EFAULT) or a copy's error.
// Every byte is where it was before on error.
// Context: no gpusvm lock held; takes the mmap lock (read) of `as` itself and holds it from
// the walk through migrate_vma_finalize, across populate_devmem_pfn and the copy, as the
// kernel does (migrate_vma_pages needs it, and the migration entries must not outlive it).
// May sleep.
[[nodiscard]] int migrate_to_devmem(Devmem* devmem, mm::AddressSpace* as, mm::Va start, mm::Va end,
                                    const MigrateDetails& details);

// drm_pagemap_evict_to_ram: migrates every page of `devmem` still in use to system memory
// through migrate_device_pfns / migrate_device_pages (no VMA, no mmap lock: every address
// space mapping a page is found through the reverse map). Retries twice while some page
// stayed behind (busy). Returns 0 once the allocation is detached (every page gone), else the
// last error or -EBUSY; -EFAULT when the address space has exited. Context: no gpusvm lock
// held (the collection takes page-table locks of any address space); may sleep. The caller
// keeps `devmem` valid across the call.
[[nodiscard]] int evict_to_ram(Devmem* devmem);

// Statistics of the provider (all pagemaps), for tests and benchmarks.
struct PagemapStats {
  std::atomic<uint64_t> migrations_to_devmem{0};  // migrate_to_devmem successes
  std::atomic<uint64_t> cpu_faults{0};            // migrate_to_ram calls
  std::atomic<uint64_t> timeslice_deferred{0};    // CPU faults left alone by the timeslice
  std::atomic<uint64_t> peer_copies{0};           // device-to-device runs copied by the source
};
PagemapStats& pagemap_stats();

}  // namespace gpusvm::svm
