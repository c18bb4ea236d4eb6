// Transparent huge pages: PMD-mapped faults, PMD splits, MADV_COLLAPSE.
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/migrate_internal.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {

// Held: the mmap lock of mm (read or write), the rmap walk lock (shared; exclusive under
// mremap's move). The PMD was a leaf when read locklessly; the split has not begun (a PMD
// migration entry's records are still one PMD record).
GPUSVM_SCHED_POINT(g_sp_split_huge_pmd, "mm.split.huge_pmd_records");

void copy_page_data(Folio* dst, const Folio* src) {
  std::memcpy(dst->data(), src->data(), kPageSize);
}

void split_huge_pmd(AddressSpace& mm, PmdSlot slot, Va haddr) {
  mm.mmap_assert_locked();
  if (!slot.load_lockless().is_leaf()) return;
  // Taken for every kind of leaf: a present PMD may have become a migration entry by the time
  // the PMD lock is held.
  ReadLock walk(&mm.mem()->rmap_walk_lock());
  split_huge_pmd_walk_locked(mm, slot, haddr);
}

void split_huge_pmd_walk_locked(AddressSpace& mm, PmdSlot slot, Va haddr) {
  mm.mmap_assert_locked();
  mm.mem()->rmap_walk_lock().assert_held();
  if (!slot.load_lockless().is_leaf()) return;
  g_sp_split_huge_pmd.reach();
  PhysMem* mem = mm.mem();
  MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
  {
    // A page-cache THP (__split_huge_pmd_locked for !vma_is_anonymous): the PMD is simply
    // zapped - there is no deposited table - and the pages refault through the page cache,
    // by PTEs where the VMA no longer holds the whole 2 MiB. The folio stays whole in the
    // cache.
    Folio* file_put = nullptr;
    {
      SpinLockGuard g(&slot.table->lock);
      const Pmd pmd = slot.table->get(slot.index);
      if (pmd.is_leaf() && pmd.leaf().present() &&
          mem->folio_of(pmd.leaf().pfn())->test(kFolioShmem)) {
        file_put = mem->folio_of(pmd.leaf().pfn());
        if (pmd.leaf().dirty()) file_put->set(kFolioDirty);
        slot.table->set(slot.index, Pmd());
        folio_remove_rmap_pmd(file_put, &mm, haddr);
      }
    }
    if (file_put) {
      file_put->put();  // the mapping's reference; the page cache keeps its own
      mm.stats().thp_split_pmd.add();
      return;
    }
  }
  SpinLockGuard g(&slot.table->lock);
  const Pmd pmd = slot.table->get(slot.index);
  if (!pmd.is_leaf()) return;  // split or zapped by someone else meanwhile
  PteTable* t = slot.table->withdraw(slot.index);
  if (!t) panic("split_huge_pmd: huge leaf without a deposited table");
  const Pte leaf = pmd.leaf();
  {
    // The table is not reachable yet; its lock is taken because set() asserts it.
    SpinLockGuard tg(&t->ptl);
    if (leaf.present() && mem->is_huge_zero_pfn(leaf.pfn())) {
      for (unsigned i = 0; i < kPtrsPerTable; i++) t->set(i, Pte::make_zero(mem->zero_pfn()));
    } else if (leaf.is_migration()) {
      // A PMD migration entry (a migration without our mmap lock: eviction, another
      // process's): 512 PTE migration entries, each with its own record.
      Folio* folio = mem->folio_of(leaf.pfn());
      const Pte pte(leaf.raw() & ~pte_bits::kHuge);
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        t->set(i, pte.with_pfn(leaf.pfn() + i));
        folio_add_migration_item(folio, RmapItem{&mm, haddr + i * kPageSize, i, false, true});
      }
      (void)folio_remove_migration_item(folio, RmapItem{&mm, haddr, 0, true, true});
    } else {
      Folio* folio = mem->folio_of(leaf.pfn());
      // hugetlb pages are mapped by PMDs only: every path that could cut one is refused first.
      if (folio->test(kFolioHugetlb)) panic("split_huge_pmd of a hugetlb page");
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        // Keep every bit but "huge"; each PTE points at its own page of the folio.
        Pte pte(leaf.raw() & ~pte_bits::kHuge);
        t->set(i, pte.with_pfn(leaf.pfn() + i));
        page_add_rmap_pte(folio->page(i), &mm, haddr + i * kPageSize);
      }
      // One reference per PTE mapping instead of one for the PMD mapping.
      folio->get(kPtrsPerTable - 1);
      folio_remove_rmap_pmd(folio, &mm, haddr);
    }
  }
  slot.table->set(slot.index, Pmd::make_table(t));
  mm.stats().thp_split_pmd.add();
}

