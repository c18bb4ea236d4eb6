// Reclaim (mm/vmscan.c, the reclaim side of mm/rmap.c): the LRU lists, folio_referenced,
// try_to_unmap, shrink_folio, shrink_lru and direct reclaim. Design: docs/reclaim.md.
//
// Locking: the LRU lock (a leaf spin lock) guards the lists and the kFolioLru/kFolioActive
// flags. Reclaim itself holds no spin lock across a folio: it isolates folios under the LRU
// lock (taking a reference), trylocks each (never sleeps on a folio lock: the caller of direct
// reclaim may hold anything up to the mmap lock), and reaches mappings through the reverse map
// with the rmap walk lock shared, as try_to_migrate does.
#include <cerrno>
#include <string>

#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/swap.h"
#include "gpusvm/mm/vmscan.h"

namespace gpusvm::mm {
namespace {

// shrink_folio: try_to_unmap turned every mapping into a swap entry; the folio is still
// locked and in the swap cache, not yet written or removed. Held: the folio lock only.
GPUSVM_SCHED_POINT(g_sp_reclaim_unmapped, "mm.vmscan.unmapped");

constexpr uint32_t kLruIneligible = kFolioZero | kFolioHugetlb | kFolioShmem | kFolioDevicePrivate |
                                    kFolioDeviceCoherent | kFolioFree;

// Folios per isolation batch (SWAP_CLUSTER_MAX).
constexpr uint64_t kClusterMax = 32;

}  // namespace

// ---- LRU lists ----

void PhysMem::lru_link_locked(Folio* folio, bool active) {
  lru_lock_.assert_held();
  LruList& l = lru_[active ? 1 : 0];
  folio->lru_prev_ = nullptr;
  folio->lru_next_ = l.head;
  if (l.head) l.head->lru_prev_ = folio;
  l.head = folio;
  if (!l.tail) l.tail = folio;
  l.nr++;
  folio->set(kFolioLru);
  if (active) {
    folio->set(kFolioActive);
  } else {
    folio->clear(kFolioActive);
  }
}

void PhysMem::lru_unlink_locked(Folio* folio) {
  lru_lock_.assert_held();
  LruList& l = lru_[folio->test(kFolioActive) ? 1 : 0];
  if (folio->lru_prev_) {
    folio->lru_prev_->lru_next_ = folio->lru_next_;
  } else {
    l.head = folio->lru_next_;
  }
  if (folio->lru_next_) {
    folio->lru_next_->lru_prev_ = folio->lru_prev_;
  } else {
    l.tail = folio->lru_prev_;
  }
  folio->lru_prev_ = folio->lru_next_ = nullptr;
  l.nr--;
  folio->clear(kFolioLru);
  folio->clear(kFolioActive);
}

void PhysMem::lru_add(Folio* folio) {
  if (!folio->is_head() || folio->pagemap() || (folio->flags() & kLruIneligible) ||
      !folio->test(kFolioAnon)) {
    return;
  }
  SpinLockGuard g(&lru_lock_);
  // An isolated folio (reclaim holds it off the lists) is put back by its isolator.
  if (folio->flags() & (kFolioLru | kFolioIsolated)) return;
  lru_link_locked(folio, /*active=*/false);
}

void PhysMem::lru_del(Folio* folio) {
  if (!folio->test(kFolioLru)) return;
  SpinLockGuard g(&lru_lock_);
  if (folio->test(kFolioLru)) lru_unlink_locked(folio);
}

void PhysMem::folio_deactivate(Folio* folio) {
  folio->clear(kFolioReferenced);
  SpinLockGuard g(&lru_lock_);
  if (!folio->test(kFolioLru) || !folio->test(kFolioActive)) return;
  lru_unlink_locked(folio);
  lru_link_locked(folio, /*active=*/false);
}

PhysMem::LruCounts PhysMem::lru_counts() const {
  SpinLockGuard g(&lru_lock_);
  return LruCounts{lru_[1].nr, lru_[0].nr};
}

std::vector<Folio*> PhysMem::lru_isolate(bool active, uint64_t nr) {
  std::vector<Folio*> out;
  SpinLockGuard g(&lru_lock_);
  LruList& l = lru_[active ? 1 : 0];
  // A folio whose last reference is going (try_get fails) is being freed: free_folio takes it
  // off the list once we drop the lock. Bounded by the list's length at entry.
  for (uint64_t scanned = 0, len = l.nr; scanned < len && out.size() < nr && l.tail; scanned++) {
    Folio* folio = l.tail;
    lru_unlink_locked(folio);
    if (!folio->try_get()) {
      lru_link_locked(folio, active);  // rotated to the head; its free unlinks it
      continue;
    }
    folio->set(kFolioIsolated);
    out.push_back(folio);
  }
  return out;
}

bool PhysMem::lru_isolate_folio(Folio* folio) {
  SpinLockGuard g(&lru_lock_);
  if (folio->test(kFolioIsolated)) return false;  // another reclaimer has it
  if (folio->test(kFolioLru)) lru_unlink_locked(folio);
  folio->set(kFolioIsolated);
  return true;
}

void PhysMem::lru_putback(Folio* folio, bool active) {
  {
    SpinLockGuard g(&lru_lock_);
    folio->clear(kFolioIsolated);
    const bool eligible = !folio->pagemap() && !(folio->flags() & kLruIneligible) &&
                          folio->test(kFolioAnon) && (folio->mapped() || folio->test(kFolioSwapCache));
    if (eligible && !folio->test(kFolioLru)) lru_link_locked(folio, active);
  }
  folio->put();  // the isolation's reference (may be the last: the folio was unmapped)
}

// shrink_active_list: the oldest active folios go to the inactive list. Their young bits are
// not consulted (Linux deactivates referenced anonymous folios too; only executable file
// pages are kept active), so a folio that keeps being used comes back through the inactive
// list's second look (kFolioReferenced).
void PhysMem::shrink_active(uint64_t nr) {
  SpinLockGuard g(&lru_lock_);
  for (uint64_t i = 0; i < nr && lru_[1].tail; i++) {
    Folio* folio = lru_[1].tail;
    lru_unlink_locked(folio);
    lru_link_locked(folio, /*active=*/false);
  }
}

// ---- rmap walks ----

int folio_referenced(Folio* folio) {
  folio_assert_locked(folio);
  PhysMem* mem = folio->mem();
  int referenced = 0;
  ReadLock walk(&mem->rmap_walk_lock());
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.migration) continue;
    AddressSpace& mm = *item.mm;
    PmdSlot slot = mm.page_table().pmd_lookup(item.va);
    if (!slot) continue;
    if (item.pmd) {
      SpinLockGuard g(&slot.table->lock);
      const Pmd pmd = slot.table->get(slot.index);
      if (pmd.is_huge_present() && pmd.leaf().pfn() == folio->pfn() && pmd.leaf().young()) {
        slot.table->set(slot.index, Pmd::make_leaf(pmd.leaf().mkold()));
        referenced++;
      }
      continue;
    }
    PteTable* t = mm.page_table().pte_offset_map_lock(slot);
    if (!t) continue;
    t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
    const unsigned i = pte_index(item.va);
    const Pte pte = t->get(i);
    // Seed 004 (folio_referenced_one): only a present PTE has an accessed bit. A
    // device-exclusive entry maps the page too but is skipped, untouched.
    if (pte.present() && !pte.special() && pte.pfn() == folio->page(item.page)->pfn() && pte.young()) {
      t->set(i, pte.mkold());
      referenced++;
    }
    PageTable::pte_unmap_unlock(t);
  }
  return referenced;
}

