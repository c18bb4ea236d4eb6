// DmirrorDevice: one dmirror unit ("hmm_dmirror<id>") - the device half of lib/test_hmm.c.
//
// Design notes
//  - Device memory is device-private or device-coherent (Config::memory_type; test_hmm's
//    units 0-1 and 2-3): chunks of frames registered as DevPagemaps whose owner is this
//    device (the page owner that hmm_range_fault and migrate_vma compare). The pagemap keeps
//    the frames' bytes in host memory (DevPagemap storage); for device-private memory that is
//    the "backing store" test_hmm keeps in a system page per device page, for coherent memory
//    it is the device memory the CPU maps directly (a 2 MiB coherent folio by a present PMD).
//  - A chunk is added when the free lists run dry (test_hmm adds 256 MiB chunks; the size is
//    a Config field here so tests stay small). A new chunk is a list of free 2 MiB blocks; a
//    small allocation breaks a block into 512 free pages when no free page is left (freed
//    pages are not merged back; a freed 2 MiB folio returns as a block). RELEASE evicts every page of every chunk to
//    system memory and drops the chunks; the next allocation adds a new one.
//  - Every file opened on the device shares its device memory and its owner: files are
//    mirrors (Dmirror, dmirror.h) of the opener's address space.
//
// Locking: see gpusvm/base/lock_order.h. chunks_ under devmem_lock_; the free list under free_lock_.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "drivers/devfs/device.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::dmirror {

class Dmirror;

