// mmap, munmap, mprotect and madvise.
#include <cerrno>
#include <chrono>
#include <vector>

#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/hugetlb.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/shmem.h"

namespace gpusvm::mm {
namespace {

// Between mmap's write-lock hold and the populate's read-lock hold. Held: nothing. The new
// mapping is visible: another thread may fault, migrate, change or unmap it meanwhile.
GPUSVM_SCHED_POINT(g_sp_populate, "mm.mmap.populate");

// MAP_POPULATE (mm_populate): pre-faults [start, end) of the new mapping like the kernel's
// populate: writable private mappings are faulted for write so that no COW is left to break
// later. Failures are ignored, as in Linux (mmap still returns the address), but bounded: a
// page that keeps faulting kRetry for hang_timeout() (a livelock) or a fault that timed out
// (a folio lock held too long) stops the populate, logged with the address. Takes the mmap
// lock (read); called with no lock held.
void mm_populate(AddressSpace& mm, Va start, Va end) {
  g_sp_populate.reach();
  ReadLock g(&mm.mmap_lock());
  Vma* v = mm.vma_lookup(start);  // stable under the read lock
  const unsigned fl = v && (v->flags & VM_WRITE) ? unsigned{kFaultWrite} : 0u;
  // Per page, started at the page's first retry: the common populate never reads the clock.
  std::chrono::steady_clock::time_point deadline{};
  for (Va va = start; v && va < end && va < v->end;) {
    if (!(v->flags & VM_READ)) break;
    const VmFault r = handle_mm_fault(mm, va, fl);
    if (r == VmFault::kRetry) {
      const auto now = std::chrono::steady_clock::now();
      if (deadline == std::chrono::steady_clock::time_point{}) {
        deadline = now + hang_timeout();
      } else if (now > deadline) {
        log::get().error("mmap populate [{:#x}, {:#x}): the fault at {:#x} kept retrying for {} ms; "
                         "populate stopped", start, end, va, hang_timeout().count());
        break;
      }
      continue;
    }
    if (r != VmFault::kOk) {
      if (r == VmFault::kTimeout) {
        log::get().error("mmap populate [{:#x}, {:#x}): the fault at {:#x} timed out; populate "
                         "stopped", start, end, va);
      }
      break;
    }
    deadline = {};
    PmdSlot slot = mm.page_table().pmd_lookup(va);
    va = slot && slot.load_lockless().is_huge_present() ? pmd_align_down(va) + kPmdSize
                                                        : va + kPageSize;
  }
}

// Splits the VMA containing addr so that a VMA boundary falls on addr, first splitting a
// PMD mapping that straddles addr. Write lock held.
void split_vma_at(AddressSpace& mm, VmaTree& vmas, Va addr) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  Vma* v = vmas.lookup(addr);
  if (!v || v->start == addr) return;
  split_huge_pmd_address(mm, addr);
  vmas.split(v, addr);
}

// The VMAs inside [start, end), after split_vma_at(start) and split_vma_at(end).
std::vector<Vma*> vmas_in(VmaTree& vmas, Va start, Va end) {
  std::vector<Vma*> out;
  for (Vma* v = vmas.find(start); v && v->start < end; v = vmas.next(v)) out.push_back(v);
  return out;
}

// Re-merges VMAs around [start, end) after their flags changed. Looks each one up again by
// address because a merge frees the VMA it absorbs.
void merge_range(VmaTree& vmas, Va start, Va end) {
  std::vector<Va> starts;
  for (Vma* v = vmas.find(start); v && v->start < end; v = vmas.next(v)) starts.push_back(v->start);
  for (Va a : starts) {
    if (Vma* v = vmas.lookup(a)) vmas.try_merge(v);
  }
}

// The end of the run of VMAs without holes that starts at `start`, clamped to `end`; start
// itself when no VMA contains start.
Va mapped_run_end(const VmaTree& vmas, Va start, Va end) {
  Va at = start;
  for (Vma* v = vmas.find(start); v && v->start <= at && at < end; v = vmas.next(v)) at = v->end;
  return std::min(at, end);
}

// True when [start, end) is fully covered by VMAs without holes.
bool fully_mapped(const VmaTree& vmas, Va start, Va end) {
  return mapped_run_end(vmas, start, end) >= end;
}

}  // namespace

