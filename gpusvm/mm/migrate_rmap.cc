// The reverse-map side of migration: try_to_migrate and remove_migration_ptes.
//
// A walker here may reach into an address space whose mmap lock it does not hold (the other
// side of a fork; migrate_device_range holds none at all). Three rules keep that safe:
//  - it holds PhysMem::rmap_walk_lock() shared, and whoever frees a page table that may still
//    be reachable, or an address space, holds it exclusive first (free_pgtables, ~AddressSpace);
//  - every record it follows was read under the folio's rmap lock, and a zap removes records
//    under the entry's PTL (and the walk lock shared, which keeps it out of a split during
//    migration that holds the records), so a record names a live address space;
//  - it re-reads the entry under its PTL and acts only if the entry still maps the page.
#include <string>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate_internal.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// Bounds the passes of remove_migration_ptes: each pass restores every record it took, so a
// further pass happens only when fork copied one of our entries meanwhile.
constexpr int kRestorePassBudget = 1000;

// remove_migration_ptes took a batch of migration records, none restored yet. Held: the src
// folio lock, the rmap walk lock (shared).
GPUSVM_SCHED_POINT(g_sp_records_taken, "mm.migrate.records_taken");

// The mapping that replaces migration entry `mig` of a page now living in `dst`.
Pte entry_from_migration(Pte mig, const Folio* dst) {
  const bool write = mig.soft_leaf_type() == SoftLeafType::kMigrationWrite;
  if (folio_is_device_private(dst)) {
    Pte e = Pte::make_soft_leaf(write ? SoftLeafType::kDevicePrivateWrite : SoftLeafType::kDevicePrivateRead,
                                dst->pfn());
    return mig.soft_dirty() ? e.swp_mksoft_dirty() : e;
  }
  Pte e = Pte::make_present(dst->pfn(), write);
  if (mig.soft_dirty()) e = Pte(e.raw() | pte_bits::kSoftDirty);  // remove_migration_pte
  if (mig.swp_young()) e = e.mkyoung();
  if (mig.swp_dirty()) e = e.mkdirty();
  return e;
}

// Restores one PTE migration record onto dst's page `item.page`. Rmap walk lock held.
void restore_pte(const RmapItem& item, Folio* src, Folio* dst)
    GPUSVM_REQUIRES_SHARED(src->mem()->rmap_walk_lock()) {
  src->mem()->rmap_walk_lock().assert_held();
  AddressSpace& mm = *item.mm;
  PmdSlot slot = mm.page_table().pmd_lookup(item.va);
  PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
  if (!t) return;  // zapped and its table freed
  const unsigned i = pte_index(item.va);
  const Pte cur = t->get(i);
  if (cur.is_migration() && cur.pfn() == src->pfn() + item.page) {
    Folio* page = dst->page(item.page);
    if (cur.soft_leaf_type() != SoftLeafType::kMigrationRead) page->set_page(kPageAnonExclusive);
    dst->get();
    page_add_rmap_pte(page, &mm, item.va);
    t->set(i, entry_from_migration(cur, page));
  }
  PageTable::pte_unmap_unlock(t);
}

// Restores one PMD migration record: a PMD mapping of the 2 MiB folio dst. Rmap walk lock held.
void restore_pmd(const RmapItem& item, Folio* src, Folio* dst)
    GPUSVM_REQUIRES_SHARED(src->mem()->rmap_walk_lock()) {
  src->mem()->rmap_walk_lock().assert_held();
  AddressSpace& mm = *item.mm;
  PmdSlot slot = mm.page_table().pmd_lookup(item.va);
  if (!slot) return;
  SpinLockGuard g(&slot.table->lock);
  const Pmd pmd = slot.table->get(slot.index);
  if (!pmd.is_huge_soft_leaf() || !pmd.leaf().is_migration() || pmd.leaf().pfn() != src->pfn()) return;
  const Pte mig = pmd.leaf();
  if (mig.soft_leaf_type() != SoftLeafType::kMigrationRead) {
    for (uint64_t i = 0; i < kPagesPerPmd; i++) dst->page(i)->set_page(kPageAnonExclusive);
  }
  dst->get();
  folio_add_rmap_pmd(dst, &mm, item.va);
  slot.table->set(slot.index, Pmd::make_leaf(entry_from_migration(mig, dst)));
}