class DmirrorDevice final : public devfs::Device,
                            public mm::DevPagemapOps,
                            public std::enable_shared_from_this<DmirrorDevice> {
 public:
  struct Config {
    uint64_t chunk_pages = 4096;  // frames per device-memory chunk (16 MiB)
    unsigned max_chunks = 64;     // device memory limit: chunk_pages * max_chunks
    mm::DevMemoryType memory_type = mm::DevMemoryType::kDevicePrivate;
    // Test hook for deterministic interleavings: called by a device fault after
    // hmm_range_fault returned 0 and before the read_retry check and commit, with no lock
    // held. Null outside tests.
    std::function<void()> after_range_fault;
  };

  // A device with one chunk of memory. Errors: -EINVAL (bad config), -ENOMEM, -ENOSPC.
  static Result<std::shared_ptr<DmirrorDevice>> create(mm::PhysMem* mem, int id, Config config);
  static Result<std::shared_ptr<DmirrorDevice>> create(mm::PhysMem* mem, int id) {
    return create(mem, id, Config{});
  }
  // Every device page must be free by now (the address spaces that mapped them exited or the
  // pages were evicted): a DevPagemap panics when destroyed with pages in use.
  ~DmirrorDevice() override;
  DmirrorDevice(const DmirrorDevice&) = delete;
  DmirrorDevice& operator=(const DmirrorDevice&) = delete;

  // devfs::Device: a new mirror of opener's address space.
  Result<std::shared_ptr<devfs::File>> open(devfs::Process& opener) override;

  // The page owner of this device's memory (dev_private_owner / pgmap_owner).
  const void* owner() const { return this; }
  bool owns(const mm::Folio* page) const {
    return page->pagemap() != nullptr && page->pagemap()->owner() == owner();
  }
  mm::PhysMem* mem() const { return mem_; }
  int id() const { return id_; }
  bool coherent() const { return config_.memory_type == mm::DevMemoryType::kDeviceCoherent; }
  // The MIGRATE_VMA_SELECT_* flag that collects this device's memory.
  unsigned select_device_flag() const {
    return coherent() ? mm::MIGRATE_VMA_SELECT_DEVICE_COHERENT : mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
  }
  const Config& config() const { return config_; }

  // Allocates one device page: refcount 1, unlocked. Returns nullptr when device memory is
  // exhausted. May add a chunk (allocates host memory, registers a pagemap). Context: may
  // hold folio locks, not the devmem lock or any lock ranked above it.
  mm::Folio* alloc_page() GPUSVM_EXCLUDES(devmem_lock_, free_lock_);
  // Allocates one 2 MiB device folio (refcount 1, unlocked), adding a chunk when no free
  // aligned block is left. nullptr when device memory is exhausted. Context as alloc_page.
  mm::Folio* alloc_huge() GPUSVM_EXCLUDES(devmem_lock_, free_lock_);

  // HMM_DMIRROR_RELEASE: evicts every page of every chunk to system memory and drops the
  // chunks. Returns 0, or -EBUSY when a page could not be evicted within the retry budget
  // (its chunk is kept, marked removing, and retried by the next release). Context: no gpusvm
  // lock held; may sleep.
  int release_chunks() GPUSVM_EXCLUDES(devmem_lock_);

  // DevPagemapOps.
  void folio_free(mm::Folio* folio) override GPUSVM_EXCLUDES(free_lock_);
  // CPU fault on one of this device's pages: migrates the page back to system memory with
  // migrate_vma (fault_page = vmf.page). Context: mmap lock (read) held, vmf.page locked and
  // referenced by the fault handler; may sleep.
  mm::VmFault migrate_to_ram(const mm::VmFaultInfo& vmf) override;
  // A 2 MiB device folio was split into 512 small ones: each gets its chunk link.
  void folio_split(mm::Folio* folio) override;

  // Whether any device page is in use (allocated and not freed).
  bool any_page_in_use() const GPUSVM_EXCLUDES(devmem_lock_, free_lock_);

  // Dmirror::check_mirror() of every file of this device still open (tests run it after
  // every scenario, next to mm::check). Context and quiescence as check_mirror.
  std::vector<std::string> check_mirrors() GPUSVM_EXCLUDES(devmem_lock_);

  // Statistics for tests.
  uint64_t pages_in_use() const GPUSVM_EXCLUDES(devmem_lock_);
  size_t chunk_count() const GPUSVM_EXCLUDES(devmem_lock_);
  StatCounter cpu_faults;     // migrate_to_ram calls
  StatCounter fault_retries;  // device faults that found the notifier invalidated (read_retry)
  StatCounter chunks_added;

 private:
  struct Chunk {
    std::unique_ptr<mm::DevPagemap> pgmap;  // const after init
    // Both under free_lock_ (the device's lock, not the chunk's: folio_free's last access to
    // a chunk is inside that lock, so release may free the chunk once in_use reads 0 there).
    bool removing = false;  // release started: freed pages do not go back on the free list
    uint64_t in_use = 0;    // pages handed out and not freed yet
  };
  struct FreePage {
    Chunk* chunk;
    mm::Pfn pfn;
  };

  DmirrorDevice(mm::PhysMem* mem, int id, Config config) : mem_(mem), id_(id), config_(config) {}
  // Adds a chunk and puts its pages on the free list. Errors: -ENOMEM (limit, host memory),
  // -ENOSPC (pfn space).
  int add_chunk() GPUSVM_EXCLUDES(devmem_lock_, free_lock_);
  // Migrates every page of `chunk` in use to system memory (migrate_device_range) until none
  // is in use. Returns 0, or -EBUSY when pages stayed busy past the retry budget.
  int evict_chunk(Chunk* chunk) GPUSVM_EXCLUDES(free_lock_);
  // Copies `chunk`'s collected pages to new system memory (fills dst). Returns the number
  // of pages collected.
  uint64_t evict_copy(uint64_t* src, uint64_t* dst, uint64_t n);
  mm::Folio* alloc_folio(unsigned order) GPUSVM_EXCLUDES(devmem_lock_, free_lock_);
  // Takes a free page, or a free 2 MiB block (order kPmdOrder), from the free lists.
  bool take_free(unsigned order, FreePage* out) GPUSVM_EXCLUDES(free_lock_);

  mm::PhysMem* const mem_;
  const int id_;
  const Config config_;

  mutable Mutex devmem_lock_{&kDmirrorDevmemLockClass};
  std::vector<std::unique_ptr<Chunk>> chunks_ GPUSVM_GUARDED_BY(devmem_lock_);
  // Chunks a release could not empty (pages stayed busy): retried by the next release.
  std::vector<std::unique_ptr<Chunk>> dying_ GPUSVM_GUARDED_BY(devmem_lock_);
  // The files opened on this device (for check_mirrors); expired ones are pruned at open.
  std::vector<std::weak_ptr<Dmirror>> files_ GPUSVM_GUARDED_BY(devmem_lock_);
  mutable SpinLock free_lock_{&kDmirrorFreeLockClass};
  std::vector<FreePage> free_ GPUSVM_GUARDED_BY(free_lock_);       // free 4 KiB pages
  std::vector<FreePage> free_huge_ GPUSVM_GUARDED_BY(free_lock_);  // free aligned 2 MiB blocks
};

}  // namespace gpusvm::dmirror
