// Helpers shared by the three migrations of the provider (to devmem, eviction, CPU fault).
// Internal to gpusvm/svm.
#pragma once

#include <cstdint>

#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap.h"

namespace gpusvm::svm {

// Pages covered by the migrate word `w` (512 for a compound entry).
inline uint64_t mpfn_pages(uint64_t w) { return (w & mm::MIGRATE_PFN_COMPOUND) ? mm::kPagesPerPmd : 1; }
// The folio of a migrate word with MIGRATE_PFN_VALID, else nullptr.
inline mm::Folio* mpfn_folio(mm::PhysMem* mem, uint64_t w) {
  return (w & mm::MIGRATE_PFN_VALID) ? mem->pfn_to_page(mm::migrate_pfn_to_pfn(w)) : nullptr;
}

// drm_pagemap_migrate_map_pages: addrs[i] for each folio of mpfns[0, npages) as `dev` reaches
// it: a system folio through dma_map_page, a device folio through its pagemap's device_map.
// A device folio of `skip_pagemap` is left unmapped (not nullptr: pages already in place).
// Entries without a folio (holes) stay kDmaMappingError. Returns 0 or -EFAULT (a mapping
// failed; what was mapped stays recorded in addrs for unmap_pages). Never sleeps.
int map_pages(mm::PhysMem* mem, Device* dev, const Pagemap* skip_pagemap, PagemapAddr* addrs,
              const uint64_t* mpfns, uint64_t npages, DmaDirection dir);
// Undoes map_pages (every entry whose addr is not kDmaMappingError) and resets addrs.
void unmap_pages(mm::PhysMem* mem, Device* dev, PagemapAddr* addrs, const uint64_t* mpfns, uint64_t npages);

// Unlocks and drops every destination folio in dst (the migration's reference) and clears
// dst: nothing of them is committed (drm_pagemap_migration_unlock_put_pages).
void unlock_put_pages(mm::PhysMem* mem, uint64_t* dst, uint64_t npages);

// Allocates a locked system folio of the source's order for every collected device page in
// src that belongs to `devmem` (others - a peer's pages in a fault window, frames reused by a
// new allocation - get none and stay). Returns 0 or -ENOMEM (nothing kept). Sets *mpages to
// the pages allocated.
int populate_ram_pfn(mm::PhysMem* mem, const Devmem* devmem, const uint64_t* src, uint64_t* dst,
                     uint64_t npages, uint64_t* mpages);

// dev_pagemap_ops.migrate_to_ram of every svm device page (pagemap_evict.cc).
mm::VmFault pagemap_migrate_to_ram(const mm::VmFaultInfo& vmf);

}  // namespace gpusvm::svm
