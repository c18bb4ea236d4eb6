// migrate_vma_setup / _pages / _finalize, migrate_hmm_range_setup and migrate_device_*.
//
// Where the collection lives: Linux's migrate_vma_collect_pmd/_hole have no counterpart here.
// migrate_vma_setup collects with the unified walk of hmm.cc (hmm_walk_range with select
// flags: migrate_prepare_pte and migrate_prepare_pmd install the migration entries in the
// same lock hold that reads the entry), so one walk serves hmm_range_fault, REQ_MIGRATE and
// migrate_vma_setup alike. This file holds what follows the walk.
//
// Reference and lock states of a collected source page (what mm::check sees afterwards):
//   collect:  folio locked (unless it is fault_page), +1 reference held by the migration;
//             each mapping replaced by a migration entry: mapcount and the mapping's
//             reference dropped, its rmap record kept as a migration record.
//   unmap:    mappings in other address spaces the same way (try_to_migrate); a page that
//             is still mapped or carries other references is restored now (src = 0).
//   finalize: every migration entry becomes a mapping of the destination (or of the source
//             again), which takes its own reference; the source is unlocked and the
//             migration's reference dropped (freeing it when it moved).
#include "gpusvm/mm/migrate.h"

#include <cerrno>
#include <optional>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/migrate_internal.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// The windows between the steps of a migration, where a driver copies and where everything
// else in the system meets the migration entries (explored by window_explorer_test.cc).
// held: the collected source folios' locks (and for the VMA flavour the caller's mmap read
// lock); setup is done (the pages are unmapped everywhere), the driver copies next
GPUSVM_SCHED_POINT(g_sp_unmapped, "mm.migrate.unmapped");
// held: as above, and the destination folios' locks; the new pages are installed, not mapped
GPUSVM_SCHED_POINT(g_sp_pages_done, "mm.migrate.pages_done");
// held: as above; before each source entry's migration entries are removed (some earlier
// entries of the same migration are finalized already)
GPUSVM_SCHED_POINT(g_sp_finalize_entry, "mm.migrate.finalize_entry");

constexpr unsigned kSelectMask =
    MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT;
constexpr unsigned kWalkFlags = kSelectMask | MIGRATE_VMA_SELECT_COMPOUND;

// Windows of migrate_vma_* where what a walk decided is acted on later, under a fresh lock.
// Held at each: mmap lock (read), the folio locks and references of the collected pages
// (their mappings are migration entries); no page-table lock.
//   collected:   migrate_vma_setup's walk is done, migrate_unmap (try_to_migrate and the pin
//                check) not begun.
//   three_step:  kThreeStep: between the collect walk and the fault walk, and between the
//                fault walk and the second collect walk.
//   insert_hole: migrate_vma_pages is about to insert the destination of an entry the walk
//                saw as a hole or zero page (insert_page / insert_huge_page check again that
//                it still is one); held in addition: the MIGRATE invalidation, the
//                destination folio locks.
GPUSVM_SCHED_POINT(g_sp_collected, "mm.migrate.collected");
GPUSVM_SCHED_POINT(g_sp_three_step, "mm.migrate.three_step");
GPUSVM_SCHED_POINT(g_sp_insert_hole, "mm.migrate.insert_hole");

// The arrays of one migration and what is special about it; shared by the VMA and the
// device-pfn flavours.
struct MigrateArrays {
  PhysMem* mem;
  uint64_t* src;
  uint64_t* dst;
  uint64_t npages;
  Folio* fault_page;
};

Folio* src_folio(const MigrateArrays& a, uint64_t i) {
  if (!(a.src[i] & MIGRATE_PFN_VALID)) return nullptr;
  return a.mem->pfn_to_page(migrate_pfn_to_pfn(a.src[i]))->head();
}

Folio* dst_folio(const MigrateArrays& a, uint64_t i) {
  if (!(a.dst[i] & MIGRATE_PFN_VALID)) return nullptr;
  return a.mem->pfn_to_page(migrate_pfn_to_pfn(a.dst[i]))->head();
}

// Gives a collected page back: its entries map it again, it is unlocked and released.
void release_collected(const MigrateArrays& a, uint64_t i) {
  Folio* folio = src_folio(a, i);
  remove_migration_ptes(folio, folio);
  if (folio != a.fault_page) folio_unlock(folio);
  folio->put();
  a.src[i] = 0;
}