void split_huge_pmd_address(AddressSpace& mm, Va addr) {
  mm.mmap_assert_locked();
  if (pmd_aligned(addr)) return;
  PmdSlot slot = mm.page_table().pmd_lookup(addr);
  if (slot && slot.load_lockless().is_leaf()) split_huge_pmd(mm, slot, pmd_align_down(addr));
}

VmFault do_huge_pmd_anonymous_page(AddressSpace& mm, Vma& vma, PmdSlot slot, Va va,
                                   bool write, bool* fallback) {
  mm.mmap_assert_locked();
  *fallback = false;
  PhysMem* mem = mm.mem();
  const Va haddr = pmd_align_down(va);
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return VmFault::kOom;

  if (!write && mem->use_zero_page()) {
    {
      SpinLockGuard g(&slot.table->lock);
      if (slot.table->get(slot.index).is_none()) {
        slot.table->set(slot.index, Pmd::make_leaf(Pte::make_zero(mem->huge_zero_folio()->pfn(), true)));
        slot.table->deposit(slot.index, deposit);
        deposit = nullptr;
        mm.stats().faults_huge_zero.add();
      }
    }
    PageTable::free_pte_table(deposit);
    return VmFault::kOk;
  }

  Folio* folio = mem->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!folio) {
    PageTable::free_pte_table(deposit);
    mm.stats().faults_thp_fallback.add();
    *fallback = true;
    return VmFault::kOk;
  }
  folio->set(kFolioAnon);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->set_page(kPageAnonExclusive);
  {
    SpinLockGuard g(&slot.table->lock);
    if (slot.table->get(slot.index).is_none()) {
      Pte leaf = Pte::make_present(folio->pfn(), vma.flags & VM_WRITE, true).mkdirty().mkyoung();
      folio_add_rmap_pmd(folio, &mm, haddr);  // the allocation's reference is the mapping's
      slot.table->set(slot.index, Pmd::make_leaf(leaf));
      slot.table->deposit(slot.index, deposit);
      deposit = nullptr;
      folio = nullptr;
      mm.stats().faults_thp.add();
    }
  }
  PageTable::free_pte_table(deposit);
  if (folio) {
    folio->put();  // lost a race with another fault: retry sees its entry
    return VmFault::kRetry;
  }
  return VmFault::kOk;
}