void do_munmap(AddressSpace& mm, VmaTree& vmas, Va start, Va end) {
  mm.mmap_assert_write_locked();
  split_vma_at(mm, vmas, start);
  split_vma_at(mm, vmas, end);
  std::vector<Vma*> victims = vmas_in(vmas, start, end);
  if (victims.empty()) return;
  {
    MmuInvalidation inv(mm, start, end, MmuNotifyEvent::kUnmap);
    for (Vma* v : victims) {
      zap_range(mm, v->start, v->end);
      if (v->is_hugetlb()) mm.mem()->hugetlb_unreserve(&mm, v->start, v->end);
      (void)vmas.erase(v);
    }
  }
  free_pgtables(mm, vmas, start, end);
}

Va get_unmapped_area(const VmaTree& vmas, Va hint, uint64_t len, uint64_t align) {
  if (hint && page_aligned(hint) && hint >= kMmapMinAddr && hint + len <= kTaskSize && hint + len > hint) {
    const Vma* v = vmas.find(hint);
    if (!v || v->start >= hint + len) return hint;
  }
  return vmas.find_gap_topdown(len, kMmapMinAddr, kMmapBase, align);
}

void free_pgtables(AddressSpace& mm, const VmaTree& vmas, Va start, Va end) {
  mm.mmap_assert_write_locked();
  PageTable& pt = mm.page_table();
  for (Va haddr = pmd_align_down(start); haddr < end; haddr += kPmdSize) {
    Vma* v = vmas.find(haddr);
    if (v && v->start < haddr + kPmdSize) continue;  // still in use by a VMA
    PmdSlot slot = pt.pmd_lookup(haddr);
    if (!slot) continue;
    PteTable* table = nullptr;
    // An rmap walker from another address space may be following a record into this table.
    WriteLock walkers(&mm.mem()->rmap_walk_lock());
    {
      SpinLockGuard g(&slot.table->lock);
      Pmd pmd = slot.table->get(slot.index);
      if (!pmd.is_table()) continue;
      table = pmd.table();
      slot.table->set(slot.index, Pmd());
    }
    // No VMA covers the table, so the zap left it empty; the write lock keeps lockless
    // walkers (which hold the mmap lock) away from it.
    for (unsigned i = 0; i < kPtrsPerTable; i++) {
      if (!table->load_lockless(i).is_none()) panic("free_pgtables: table still has entries");
    }
    PageTable::free_pte_table(table);
  }
}