bool try_to_unmap(Folio* folio, bool discard, uint64_t slot) {
  folio_assert_locked(folio);
  PhysMem* mem = folio->mem();
  bool ok = true;
  ReadLock walk(&mem->rmap_walk_lock());
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.migration || item.pmd) return false;  // not ours to unmap (small folios only)
    AddressSpace& mm = *item.mm;
    Folio* drop = nullptr;
    {
      MmuInvalidation inv(mm, item.va, item.va + kPageSize, MmuNotifyEvent::kClear);
      PmdSlot pslot = mm.page_table().pmd_lookup(item.va);
      PteTable* t = pslot ? mm.page_table().pte_offset_map_lock(pslot) : nullptr;
      if (!t) continue;  // the mapping went away, and its record with it
      t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
      const unsigned i = pte_index(item.va);
      const Pte pte = t->get(i);
      Folio* page = folio->page(item.page);
      // Seed 004 (try_to_unmap_one): a device-exclusive entry is a PFN swap PTE that maps the
      // page; it is unmapped like a present PTE (its dirty bit went to the folio when it was
      // made). The CLEAR invalidation above is how the device loses its exclusive access.
      const bool maps = ((pte.present() && !pte.special()) || pte.is_device_exclusive()) &&
                        pte.pfn() == page->pfn();
      if (maps) {
        if (pte.dirty()) folio->set(kFolioDirty);
        if (discard && folio->test(kFolioDirty)) {
          ok = false;  // written since MADV_FREE: the data is live again
        } else if (discard && folio->refcount() != 1 + folio->total_mapcount()) {
          // A reference beyond the mappings and ours (GUP for direct I/O, which may write to the
          // page later): discarding would lose what it writes. Linux checks the same before it
          // drops a lazyfree PTE (the MADV_FREE vs direct-I/O read fix).
          ok = false;
        } else {
          Pte e = discard ? Pte::none() : Pte::make_swap(slot);
          if (!discard) {
            if (pte.soft_dirty()) e = e.swp_mksoft_dirty();
            mem->swap().duplicate(slot);
          }
          t->set(i, e);
          page->clear_page(kPageAnonExclusive);
          page_remove_rmap_pte(page, &mm, item.va);
          drop = page;
        }
      }
      PageTable::pte_unmap_unlock(t);
    }
    if (drop) drop->head()->put();  // the mapping's; never the last (the caller holds one)
    if (!ok) return false;
  }
  return !folio->mapped();
}