int collapse_huge_page(AddressSpace& mm, Vma& vma, Va haddr) {
  mm.mmap_assert_write_locked();
  PhysMem* mem = mm.mem();
  PmdSlot slot = mm.page_table().pmd_lookup(haddr);
  if (!slot) return -EINVAL;  // nothing mapped: the kernel reports SCAN_PMD_NULL as -EINVAL
  const Pmd first = slot.load_lockless();
  if (first.is_huge_present()) return 0;  // already PMD-mapped (THP or huge zero)
  if (first.is_huge_soft_leaf()) return -EAGAIN;
  if (!first.is_table()) return -EINVAL;

  // Scan: at least one page present, none busy. The mmap write lock keeps the table stable.
  PteTable* t = first.table();
  std::vector<Folio*> locked;
  auto unlock_all = [&locked] {
    for (Folio* f : locked) folio_unlock(f);
    locked.clear();
  };
  int present = 0;
  {
    SpinLockGuard g(&t->ptl);
    for (unsigned i = 0; i < kPtrsPerTable; i++) {
      Pte pte = t->get(i);
      if (pte.is_none() || pte.special()) continue;
      if (!pte.present()) {
        for (Folio* f : locked) folio_unlock(f);
        return -EAGAIN;  // migration / device entry: busy
      }
      present++;
      Folio* head = mem->folio_of(pte.pfn());
      if (folio_is_zone_device(head)) {
        unlock_all();
        return -EINVAL;  // device-coherent memory is not collapsed (SCAN_PAGE_NULL)
      }
      bool seen = false;
      for (Folio* f : locked) seen |= f == head;
      if (seen) continue;
      if (!folio_trylock(head)) {
        for (Folio* f : locked) folio_unlock(f);
        return -EAGAIN;
      }
      locked.push_back(head);
      // A reference beyond the mappings (a GUP reference or pin, a migration in flight):
      // someone may still access the page after the collapse copied it, so refuse
      // (folio_expected_ref_count != folio_ref_count: SCAN_PAGE_COUNT, -EAGAIN).
      if (head->refcount() != head->total_mapcount()) {
        unlock_all();
        return -EAGAIN;
      }
    }
  }
  if (present == 0) {
    unlock_all();
    return -EINVAL;  // every PTE none or zero page: exceeds max_ptes_none
  }
  Folio* thp = mem->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!thp) {
    unlock_all();
    return -ENOMEM;
  }
  thp->set(kFolioAnon);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) thp->page(i)->set_page(kPageAnonExclusive);

  std::vector<Folio*> puts;
  {
    MmuInvalidation inv(mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
    SpinLockGuard pg(&slot.table->lock);
    {
      SpinLockGuard g(&t->ptl);
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        Pte pte = t->get(i);
        if (pte.is_none()) continue;
        t->set(i, Pte::none());
        if (pte.special()) continue;
        Folio* page = mem->pfn_to_page(pte.pfn());
        std::memcpy(thp->data(i), page->data(), kPageSize);
        page_remove_rmap_pte(page, &mm, haddr + i * kPageSize);
        puts.push_back(page);
      }
    }
    // The emptied PTE table becomes the deposit of the new huge leaf.
    Pte leaf = Pte::make_present(thp->pfn(), vma.flags & VM_WRITE, true).mkdirty().mkyoung();
    folio_add_rmap_pmd(thp, &mm, haddr);
    slot.table->set(slot.index, Pmd::make_leaf(leaf));
    slot.table->deposit(slot.index, t);
  }
  unlock_all();
  for (Folio* p : puts) p->head()->put();
  mm.stats().thp_collapse.add();
  return 0;
}

}  // namespace gpusvm::mm

namespace gpusvm::mm {
namespace {

// Held: the mmap lock of mm, the folio lock of the THP. Step 1 of split_folio_exclusive is
// done: every mapping it found is a migration entry, the freeze has not been tried.
GPUSVM_SCHED_POINT(g_sp_exclusive_unmapped, "mm.split.exclusive_unmapped");
// Held: the mmap lock of mm; the first new folio (the caller's) and every other new folio
// locked. Steps 3 and 4 are done (split, mapped back); step 5 (unlock and wake) is not.
GPUSVM_SCHED_POINT(g_sp_exclusive_remapped, "mm.split.exclusive_remapped");

struct SplitMapping {
  Va va;
  Pte orig;
  uint32_t page;
};

bool page_is_zero(const Folio* page) {
  static const std::byte kZero[kPageSize] = {};
  return std::memcmp(page->data(), kZero, kPageSize) == 0;
}

// Puts the original entry back where our migration entry still is; otherwise (zapped
// meanwhile) the mapping is simply gone. Returns true when it mapped `page` again. mmap lock
// of mm held, no page-table lock.
bool restore_mapping(AddressSpace& mm, const SplitMapping& m, Folio* page, bool use_zero_page)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PmdSlot slot = mm.page_table().pmd_lookup(m.va);
  PteTable* t = slot ? mm.page_table().pte_offset_map_lock(slot) : nullptr;
  if (!t) return false;
  const unsigned i = pte_index(m.va);
  const Pte cur = t->get(i);
  bool mapped = false;
  if (cur.is_migration() && cur.pfn() == m.orig.pfn()) {
    if (use_zero_page) {
      t->set(i, Pte::make_zero(mm.mem()->zero_pfn()));
    } else {
      page->head()->get();
      page_add_rmap_pte(page, &mm, m.va);
      t->set(i, m.orig);
      mapped = true;
    }
  }
  PageTable::pte_unmap_unlock(t);
  return mapped;
}

}  // namespace