namespace {

// A writable migration or device-private entry becomes read-only on any mprotect, as in
// Linux's change_pte_range ("a protection check is difficult so just be safe"): the page
// comes back read-only and a write fault makes it writable again if the VMA allows. A
// migration entry of an anonymous page keeps its exclusivity (read-exclusive), so that write
// fault reuses the page. Device-exclusive entries stay: their restore decides the write bit.
Pte wrprotect_soft_leaf(PhysMem* mem, Pte e) {
  switch (e.soft_leaf_type()) {
    case SoftLeafType::kMigrationWrite: {
      const Folio* folio = mem->folio_of(e.pfn());  // the migration holds a reference
      return e.with_soft_leaf_type(folio && folio->test(kFolioAnon) ? SoftLeafType::kMigrationReadExclusive
                                                                    : SoftLeafType::kMigrationRead);
    }
    case SoftLeafType::kDevicePrivateWrite:
      return e.with_soft_leaf_type(SoftLeafType::kDevicePrivateRead);
    default:
      return e;
  }
}

// Applies `write` permission changes to the entries of [start, end) inside `vma`
// (change_protection). Removing write protects every entry; adding write makes writable
// only what may be written without a fault: anon-exclusive pages and shared mappings - not
// private hugetlb pages, which hugetlb_change_protection leaves read-only until a write fault
// (the private mapping's page protection has no write bit). mmap lock held for write
// (mprotect changes the VMA flags in the same hold).
void change_protection(AddressSpace& mm, const Vma& vma, Va start, Va end, bool write)
    GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  auto may_write = [&](Pte pte) {
    if (!write || pte.special() || vma.is_hugetlb()) return false;
    if (vma.is_shared()) return true;
    Folio* page = mem->pfn_to_page(pte.pfn());
    return page->head()->test(kFolioAnon) && page->test_page(kPageAnonExclusive);
  };
  for_each_pmd_range(mm, start, end, [&](PmdSlot slot, Va addr, Va next) {
    {
      SpinLockGuard g(&slot.table->lock);
      Pmd pmd = slot.table->get(slot.index);
      if (pmd.is_huge_present() && !mem->is_huge_zero_pfn(pmd.leaf().pfn())) {
        Pte leaf = pmd.leaf();
        Pte upd = may_write(leaf) ? leaf.mkwrite() : (write ? leaf : leaf.wrprotect());
        if (upd != leaf) slot.table->set(slot.index, Pmd::make_leaf(upd));
      } else if (pmd.is_huge_soft_leaf()) {
        const Pte upd = wrprotect_soft_leaf(mem, pmd.leaf());
        if (upd != pmd.leaf()) slot.table->set(slot.index, Pmd::make_leaf(upd));
      }
    }
    if (PteTable* t = pt.pte_offset_map_lock(slot)) {
      for (Va va = addr; va < next; va += kPageSize) {
        const unsigned i = pte_index(va);
        Pte pte = t->get(i);
        if (pte.is_soft_leaf()) {
          const Pte upd = wrprotect_soft_leaf(mem, pte);
          if (upd != pte) t->set(i, upd);
          continue;
        }
        if (!pte.present()) continue;
        Pte upd = may_write(pte) ? pte.mkwrite() : (write ? pte : pte.wrprotect());
        if (upd != pte) t->set(i, upd);
      }
      PageTable::pte_unmap_unlock(t);
    }
  });
}

// Whether split_folio_exclusive can take the large folio of a page mapped in the locked PTE
// table `t` (which covers [table_va, table_va + 2 MiB)): every mapping of the folio is a PTE of
// `mm` in this table, present or device-exclusive (the split gives that page back to the CPU,
// as Linux's try_to_migrate does). A mapping in another table keeps the folio whole here. PTE
// lock of t held.
bool folio_splittable_here(AddressSpace& mm, PteTable* t, Va table_va, Folio* folio)
    GPUSVM_REQUIRES(t->ptl) {
  t->ptl.assert_held();
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.pmd || item.mm != &mm || pmd_align_down(item.va) != table_va) return false;
    const Pte pte = t->get(pte_index(item.va));
    if (!pte.present() && !pte.is_device_exclusive()) return false;
  }
  return true;
}

// folio_maybe_mapped_shared: some mapping of the folio belongs to another address space.
bool folio_maybe_mapped_shared(Folio* folio, const AddressSpace* mm) {
  for (const RmapItem& item : folio_rmap_snapshot(folio)) {
    if (item.mm != mm) return true;
  }
  return false;
}

