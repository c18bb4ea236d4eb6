// What backs one virtual page, in the categories the differential tests compare with Linux
// (/proc/self/pagemap, /proc/kpageflags, smaps).
#pragma once

#include <cstdint>

#include "gpusvm/mm/pte.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;

enum class PageKind {
  kNone,          // no entry
  kZeroPage,      // the 4 KiB zero page
  kHugeZero,      // the huge zero folio (PMD-mapped)
  kSmall,         // a 4 KiB folio (anonymous or page cache)
  kThpPte,        // a page of a large folio mapped by a PTE
  kThpPmd,        // a page of a large folio mapped by a PMD
  kSoftLeaf,      // a migration, device-private or device-exclusive entry (see `leaf`)
};

const char* page_kind_name(PageKind k);

struct PageState {
  PageKind kind = PageKind::kNone;
  Pfn pfn = 0;
  bool writable = false;
  bool dirty = false;
  bool anon_exclusive = false;
  int mapcount = 0;  // total mappings of the folio
  // Soft leaves: which one (kNone for present entries and holes).
  SoftLeafType leaf = SoftLeafType::kNone;
  // For entries that map a folio (present pages, device-private and device-exclusive
  // entries; not the zero pages, not migration entries): its refcount and order, and the
  // mapcount of this page alone. Read after the entry's lock is dropped: exact only when
  // nothing changes the page concurrently (tests at a quiescent point).
  int refcount = 0;
  int page_mapcount = 0;
  bool large = false;  // the folio is PMD order
  bool folio_dirty = false;
};

// Takes the mmap lock (read) and the page-table lock of the entry. va must be a user address.
PageState query_page(AddressSpace& mm, Va va);

}  // namespace gpusvm::mm
