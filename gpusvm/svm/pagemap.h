// Pagemap: a device-memory provider (the kernel's drm_pagemap).
//
// A driver owns an mm::DevPagemap (its dev_pagemap: the device frames) and creates it with
// svm::pagemap_dev_pagemap_ops() as its ops, which implement folio_free, migrate_to_ram (with
// the residency timeslice) and folio_split for every device page this layer hands out. Each
// device page's zone_device_data points to a refcounted per-allocation record (the kernel's
// zdd, pagemap_zdd.h) that holds the Devmem (devmem.h), so any page leads back to its Devmem
// and Pagemap (page_to_pagemap) while it is in use.
//
// Lifetime: a Pagemap is refcounted (get/put, PagemapRef); the driver holds one reference,
// every Pages object holding device pages of it holds one, every live Devmem holds one (so
// every device page keeps it alive through its zdd). The last put calls ops->destroy and then
// deletes the Pagemap. When the last put may come from a reclaim-like context (folio_free
// under page-table locks, put(from_reclaim = true)) both are deferred to a worker thread, as
// drm_pagemap_release defers through a work item: the DevPagemap that is in the middle of
// freeing a folio must not be torn down under its own feet. pagemap_flush_destroy_work()
// waits for that worker (tests, driver unload).
//
// This header is the contract between the helper (gpusvm.h), which maps device pages through
// device_map, and the provider (devmem.h: migrate_to_devmem, evict_to_ram).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "gpusvm/base/result.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/types.h"
#include "gpusvm/svm/device.h"

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
  // The last reference went: the driver lets go of the pagemap (the Pagemap object is deleted
  // by this layer right after this returns). Always called from a context that may sleep
  // (the worker, when the last put came from reclaim).
  virtual void destroy(Pagemap* pagemap) = 0;
};

class Pagemap {
 public:
  // A pagemap over the driver's dev_pagemap (created with pagemap_dev_pagemap_ops()) for
  // `dev`, with one reference for the caller. Errors: -EINVAL (null argument, or a
  // dev_pagemap whose ops are not pagemap_dev_pagemap_ops()), -ENOMEM.
  static Result<Pagemap*> create(Device* dev, mm::DevPagemap* dev_pagemap, PagemapOps* ops);

  Pagemap(const Pagemap&) = delete;
  Pagemap& operator=(const Pagemap&) = delete;

  // Takes a reference; the caller must already hold one (kref_get). Never sleeps.
  void get();
  // Drops a reference; the last one calls ops->destroy and deletes the Pagemap, on the
  // destroy worker when from_reclaim (the caller may hold page-table locks then: this call
  // never sleeps or takes a lock ranked below the zone lock in that case).
  void put(bool from_reclaim = false);
  // References held (for tests and teardown checks).
  int64_t refcount() const { return refcount_.load(std::memory_order_acquire); }

  Device* device() const { return dev_; }
  mm::DevPagemap* dev_pagemap() const { return dev_pagemap_; }
  PagemapOps* ops() const { return ops_; }
  // The device-private owner of its pages (the dev_pagemap's owner).
  const void* owner() const { return dev_pagemap_->owner(); }

  // The ops, called for `dev` (see PagemapOps for the context of each).
  PagemapAddr device_map(Device* dev, mm::Folio* page, unsigned order, DmaDirection dir);
  void device_unmap(Device* dev, const PagemapAddr& addr);
  // drm_pagemap_populate_mm: -EFAULT when the address space has exited, -EINVAL for a bad
  // range, else ops->populate_mm's result. Unlike the kernel, the mmap lock is not taken
  // here: migrate_to_devmem takes it itself (read) around the walk, copy and commit.
  int populate_mm(mm::Va start, mm::Va end, mm::AddressSpace* as, unsigned timeslice_ms);

 private:
  friend class PagemapDestroyWorker;
  Pagemap(Device* dev, mm::DevPagemap* dev_pagemap, PagemapOps* ops)
      : dev_(dev), dev_pagemap_(dev_pagemap), ops_(ops) {}
  ~Pagemap() = default;
  void release();  // ops->destroy, then delete: the last reference went

  Device* const dev_;
  mm::DevPagemap* const dev_pagemap_;
  PagemapOps* const ops_;
  std::atomic<int64_t> refcount_{1};
};

// An owning reference (get on copy, put on destruction; a moved-from ref holds nothing).
class PagemapRef {
 public:
  PagemapRef() = default;
  // Adopts a reference the caller already holds (no get).
  static PagemapRef adopt(Pagemap* p) { return PagemapRef(p); }
  // Takes a new reference on p (which the caller keeps alive meanwhile).
  static PagemapRef get(Pagemap* p) {
    if (p) p->get();
    return PagemapRef(p);
  }
  PagemapRef(const PagemapRef& o) : p_(o.p_) {
    if (p_) p_->get();
  }
  PagemapRef(PagemapRef&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  PagemapRef& operator=(PagemapRef o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~PagemapRef() { reset(); }
  void reset() {
    if (Pagemap* p = p_) {
      p_ = nullptr;
      p->put();
    }
  }
  Pagemap* get() const { return p_; }
  Pagemap* operator->() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  explicit PagemapRef(Pagemap* p) : p_(p) {}
  Pagemap* p_ = nullptr;
};

// The svm Pagemap a device page belongs to while it is in use (through zone_device_data);
// nullptr for a page that is not an svm device page. Caller holds a reference on the page or
// the page-table lock over an entry mapping it. No reference is taken.
Pagemap* page_to_pagemap(mm::Folio* page);

// The dev_pagemap ops every driver passes to mm::DevPagemap::create for memory this layer
// manages (drm_pagemap_pagemap_ops_get).
mm::DevPagemapOps* pagemap_dev_pagemap_ops();

// Waits until every deferred destroy queued so far has run (drm_pagemap_exit's flush_work).
// Context: may sleep; no lock held.
void pagemap_flush_destroy_work();

}  // namespace gpusvm::svm