int split_folio_exclusive(AddressSpace& mm, Folio* folio) {
  mm.mmap_assert_locked();
  folio_assert_locked(folio);
  PhysMem* mem = mm.mem();
  if (!folio->large() || !folio->is_head() || !folio->test(kFolioAnon) ||
      folio->entire_mapcount() != 0) {
    return -EBUSY;
  }
  std::vector<RmapItem> items = folio_rmap_snapshot(folio);
  Va lo = kTaskSize, hi = 0;
  for (const RmapItem& it : items) {
    if (it.mm != &mm || it.pmd) return -EBUSY;
    lo = std::min(lo, it.va);
    hi = std::max(hi, it.va + kPageSize);
  }
  std::optional<MmuInvalidation> inv;
  if (!items.empty()) inv.emplace(mm, lo, hi, MmuNotifyEvent::kClear);

  // 1. Unmap: every PTE becomes a migration entry, so CPU accesses wait on the folio lock
  //    until step 4 maps the new folios back.
  std::vector<SplitMapping> saved;
  for (const RmapItem& it : items) {
    PmdSlot slot = mm.page_table().pmd_lookup(it.va);
    PteTable* t = mm.page_table().pte_offset_map_lock(slot);
    if (!t) panic("split_folio: rmap item without a PTE table");
    const unsigned i = pte_index(it.va);
    const Pte pte = t->get(i);
    // Present PTEs, device-private PTEs of a device folio (a device PMD split by munmap,
    // mprotect or mremap, collected page by page by a migration) and device-exclusive PTEs.
    if (!(pte.present() || pte.is_device_private() || pte.is_device_exclusive()) ||
        pte.pfn() != folio->pfn() + it.page) {
      // Gone since the snapshot: a COW fault replaced it under this PTL (it needs neither the
      // folio lock nor the mmap write lock) and took its reference and rmap record along.
      PageTable::pte_unmap_unlock(t);
      continue;
    }
    const bool write = pte.present() ? pte.write() : pte.soft_leaf_write();
    Pte mig = Pte::make_soft_leaf(write ? SoftLeafType::kMigrationWrite : SoftLeafType::kMigrationRead, pte.pfn());
    if (pte.young()) mig = mig.swp_mkyoung();
    if (pte.dirty()) mig = mig.swp_mkdirty();
    t->set(i, mig);
    page_remove_rmap_pte(folio->page(it.page), &mm, it.va);
    PageTable::pte_unmap_unlock(t);
    // A device-exclusive page comes back to the CPU as try_to_migrate + remove_migration_pte
    // hand it back: read-only (a write fault reuses it if it is still anon-exclusive), old
    // (the entry was not young) and clean (its dirty bit went to the folio), soft-dirty kept
    // from the entry. The CLEAR invalidation above told the device.
    Pte restore = pte;
    if (pte.is_device_exclusive()) {
      restore = Pte::make_present(pte.pfn(), false);
      if (pte.soft_dirty()) restore = Pte(restore.raw() | pte_bits::kSoftDirty);
    }
    saved.push_back(SplitMapping{it.va, restore, it.page});
  }
  g_sp_exclusive_unmapped.reach();

  // 2. Freeze: the only references left must be the unmapped mappings' and the caller's.
  int expected = static_cast<int>(saved.size()) + 1;
  if (!folio->refcount_.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
    for (const SplitMapping& m : saved) {
      // Step 1 kept each unmapped mapping's reference. A restored mapping took a new one; a
      // mapping zapped meanwhile (MADV_DONTNEED, munmap: a migration entry holds nothing, so
      // the zap dropped none) is gone. Either way the kept reference goes now.
      (void)restore_mapping(mm, m, folio->page(m.page), false);
      folio->put();  // never the last: the caller holds one
    }
    return -EAGAIN;
  }

  // 3. Split the descriptors. Every new folio starts locked (faults on its migration entries
  //    wait for that) with one reference owned by this function; the first keeps the
  //    caller's reference too.
  mem->deferred_split_remove(folio);
  mem->lru_del(folio);  // the new folios join the LRU when they are mapped again
  const uint32_t inherit =
      folio->flags() &
      (kFolioAnon | kFolioDirty | kFolioLazyfree | kFolioYoung | kFolioDevicePrivate | kFolioDeviceCoherent);
  const uint64_t n = folio->nr_pages();
  const Pfn pfn = folio->pfn();
  for (uint64_t i = 0; i < n; i++) {
    Folio* p = mem->pfn_to_page(pfn + i);
    p->order_.store(0, std::memory_order_relaxed);
    p->entire_mapcount_.store(0, std::memory_order_relaxed);
    p->flags_.store(inherit | kFolioLocked, std::memory_order_relaxed);
    p->refcount_.store(i == 0 ? 2 : 1, std::memory_order_relaxed);
    p->head_.store(p, std::memory_order_release);  // publishes the fields above
  }

  // 4. Map back; all-zero subpages become the shared zero page and are freed below.
  for (const SplitMapping& m : saved) {
    Folio* page = mem->pfn_to_page(pfn + m.page);
    // Device memory is never replaced by the zero page: its bytes are the device's.
    (void)restore_mapping(mm, m, page, !folio->pagemap() && page_is_zero(page));
  }
  g_sp_exclusive_remapped.reach();

  if (DevPagemap* pgmap = folio->pagemap()) pgmap->ops()->folio_split(folio);
  // 5. Unlock the new folios but the first (the caller's) and drop this function's references.
  for (uint64_t i = 1; i < n; i++) {
    Folio* p = mem->pfn_to_page(pfn + i);
    p->flags_.fetch_and(~static_cast<uint32_t>(kFolioLocked), std::memory_order_release);
    mem->folio_waitqueue(p).wake_all();
    p->put();
  }
  folio->put();
  mm.stats().thp_split_folio.add();
  return 0;
}