// migrate_device_unmap: every collected page must end up mapped nowhere and referenced only
// by the migration (and the faulting CPU, for fault_page); pages mapped by another process
// are unmapped there through the reverse map. Pages that cannot move go back now. Returns
// the number of pages that may move (holes included).
uint64_t migrate_unmap(const MigrateArrays& a) {
  uint64_t cpages = 0;
  for (uint64_t i = 0; i < a.npages; i++) {
    if (!(a.src[i] & MIGRATE_PFN_MIGRATE)) continue;
    Folio* folio = src_folio(a, i);
    if (folio) {
      const int expected = 1 + (folio == a.fault_page ? 1 : 0);
      if ((folio->mapped() && !try_to_migrate(folio)) || folio->refcount() != expected) {
        release_collected(a, i);
        continue;
      }
    }
    cpages += (a.src[i] & MIGRATE_PFN_COMPOUND) ? kPagesPerPmd : 1;
  }
  return cpages;
}

// folio_migrate_flags: the destination inherits what the source was.
void migrate_flags(Folio* dst, const Folio* src) {
  dst->set(kFolioAnon);
  if (src->test(kFolioDirty)) dst->set(kFolioDirty);
}

// A compound source whose driver provided 4 KiB destinations: split the (unmapped) source
// folio so that each page migrates on its own (seed 003). src[i..i+511] then describe the
// 512 new folios. Returns false if the split failed (nothing migrates then).
bool split_compound_src(const MigrateArrays& a, uint64_t i) {
  Folio* src = src_folio(a, i);
  const uint64_t word = a.src[i];
  if (i + kPagesPerPmd > a.npages || split_migrating_folio(src, src == a.fault_page ? 1 : 0) != 0) {
    return false;
  }
  for (uint64_t j = 0; j < kPagesPerPmd; j++) {
    a.src[i + j] = migrate_pfn(src->pfn() + j) | MIGRATE_PFN_MIGRATE | (word & MIGRATE_PFN_WRITE);
  }
  return true;
}

// migrate_vma_pages' commit for entry i, which has a source page. Returns how many entries
// it covered. `vma` is false for migrate_device_pages: without a VMA a compound source with
// small destinations is not split but left where it is, MIGRATE and COMPOUND cleared (as
// __migrate_device_pages does when migrate is NULL); the evicting caller must provide compound
// destinations.
uint64_t commit_page(const MigrateArrays& a, uint64_t i, bool vma) {
  Folio* dst = dst_folio(a, i);
  Folio* src = src_folio(a, i);
  const bool compound = a.src[i] & MIGRATE_PFN_COMPOUND;
  if (!dst) {
    a.src[i] &= ~MIGRATE_PFN_MIGRATE;
    return 1;
  }
  if (compound && !(a.dst[i] & MIGRATE_PFN_COMPOUND)) {
    if (!vma) {
      a.src[i] &= ~(MIGRATE_PFN_MIGRATE | MIGRATE_PFN_COMPOUND);
      return kPagesPerPmd;
    }
    if (!split_compound_src(a, i)) {
      a.src[i] &= ~MIGRATE_PFN_MIGRATE;
      return kPagesPerPmd;
    }
    for (uint64_t j = 0; j < kPagesPerPmd; j++) {
      if (Folio* d = dst_folio(a, i + j); d && !d->large()) {
        migrate_flags(d, src_folio(a, i + j));
      } else {
        a.src[i + j] &= ~MIGRATE_PFN_MIGRATE;
      }
    }
    return kPagesPerPmd;
  }
  if (compound != (dst->order() == kPmdOrder)) {
    a.src[i] &= ~MIGRATE_PFN_MIGRATE;  // a destination of the wrong size: refused
    return 1;
  }
  migrate_flags(dst, src);
  return compound ? kPagesPerPmd : 1;
}

void finalize(const MigrateArrays& a) {
  for (uint64_t i = 0; i < a.npages; i++) {
    Folio* src = src_folio(a, i);
    Folio* dst = dst_folio(a, i);
    if (src) {
      g_sp_finalize_entry.reach();
      const bool moved = (a.src[i] & MIGRATE_PFN_MIGRATE) && dst;
      remove_migration_ptes(src, moved ? dst : src);
      if (src != a.fault_page) folio_unlock(src);
      src->put();  // the migration's reference: frees the source when it moved
    }
    if (dst) {
      folio_unlock(dst);
      dst->put();  // the driver's allocation reference; the mappings hold their own
    }
  }
}

