#include "gpusvm/svm/device.h"

#include <string>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::svm {
namespace {
GPUSVM_FAULT_POINT(g_fail_dma_map, "svm.dma_map");
}  // namespace

Device::Device(std::string name) : name_(std::move(name)) {}

Device::~Device() {
  SpinLockGuard g(&lock_);
  if (pages_ != 0) {
    panic("svm::Device " + name_ + ": " + std::to_string(pages_) + " pages still DMA mapped at destruction");
  }
}

const std::string& Device::name() const { return name_; }

DmaAddr Device::dma_map_page(mm::Pfn pfn, unsigned order, DmaDirection dir) {
  (void)dir;  // no IOMMU: the direction changes no mapping, only what a real one would allow
  if (g_fail_dma_map.should_fail()) return kDmaMappingError;
  const DmaAddr addr = DmaAddr{pfn} << mm::kPageShift;
  SpinLockGuard g(&lock_);
  mappings_[{addr, order}]++;
  pages_ += uint64_t{1} << order;
  return addr;
}

void Device::dma_unmap_page(DmaAddr addr, unsigned order, DmaDirection dir) {
  (void)dir;
  SpinLockGuard g(&lock_);
  auto it = mappings_.find({addr, order});
  if (it == mappings_.end()) {
    panic("svm::Device " + name_ + ": dma_unmap_page of an address never mapped (or of another order)");
  }
  if (--it->second == 0) mappings_.erase(it);
  pages_ -= uint64_t{1} << order;
}

uint64_t Device::dma_mappings() const {
  SpinLockGuard g(&lock_);
  return pages_;
}

}  // namespace gpusvm::svm
