// The per-allocation record behind every device page of a Devmem (drm_pagemap_zdd), kept in
// the pages' zone_device_data. Internal to gpusvm/svm.
//
// References: the migration holds one while it runs, each device folio holds one (taken when
// the migration initialises the folio, dropped by folio_free; folio_split takes one for each
// new small folio). The last put detaches the Devmem: `detached` completes, devmem_release
// runs and the Devmem's Pagemap reference is dropped (deferred when from folio_free).
#pragma once

#include <atomic>
#include <cstdint>

#include "gpusvm/base/log.h"
#include "gpusvm/svm/devmem.h"

namespace gpusvm::svm {

// Completes devmem->detached, calls devmem_release, then drops the Devmem's Pagemap
// reference. from_reclaim: the caller may hold page-table locks (folio_free).
void devmem_detach(Devmem* devmem, bool from_reclaim);

struct PagemapZdd {
  explicit PagemapZdd(Devmem* d) : devmem(d) {}
  void get() { refcount.fetch_add(1, std::memory_order_relaxed); }  // caller holds one
  // Never sleeps (the release path is folio_free-safe). An unbalanced put panics (kref's
  // underflow warning), so a missing get shows up as the second put, not as silence.
  void put(bool from_reclaim) {
    const int64_t old = refcount.fetch_sub(1, std::memory_order_acq_rel);
    if (old <= 0) panic("svm: zdd reference underflow");
    if (old != 1) return;
    devmem_detach(devmem, from_reclaim);
    delete this;
  }

  std::atomic<int64_t> refcount{1};
  Devmem* const devmem;  // owned: detached with the last reference
};

// The zdd of a device page handed out by this layer (any page of the folio), or nullptr.
PagemapZdd* page_zdd(mm::Folio* page);

}  // namespace gpusvm::svm
