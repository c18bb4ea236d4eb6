#include "gpusvm/mm/devmap.h"

#include <cerrno>

namespace gpusvm::mm {

Result<std::unique_ptr<DevPagemap>> DevPagemap::create(PhysMem* mem, uint64_t nr_pages,
                                                       const void* owner, DevPagemapOps* ops,
                                                       bool storage, DevMemoryType type) {
  if (!mem || !ops || nr_pages == 0 || nr_pages > (1ULL << 30)) return Err{-EINVAL};
  if (type == DevMemoryType::kDeviceCoherent && !storage) return Err{-EINVAL};
  std::unique_ptr<DevPagemap> pgmap(new DevPagemap(mem, owner, ops, type));
  pgmap->frames_ = std::make_unique<Folio[]>(nr_pages);
  if (storage) pgmap->storage_ = std::make_unique<std::byte[]>(nr_pages << kPageShift);
  Result<Pfn> first = mem->register_pagemap(pgmap.get(), pgmap->frames_.get(), nr_pages);
  if (!first) return Err{first.error()};
  pgmap->first_pfn_ = *first;
  pgmap->nr_pages_ = nr_pages;
  for (uint64_t i = 0; i < nr_pages; i++) {
    Folio& f = pgmap->frames_[i];
    f.mem_ = mem;
    f.pagemap_ = pgmap.get();
    f.pfn_ = *first + i;
    f.head_.store(&f, std::memory_order_relaxed);
    f.flags_.store(pgmap->kind_flag() | kFolioFree, std::memory_order_relaxed);
  }
  return pgmap;
}

DevPagemap::~DevPagemap() {
  if (folios_in_use() != 0) panic("DevPagemap destroyed with device folios still in use");
  mem_->unregister_pagemap(this, std::move(frames_));
}

Folio* DevPagemap::folio_init(Pfn pfn, unsigned order) {
  const uint64_t n = 1ULL << order;
  if ((order != 0 && order != kPmdOrder) || !contains(pfn) || !contains(pfn + n - 1) ||
      (pfn - first_pfn_) % n != 0) {
    return nullptr;
  }
  Folio* head = pfn_to_page(pfn);
  for (uint64_t i = 0; i < n; i++) {
    if (!(head[i].flags() & kFolioFree)) return nullptr;
  }
  Folio::init_frames(head, order, kind_flag());
  return head;
}

void DevPagemap::free_folio(Folio* folio) {
  if (folio->total_mapcount() != 0) panic("freeing mapped device folio pfn " + std::to_string(folio->pfn()));
  // The frames become free descriptors first; the head keeps its order and zone_device_data
  // for the driver's folio_free. Nothing here touches the descriptors after that call: the
  // driver may hand the frames out again at once (folio_init resets the head).
  const uint64_t n = folio->nr_pages();
  for (uint64_t i = 0; i < n; i++) {
    Folio* p = folio + i;
    if (i > 0) {
      p->head_.store(p, std::memory_order_relaxed);
      p->zone_device_data = nullptr;
    }
    p->flags_.store(kind_flag() | kFolioFree, std::memory_order_release);
  }
  ops_->folio_free(folio);
}

uint64_t DevPagemap::folios_in_use() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < nr_pages_; i++) {
    if (frames_[i].is_head() && frames_[i].refcount() > 0) n++;
  }
  return n;
}

}  // namespace gpusvm::mm
