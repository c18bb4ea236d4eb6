// Pagemap: a device-memory provider (the kernel's drm_pagemap), and Devmem, one device
// allocation backing a range (drm_pagemap_devmem).
//
// A driver owns an mm::DevPagemap (its dev_pagemap: the device frames) and creates it with
// svm::pagemap_dev_pagemap_ops() as its ops, which implement folio_free, migrate_to_ram (with
// the residency timeslice) and folio_split for every device page this layer hands out. Each
// device page's zone_device_data points to a refcounted per-allocation record (the kernel's
// zdd) that holds the Devmem and the device-private owner, so any page leads back to its
// Devmem and Pagemap (page_to_pagemap) while it is in use.
//
// Lifetime: a Pagemap is refcounted (PagemapRef); the driver holds one reference, every Pages
// object holding device pages of it holds one, every live Devmem holds one. The last put
// calls ops.destroy, deferred to a worker when the put may come from a reclaim-like context
// (a folio_free under page-table locks), so a Pagemap outlives all its users.
//
// This header is the contract between the helper (gpusvm.h), which maps device pages through
// device_map, and the provider (migrate_to_devmem, evict_to_ram).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "gpusvm/svm/device.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {
class AddressSpace;
}

namespace gpusvm::svm {

class Pagemap;

// How a device reaches a page (drm_pagemap_addr_encode's proto): system memory through DMA,
// or its own or a peer device's memory through the interconnect.
enum class PagemapAddrProto : uint8_t { kSystem, kDeviceLocal, kDeviceInterconnect };

// One entry of an address array: covers 2^order pages from addr.
struct PagemapAddr {
  DmaAddr addr = kDmaMappingError;
  PagemapAddrProto proto = PagemapAddrProto::kSystem;
  uint8_t order = 0;
  DmaDirection dir = DmaDirection::kBidirectional;
};

// Driver callbacks of a pagemap. Context per op.
class PagemapOps {
 public:
  virtual ~PagemapOps() = default;
  // Maps `page` (a device page of this pagemap, 2^order pages from it) for `dev`: the device
  // address `dev` uses to reach it (its own VRAM offset, or an interconnect address for a
  // peer). Called under the Gpusvm notifier lock (read): must not sleep or allocate device
  // work. Errors: addr == kDmaMappingError.
  virtual PagemapAddr device_map(Pagemap* pagemap, Device* dev, mm::Folio* page, unsigned order,
                                 DmaDirection dir) = 0;
  virtual void device_unmap(Pagemap* pagemap, Device* dev, const PagemapAddr& addr) = 0;
  // Best-effort migration of [start, end) of `as` into this pagemap: allocate a Devmem and
  // call migrate_to_devmem. Called with no lock held; may sleep. 0 or a negative errno.
  virtual int populate_mm(Pagemap* pagemap, mm::Va start, mm::Va end, mm::AddressSpace* as,
                          unsigned timeslice_ms) = 0;
  // The last reference went. from_reclaim: the put came from a context that must not sleep;
  // the Pagemap defers the call to its worker then, so destroy itself may always sleep.
  virtual void destroy(Pagemap* pagemap) = 0;
};

class Pagemap {
 public:
  // A pagemap over the driver's dev_pagemap (created with pagemap_dev_pagemap_ops()) for
  // `dev`, with one reference for the caller. Errors: -EINVAL (null argument, or a
  // dev_pagemap whose ops are not pagemap_dev_pagemap_ops()), -ENOMEM.
  static Result<Pagemap*> create(Device* dev, mm::DevPagemap* dev_pagemap, PagemapOps* ops);

  void get();
  // Drops a reference; the last one calls ops->destroy (deferred when from_reclaim).
  void put(bool from_reclaim = false);

  Device* device() const;
  mm::DevPagemap* dev_pagemap() const;
  PagemapOps* ops() const;
  // The device-private owner of its pages (the dev_pagemap's owner).
  const void* owner() const;

  PagemapAddr device_map(Device* dev, mm::Folio* page, unsigned order, DmaDirection dir);
  void device_unmap(Device* dev, const PagemapAddr& addr);
  int populate_mm(mm::Va start, mm::Va end, mm::AddressSpace* as, unsigned timeslice_ms);
};

// An owning reference (get on copy, put on destruction).
class PagemapRef;

// The svm Pagemap a device page belongs to while it is in use (through zone_device_data);
// nullptr for a page that is not an svm device page. Caller holds a reference on the page or
// the page-table lock over an entry mapping it.
Pagemap* page_to_pagemap(mm::Folio* page);

// The dev_pagemap ops every driver passes to mm::DevPagemap::create for memory this layer
// manages (drm_pagemap_pagemap_ops_get).
mm::DevPagemapOps* pagemap_dev_pagemap_ops();

}  // namespace gpusvm::svm