// madvise_free_huge_pmd for the huge leaf at slot, [addr, next) of its 2 MiB: returns true
// when the PTE level must be walked next (the PMD was split because [addr, next) covers only
// part of an exclusively mapped THP; the folio split follows there). A whole exclusive THP
// becomes clean and lazily freeable and stays PMD-mapped. Left alone, PMD and all: the huge
// zero folio (a later write still gets a whole THP), a THP another process maps too (a fork
// child), a busy (locked) THP, a non-present huge leaf. mmap lock held, no page-table lock.
bool madvise_free_huge_pmd(AddressSpace& mm, PmdSlot slot, Va addr, Va next)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return pmd.is_table();  // a table meanwhile: walk it
    if (!pmd.is_huge_present() || mem->is_huge_zero_pfn(pmd.leaf().pfn())) return false;
    Folio* folio = mem->folio_of(pmd.leaf().pfn());
    if (folio_is_zone_device(folio) || folio_maybe_mapped_shared(folio, &mm)) return false;
    if (next - addr == kPmdSize) {
      folio->clear(kFolioDirty);
      folio->set(kFolioLazyfree);
      slot.table->set(slot.index, Pmd::make_leaf(pmd.leaf().mkclean().mkold()));
      return false;
    }
    if (folio_test_locked(folio)) return false;  // folio_trylock would fail: skip, as Linux does
  }
  split_huge_pmd(mm, slot, pmd_align_down(addr));
  return true;
}

// MADV_FREE on [start, end) of a private anonymous VMA: exclusive pages become clean and
// lazily freeable. A partly covered exclusive THP is split first (madvise_free_huge_pmd).
// mmap lock held (read suffices: only entries change, as in Linux).
void madvise_free_range(AddressSpace& mm, Va start, Va end) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  for (Va addr = start, next; addr < end; addr = next) {
    next = std::min(pmd_align_down(addr) + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (!slot) continue;
    if (slot.load_lockless().is_leaf() && !madvise_free_huge_pmd(mm, slot, addr, next)) continue;
    Folio* unsplittable = nullptr;
    for (Va va = addr; va < next;) {
      PteTable* t = pt.pte_offset_map_lock(slot);
      if (!t) break;
      t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
      Folio* split = nullptr;
      for (; va < next; va += kPageSize) {
        const unsigned i = pte_index(va);
        const Pte pte = t->get(i);
        if (!pte.present() || pte.special()) continue;
        Folio* folio = mem->folio_of(pte.pfn());
        if (folio_is_zone_device(folio)) continue;  // device memory is never reclaimed lazily
        if (folio->large()) {
          // Part of a large folio: split it if only we map it (as Linux does), then look
          // at this page again; a folio that cannot be split is left alone.
          if (folio != unsplittable && folio_mapped_only_by(folio, &mm) &&
              folio_splittable_here(mm, t, pmd_align_down(va), folio) && folio_trylock(folio)) {
            folio->get();
            split = folio;
            break;
          }
          continue;
        }
        if (folio->total_mapcount() != 1) continue;
        folio->clear(kFolioDirty);
        folio->set(kFolioLazyfree);
        t->set(i, pte.mkclean().mkold());
      }
      PageTable::pte_unmap_unlock(t);
      if (split) {
        if (split_folio_exclusive(mm, split) != 0) unsplittable = split;
        folio_unlock(split);
        split->put();
      }
    }
  }
}

// MADV_COLLAPSE of [start, end) inside `v` (madvise_collapse). -EINVAL when the VMA cannot
// hold a THP at all (not private anonymous, MADV_NOHUGEPAGE, or no aligned 2 MiB block inside
// the VMA: thp_vma_allowable_order) or when [start, end) lies inside one 2 MiB block without
// covering it (Linux's hstart > hend; a range that is empty after alignment, hstart == hend,
// succeeds with nothing done). Otherwise every aligned block is collapsed; a block that fails
// does not stop the others, the result is then the last block's error (-ENOMEM stops at once).
// mmap lock held for write.
int madvise_collapse(AddressSpace& mm, Vma& v, Va start, Va end) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  if (!v.is_anonymous() || v.is_shared() || (v.flags & VM_NOHUGEPAGE)) return -EINVAL;
  if (pmd_align_up(v.start) + kPmdSize > v.end) return -EINVAL;  // thp_vma_suitable_order
  const Va hs = pmd_align_up(start);
  const Va he = pmd_align_down(end);
  if (hs > he) return -EINVAL;
  int err = 0;
  for (Va h = hs; h < he; h += kPmdSize) {
    const int rc = collapse_huge_page(mm, v, h);
    if (rc == -ENOMEM) return rc;
    if (rc) err = rc;
  }
  return err;
}