namespace {

// A reference taken by someone else between the migration's pin check and the split (a
// speculative folio_try_get): the freeze fails. Injectable, as it is otherwise hard to hit.
GPUSVM_FAULT_POINT(g_fail_split_freeze, "mm.migrate_split_freeze");

// Held: the folio lock of the THP, the rmap walk lock (write). Its migration records have
// been taken off the folio; no PMD migration entry has been split yet.
GPUSVM_SCHED_POINT(g_sp_migrating_records, "mm.split.migrating_records");
// Held: the locks of the 512 new folios (the migration's), nothing else. The split is done:
// every page is its own folio owning its records; finalize has not run.
GPUSVM_SCHED_POINT(g_sp_migrating_split, "mm.split.migrating_split");

// The PMD migration entry of `folio` at (mm, haddr) becomes 512 PTE migration entries in the
// deposited table. Returns false when the entry is gone (zapped). Rmap walk lock held.
// (The walk lock, not mm's mmap lock, keeps mm's tables alive: mm is any mapper of folio.)
bool split_pmd_migration_entry(AddressSpace& mm, Va haddr, const Folio* folio)
    GPUSVM_REQUIRES(folio->mem()->rmap_walk_lock()) {
  folio->mem()->rmap_walk_lock().assert_write_held();
  PmdSlot slot = mm.page_table().pmd_lookup(haddr);
  if (!slot) return false;
  SpinLockGuard g(&slot.table->lock);
  const Pmd pmd = slot.table->get(slot.index);
  if (!pmd.is_huge_soft_leaf() || !pmd.leaf().is_migration() || pmd.leaf().pfn() != folio->pfn()) {
    return false;
  }
  PteTable* t = slot.table->withdraw(slot.index);
  if (!t) panic("split_pmd_migration_entry: PMD migration entry without a deposited table");
  {
    SpinLockGuard tg(&t->ptl);  // not reachable yet; set() asserts it
    const Pte leaf(pmd.leaf().raw() & ~pte_bits::kHuge);
    for (unsigned i = 0; i < kPtrsPerTable; i++) t->set(i, leaf.with_pfn(folio->pfn() + i));
  }
  slot.table->set(slot.index, Pmd::make_table(t));
  return true;
}

}  // namespace