// ---- shrink_folio_list ----

namespace {

// folio_check_references for an anonymous folio on the inactive list.
ReclaimResult check_references(Folio* folio) {
  const bool referenced_folio = folio->test(kFolioReferenced);
  folio->clear(kFolioReferenced);
  const int referenced_ptes = folio_referenced(folio);
  if (referenced_ptes == 0) return ReclaimResult::kFreed;  // "reclaim"
  // Every mapped page starts with a young PTE from the fault that made it: look twice.
  folio->set(kFolioReferenced);
  if (referenced_folio || referenced_ptes > 1) return ReclaimResult::kActivate;
  return ReclaimResult::kKeep;
}

// Whether only the caller (and the swap cache, when cached) references the unmapped folio.
bool only_ours(const Folio* folio) {
  return folio->refcount() == 1 + (folio->test(kFolioSwapCache) ? 1 : 0);
}

}  // namespace

ReclaimResult shrink_folio(Folio* folio, bool ignore_references) {
  folio_assert_locked(folio);
  PhysMem* mem = folio->mem();
  if (!folio->test(kFolioAnon) || folio->large() || folio_is_zone_device(folio) ||
      (folio->flags() & kLruIneligible)) {
    return ReclaimResult::kKeep;
  }
  // A pinned page cannot be unmapped: the DMA would go on into a page that is gone.
  if (folio->maybe_dma_pinned()) return ReclaimResult::kActivate;
  if (!ignore_references) {
    const ReclaimResult r = check_references(folio);
    if (r != ReclaimResult::kFreed) {
      mem->stat_reclaim_activate.add(r == ReclaimResult::kActivate);
      return r;
    }
  }
  // MADV_FREE'd and clean: the contents are disposable (as !swapbacked folios in Linux).
  if (folio->test(kFolioLazyfree) && !folio->test(kFolioDirty) && !folio->test(kFolioSwapCache)) {
    if (!try_to_unmap(folio, /*discard=*/true, 0)) {
      folio->clear(kFolioLazyfree);  // redirtied: folio_set_swapbacked, back to normal anon
      return ReclaimResult::kActivate;
    }
    if (!only_ours(folio)) return ReclaimResult::kKeep;  // a GUP reference appeared
    mem->stat_reclaim_lazyfree.add();
    return ReclaimResult::kFreed;
  }
  // add_to_swap, unless the folio is cached already (swapped in and not written since).
  bool fresh = false;
  if (!folio->test(kFolioSwapCache)) {
    Result<uint64_t> slot = mem->swap().add_to_swap(folio);
    if (!slot) return ReclaimResult::kActivate;  // no swap space: activate_locked
    fresh = true;
    folio->clear(kFolioLazyfree);
  }
  const uint64_t slot = folio->swap_slot();
  if (!try_to_unmap(folio, /*discard=*/false, slot)) {
    if (Folio* drop = mem->swap().release_if_unused(folio)) drop->put();
    return ReclaimResult::kActivate;
  }
  g_sp_reclaim_unmapped.reach();
  // pageout: only a page that changed since its slot was written (or a fresh slot) is written.
  if (fresh || folio->test(kFolioDirty)) {
    mem->swap().write(slot, folio);
    folio->clear(kFolioDirty);
    mem->stat_pswpout.add();
  } else {
    mem->stat_reclaim_clean.add();
  }
  // __remove_mapping: a reference taken meanwhile (a swap-in that found the folio in the cache,
  // GUP through a mapping before it went) keeps the folio: it stays cached, and the swap-in
  // maps it back without reading the slot.
  if (!mem->swap().remove_mapping(folio)) return ReclaimResult::kKeep;
  return ReclaimResult::kFreed;
}