// try_to_migrate for a PMD mapping of the whole folio: a PMD migration entry. Returns false
// if the mapping is there but cannot be taken (a huge zero or foreign leaf is not ours).
// Rmap walk lock held.
bool try_to_migrate_pmd(const RmapItem& item, Folio* folio)
    GPUSVM_REQUIRES_SHARED(folio->mem()->rmap_walk_lock()) {
  folio->mem()->rmap_walk_lock().assert_held();
  AddressSpace& mm = *item.mm;
  MmuInvalidation inv(mm, item.va, item.va + kPmdSize, MmuNotifyEvent::kClear);
  PmdSlot slot = mm.page_table().pmd_lookup(item.va);
  if (!slot) return true;
  bool took = false;
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return true;  // gone (and its record with it)
    const Pte leaf = pmd.leaf();
    if ((leaf.present() || leaf.is_device_private()) && leaf.pfn() == folio->pfn()) {
      if (leaf.dirty()) folio->set(kFolioDirty);
      slot.table->set(slot.index, Pmd::make_leaf(make_migration_entry(leaf, folio)));
      for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->clear_page(kPageAnonExclusive);
      folio_rmap_pmd_to_migration(folio, &mm, item.va);
      took = true;
    }
  }
  if (took) folio->put();  // the mapping's reference; the migration holds its own
  return true;
}

}  // namespace

Pte make_migration_entry(Pte orig, const Folio* page) {
  const bool write = orig.present() ? orig.write() : orig.soft_leaf_write();
  const SoftLeafType type = write ? SoftLeafType::kMigrationWrite
                            : page->test_page(kPageAnonExclusive) ? SoftLeafType::kMigrationReadExclusive
                                                                  : SoftLeafType::kMigrationRead;
  Pte e = Pte::make_soft_leaf(type, orig.pfn());
  if (orig.young()) e = e.swp_mkyoung();
  if (orig.dirty()) e = e.swp_mkdirty();
  if (orig.soft_dirty()) e = e.swp_mksoft_dirty();
  return e;
}

Folio* install_migration_pte(AddressSpace& mm, PteTable* t, Va va, Pte orig, Folio* page) {
  t->ptl.assert_held();
  folio_assert_locked(page->head());
  if (orig.dirty()) page->head()->set(kFolioDirty);
  t->set(pte_index(va), make_migration_entry(orig, page));
  page->clear_page(kPageAnonExclusive);  // carried by the entry type until it is restored
  page_rmap_pte_to_migration(page, &mm, va);
  return page->head();
}

bool try_to_migrate(Folio* folio) {
  folio_assert_locked(folio);
  ReadLock walk(&folio->mem()->rmap_walk_lock());
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.migration) continue;
    if (item.pmd) {
      if (!try_to_migrate_pmd(item, folio)) return false;
      continue;
    }
    AddressSpace& mm = *item.mm;
    Folio* drop = nullptr;
    {
      MmuInvalidation inv(mm, item.va, item.va + kPageSize, MmuNotifyEvent::kClear);
      PmdSlot slot = mm.page_table().pmd_lookup(item.va);
      PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
      if (!t) continue;  // the mapping went away (and so did the record)
      t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
      const Pte pte = t->get(pte_index(item.va));
      Folio* page = folio->page(item.page);
      const bool maps_page = (pte.present() || pte.is_device_private() || pte.is_device_exclusive()) &&
                             !pte.special() && pte.pfn() == page->pfn();
      if (maps_page) drop = install_migration_pte(mm, t, item.va, pte, page);
      PageTable::pte_unmap_unlock(t);
    }
    // The folio keeps the migration's own reference, so this is never the last one.
    if (drop) drop->put();
  }
  return !folio->mapped();
}

void remove_migration_ptes(Folio* src, Folio* dst) {
  folio_assert_locked(src);
  ReadLock walk(&src->mem()->rmap_walk_lock());
  for (int pass = 0; pass < kRestorePassBudget; pass++) {
    std::vector<RmapItem> items = folio_take_migration_items(src);
    if (items.empty()) return;
    g_sp_records_taken.reach();
    for (const RmapItem& item : items) {
      if (item.pmd) {
        restore_pmd(item, src, dst);
      } else {
        restore_pte(item, src, dst);
      }
    }
  }
  panic("remove_migration_ptes: migration records of pfn " + std::to_string(src->pfn()) +
        " keep reappearing");
}

}  // namespace gpusvm::mm
