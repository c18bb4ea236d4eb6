#include "drivers/dmirror/migrate_copy.h"

#include "drivers/dmirror/dmirror_device.h"
#include "drivers/dmirror/page_copy.h"

namespace gpusvm::dmirror {
namespace {

mm::Folio* alloc(DmirrorDevice& dev, MigrateTarget target, unsigned order) {
  if (target == MigrateTarget::kDevice) return order ? dev.alloc_huge() : dev.alloc_page();
  return dev.mem()->folio_alloc(order, /*zero=*/false);
}

// Page j of the destination folio d gets page sj of the source folio s (or zeroes).
void fill(mm::Folio* d, uint64_t j, mm::Folio* s, uint64_t sj) {
  if (s) {
    dev_copy_page(d->data(j), s->data(sj));
  } else {
    dev_clear_page(d->data(j));
  }
}

}  // namespace

bool alloc_and_copy(DmirrorDevice& dev, MigrateTarget target, const uint64_t* src, uint64_t* dst,
                    uint64_t i, bool fail) {
  mm::PhysMem* mem = dev.mem();
  const uint64_t s = src[i];
  mm::Folio* spage = (s & mm::MIGRATE_PFN_VALID) ? mem->pfn_to_page(mm::migrate_pfn_to_pfn(s)) : nullptr;
  const uint64_t write = s & mm::MIGRATE_PFN_WRITE;
  const uint64_t n = src_pages(s);
  if (n == 1) {
    mm::Folio* d = fail ? nullptr : alloc(dev, target, 0);
    if (!d) return false;
    mm::folio_lock(d);
    fill(d, 0, spage, 0);
    dst[i] = mm::migrate_pfn(d->pfn()) | write;
    return true;
  }
  if (mm::Folio* d = fail ? nullptr : alloc(dev, target, mm::kPmdOrder)) {
    mm::folio_lock(d);
    for (uint64_t j = 0; j < n; j++) fill(d, j, spage, j);
    dst[i] = mm::migrate_pfn(d->pfn()) | mm::MIGRATE_PFN_COMPOUND | write;
    return true;
  }
  // 512 small destinations.
  uint64_t j = 0;
  for (; j < n; j++) {
    mm::Folio* d = alloc(dev, target, 0);
    if (!d) break;
    mm::folio_lock(d);
    fill(d, 0, spage, j);
    dst[i + j] = mm::migrate_pfn(d->pfn()) | write;
  }
  if (j == n) return true;
  // Out of memory part-way: give back what was taken; the source stays.
  for (uint64_t k = 0; k < j; k++) {
    mm::Folio* d = mem->pfn_to_page(mm::migrate_pfn_to_pfn(dst[i + k]));
    dst[i + k] = 0;
    mm::folio_unlock(d);
    d->put();
  }
  return false;
}

}  // namespace gpusvm::dmirror
