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
// Thread safety: all calls may be made concurrently; the record is a leaf lock.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::svm {

using DmaAddr = uint64_t;
inline constexpr DmaAddr kDmaMappingError = ~DmaAddr{0};

enum class DmaDirection : uint8_t { kBidirectional, kToDevice, kFromDevice };

class Device {
 public:
  explicit Device(std::string name);
  ~Device();  // panics when mappings are still recorded (a leak)
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& name() const;

  // Maps the 2^order system pages at pfn for this device; kDmaMappingError when fault
  // injection ("svm.dma_map") fails it. Never sleeps; callable under the notifier lock.
  DmaAddr dma_map_page(mm::Pfn pfn, unsigned order, DmaDirection dir);
  void dma_unmap_page(DmaAddr addr, unsigned order, DmaDirection dir);
  // Live mappings (in 4 KiB pages).
  uint64_t dma_mappings() const;

 private:
  const std::string name_;
  mutable SpinLock lock_{&kDmaRecordLockClass};
  // (address, order) -> how many times it is mapped.
  std::map<std::pair<DmaAddr, unsigned>, uint64_t> mappings_ GPUSVM_GUARDED_BY(lock_);
  uint64_t pages_ GPUSVM_GUARDED_BY(lock_) = 0;
};

}  // namespace gpusvm::svm