// Page-table reclaim after MADV_DONTNEED zapped [start, end) of one VMA (Linux >= 6.14 with
// CONFIG_PT_RECLAIM, as on the reference host): a PTE table is freed when the zap covered
// all of it (reclaim_pt_is_enabled: end - start >= PMD_SIZE for that table) and left every
// entry none. Only MADV_DONTNEED does this; munmap frees tables through free_pgtables.
// mmap lock held (read suffices, see PageTable::try_reclaim_pte_table), no page-table lock.
void reclaim_pte_tables(AddressSpace& mm, Va start, Va end) {
  PageTable& pt = mm.page_table();
  for (Va h = pmd_align_up(start); h + kPmdSize <= end; h += kPmdSize) {
    if (PmdSlot slot = pt.pmd_lookup(h)) (void)pt.try_reclaim_pte_table(slot);
  }
}

bool valid_advice(int advice) {
  switch (advice) {
    case MADV_DONTNEED: case MADV_FREE: case MADV_HUGEPAGE: case MADV_NOHUGEPAGE:
    case MADV_COLLAPSE: case MADV_DONTFORK: case MADV_DOFORK: case MADV_WIPEONFORK:
    case MADV_KEEPONFORK:
      return true;
    default:
      return false;
  }
}

}  // namespace

Result<Va> AddressSpace::mmap(Va addr, uint64_t len, int prot, int flags,
                              std::shared_ptr<ShmemObject> file, uint64_t offset) {
  constexpr int kKnown = MAP_SHARED | MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS |
                         MAP_FIXED_NOREPLACE | MAP_POPULATE | MAP_NORESERVE | MAP_HUGETLB;
  // MAP_HUGETLB may name its page size in bits 26..31 (MAP_HUGE_2MB); 0 is the default, 2 MiB.
  const int huge_size = (flags >> MAP_HUGE_SHIFT) & MAP_HUGE_MASK;
  const bool hugetlb = flags & MAP_HUGETLB;
  constexpr unsigned kHugeSizeBits = unsigned{MAP_HUGE_MASK} << MAP_HUGE_SHIFT;
  if (len == 0 || (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) ||
      (static_cast<unsigned>(flags) & ~(static_cast<unsigned>(kKnown) | kHugeSizeBits))) {
    return Err{-EINVAL};
  }
  if (huge_size && (!hugetlb || huge_size != kPmdShift)) return Err{-EINVAL};
  const int type = flags & (MAP_SHARED | MAP_PRIVATE);
  if (type != MAP_SHARED && type != MAP_PRIVATE) return Err{-EINVAL};
  // hugetlb: the length is rounded up to the huge page size (ksys_mmap_pgoff) and a fixed
  // address must be aligned to it (hugetlb_get_unmapped_area).
  if (hugetlb && len > kTaskSize) return Err{-ENOMEM};
  if (hugetlb && (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) && !pmd_aligned(addr)) return Err{-EINVAL};
  const uint64_t alen = hugetlb ? pmd_align_up(len) : page_align_up(len);
  if (alen < len || alen > kTaskSize) return Err{-ENOMEM};
  const bool anon = flags & MAP_ANONYMOUS;
  if (anon && file) return Err{-EINVAL};
  if (!anon && !file) return Err{-EBADF};
  // Only private anonymous hugetlb is modelled (hugetlb.h); a file that is not hugetlbfs
  // cannot be mapped MAP_HUGETLB (-EINVAL, as in Linux).
  if (hugetlb && (!anon || type != MAP_PRIVATE)) return Err{-EINVAL};
  if (!page_aligned(offset) || offset + alen < offset) return Err{-EINVAL};
  const bool fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE);
  if (fixed) {
    if (int rc = check_fixed_addr(addr, alen)) return Err{rc};
  }
  if (anon && type == MAP_SHARED) {
    // Shared anonymous memory is a shmem object of the mapping's size.
    Result<std::shared_ptr<ShmemObject>> obj = ShmemObject::create(mem_, alen, "dev/zero");
    if (!obj) return Err{obj.error()};
    file = *obj;
  }

  Va start;
  {
    WriteLock g(&mmap_lock_);
    if (exited()) return Err{-ENOMEM};
    if (fixed) {
      if (flags & MAP_FIXED_NOREPLACE) {
        Vma* v = vmas_.find(addr);
        if (v && v->start < addr + alen) return Err{-EEXIST};
      } else {
        if (int rc = hugetlb_check_split(vmas_, addr, addr + alen)) return Err{rc};
        do_munmap(*this, vmas_, addr, addr + alen);
      }
      start = addr;
    } else {
      // Anonymous mappings of whole 2 MiB multiples are PMD aligned so THPs can back them,
      // as Linux does since 6.7 (thp_get_unmapped_area).
      const uint64_t align = hugetlb || (anon && alen % kPmdSize == 0) ? kPmdSize : kPageSize;
      start = 0;
      if (hugetlb) addr = pmd_align_up(addr);  // hugetlb_get_unmapped_area aligns the hint
      start = get_unmapped_area(vmas_, addr, alen, align);
      if (!start) return Err{-ENOMEM};
    }
    // A private hugetlb mapping reserves its pages now, so a pool that cannot back it fails
    // the mmap rather than a later fault (hugetlb_reserve_pages). With MAP_FIXED the old
    // mapping is gone by then, as in Linux.
    if (hugetlb && !(flags & MAP_NORESERVE)) {
      if (int rc = mem_->hugetlb_reserve(this, start, start + alen)) return Err{rc};
    }
    auto vma = std::make_unique<Vma>();
    vma->start = start;
    vma->end = start + alen;
    vma->flags = prot_to_vm_flags(prot) | VM_MAYWRITE | (type == MAP_SHARED ? uint32_t{VM_SHARED} : 0u) |
                 (hugetlb ? uint32_t{VM_HUGETLB} : 0u);
    vma->file = std::move(file);
    vma->pgoff = offset >> kPageShift;
    vmas_.try_merge(vmas_.insert(std::move(vma)));
  }
  if (flags & MAP_POPULATE) mm_populate(*this, start, start + alen);
  return start;
}

