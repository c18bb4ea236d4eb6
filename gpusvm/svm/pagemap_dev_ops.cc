// The dev_pagemap ops of every svm device page (drm_pagemap_pagemap_ops): folio_free drops
// the page's zdd reference, folio_split gives each new small folio its own, migrate_to_ram is
// the CPU-fault migration (pagemap_evict.cc).
#include "gpusvm/mm/devmap.h"
#include "gpusvm/svm/pagemap.h"
#include "gpusvm/svm/pagemap_migrate.h"
#include "gpusvm/svm/pagemap_zdd.h"

namespace gpusvm::svm {
namespace {

class SvmDevPagemapOps final : public mm::DevPagemapOps {
 public:
  // May run under page-table locks (the last reference can go in a zap): the zdd put never
  // sleeps, and a last Pagemap put from here is deferred to the destroy worker.
  void folio_free(mm::Folio* folio) override {
    auto* zdd = static_cast<PagemapZdd*>(folio->zone_device_data);
    for (uint64_t i = 0; i < folio->nr_pages(); i++) folio->page(i)->zone_device_data = nullptr;
    if (zdd) zdd->put(/*from_reclaim=*/true);
  }
  mm::VmFault migrate_to_ram(const mm::VmFaultInfo& vmf) override { return pagemap_migrate_to_ram(vmf); }
  // The folios are locked by the migration that split them; `folio` (the first) keeps the
  // head's reference, every other one takes its own, as each will get its own folio_free.
  void folio_split(mm::Folio* folio) override {
    auto* zdd = static_cast<PagemapZdd*>(folio->zone_device_data);
    if (!zdd) return;
    mm::DevPagemap* pgmap = folio->pagemap();
    for (uint64_t i = 1; i < mm::kPagesPerPmd; i++) {
      pgmap->pfn_to_page(folio->pfn() + i)->zone_device_data = zdd;
      zdd->get();
    }
  }
};

}  // namespace

mm::DevPagemapOps* pagemap_dev_pagemap_ops() {
  static SvmDevPagemapOps ops;
  return &ops;
}

}  // namespace gpusvm::svm
