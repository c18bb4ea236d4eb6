#include "gpusvm/svm/device.h"

#include <string>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::svm {
namespace {
GPUSVM_FAULT_POINT(g_fail_dma_map, "svm.dma_map");

std::atomic<uint32_t>* alloc_slots(uint64_t n) {
  static_assert(std::atomic<uint32_t>::is_always_lock_free);
  void* p = std::calloc(n, sizeof(std::atomic<uint32_t>));
  if (!p) panic("svm::Device: cannot reserve the DMA mapping record");
  return static_cast<std::atomic<uint32_t>*>(p);
}
}  // namespace

Device::Device(std::string name, mm::PhysMem* mem)
    : name_(std::move(name)), mem_(mem), window_(mem->ram_pages()), slots_(alloc_slots(window_)) {}

Device::Device(std::string name)
    : name_(std::move(name)), mem_(nullptr), window_(kDefaultDmaPfns), slots_(alloc_slots(window_)) {}

Device::~Device() {
  const uint64_t pages = pages_.load(std::memory_order_acquire);
  if (pages != 0) {
    panic("svm::Device " + name_ + ": " + std::to_string(pages) + " pages still DMA mapped at destruction");
  }
}

const std::string& Device::name() const { return name_; }

void Device::check_allocated(mm::Pfn pfn, unsigned order) const {
  // Folio by folio: a folded entry spans several small folios, a THP entry one folio.
  const mm::Pfn end = pfn + (uint64_t{1} << order);
  for (mm::Pfn p = pfn; p < end;) {
    mm::Folio* folio = mem_->folio_of(p);
    if (!folio || folio->refcount() <= 0 || folio->test(mm::kFolioFree)) {
      panic("svm::Device " + name_ + ": dma_map_page of a freed pfn " + std::to_string(p) +
            " (the caller's notifier sequence was stale)");
    }
    p = folio->pfn() + folio->nr_pages();
  }
}

DmaAddr Device::dma_map_page(mm::Pfn pfn, unsigned order, DmaDirection dir) {
  (void)dir;  // no IOMMU: the direction changes no mapping, only what a real one would allow
  if (order > kOrderMask || pfn >= window_ || (uint64_t{1} << order) > window_ - pfn) {
    return kDmaMappingError;  // beyond the DMA mask
  }
  if (g_fail_dma_map.should_fail()) return kDmaMappingError;
  if (mem_) check_allocated(pfn, order);
  std::atomic<uint32_t>& slot = slots_[pfn];
  uint32_t old = slot.load(std::memory_order_relaxed);
  for (;;) {
    uint32_t want;
    if (old == 0) {
      want = order | kCountOne;
    } else if ((old & kOrderMask) == order) {
      if (old >= ~uint32_t{0} - kCountOne) panic("svm::Device " + name_ + ": DMA mapping count overflow");
      want = old + kCountOne;
    } else {
      overflow_get(pfn, order);  // the slot holds another order
      break;
    }
    if (slot.compare_exchange_weak(old, want, std::memory_order_acq_rel, std::memory_order_relaxed)) break;
  }
  pages_.fetch_add(uint64_t{1} << order, std::memory_order_acq_rel);
  return DmaAddr{pfn} << mm::kPageShift;
}

void Device::dma_unmap_page(DmaAddr addr, unsigned order, DmaDirection dir) {
  (void)dir;
  const mm::Pfn pfn = addr >> mm::kPageShift;
  if (order > kOrderMask || pfn >= window_ || (addr & (mm::kPageSize - 1))) panic_unmapped();
  std::atomic<uint32_t>& slot = slots_[pfn];
  uint32_t old = slot.load(std::memory_order_relaxed);
  for (;;) {
    if (old == 0 || (old & kOrderMask) != order) {
      // Counts of one key are interchangeable between the slot and the table; with the slot
      // holding another order (or none) this key's live mappings are all in the table.
      if (!overflow_put(pfn, order)) panic_unmapped();
      break;
    }
    const uint32_t want = old - kCountOne == order ? 0 : old - kCountOne;
    if (slot.compare_exchange_weak(old, want, std::memory_order_acq_rel, std::memory_order_relaxed)) break;
  }
  pages_.fetch_sub(uint64_t{1} << order, std::memory_order_acq_rel);
}

void Device::overflow_get(mm::Pfn pfn, unsigned order) {
  SpinLockGuard g(&lock_);
  OverflowEntry* free_entry = nullptr;
  for (OverflowEntry& e : overflow_) {
    if (e.count != 0 && e.pfn == pfn && e.order == order) {
      e.count++;
      return;
    }
    if (e.count == 0 && !free_entry) free_entry = &e;
  }
  if (!free_entry) {
    panic("svm::Device " + name_ + ": more than " + std::to_string(kOverflowEntries) +
          " DMA mappings at pfns already mapped with another order");
  }
  *free_entry = {.pfn = pfn, .order = order, .count = 1};
  overflow_used_++;
}

bool Device::overflow_put(mm::Pfn pfn, unsigned order) {
  SpinLockGuard g(&lock_);
  if (overflow_used_ == 0) return false;
  for (OverflowEntry& e : overflow_) {
    if (e.count != 0 && e.pfn == pfn && e.order == order) {
      if (--e.count == 0) overflow_used_--;
      return true;
    }
  }
  return false;
}

void Device::panic_unmapped() const {
  panic("svm::Device " + name_ + ": dma_unmap_page of an address never mapped (or of another order)");
}

uint64_t Device::dma_mappings() const { return pages_.load(std::memory_order_acquire); }

uint32_t Device::dma_overflow_entries() const {
  SpinLockGuard g(&lock_);
  return overflow_used_;
}

}  // namespace gpusvm::svm