int AddressSpace::munmap(Va start, uint64_t len) {
  if (!page_aligned(start) || len == 0 || start > kTaskSize) return -EINVAL;
  const uint64_t alen = page_align_up(len);
  if (alen < len || alen > kTaskSize - start) return -EINVAL;
  WriteLock g(&mmap_lock_);
  if (int rc = hugetlb_check_split(vmas_, start, start + alen)) return rc;
  do_munmap(*this, vmas_, start, start + alen);
  return 0;
}

int AddressSpace::mprotect(Va start, uint64_t len, int prot) {
  if (!page_aligned(start) || (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC))) return -EINVAL;
  const uint64_t alen = page_align_up(len);
  if (alen < len || start + alen < start) return -ENOMEM;
  if (alen == 0) return 0;  // as Linux: an empty mprotect succeeds and changes nothing
  WriteLock g(&mmap_lock_);
  // As do_mprotect_pkey: a hole at start fails with nothing changed; a later hole stops the
  // walk there, after the VMAs before it were changed, and the call fails with -ENOMEM.
  const Va end = mapped_run_end(vmas_, start, start + alen);
  if (end == start) return -ENOMEM;
  const int rc_hole = end < start + alen ? -ENOMEM : 0;
  if (int rc = hugetlb_check_split(vmas_, start, end)) return rc;
  split_vma_at(*this, vmas_, start);
  split_vma_at(*this, vmas_, end);
  const uint32_t newprot = prot_to_vm_flags(prot);
  {
    MmuInvalidation inv(*this, start, end, MmuNotifyEvent::kProtectionVma);
    for (Vma* v : vmas_in(vmas_, start, end)) {
      const bool was_writable = v->flags & VM_WRITE;
      v->flags = (v->flags & ~(VM_READ | VM_WRITE | VM_EXEC)) | newprot;
      const bool writable = v->flags & VM_WRITE;
      if (was_writable != writable || !(v->flags & VM_READ)) {
        change_protection(*this, *v, v->start, v->end, writable && (v->flags & VM_READ));
      }
    }
  }
  merge_range(vmas_, start, end);
  return rc_hole;
}