int split_folio_rmap(AddressSpace& mm, Folio* folio) {
  mm.mmap_assert_locked();
  folio_assert_locked(folio);
  if (!folio->large() || !folio->is_head() || !folio->test(kFolioAnon) || folio->test(kFolioHugetlb)) {
    return -EBUSY;
  }
  // The caller's reference stands in for the migration's: split_migrating_folio then finds
  // exactly the references of a migration holding an unmapped folio.
  if (!try_to_migrate(folio)) {
    remove_migration_ptes(folio, folio);
    return -EBUSY;
  }
  if (int rc = split_migrating_folio(folio, 0)) {
    remove_migration_ptes(folio, folio);  // PMD entries may be PTE entries now: restored alike
    return rc;
  }
  // Map every new folio back where its page was; all but the first are this function's
  // (locked, one reference) to release.
  const uint64_t n = kPagesPerPmd;
  for (uint64_t i = 0; i < n; i++) remove_migration_ptes(folio->page(i), folio->page(i));
  for (uint64_t i = 1; i < n; i++) {
    folio_unlock(folio->page(i));
    folio->page(i)->put();
  }
  mm.stats().thp_split_folio.add();
  return 0;
}

int split_migrating_folio(Folio* folio, int extra_refs) {
  folio_assert_locked(folio);
  if (!folio->large() || !folio->is_head() || folio->mapped()) return -EBUSY;
  PhysMem* mem = folio->mem();
  {
    // Records change owner below: no rmap walker may be in flight, nor anyone who changes a
    // migration record of an entry under its PTL (zap, split_huge_pmd, fork, mremap all hold
    // the walk lock shared for that): the records are in our hands until step 3.
    WriteLock walk(&folio->mem()->rmap_walk_lock());
    // 1. Every PMD migration entry becomes PTE migration entries, its record 512 records.
    std::vector<RmapItem> records;
    std::vector<RmapItem> taken = folio_take_migration_items(folio);
    g_sp_migrating_records.reach();
    for (const RmapItem& it : taken) {
      if (!it.pmd) {
        records.push_back(it);
      } else if (split_pmd_migration_entry(*it.mm, it.va, folio)) {
        for (uint32_t i = 0; i < kPagesPerPmd; i++) {
          records.push_back(RmapItem{it.mm, it.va + i * kPageSize, i, false, true});
        }
      }
    }
    // 2. Freeze: nobody but the migration may hold the folio now.
    int expected = 1 + extra_refs;
    if (g_fail_split_freeze.should_fail() ||
        !folio->refcount_.compare_exchange_strong(expected, 0, std::memory_order_acq_rel)) {
      for (const RmapItem& r : records) folio_add_migration_item(folio, r);
      return -EAGAIN;
    }
    // 3. Split the descriptors: every new folio locked with one reference (the first keeps
    //    the migration's and the extra ones), owning its page's records.
    mem->deferred_split_remove(folio);
    mem->lru_del(folio);  // the new folios join the LRU when they are mapped again
    const uint32_t inherit =
        folio->flags() & (kFolioAnon | kFolioDirty | kFolioYoung | kFolioDevicePrivate | kFolioDeviceCoherent);
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      Folio* p = folio->page(i);
      p->order_.store(0, std::memory_order_relaxed);
      p->entire_mapcount_.store(0, std::memory_order_relaxed);
      p->flags_.store(inherit | kFolioLocked, std::memory_order_relaxed);
      p->refcount_.store(i == 0 ? 1 + extra_refs : 1, std::memory_order_relaxed);
      p->head_.store(p, std::memory_order_release);  // publishes the fields above
    }
    for (RmapItem r : records) {
      Folio* page = mem->pfn_to_page(folio->pfn() + r.page);
      r.page = 0;
      folio_add_migration_item(page, r);
    }
  }
  // The new folios but the first are locked by this thread for the migration, which unlocks
  // them in finalize (lockdep counts folio locks per thread).
  for (uint64_t i = 1; i < kPagesPerPmd; i++) lockdep::acquire_class(&kFolioLockClass);
  if (DevPagemap* pgmap = folio->pagemap()) pgmap->ops()->folio_split(folio);
  mem->stat_split_migrating.add();
  g_sp_migrating_split.reach();
  return 0;
}

}  // namespace gpusvm::mm
