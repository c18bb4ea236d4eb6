// DevPagemap: device memory registered by a driver (the kernel's dev_pagemap with
// MEMORY_DEVICE_PRIVATE or MEMORY_DEVICE_COHERENT).
//
// A driver registers a range of device frames; PhysMem gives them pfns above system RAM and
// folio descriptors live here. The `owner` pointer identifies the driver instance.
//  - Device-private folios are never mapped present in a CPU page table: the CPU sees a
//    device-private soft-leaf entry and faults, and the fault calls ops->migrate_to_ram.
//    hmm_range_fault reports them only to the caller whose dev_private_owner matches;
//    MIGRATE_VMA_SELECT_DEVICE_PRIVATE collects them for that owner.
//  - Device-coherent folios are CPU-addressable (the pagemap keeps their bytes): a migration
//    maps them with present PTEs, the CPU reads and writes them in place without faulting,
//    hmm_range_fault reports them VALID to every caller, fork shares them COW and a COW
//    fault copies straight from device memory. MIGRATE_VMA_SELECT_DEVICE_COHERENT collects
//    them for their owner; a FOLL_LONGTERM pin moves them to system memory first
//    (migrate_device_coherent_folio). A 2 MiB coherent folio is mapped by a present PMD
//    like a THP (migrate_vma_insert_huge_pmd_page allows it), split like one, but never
//    collapsed into or reclaimed lazily (MADV_FREE).
//
// A folio whose last reference goes is handed to ops->folio_free.
#pragma once

#include <cstdint>
#include <memory>

#include "gpusvm/base/result.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

class DevPagemap;

enum class DevMemoryType : uint8_t { kDevicePrivate, kDeviceCoherent };

// Driver callbacks. Context documented per op.
class DevPagemapOps {
 public:
  virtual ~DevPagemapOps() = default;
  // The folio's refcount reached zero: return its frames to the driver's allocator.
  // May run with page-table locks held (the last reference can go in a zap): must not sleep
  // or take locks ranked below the zone lock. Required.
  virtual void folio_free(Folio* folio) = 0;
  // A CPU touched a device-private page (never called for device-coherent memory): migrate
  // it (at least vmf.page) back to system memory, normally with migrate_vma_* and fault_page
  // = vmf.page. Context: the mmap lock of *vmf.mm is held (read; the fault path asserts it
  // first, but a virtual call cannot state it to the analysis, so an implementation that
  // calls annotated mm functions asserts it itself), vmf.page is locked and referenced by
  // the caller and must stay locked; may sleep. Returns kOk (the access is retried), kSigbus
  // or kOom. Required.
  virtual VmFault migrate_to_ram(const VmFaultInfo& vmf) = 0;
  // A large device folio was split into 4 KiB folios (a migration to small destinations,
  // seed 003); `folio` is the first of them. The driver re-links any per-page data it keeps
  // (zone_device_data) and must expect folio_free for each of the small folios. Called with
  // the folios locked by the migration; must not sleep. Optional.
  virtual void folio_split(Folio* folio) { (void)folio; }
};

class DevPagemap {
 public:
  // Registers nr_pages device frames of `type` with `owner` on `mem`. storage: when true the
  // pagemap keeps host memory for the frames' bytes (a device whose memory the host can
  // address); otherwise page_data() is null and the driver moves bytes itself. Coherent
  // memory is CPU-addressable by definition and needs storage.
  // Errors: -EINVAL (no ops, zero pages, coherent without storage), -ENOSPC (pfn space),
  // -ENOMEM.
  static Result<std::unique_ptr<DevPagemap>> create(PhysMem* mem, uint64_t nr_pages,
                                                    const void* owner, DevPagemapOps* ops,
                                                    bool storage,
                                                    DevMemoryType type = DevMemoryType::kDevicePrivate);
  ~DevPagemap();
  DevPagemap(const DevPagemap&) = delete;
  DevPagemap& operator=(const DevPagemap&) = delete;

  const void* owner() const { return owner_; }
  DevMemoryType type() const { return type_; }
  DevPagemapOps* ops() const { return ops_; }
  PhysMem* mem() const { return mem_; }
  Pfn first_pfn() const { return first_pfn_; }
  uint64_t nr_pages() const { return nr_pages_; }
  bool contains(Pfn pfn) const { return pfn >= first_pfn_ && pfn < first_pfn_ + nr_pages_; }
  Folio* pfn_to_page(Pfn pfn) {
    return contains(pfn) ? &frames_[pfn - first_pfn_] : nullptr;
  }
  std::byte* page_data(Pfn pfn) const {
    return storage_ ? storage_.get() + ((pfn - first_pfn_) << kPageShift) : nullptr;
  }

  // zone_device_folio_init: the driver hands out a free device frame range as a folio of
  // `order` (0 or kPmdOrder, pfn aligned to it) with refcount 1. Returns nullptr if any frame
  // is in use.
  Folio* folio_init(Pfn pfn, unsigned order);
  // Number of device folios with a non-zero refcount (for the checker and teardown).
  uint64_t folios_in_use() const;

 private:
  friend class Folio;
  DevPagemap(PhysMem* mem, const void* owner, DevPagemapOps* ops, DevMemoryType type)
      : mem_(mem), owner_(owner), ops_(ops), type_(type) {}
  uint32_t kind_flag() const {
    return type_ == DevMemoryType::kDeviceCoherent ? kFolioDeviceCoherent : kFolioDevicePrivate;
  }
  void free_folio(Folio* folio);  // refcount reached zero

  PhysMem* const mem_;
  const void* const owner_;
  DevPagemapOps* const ops_;
  const DevMemoryType type_;
  Pfn first_pfn_ = 0;
  uint64_t nr_pages_ = 0;
  std::unique_ptr<Folio[]> frames_;
  std::unique_ptr<std::byte[]> storage_;
};

}  // namespace gpusvm::mm
