// Mapping accounting and the reverse map: which (address space, address) entries map a folio.
#include <algorithm>
#include <string>

#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {
namespace {

bool same_item(const RmapItem& a, const RmapItem& b) {
  return a.mm == b.mm && a.va == b.va && a.page == b.page && a.pmd == b.pmd &&
         a.migration == b.migration;
}

// The record equal to `item`, or end(). Rmap lock held.
std::vector<RmapItem>::iterator find_item(std::vector<RmapItem>& rmap, const RmapItem& item) {
  return std::find_if(rmap.begin(), rmap.end(), [&](const RmapItem& r) { return same_item(r, item); });
}

// A large folio that lost some but not all of its mappings wastes the unmapped part until
// it is split: queue it as the kernel does (deferred_split_folio). Anonymous folios only:
// a page-cache THP stays whole in the cache whatever maps it (folio_remove_rmap_ptes queues
// only anon folios).
void maybe_deferred_split(Folio* head) {
  if (head->large() && !head->test(kFolioDeferredSplit) && head->entire_mapcount() == 0 &&
      !head->test(kFolioZero) && !head->test(kFolioShmem) && head->mapped()) {
    head->mem()->deferred_split_folio(head);
  }
}

// folio_add_lru at the first mapping of an anonymous RAM folio (the kernel adds new folios
// where it maps them: do_anonymous_page, do_swap_page, wp_page_copy, migration, collapse; one
// hook here covers them all). One flag test when the folio is on the LRU already.
void maybe_lru_add(Folio* head) {
  if (head->pagemap() || !head->test(kFolioAnon) || head->test(kFolioLru)) return;
  head->mem()->lru_add(head);
}

}  // namespace

void page_add_rmap_pte(Folio* page, AddressSpace* mm, Va va) {
  Folio* head = page->head();
  page->mapcount_.fetch_add(1, std::memory_order_acq_rel);
  {
    SpinLockGuard g(&head->rmap_lock_);
    head->rmap_.push_back(RmapItem{mm, va, static_cast<uint32_t>(page->page_index()), false});
  }
  maybe_lru_add(head);
}

void page_remove_rmap_pte(Folio* page, AddressSpace* mm, Va va) {
  Folio* head = page->head();
  if (page->mapcount_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
    panic("page_remove_rmap_pte: mapcount underflow on pfn " + std::to_string(page->pfn()));
  }
  {
    const RmapItem item{mm, va, static_cast<uint32_t>(page->page_index()), false};
    SpinLockGuard g(&head->rmap_lock_);
    auto it = find_item(head->rmap_, item);
    if (it == head->rmap_.end()) {
      panic("page_remove_rmap_pte: no rmap item for pfn " + std::to_string(page->pfn()));
    }
    *it = head->rmap_.back();
    head->rmap_.pop_back();
  }
  maybe_deferred_split(head);
}

void page_rmap_pte_to_migration(Folio* page, AddressSpace* mm, Va va) {
  Folio* head = page->head();
  if (page->mapcount_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
    panic("page_rmap_pte_to_migration: mapcount underflow on pfn " + std::to_string(page->pfn()));
  }
  {
    SpinLockGuard g(&head->rmap_lock_);
    auto it = find_item(head->rmap_, RmapItem{mm, va, static_cast<uint32_t>(page->page_index()), false});
    if (it == head->rmap_.end()) {
      panic("page_rmap_pte_to_migration: no rmap item for pfn " + std::to_string(page->pfn()));
    }
    it->migration = true;
  }
  maybe_deferred_split(head);
}

void folio_rmap_pmd_to_migration(Folio* folio, AddressSpace* mm, Va haddr) {
  if (folio->entire_mapcount_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
    panic("folio_rmap_pmd_to_migration: entire_mapcount underflow on pfn " + std::to_string(folio->pfn()));
  }
  SpinLockGuard g(&folio->rmap_lock_);
  auto it = find_item(folio->rmap_, RmapItem{mm, haddr, 0, true});
  if (it == folio->rmap_.end()) {
    panic("folio_rmap_pmd_to_migration: no rmap item for pfn " + std::to_string(folio->pfn()));
  }
  it->migration = true;
}

void folio_add_migration_item(Folio* folio, const RmapItem& item) {
  folio->mem()->rmap_walk_lock().assert_held();
  if (!item.migration) panic("folio_add_migration_item: not a migration record");
  Folio* head = folio->head();
  SpinLockGuard g(&head->rmap_lock_);
  head->rmap_.push_back(item);
}

bool folio_remove_migration_item(Folio* folio, const RmapItem& item) {
  folio->mem()->rmap_walk_lock().assert_held();
  Folio* head = folio->head();
  SpinLockGuard g(&head->rmap_lock_);
  auto it = find_item(head->rmap_, item);
  if (it == head->rmap_.end()) return false;
  *it = head->rmap_.back();
  head->rmap_.pop_back();
  return true;
}

std::vector<RmapItem> folio_take_migration_items(Folio* folio) {
  folio->mem()->rmap_walk_lock().assert_held();
  Folio* head = folio->head();
  std::vector<RmapItem> out;
  SpinLockGuard g(&head->rmap_lock_);
  auto keep = std::partition(head->rmap_.begin(), head->rmap_.end(),
                             [](const RmapItem& r) { return !r.migration; });
  out.assign(keep, head->rmap_.end());
  head->rmap_.erase(keep, head->rmap_.end());
  return out;
}

void folio_add_rmap_pmd(Folio* folio, AddressSpace* mm, Va haddr) {
  folio->entire_mapcount_.fetch_add(1, std::memory_order_acq_rel);
  {
    SpinLockGuard g(&folio->rmap_lock_);
    folio->rmap_.push_back(RmapItem{mm, haddr, 0, true});
  }
  maybe_lru_add(folio);
}

void folio_remove_rmap_pmd(Folio* folio, AddressSpace* mm, Va haddr) {
  if (folio->entire_mapcount_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
    panic("folio_remove_rmap_pmd: entire_mapcount underflow on pfn " + std::to_string(folio->pfn()));
  }
  SpinLockGuard g(&folio->rmap_lock_);
  auto it = find_item(folio->rmap_, RmapItem{mm, haddr, 0, true});
  if (it == folio->rmap_.end()) {
    panic("folio_remove_rmap_pmd: no rmap item for pfn " + std::to_string(folio->pfn()));
  }
  *it = folio->rmap_.back();
  folio->rmap_.pop_back();
}

void folio_move_rmap(Folio* folio, const RmapItem& item, AddressSpace* mm, Va va) {
  Folio* head = folio->head();
  SpinLockGuard g(&head->rmap_lock_);
  for (RmapItem& r : head->rmap_) {
    if (same_item(r, item)) {
      r.mm = mm;
      r.va = va;
      return;
    }
  }
  panic("folio_move_rmap: no rmap item for pfn " + std::to_string(head->pfn()));
}

bool folio_mapped_only_by(Folio* folio, AddressSpace* mm) {
  Folio* head = folio->head();
  if (head->refcount() != head->total_mapcount()) return false;  // pinned or in flight
  SpinLockGuard g(&head->rmap_lock_);
  for (const RmapItem& item : head->rmap_) {
    if (item.mm != mm) return false;
  }
  return true;
}

std::vector<RmapItem> folio_rmap_snapshot(Folio* folio) {
  Folio* head = folio->head();
  SpinLockGuard g(&head->rmap_lock_);
  return head->rmap_;
}

}  // namespace gpusvm::mm