namespace {

// Runs shrink_folio on isolated folios and puts back or frees each. Returns the pages freed.
uint64_t shrink_isolated(PhysMem& mem, const std::vector<Folio*>& folios, bool ignore_references) {
  uint64_t freed = 0;
  for (Folio* folio : folios) {
    mem.stat_reclaim_scanned.add();
    if (!folio_trylock(folio)) {
      mem.lru_putback(folio, folio->test(kFolioActive));
      continue;
    }
    const ReclaimResult r = shrink_folio(folio, ignore_references);
    folio_unlock(folio);
    if (r == ReclaimResult::kFreed) {
      folio->clear(kFolioIsolated);
      freed += folio->nr_pages();
      folio->put();  // the last reference: frees it
      continue;
    }
    mem.lru_putback(folio, r == ReclaimResult::kActivate);
  }
  return freed;
}

}  // namespace

uint64_t reclaim_pages(PhysMem& mem, const std::vector<Folio*>& folios) {
  std::vector<Folio*> isolated;
  for (Folio* folio : folios) {
    // folio_isolate_lru: off the LRU (if it is on it), our reference becomes the isolation's.
    if (mem.lru_isolate_folio(folio)) {
      isolated.push_back(folio);
    } else {
      folio->put();
    }
  }
  return shrink_isolated(mem, isolated, /*ignore_references=*/true);
}

uint64_t PhysMem::shrink_lru(uint64_t nr) {
  if (lockdep::spin_locks_held() > 0) panic("shrink_lru under a spin lock: " + lockdep::held_locks_string());
  uint64_t freed = 0;
  // Bounded: each round scans at most one batch of each list; four rounds per cluster asked.
  const uint64_t rounds = 4 * ((nr + kClusterMax - 1) / kClusterMax) + 4;
  for (uint64_t round = 0; round < rounds && freed < nr; round++) {
    LruCounts c = lru_counts();
    // inactive_is_low: keep the inactive list at least as long as the active one.
    if (c.inactive < c.active || c.inactive == 0) shrink_active(kClusterMax);
    std::vector<Folio*> batch = lru_isolate(/*active=*/false, kClusterMax);
    if (batch.empty() && lru_counts().active == 0) break;
    freed += shrink_isolated(*this, batch, /*ignore_references=*/false);
  }
  return freed;
}

Folio* PhysMem::folio_alloc_reclaim(unsigned order, bool zero) {
  if (lockdep::spin_locks_held() > 0) {
    panic("folio_alloc_reclaim under a spin lock: " + lockdep::held_locks_string());
  }
  // The injection points fire as for folio_alloc; such a failure is not for want of memory,
  // and neither is a THP that fails for fragmentation: reclaim runs only when frames are short.
  Folio* folio = folio_alloc(order, zero);
  const uint64_t n = 1ULL << order;
  auto short_of_memory = [&] {
    return free_pages() < n || (config_.memory_limit_pages && used_pages() + n > config_.memory_limit_pages);
  };
  for (int attempt = 0; !folio && attempt < 4 && short_of_memory(); attempt++) {
    stat_direct_reclaim.add();
    if (shrink_lru(std::max(n, kClusterMax)) == 0) return nullptr;
    folio = alloc_frames(order, zero);
  }
  return folio;
}

}  // namespace gpusvm::mm