int AddressSpace::madvise(Va start, uint64_t len, int advice) {
  if (!page_aligned(start) || !valid_advice(advice)) return -EINVAL;
  const uint64_t alen = page_align_up(len);
  if (alen < len || start + alen < start) return -EINVAL;
  if (alen == 0) return 0;  // as Linux
  const Va end = start + alen;
  if (end > kTaskSize) return -ENOMEM;

  if (advice == MADV_DONTNEED || advice == MADV_FREE) {
    // Only the entries change, not the VMAs: the read lock suffices, as in Linux.
    ReadLock g(&mmap_lock_);
    const bool holes = !fully_mapped(vmas_, start, end);
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (v->flags & (VM_LOCKED | VM_PFNMAP)) return -EINVAL;
      if (advice == MADV_FREE && (!v->is_anonymous() || v->is_shared())) return -EINVAL;
      // madvise_dontneed_free_valid_vma: on hugetlb only DONTNEED, from a huge page boundary.
      if (v->is_hugetlb() && !pmd_aligned(std::max(start, v->start))) return -EINVAL;
    }
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      const Va s = std::max(start, v->start);
      // ... and the end rounded down to one ("callers may be unaware that this VMA uses huge
      // pages"), so a hugetlb page is zapped whole or not at all.
      const Va e = v->is_hugetlb() ? pmd_align_down(std::min(end, v->end)) : std::min(end, v->end);
      if (s >= e) continue;
      MmuInvalidation inv(*this, s, e, MmuNotifyEvent::kClear);
      if (advice == MADV_DONTNEED) {
        zap_range(*this, s, e);
        if (!v->is_hugetlb()) reclaim_pte_tables(*this, s, e);
      } else {
        madvise_free_range(*this, s, e);
      }
    }
    return holes ? -ENOMEM : 0;
  }

  WriteLock g(&mmap_lock_);
  const bool holes = !fully_mapped(vmas_, start, end);
  if (advice == MADV_COLLAPSE) {
    // madvise_walk_vmas: the first VMA that fails ends the walk with its error; holes make
    // the call fail with -ENOMEM after the rest was done.
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (int rc = madvise_collapse(*this, *v, std::max(start, v->start), std::min(end, v->end))) {
        return rc;
      }
    }
    return holes ? -ENOMEM : 0;
  }
  if (advice == MADV_WIPEONFORK) {
    for (Vma* v = vmas_.find(start); v && v->start < end; v = vmas_.next(v)) {
      if (!v->is_anonymous() || v->is_shared()) return -EINVAL;
    }
  }
  if (int rc = hugetlb_check_split(vmas_, start, end)) return rc;
  split_vma_at(*this, vmas_, start);
  split_vma_at(*this, vmas_, end);
  std::vector<Vma*> targets = vmas_in(vmas_, start, end);
  for (Vma* v : targets) {
    switch (advice) {
      case MADV_HUGEPAGE: v->flags = (v->flags & ~VM_NOHUGEPAGE) | VM_HUGEPAGE; break;
      case MADV_NOHUGEPAGE: v->flags = (v->flags & ~VM_HUGEPAGE) | VM_NOHUGEPAGE; break;
      case MADV_DONTFORK: v->flags |= VM_DONTCOPY; break;
      case MADV_DOFORK: v->flags &= ~VM_DONTCOPY; break;
      case MADV_WIPEONFORK: v->flags |= VM_WIPEONFORK; break;
      case MADV_KEEPONFORK: v->flags &= ~VM_WIPEONFORK; break;
    }
  }
  merge_range(vmas_, start, end);
  return holes ? -ENOMEM : 0;
}

}  // namespace gpusvm::mm
