// migrate_vma_setup / migrate_vma_pages / migrate_vma_finalize (the collect-walk path).
//
// Reference and lock states of a collected source page (what mm::check sees afterwards):
//   setup:    folio locked (unless it is fault_page), +1 reference held by the migration;
//             its mapping at va replaced by a migration entry: mapcount, rmap item and the
//             mapping's reference dropped.
//   finalize: the migration entry becomes a mapping of the destination (or of the source
//             again), which takes its own reference; the source is unlocked and the
//             migration's reference dropped (freeing it when it moved).
#include "gpusvm/mm/migrate.h"

#include <cerrno>
#include <optional>
#include <vector>

#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

bool folio_is_device(const Folio* folio) { return folio->pagemap() != nullptr; }

// The migration entry that replaces a present or device-private mapping, carrying its
// write permission, exclusivity and young/dirty bits.
Pte make_migration_entry(Pte orig, Folio* page) {
  const bool write = orig.present() ? orig.write() : orig.soft_leaf_write();
  SoftLeafType type = write ? SoftLeafType::kMigrationWrite
                      : page->test_page(kPageAnonExclusive) ? SoftLeafType::kMigrationReadExclusive
                                                            : SoftLeafType::kMigrationRead;
  Pte e = Pte::make_soft_leaf(type, orig.pfn());
  if (orig.young()) e = e.swp_mkyoung();
  if (orig.dirty()) e = e.swp_mkdirty();
  if (orig.soft_dirty()) e = e.swp_mksoft_dirty();
  return e;
}

// remove_migration_pte: where the migration entry for `src` still is at va, map `dst`
// (which may be src itself) with the entry's permissions. Returns false when the entry is
// gone (zapped meanwhile). No page-table lock held on entry.
bool remove_migration_pte(AddressSpace& mm, Va va, Folio* src, Folio* dst) {
  PmdSlot slot = mm.page_table().pmd_lookup(va);
  PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
  if (!t) return false;
  const unsigned i = pte_index(va);
  const Pte cur = t->get(i);
  bool done = false;
  if (cur.is_migration() && cur.pfn() == src->pfn()) {
    const bool write = cur.soft_leaf_type() == SoftLeafType::kMigrationWrite;
    Pte e;
    if (folio_is_device(dst)) {
      e = Pte::make_soft_leaf(write ? SoftLeafType::kDevicePrivateWrite : SoftLeafType::kDevicePrivateRead,
                              dst->pfn());
    } else {
      e = Pte::make_present(dst->pfn(), write);
      if (cur.swp_young()) e = e.mkyoung();
      if (cur.swp_dirty()) e = e.mkdirty();
    }
    if (write || cur.soft_leaf_type() == SoftLeafType::kMigrationReadExclusive) {
      dst->set_page(kPageAnonExclusive);
    }
    dst->get();
    page_add_rmap_pte(dst, &mm, va);
    t->set(i, e);
    done = true;
  }
  PageTable::pte_unmap_unlock(t);
  return done;
}

// Collects one PTE under its lock. Returns the src word; *drop is set to a page whose mapping
// reference must be dropped after the lock is released.
uint64_t collect_pte(MigrateVma& m, const Vma& vma, PteTable* t, Va va, Folio** drop) {
  PhysMem* mem = m.mm->mem();
  const unsigned i = pte_index(va);
  const Pte pte = t->get(i);
  if (pte.is_none()) {
    // A hole of an anonymous mapping can receive a new page.
    if (vma.is_anonymous() && (m.flags & MIGRATE_VMA_SELECT_SYSTEM)) return MIGRATE_PFN_MIGRATE;
    return 0;
  }
  Folio* page = nullptr;
  if (pte.present()) {
    if (!(m.flags & MIGRATE_VMA_SELECT_SYSTEM)) return 0;
    if (pte.special()) return mem->is_zero_pfn(pte.pfn()) ? MIGRATE_PFN_MIGRATE : 0;
    page = mem->pfn_to_page(pte.pfn());
  } else if (pte.is_device_private()) {
    if (!(m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE)) return 0;
    page = mem->pfn_to_page(pte.pfn());
    if (page->pagemap()->owner() != m.pgmap_owner) return 0;
  } else {
    return 0;  // migration in flight, device-exclusive: not ours to take
  }
  Folio* folio = page->head();
  if (folio->large() || !folio->test(kFolioAnon)) return 0;  // see the header's limits
  folio->get();
  if (folio != m.fault_page && !folio_trylock(folio)) {
    *drop = folio;  // busy: skip it, as the kernel does
    return 0;
  }
  const bool write = pte.present() ? pte.write() : pte.soft_leaf_write();
  t->set(i, make_migration_entry(pte, page));
  page->clear_page(kPageAnonExclusive);  // carried by the entry type
  page_remove_rmap_pte(page, m.mm, va);
  *drop = folio;  // the mapping's reference; the migration keeps the one taken above
  return migrate_pfn(page->pfn()) | MIGRATE_PFN_MIGRATE | (write ? MIGRATE_PFN_WRITE : 0);
}