// The entry at va for a hole or zero page: replaced by the new page (migrate_vma_insert_page).
bool insert_page(MigrateVma& m, const Vma& vma, Va va, Folio* dst) GPUSVM_REQUIRES_SHARED(m.mm->mmap_lock()) {
  m.mm->mmap_assert_locked();
  Result<PmdSlot> slot = m.mm->page_table().pmd_alloc(va);
  if (!slot || m.mm->page_table().pte_alloc(*slot) != 0) return false;
  PteTable* t = m.mm->page_table().pte_offset_map_lock(*slot);
  if (!t) return false;
  const unsigned i = pte_index(va);
  const Pte cur = t->get(i);
  bool ok = false;
  if (cur.is_none() || (cur.special() && m.mm->mem()->is_zero_pfn(cur.pfn()))) {
    const bool write = vma.flags & VM_WRITE;
    Pte e = folio_is_device_private(dst)
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

// A 2 MiB hole (or huge zero folio) receives one 2 MiB destination as a PMD mapping
// (migrate_vma_insert_huge_pmd_page). Fails if the PMD was populated meanwhile.
bool insert_huge_page(MigrateVma& m, const Vma& vma, Va haddr, Folio* dst)
    GPUSVM_REQUIRES_SHARED(m.mm->mmap_lock()) {
  m.mm->mmap_assert_locked();
  Result<PmdSlot> slot = m.mm->page_table().pmd_alloc(haddr);
  if (!slot) return false;
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return false;
  bool ok = false;
  {
    SpinLockGuard g(&slot->table->lock);
    const Pmd cur = slot->table->get(slot->index);
    const bool huge_zero = cur.is_huge_present() && m.mm->mem()->is_huge_zero_pfn(cur.leaf().pfn());
    if (cur.is_none() || huge_zero) {
      const bool write = vma.flags & VM_WRITE;
      Pte e = folio_is_device_private(dst)
                  ? Pte::make_soft_leaf(write ? SoftLeafType::kDevicePrivateWrite
                                              : SoftLeafType::kDevicePrivateRead, dst->pfn(), true)
                  : Pte::make_present(dst->pfn(), write, true).mkdirty().mkyoung();
      dst->set(kFolioAnon);
      for (uint64_t i = 0; i < kPagesPerPmd; i++) dst->page(i)->set_page(kPageAnonExclusive);
      dst->get();
      folio_add_rmap_pmd(dst, m.mm, haddr);
      slot->table->set(slot->index, Pmd::make_leaf(e));
      if (!huge_zero) {
        slot->table->deposit(slot->index, deposit);  // the huge zero PMD has one already
        deposit = nullptr;
      }
      ok = true;
    }
  }
  PageTable::free_pte_table(deposit);
  return ok;
}

// A hole entry i of migrate_vma_pages: insert the destination(s). Returns how many entries
// it covered.
uint64_t insert_hole(MigrateVma& m, const Vma* vma, uint64_t i) GPUSVM_REQUIRES_SHARED(m.mm->mmap_lock()) {
  m.mm->mmap_assert_locked();
  const MigrateArrays a{m.mm->mem(), m.src, m.dst, m.npages, m.fault_page};
  const Va va = m.start + i * kPageSize;
  Folio* dst = dst_folio(a, i);
  g_sp_insert_hole.reach();
  if (!(m.src[i] & MIGRATE_PFN_COMPOUND)) {
    if (!dst || dst->large() || !vma || !insert_page(m, *vma, va, dst)) m.src[i] &= ~MIGRATE_PFN_MIGRATE;
    return 1;
  }
  if (!dst) {  // the driver takes none of it
    m.src[i] &= ~MIGRATE_PFN_MIGRATE;
    return kPagesPerPmd;
  }
  if (m.dst[i] & MIGRATE_PFN_COMPOUND) {
    if (!vma || dst->order() != kPmdOrder || !insert_huge_page(m, *vma, va, dst)) {
      m.src[i] &= ~MIGRATE_PFN_MIGRATE;
    }
    return kPagesPerPmd;
  }
  // 512 small destinations: the huge zero folio (if that is what is there) is split first.
  if (PmdSlot slot = m.mm->page_table().pmd_lookup(va); slot && slot.load_lockless().is_leaf()) {
    split_huge_pmd(*m.mm, slot, va);
  }
  for (uint64_t j = 0; j < kPagesPerPmd && i + j < m.npages; j++) {
    m.src[i + j] = MIGRATE_PFN_MIGRATE;
    Folio* d = dst_folio(a, i + j);
    if (!d || d->large() || !vma || !insert_page(m, *vma, va + j * kPageSize, d)) {
      m.src[i + j] &= ~MIGRATE_PFN_MIGRATE;
    }
  }
  return kPagesPerPmd;
}

// migrate_hmm_range_setup's conversion: VALID|MIGRATE words become src words (in place when
// hmm_pfns == src).
void hmm_pfns_to_src(const uint64_t* hmm_pfns, uint64_t* src, uint64_t npages) {
  for (uint64_t i = 0; i < npages; i++) {
    const uint64_t w = hmm_pfns[i];
    if ((w & (HMM_PFN_VALID | HMM_PFN_MIGRATE)) != (HMM_PFN_VALID | HMM_PFN_MIGRATE)) {
      src[i] = 0;
    } else if (!hmm_pfn_migrate_has_source(w)) {
      src[i] = MIGRATE_PFN_MIGRATE | ((w & HMM_PFN_COMPOUND) ? MIGRATE_PFN_COMPOUND : 0);
    } else {
      src[i] = migrate_pfn(hmm_pfn_to_pfn(w)) | MIGRATE_PFN_MIGRATE |
               ((w & HMM_PFN_COMPOUND) ? MIGRATE_PFN_COMPOUND : 0) |
               ((w & HMM_PFN_WRITE) ? MIGRATE_PFN_WRITE : 0);
    }
  }
}

// The collection walk(s) of migrate_vma_setup, by walk mode (see MigrateWalkMode). The
// result is left in m.src as hmm words.
int collect(MigrateVma& m, unsigned select) GPUSVM_REQUIRES_SHARED(m.mm->mmap_lock()) {
  m.mm->mmap_assert_locked();
  AddressSpace& mm = *m.mm;
  mm.mmap_assert_locked();  // the same lock, named through the alias for the analysis
  const bool fault = m.flags & MIGRATE_VMA_FAULT;
  HmmRange r{.start = m.start, .end = m.end, .hmm_pfns = m.src,
             .dev_private_owner = m.pgmap_owner, .migrate = &m};
  if (!fault || m.walk_mode == MigrateWalkMode::kUnified) {
    r.default_flags = fault ? HMM_PFN_REQ_FAULT : 0;
    return hmm_walk_range(mm, &r, select, m.fault_page, false);
  }
  if (m.walk_mode == MigrateWalkMode::kTwoStep) {
    // hmm_range_fault first, then migrate_vma_setup's own walk.
    r.default_flags = HMM_PFN_REQ_FAULT;
    if (int rc = hmm_walk_range(mm, &r, 0, nullptr, false)) return rc;
    for (uint64_t i = 0; i < m.npages; i++) m.src[i] = 0;
    r.default_flags = 0;
    return hmm_walk_range(mm, &r, select, m.fault_page, false);
  }
  // Three steps: collect, fault what was not taken, collect that again.
  r.default_flags = 0;
  if (int rc = hmm_walk_range(mm, &r, select, m.fault_page, false)) return rc;
  g_sp_three_step.reach();
  std::vector<uint64_t> again(m.npages);
  for (uint64_t i = 0; i < m.npages; i++) again[i] = (m.src[i] & HMM_PFN_MIGRATE) ? 0 : HMM_PFN_REQ_FAULT;
  HmmRange rf{.start = m.start, .end = m.end, .hmm_pfns = again.data(),
              .pfn_flags_mask = HMM_PFN_REQ_FAULT, .dev_private_owner = m.pgmap_owner};
  int rc = hmm_walk_range(mm, &rf, 0, nullptr, /*no_wait=*/true);  // holds step 1's locks
  if (rc == 0) {
    g_sp_three_step.reach();
    for (uint64_t& w : again) w = 0;
    HmmRange rm{.start = m.start, .end = m.end, .hmm_pfns = again.data(),
                .dev_private_owner = m.pgmap_owner, .migrate = &m};
    rc = hmm_walk_range(mm, &rm, select, m.fault_page, false);
  }
  if (rc != 0) {
    // Give back what the first walk took.
    hmm_pfns_to_src(m.src, m.src, m.npages);
    MigrateArrays a{mm.mem(), m.src, m.dst, m.npages, m.fault_page};
    for (uint64_t i = 0; i < m.npages; i++) {
      if (src_folio(a, i)) release_collected(a, i);
    }
    return rc;
  }
  for (uint64_t i = 0; i < m.npages; i++) {
    if (!(m.src[i] & HMM_PFN_MIGRATE) && (again[i] & HMM_PFN_MIGRATE)) m.src[i] = again[i];
  }
  return 0;
}

// Collects one device folio for eviction (migrate_device_range's per-pfn step).
uint64_t collect_device_pfn(PhysMem* mem, Pfn pfn) {
  Folio* page = mem->pfn_to_page(pfn);
  if (!page || !folio_is_zone_device(page)) return 0;
  Folio* folio = page->head();
  if (folio != page || !folio->try_get()) return 0;  // free (or a tail page)
  if (!folio_trylock(folio)) {
    folio->put();
    return 0;
  }
  return migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | (folio->large() ? MIGRATE_PFN_COMPOUND : 0);
}

}  // namespace

int migrate_vma_setup(MigrateVma* m) {
  constexpr unsigned kKnown = kWalkFlags | MIGRATE_VMA_FAULT;
  if (!m || !m->mm || !m->src || !m->dst || !page_aligned(m->start) || !page_aligned(m->end) ||
      m->start >= m->end || !(m->flags & kSelectMask) || (m->flags & ~kKnown)) {
    return -EINVAL;
  }
  if (m->fault_page && (!folio_is_device_private(m->fault_page) || !folio_test_locked(m->fault_page))) {
    return -EINVAL;
  }
  AddressSpace& mm = *m->mm;
  m->mm->mmap_assert_locked();  // named through m, as collect's and insert_hole's contracts
  const Vma* vma = m->mm->vma_lookup(m->start);
  // As Linux: every VMA but hugetlb and VM_SPECIAL ones (VM_IO, VM_PFNMAP, VM_MIXEDMAP). A file
  // or shmem VMA contributes only its anonymous pages (the COW copies of a private mapping);
  // its holes and page-cache pages are not collected (hole_value, migrate_prepare_pte).
  if (!vma || m->end > vma->end || vma->is_hugetlb() || (vma->flags & VM_SPECIAL)) {
    return -EINVAL;
  }
  m->npages = (m->end - m->start) >> kPageShift;
  m->cpages = 0;
  for (uint64_t i = 0; i < m->npages; i++) m->src[i] = m->dst[i] = 0;
  if (int rc = collect(*m, m->flags & kWalkFlags)) {
    for (uint64_t i = 0; i < m->npages; i++) m->src[i] = 0;
    return rc;
  }
  hmm_pfns_to_src(m->src, m->src, m->npages);
  g_sp_collected.reach();
  m->cpages = migrate_unmap(MigrateArrays{mm.mem(), m->src, m->dst, m->npages, m->fault_page});
  g_sp_unmapped.reach();
  return 0;
}

int migrate_hmm_range_setup(HmmRange* range) {
  if (!range || !range->notifier || !range->migrate || !range->hmm_pfns ||
      !(range->default_flags & HMM_PFN_REQ_MIGRATE)) {
    return -EINVAL;
  }
  MigrateVma& m = *range->migrate;
  m.mm = range->notifier->mm();
  m.mm->mmap_assert_locked();
  m.start = range->start;
  m.end = range->end;
  m.npages = (m.end - m.start) >> kPageShift;
  for (uint64_t i = 0; i < m.npages; i++) m.dst[i] = 0;
  hmm_pfns_to_src(range->hmm_pfns, m.src, m.npages);
  m.cpages = migrate_unmap(MigrateArrays{m.mm->mem(), m.src, m.dst, m.npages, m.fault_page});
  g_sp_unmapped.reach();
  return 0;
}

void migrate_vma_pages(MigrateVma* m) {
  AddressSpace& mm = *m->mm;
  m->mm->mmap_assert_locked();  // named through m, as collect's and insert_hole's contracts
  const Vma* vma = m->mm->vma_lookup(m->start);
  const MigrateArrays a{mm.mem(), m->src, m->dst, m->npages, m->fault_page};
  std::optional<MmuInvalidation> inv;
  for (uint64_t i = 0; i < m->npages;) {
    if (!(m->src[i] & MIGRATE_PFN_MIGRATE)) {
      i++;
      continue;
    }
    if (!src_folio(a, i)) {
      // A hole or the zero page: the new page is inserted into the page table here.
      if (!inv) inv.emplace(mm, m->start + i * kPageSize, m->end, MmuNotifyEvent::kMigrate, m->pgmap_owner);
      i += insert_hole(*m, vma, i);
      continue;
    }
    i += commit_page(a, i, /*vma=*/true);
  }
  g_sp_pages_done.reach();
}

void migrate_vma_finalize(MigrateVma* m) {
  finalize(MigrateArrays{m->mm->mem(), m->src, m->dst, m->npages, m->fault_page});
}

int migrate_device_pfns(PhysMem* mem, uint64_t* src_pfns, uint64_t npages) {
  if (!mem || !src_pfns) return -EINVAL;
  for (uint64_t i = 0; i < npages; i++) src_pfns[i] = collect_device_pfn(mem, src_pfns[i]);
  (void)migrate_unmap(MigrateArrays{mem, src_pfns, nullptr, npages, nullptr});
  g_sp_unmapped.reach();
  return 0;
}

int migrate_device_range(PhysMem* mem, uint64_t* src_pfns, Pfn start, uint64_t npages) {
  if (!mem || !src_pfns || npages == 0) return -EINVAL;
  DevPagemap* pgmap = mem->pfn_to_pagemap(start);
  if (!pgmap || !pgmap->contains(start + npages - 1)) return -EINVAL;
  for (uint64_t i = 0; i < npages; i++) src_pfns[i] = start + i;
  return migrate_device_pfns(mem, src_pfns, npages);
}

void migrate_device_pages(PhysMem* mem, uint64_t* src_pfns, uint64_t* dst_pfns, uint64_t npages) {
  const MigrateArrays a{mem, src_pfns, dst_pfns, npages, nullptr};
  for (uint64_t i = 0; i < npages;) {
    if (!(src_pfns[i] & MIGRATE_PFN_MIGRATE)) {
      i++;
    } else if (!src_folio(a, i)) {
      src_pfns[i++] &= ~MIGRATE_PFN_MIGRATE;  // nothing to insert without a VMA
    } else {
      i += commit_page(a, i, /*vma=*/false);
    }
  }
  g_sp_pages_done.reach();
}

void migrate_device_finalize(PhysMem* mem, uint64_t* src_pfns, uint64_t* dst_pfns, uint64_t npages) {
  finalize(MigrateArrays{mem, src_pfns, dst_pfns, npages, nullptr});
}

int migrate_device_coherent_folio(Folio* folio) {
  if (!folio) return -EINVAL;
  if (!folio_is_device_coherent(folio) || !folio->is_head()) {
    folio->put();
    return -EINVAL;
  }
  PhysMem* mem = folio->mem();
  folio_lock(folio);
  // No VMA and no walk: the caller's reference is the migration's, as collect would take. A
  // 2 MiB folio moves whole into a THP (Linux warns and does not handle it; its PMD and PTE
  // mappings all become migration entries and map the THP again).
  const bool large = folio->large();
  uint64_t src = migrate_pfn(folio->pfn()) | MIGRATE_PFN_MIGRATE | (large ? MIGRATE_PFN_COMPOUND : 0);
  uint64_t dst = 0;
  (void)migrate_unmap(MigrateArrays{mem, &src, &dst, 1, nullptr});
  if (!(src & MIGRATE_PFN_MIGRATE)) return -EBUSY;  // given back: unlocked and released
  Folio* copy = mem->folio_alloc(folio->order(), /*zero=*/false);
  if (copy) {
    folio_lock(copy);
    for (uint64_t i = 0; i < folio->nr_pages(); i++) copy_page_data(copy->page(i), folio->page(i));
    dst = migrate_pfn(copy->pfn()) | (large ? MIGRATE_PFN_COMPOUND : 0);
  }
  migrate_device_pages(mem, &src, &dst, 1);
  const bool moved = src & MIGRATE_PFN_MIGRATE;
  migrate_device_finalize(mem, &src, &dst, 1);
  return moved ? 0 : copy ? -EBUSY : -ENOMEM;
}

}  // namespace gpusvm::mm
