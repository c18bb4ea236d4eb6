// fork: copy the address space with copy-on-write sharing of private pages.
#include <cerrno>
#include <chrono>
#include <string>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/log.h"
#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {
namespace {

// Makes the restore of a device-exclusive entry find its folio busy (retry path).
GPUSVM_FAULT_POINT(g_fail_fork_exclusive_trylock, "mm.fork.exclusive_trylock");

// What copy_one_pte decided for an entry it could not copy under the current locks.
enum class CopyStop {
  kNone,  // copied
  kBusy,  // a device-exclusive entry whose folio is locked: wait for it and retry
};

struct CopyCtx {
  AddressSpace& src_mm;
  AddressSpace& dst_mm;
  const Vma& vma;  // the VMA being copied (the flags are the parent's)
  bool cow;
  Folio* busy = nullptr;  // kBusy: the folio to wait for, referenced
};

// copy_present_pte: the child shares the page; a COW mapping write-protects both sides.
void copy_present_pte(CopyCtx& c, Va va, Pte src, Pte* src_out, Pte* dst_out) {
  if (src.special()) return;  // zero page: shared freely
  Folio* page = c.dst_mm.mem()->pfn_to_page(src.pfn());
  Folio* head = page->head();
  head->get();
  page_add_rmap_pte(page, &c.dst_mm, va);
  if (head->test(kFolioAnon)) page->clear_page(kPageAnonExclusive);
  if (c.cow && src.write()) {
    *src_out = src.wrprotect();
    *dst_out = src.wrprotect();
  }
  *dst_out = dst_out->mkold();
}

// A migration entry (copy_nonpresent_pte): the child gets a copy that, like the parent's
// entry, holds no mapcount or reference. In a COW mapping a writable or read-exclusive entry
// becomes a read entry on both sides (the page is shared from now on, so the migration
// restores both read-only and neither anon-exclusive); young/dirty/soft-dirty are kept. The
// copy gets a migration record in the folio's reverse map, so remove_migration_ptes finds it
// when the migration ends, as Linux finds it through the child's anon_vma chain; a zap of the
// copy removes the record, mremap moves it. Only a migration that runs without the parent's
// mmap lock (migrate_device_*, or a driver that dropped it between setup and finalize) can
// leave an entry for fork to meet: fork holds the mmap lock for write.
// Held: both mmap locks (write), both PTLs, the rmap walk lock (shared); the analysis cannot
// name them through CopyCtx's references, so only the walk lock (which the record needs) is
// asserted.
void copy_migration_entry(CopyCtx& c, Va va, Pte src, Pte* src_out, Pte* dst_out) {
  c.dst_mm.mem()->rmap_walk_lock().assert_held();
  if (c.cow && src.soft_leaf_type() != SoftLeafType::kMigrationRead) {
    const uint64_t type = static_cast<uint64_t>(SoftLeafType::kMigrationRead) << pte_bits::kTypeShift;
    const Pte ro((src.raw() & ~pte_bits::kTypeMask) | type);
    *src_out = ro;
    *dst_out = ro;
  }
  Folio* page = c.dst_mm.mem()->pfn_to_page(src.pfn());
  folio_add_migration_item(
      page, RmapItem{&c.dst_mm, va, static_cast<uint32_t>(page->page_index()), false, true});
}

// copy_present_pte / copy_nonpresent_pte for one entry. Both PTLs held (the parent's is
// `ts`). Sets the entries to store in the parent and the child, or says why it stopped.
CopyStop copy_one_pte(CopyCtx& c, PteTable* ts, Va va, Pte src, Pte* src_out, Pte* dst_out)
    GPUSVM_REQUIRES(ts->ptl) {
  ts->ptl.assert_held();
  PhysMem* mem = c.dst_mm.mem();
  *src_out = src;
  *dst_out = src;
  if (src.present()) {
    copy_present_pte(c, va, src, src_out, dst_out);
    return CopyStop::kNone;
  }
  if (src.is_device_private()) {
    // Device-private pages are shared read-only after fork, as in Linux: a write by either
    // side faults and migrates the page back.
    Folio* page = mem->pfn_to_page(src.pfn());
    page->head()->get();
    page_add_rmap_pte(page, &c.dst_mm, va);
    page->clear_page(kPageAnonExclusive);
    if (c.cow && src.soft_leaf_write()) {
      Pte ro = Pte::make_soft_leaf(SoftLeafType::kDevicePrivateRead, src.pfn());
      *src_out = ro;
      *dst_out = ro;
    }
    return CopyStop::kNone;
  }
  if (src.is_migration()) {
    copy_migration_entry(c, va, src, src_out, dst_out);
    return CopyStop::kNone;
  }
  if (src.is_swap()) {
    // copy_nonpresent_pte: both processes name the slot now (swap_duplicate). A swap-in by
    // either side then shares the folio read-only through the swap cache.
    mem->swap().duplicate(src.swap_slot());
    return CopyStop::kNone;
  }
  if (src.is_device_exclusive()) {
    // Seed 004 rule 9: give the page back to the parent's CPU mapping first (the device
    // learns of it through fork's PROTECTION_PAGE invalidation), then copy it as present.
    // The folio lock can only be tried here, under the PTLs.
    Folio* page = mem->pfn_to_page(src.pfn());
    Folio* folio = page->head();
    if (g_fail_fork_exclusive_trylock.should_fail() || !folio_trylock(folio)) {
      folio->get();  // the entry's reference keeps it alive until we get ours
      c.busy = folio;
      return CopyStop::kBusy;
    }
    restore_exclusive_pte_locked(c.src_mm, c.vma, ts, va, src, page);
    folio_unlock(folio);
    const Pte present = ts->get(pte_index(va));
    *src_out = present;
    *dst_out = present;
    copy_present_pte(c, va, present, src_out, dst_out);
    return CopyStop::kNone;
  }
  panic("fork: unknown PTE " + std::to_string(src.raw()));
}

// Copies the PTEs of [start, end) (inside one PTE table). A device-exclusive entry whose folio
// is locked cannot be restored under the PTLs: both are dropped, the folio is waited for
// (bounded by hang_timeout()) and the copy resumes at that entry - everything before it is
// copied, nothing after it was touched.
int copy_pte_range(AddressSpace& src_mm, AddressSpace& dst_mm, const Vma& vma, PmdSlot src_slot,
                   Va start, Va end, bool cow)
    GPUSVM_REQUIRES(src_mm.mmap_lock(), dst_mm.mmap_lock()) {
  src_mm.mmap_assert_write_locked();
  dst_mm.mmap_assert_write_locked();
  Result<PmdSlot> dst_slot = dst_mm.page_table().pmd_alloc(start);
  if (!dst_slot) return dst_slot.error();
  if (dst_mm.page_table().pte_alloc(*dst_slot) != 0) return -ENOMEM;
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (Va va = start; va < end;) {
    CopyCtx c{src_mm, dst_mm, vma, cow};
    CopyStop stop = CopyStop::kNone;
    {
      // Migration records are added here (copied migration entries): a split during
      // migration, which moves records between folios, must not run meanwhile. Not held
      // across the wait below (that split may be what holds the folio).
      ReadLock walk(&src_mm.mem()->rmap_walk_lock());
      PteTable* ts = src_mm.page_table().pte_offset_map_lock(src_slot, 0);
      if (!ts) return 0;
      ts->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
      PteTable* td = dst_slot->load_lockless().table();
      td->ptl.lock_nested(1);
      for (; va < end; va += kPageSize) {
        const unsigned i = pte_index(va);
        const Pte pte = ts->get(i);
        if (pte.is_none()) continue;
        Pte s, d;
        stop = copy_one_pte(c, ts, va, pte, &s, &d);
        if (stop != CopyStop::kNone) break;
        if (s != ts->get(i)) ts->set(i, s);
        td->set(i, d);
      }
      td->ptl.unlock();
      PageTable::pte_unmap_unlock(ts);
    }
    if (stop == CopyStop::kBusy) {
      const bool unlocked = folio_wait_unlocked(c.busy, hang_timeout());
      c.busy->put();
      if (!unlocked || std::chrono::steady_clock::now() > deadline) {
        log::get().error("fork: device-exclusive page at {:#x} stayed locked for {} ms", va,
                         hang_timeout().count());
        return -EBUSY;
      }
    }
  }
  return 0;
}

// The child's copy of the huge leaf `leaf` at haddr (copy_huge_pmd / copy_huge_non_present_pmd);
// *src_out is what the parent keeps. Both PMD locks held (not nameable here), and the rmap walk
// lock (shared: the child's migration record).
//  - present THP: shared, COW write-protects both sides; the huge zero folio is shared freely;
//  - device-private PMD: shared read-only, like the PTE case (+1 reference, entire mapcount
//    and rmap item for the child);
//  - PMD migration entry: copied as a read entry on both sides with a PMD migration record for
//    the child, like the PTE case (no reference, no mapcount).
Pte copy_huge_leaf(PhysMem* mem, AddressSpace& dst_mm, Va haddr, bool cow, Pte leaf, Pte* src_out)
    GPUSVM_REQUIRES_SHARED(mem->rmap_walk_lock()) {
  mem->rmap_walk_lock().assert_held();
  *src_out = leaf;
  if (leaf.present() && mem->is_huge_zero_pfn(leaf.pfn())) return leaf.mkold();
  Folio* folio = mem->folio_of(leaf.pfn());
  if (leaf.is_migration()) {
    if (cow && leaf.soft_leaf_type() != SoftLeafType::kMigrationRead) {
      const uint64_t type = static_cast<uint64_t>(SoftLeafType::kMigrationRead) << pte_bits::kTypeShift;
      *src_out = Pte((leaf.raw() & ~pte_bits::kTypeMask) | type);
    }
    folio_add_migration_item(folio, RmapItem{&dst_mm, haddr, 0, true, true});
    return *src_out;
  }
  folio->get();
  folio_add_rmap_pmd(folio, &dst_mm, haddr);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->clear_page(kPageAnonExclusive);
  if (leaf.is_device_private()) {
    if (cow && leaf.soft_leaf_write()) {
      Pte ro = Pte::make_soft_leaf(SoftLeafType::kDevicePrivateRead, leaf.pfn(), /*huge=*/true);
      if (leaf.soft_dirty()) ro = ro.swp_mksoft_dirty();
      *src_out = ro;
    }
    return *src_out;
  }
  if (cow && leaf.write()) *src_out = leaf.wrprotect();
  return src_out->mkold();
}

// copy_huge_pmd. Returns 1 when the PMD was not a leaf any more (copy its PTEs instead).
int copy_huge_pmd(AddressSpace& src_mm, AddressSpace& dst_mm, PmdSlot src_slot, Va haddr,
                  bool cow) GPUSVM_REQUIRES(src_mm.mmap_lock(), dst_mm.mmap_lock())
    GPUSVM_REQUIRES_SHARED(src_mm.mem()->rmap_walk_lock()) {
  src_mm.mmap_assert_write_locked();
  dst_mm.mmap_assert_write_locked();
  Result<PmdSlot> dst_slot = dst_mm.page_table().pmd_alloc(haddr);
  if (!dst_slot) return dst_slot.error();
  PteTable* deposit = PageTable::alloc_pte_table();
  if (!deposit) return -ENOMEM;
  int rc = 0;
  {
    SpinLockGuard gs(&src_slot.table->lock);
    SpinLockGuard gd(&dst_slot->table->lock, 1);
    const Pmd pmd = src_slot.table->get(src_slot.index);
    if (!pmd.is_leaf()) {
      rc = 1;
    } else if (pmd.leaf().present() && !src_mm.mem()->is_huge_zero_pfn(pmd.leaf().pfn()) &&
               src_mm.mem()->folio_of(pmd.leaf().pfn())->test(kFolioShmem)) {
      // A page-cache THP is not copied: the child refaults it from the page cache
      // (copy_huge_pmd's "skip if can be re-fill on fault" for file-backed PMDs).
    } else {
      Pte keep;
      const Pte child = copy_huge_leaf(src_mm.mem(), dst_mm, haddr, cow, pmd.leaf(), &keep);
      if (keep != pmd.leaf()) src_slot.table->set(src_slot.index, Pmd::make_leaf(keep));
      dst_slot->table->set(dst_slot->index, Pmd::make_leaf(child));
      dst_slot->table->deposit(dst_slot->index, deposit);
      deposit = nullptr;
    }
  }
  PageTable::free_pte_table(deposit);
  return rc;
}

int copy_page_range(AddressSpace& src_mm, AddressSpace& dst_mm, const Vma& vma)
    GPUSVM_REQUIRES(src_mm.mmap_lock(), dst_mm.mmap_lock()) {
  src_mm.mmap_assert_write_locked();
  dst_mm.mmap_assert_write_locked();
  // is_cow_mapping: private mappings that may become writable share pages copy-on-write.
  const bool cow = !vma.is_shared() && (vma.flags & VM_MAYWRITE);
  PageTable& pt = src_mm.page_table();
  for (Va addr = vma.start; addr < vma.end;) {
    const Va haddr = pmd_align_down(addr);
    const Va next = std::min(haddr + kPmdSize, vma.end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (slot) {
      Pmd pmd = slot.load_lockless();
      int rc = 1;
      if (pmd.is_leaf()) {
        ReadLock walk(&src_mm.mem()->rmap_walk_lock());  // see copy_pte_range
        rc = copy_huge_pmd(src_mm, dst_mm, slot, haddr, cow);
      }
      if (rc < 0) return rc;
      if (rc == 1 && slot.load_lockless().is_table()) {
        rc = copy_pte_range(src_mm, dst_mm, vma, slot, addr, next, cow);
        if (rc) return rc;
      }
    }
    addr = next;
  }
  return 0;
}

}  // namespace

Result<std::unique_ptr<AddressSpace>> AddressSpace::fork() {
  Result<std::unique_ptr<AddressSpace>> child_r = create(mem_);
  if (!child_r) return child_r;
  std::unique_ptr<AddressSpace> child = std::move(*child_r);
  AddressSpace& c = *child;
  int rc = 0;
  {
    WriteLock g(&mmap_lock_);
    if (exited()) return Err{-EINVAL};
    // The child is not visible to anyone yet; its lock is taken for the assertions and the
    // static analysis, nested under the parent's.
    c.mmap_lock_.lock_nested(1);
    for (Vma* v = vmas_.find(0); v && !rc; v = vmas_.next(v)) {
      if (v->flags & VM_DONTCOPY) continue;
      Vma* cv = c.vmas_.insert(std::make_unique<Vma>(*v));
      if (v->flags & VM_WIPEONFORK) continue;
      if (!v->is_shared()) {
        // Write-protecting the parent's entries for COW must reach device mirrors too.
        MmuInvalidation inv(*this, v->start, v->end, MmuNotifyEvent::kProtectionPage);
        rc = copy_page_range(*this, c, *cv);
      } else if (v->flags & (VM_PFNMAP | VM_MIXEDMAP)) {
        rc = copy_page_range(*this, c, *cv);
      }
      // Otherwise a shared mapping is not copied: the child's faults fill it from the page
      // cache (vma_needs_copy: no anon_vma, not VM_PFNMAP/VM_MIXEDMAP).
    }
    c.mmap_lock_.unlock();
  }
  if (rc) return Err{rc};  // the child's destructor unmaps what was copied
  return child;
}

}  // namespace gpusvm::mm