void collect(MigrateVma& m, const Vma& vma) {
  PageTable& pt = m.mm->page_table();
  std::vector<Folio*> drops;
  for_each_pmd_range(*m.mm, m.start, m.end, [&](PmdSlot slot, Va addr, Va next) {
    if (slot.load_lockless().is_leaf()) split_huge_pmd(*m.mm, slot, pmd_align_down(addr));
    PteTable* t = pt.pte_offset_map_lock(slot);
    for (Va va = addr; va < next; va += kPageSize) {
      uint64_t& src = m.src[(va - m.start) >> kPageShift];
      if (!t) {
        src = vma.is_anonymous() && (m.flags & MIGRATE_VMA_SELECT_SYSTEM) ? MIGRATE_PFN_MIGRATE : 0;
        continue;
      }
      Folio* drop = nullptr;
      src = collect_pte(m, vma, t, va, &drop);
      if (drop) drops.push_back(drop);
    }
    if (t) PageTable::pte_unmap_unlock(t);
  });
  // Regions without any PMD table are holes too.
  for (Va va = m.start; va < m.end; va += kPageSize) {
    if (pt.pmd_lookup(va)) continue;
    if (vma.is_anonymous() && (m.flags & MIGRATE_VMA_SELECT_SYSTEM)) {
      m.src[(va - m.start) >> kPageShift] = MIGRATE_PFN_MIGRATE;
    }
  }
  for (Folio* f : drops) f->put();
}

// migrate_device_unmap's check: a collected page may move only if nothing but the
// migration (and the faulting CPU, for fault_page) references it and nobody maps it any more
// (another process after fork would still see the old page).
bool page_can_move(const MigrateVma& m, Folio* folio) {
  const int expected = 1 + (folio == m.fault_page ? 1 : 0);
  return folio->total_mapcount() == 0 && folio->refcount() == expected;
}

Folio* src_folio(const MigrateVma& m, uint64_t i) {
  if (!(m.src[i] & MIGRATE_PFN_VALID)) return nullptr;
  return m.mm->mem()->pfn_to_page(migrate_pfn_to_pfn(m.src[i]))->head();
}

Folio* dst_folio(const MigrateVma& m, uint64_t i) {
  if (!(m.dst[i] & MIGRATE_PFN_VALID)) return nullptr;
  return m.mm->mem()->pfn_to_page(migrate_pfn_to_pfn(m.dst[i]))->head();
}

// The entry at va for a hole or zero page: replaced by the new page (migrate_vma_insert_page).
bool insert_page(MigrateVma& m, const Vma& vma, Va va, Folio* dst) {
  Result<PmdSlot> slot = m.mm->page_table().pmd_alloc(va);
  if (!slot || m.mm->page_table().pte_alloc(*slot) != 0) return false;
  PteTable* t = m.mm->page_table().pte_offset_map_lock(*slot);
  if (!t) return false;
  const unsigned i = pte_index(va);
  const Pte cur = t->get(i);
  bool ok = false;
  if (cur.is_none() || (cur.special() && m.mm->mem()->is_zero_pfn(cur.pfn()))) {
    const bool write = vma.flags & VM_WRITE;
    Pte e = folio_is_device(dst)
                ? Pte::make_soft_leaf(write ? SoftLeafType::kDevicePrivateWrite
                                            : SoftLeafType::kDevicePrivateRead, dst->pfn())
                : Pte::make_present(dst->pfn(), write).mkdirty().mkyoung();
    dst->set(kFolioAnon);
    dst->set_page(kPageAnonExclusive);
    dst->get();
    page_add_rmap_pte(dst, m.mm, va);
    t->set(i, e);
    ok = true;
  }
  PageTable::pte_unmap_unlock(t);
  return ok;
}

}  // namespace

