// Device: a DMA-capable device (the kernel's struct device as drm_gpusvm and drm_pagemap see
// it): the identity a Pages object is bound to for life, and what system pages are "DMA
// mapped" for.
//
// The model has no IOMMU, so a DMA address of a system page is its physical address
// (pfn << kPageShift); what is real is the mapping record: every dma_map_page is counted per
// device and must be matched by a dma_unmap_page of the same address and order, so a leak or
// a double unmap is caught (dma_mappings() for tests and teardown checks, a panic on an
// unmap of something never mapped).
//
// The record never allocates after construction: get_pages maps under the notifier lock,
// where nothing may allocate (docs/svm.md, "Locking"). It is a flat array with one slot per
// pfn of the device's DMA window (the machine's RAM when the Device is created from its
// PhysMem), sized and zeroed once; a slot counts the mappings that start at its pfn with one
// order. The rare second order at the same pfn (a folded pages-only entry and a per-folio
// entry of another pages object over the same first page; a PMD and a PTE mapping of one
// THP) goes to a small preallocated overflow table; filling it is a panic naming the limit.
//
// With the PhysMem known, dma_map_page also checks that every folio it maps is allocated
// (mapping a freed pfn is a use-after-free: the caller's notifier sequence was stale).
//
// Thread safety: all calls may be made concurrently. Slots are atomics; the overflow table
// is under a leaf spin lock. Nothing sleeps.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {
class PhysMem;
}  // namespace gpusvm::mm

namespace gpusvm::svm {

using DmaAddr = uint64_t;
inline constexpr DmaAddr kDmaMappingError = ~DmaAddr{0};

enum class DmaDirection : uint8_t { kBidirectional, kToDevice, kFromDevice };

class Device {
 public:
  // The DMA window of a Device created without a PhysMem: pfns below 2^20 (4 GiB of RAM).
  // Its record is reserved, not touched, until pages are mapped (calloc'd zero pages).
  static constexpr uint64_t kDefaultDmaPfns = uint64_t{1} << 20;
  // (pfn, order) keys that may be mapped at a pfn whose slot holds another order.
  static constexpr uint32_t kOverflowEntries = 1024;

  // A device whose DMA window is the RAM of `mem` (every pfn of it), which also checks that
  // mapped folios are allocated. `mem` must outlive the Device.
  Device(std::string name, mm::PhysMem* mem);
  // A device with the kDefaultDmaPfns window and no freed-pfn check (kept for drivers that
  // create their Device before their machine; prefer the PhysMem form).
  explicit Device(std::string name);
  ~Device();  // panics when mappings are still recorded (a leak)
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& name() const;
  // Pfns [0, dma_window_pfns()) can be mapped.
  uint64_t dma_window_pfns() const { return window_; }

  // Maps the 2^order system pages at pfn for this device; kDmaMappingError when the pages
  // lie outside the DMA window (a DMA mask) or fault injection ("svm.dma_map") fails it.
  // Never sleeps, never allocates; callable under the notifier lock. Panics when a mapped
  // folio is free (PhysMem form) or the overflow table is full.
  DmaAddr dma_map_page(mm::Pfn pfn, unsigned order, DmaDirection dir);
  // Panics on an address never mapped at this order (or already unmapped as often as mapped).
  void dma_unmap_page(DmaAddr addr, unsigned order, DmaDirection dir);
  // Live mappings (in 4 KiB pages).
  uint64_t dma_mappings() const;
  // Keys now held in the overflow table (tests).
  uint32_t dma_overflow_entries() const;

 private:
  // Slot word: bits 0..4 the order, bits 5..31 the count; 0 = empty.
  static constexpr uint32_t kOrderBits = 5;
  static constexpr uint32_t kOrderMask = (1u << kOrderBits) - 1;
  static constexpr uint32_t kCountOne = 1u << kOrderBits;
  struct OverflowEntry {
    mm::Pfn pfn = 0;
    uint32_t order = 0;
    uint32_t count = 0;  // 0: free entry
  };
  struct FreeDeleter {
    void operator()(void* p) const { std::free(p); }
  };

  void check_allocated(mm::Pfn pfn, unsigned order) const;
  void overflow_get(mm::Pfn pfn, unsigned order);
  bool overflow_put(mm::Pfn pfn, unsigned order);
  [[noreturn]] void panic_unmapped() const;

  const std::string name_;
  mm::PhysMem* const mem_;
  const uint64_t window_;
  // window_ slots, zero-filled by calloc (an all-zero std::atomic<uint32_t> holds 0).
  std::unique_ptr<std::atomic<uint32_t>[], FreeDeleter> slots_;
  std::atomic<uint64_t> pages_{0};
  mutable SpinLock lock_{&kDmaRecordLockClass};
  OverflowEntry overflow_[kOverflowEntries] GPUSVM_GUARDED_BY(lock_);
  uint32_t overflow_used_ GPUSVM_GUARDED_BY(lock_) = 0;
};

}  // namespace gpusvm::svm