int migrate_vma_setup(MigrateVma* m) {
  constexpr unsigned kKnown = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
  if (!m || !m->mm || !m->src || !m->dst || !page_aligned(m->start) || !page_aligned(m->end) ||
      m->start >= m->end || !(m->flags & kKnown) || (m->flags & ~kKnown)) {
    return -EINVAL;
  }
  AddressSpace& mm = *m->mm;
  mm.mmap_assert_locked();
  const Vma* vma = mm.vma_lookup(m->start);
  if (!vma || m->end > vma->end || !vma->is_anonymous() || (vma->flags & (VM_IO | VM_PFNMAP))) {
    return -EINVAL;
  }
  m->npages = (m->end - m->start) >> kPageShift;
  m->cpages = 0;
  for (uint64_t i = 0; i < m->npages; i++) m->src[i] = m->dst[i] = 0;
  {
    MmuInvalidation inv(mm, m->start, m->end, MmuNotifyEvent::kMigrate, m->pgmap_owner);
    collect(*m, *vma);
  }
  // Pages that cannot move go back to where they were now (migrate_device_unmap's restore).
  for (uint64_t i = 0; i < m->npages; i++) {
    if (!(m->src[i] & MIGRATE_PFN_MIGRATE)) continue;
    Folio* folio = src_folio(*m, i);
    if (folio && !page_can_move(*m, folio)) {
      (void)remove_migration_pte(mm, m->start + i * kPageSize, folio, folio);
      if (folio != m->fault_page) folio_unlock(folio);
      folio->put();
      m->src[i] = 0;
      continue;
    }
    m->cpages++;
  }
  return 0;
}

void migrate_vma_pages(MigrateVma* m) {
  AddressSpace& mm = *m->mm;
  mm.mmap_assert_locked();
  const Vma* vma = mm.vma_lookup(m->start);
  std::optional<MmuInvalidation> inv;
  for (uint64_t i = 0; i < m->npages; i++) {
    if (!(m->src[i] & MIGRATE_PFN_MIGRATE)) continue;
    Folio* dst = dst_folio(*m, i);
    if (!dst) {
      m->src[i] &= ~MIGRATE_PFN_MIGRATE;
      continue;
    }
    Folio* src = src_folio(*m, i);
    if (!src) {
      // A hole or the zero page: the new page is inserted into the page table here.
      if (!inv) inv.emplace(mm, m->start + i * kPageSize, m->end, MmuNotifyEvent::kMigrate, m->pgmap_owner);
      if (!vma || !insert_page(*m, *vma, m->start + i * kPageSize, dst)) m->src[i] &= ~MIGRATE_PFN_MIGRATE;
      continue;
    }
    // folio_migrate_flags: the destination inherits what the source was.
    dst->set(kFolioAnon);
    if (src->test(kFolioDirty)) dst->set(kFolioDirty);
  }
}

void migrate_vma_finalize(MigrateVma* m) {
  AddressSpace& mm = *m->mm;
  for (uint64_t i = 0; i < m->npages; i++) {
    Folio* src = src_folio(*m, i);
    Folio* dst = dst_folio(*m, i);
    if (src) {
      const bool moved = (m->src[i] & MIGRATE_PFN_MIGRATE) && dst;
      (void)remove_migration_pte(mm, m->start + i * kPageSize, src, moved ? dst : src);
      if (src != m->fault_page) folio_unlock(src);
      src->put();  // the migration's reference: frees the source when it moved
    }
    if (dst) {
      folio_unlock(dst);
      dst->put();  // the driver's allocation reference; a mapping holds its own
    }
  }
}

}  // namespace gpusvm::mm
