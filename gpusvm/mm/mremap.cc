// mremap: shrink, grow in place, or move page-table entries to a new range.
#include <cerrno>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/hugetlb.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// mremap is about to move entries (and their rmap and migration records). Held: mmap write
// lock, the rmap walk lock (exclusive); no page-table lock yet.
GPUSVM_SCHED_POINT(g_sp_records_moving, "mm.mremap.records_moving");

// take_rmap_locks: move_huge_pmd and move_ptes hold the rmap walk lock exclusive. A walker
// holds it shared from reading a folio's records to acting on them: remove_migration_ptes
// takes a migration entry's record, then restores the entry at the record's address. An
// entry moved in between has no record to re-point ("no rmap item"), and the restore finds
// nothing at the old address, leaving a migration entry at the new one that no migration
// will remove (seed 000's hang). Shared is not enough: mremap would walk in beside the
// finalize. Held per move, not across split_huge_pmd.

// Re-points the mapping accounting of a moved entry from (mm, old_va) to (mm, new_va).
// mmap lock held for write, rmap walk lock held exclusive (take_rmap_locks), the PTLs of both
// entries held (not nameable here: the caller's tables).
void move_entry_rmap(AddressSpace& mm, Pte pte, Va old_va, Va new_va)
    GPUSVM_REQUIRES(mm.mmap_lock(), mm.mem()->rmap_walk_lock()) {
  mm.mmap_assert_write_locked();
  mm.mem()->rmap_walk_lock().assert_write_held();
  PhysMem* mem = mm.mem();
  if ((pte.present() && !pte.special()) || pte.is_device_private() || pte.is_device_exclusive() ||
      pte.is_migration()) {
    Folio* page = mem->pfn_to_page(pte.pfn());
    const uint32_t idx = static_cast<uint32_t>(page->page_index());
    // A migration entry's record is a migration record (remove_migration_ptes finds the
    // entry at its new address through it).
    folio_move_rmap(page->head(), RmapItem{&mm, old_va, idx, pte.huge(), pte.is_migration()}, &mm, new_va);
  }
}

// Whether the PTE table `t` maps nothing (prepare_destination's fresh table).
bool pte_table_empty(PteTable* t) {
  SpinLockGuard g(&t->ptl);
  for (unsigned i = 0; i < kPtrsPerTable; i++) {
    if (!t->get(i).is_none()) return false;
  }
  return true;
}

// Moves a whole huge leaf from src to dst, which is none or the empty PTE table that
// prepare_destination allocated (freed here). Returns false if src is no longer a leaf or dst
// maps something (the caller splits and moves PTEs instead). The second lock is taken only
// when the tables differ, which the static analysis cannot follow; the accessors assert both
// at run time.
bool move_huge_pmd(AddressSpace& mm, PmdSlot src, PmdSlot dst, Va old_addr, Va new_addr)
    GPUSVM_REQUIRES(mm.mmap_lock()) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  mm.mmap_assert_write_locked();
  WriteLock rmap(&mm.mem()->rmap_walk_lock());  // take_rmap_locks (above)
  g_sp_records_moving.reach();
  SpinLockGuard gs(&src.table->lock);
  const bool same = src.table == dst.table;
  if (!same) dst.table->lock.lock_nested(1);
  bool moved = false;
  Pmd pmd = src.table->get(src.index);
  const Pmd old_dst = dst.table->get(dst.index);
  PteTable* unused = old_dst.is_table() ? old_dst.table() : nullptr;
  if (pmd.is_leaf() && (old_dst.is_none() || (unused && pte_table_empty(unused)))) {
    src.table->set(src.index, Pmd());
    PteTable* deposit = src.table->withdraw(src.index);
    dst.table->set(dst.index, pmd);
    dst.table->deposit(dst.index, deposit);
    if (!mm.mem()->is_huge_zero_pfn(pmd.leaf().pfn()) || !pmd.leaf().present()) {
      move_entry_rmap(mm, pmd.leaf(), old_addr, new_addr);
    }
    moved = true;
  }
  if (!same) dst.table->lock.unlock();
  if (moved && unused) PageTable::free_pte_table(unused);  // mmap write lock: no walker sees it
  return moved;
}

// Moves the PTEs of [old_addr, old_addr + len) to new_addr; both ranges lie inside one PTE
// table each, and the destination table exists. Conditional second lock: see move_huge_pmd.
void move_ptes(AddressSpace& mm, PmdSlot src, PmdSlot dst, Va old_addr, Va new_addr, uint64_t len)
    GPUSVM_REQUIRES(mm.mmap_lock()) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  mm.mmap_assert_write_locked();
  WriteLock rmap(&mm.mem()->rmap_walk_lock());  // take_rmap_locks (above)
  g_sp_records_moving.reach();
  PageTable& pt = mm.page_table();
  PteTable* ts = pt.pte_offset_map_lock(src, 0);
  if (!ts) return;  // nothing mapped there any more
  PteTable* td = dst.load_lockless().table();
  const bool same = ts == td;
  if (!same) td->ptl.lock_nested(1);
  for (uint64_t off = 0; off < len; off += kPageSize) {
    const unsigned si = pte_index(old_addr + off), di = pte_index(new_addr + off);
    Pte pte = ts->get(si);
    if (pte.is_none()) continue;
    ts->set(si, Pte::none());
    td->set(di, pte);
    move_entry_rmap(mm, pte, old_addr + off, new_addr + off);
  }
  if (!same) td->ptl.unlock();
  PageTable::pte_unmap_unlock(ts);
}

// Allocates every destination table the move may need, so the move itself cannot fail: a PTE
// table for each destination PMD, also where the source is a huge leaf now. The leaf may be
// split before it moves (the mmap write lock does not stop a split during an eviction's
// migration, which reaches the leaf through the rmap), and then its PTEs need the table;
// move_huge_pmd frees it when the leaf moves whole. mmap lock held for write.
int prepare_destination(AddressSpace& mm, Va new_addr, uint64_t len) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  PageTable& pt = mm.page_table();
  for (uint64_t off = 0; off < len;) {
    const Va d = new_addr + off;
    const uint64_t step = std::min(pmd_align_down(d) + kPmdSize - d, len - off);
    Result<PmdSlot> slot = pt.pmd_alloc(d);
    if (!slot) return slot.error();
    if (pt.pte_alloc(*slot) != 0) return -ENOMEM;
    off += step;
  }
  return 0;
}

// Moves every entry of [old_addr, old_addr + len) to new_addr, whose tables
// prepare_destination allocated. mmap lock held for write; takes the rmap walk lock per move.
void move_page_tables(AddressSpace& mm, Va old_addr, Va new_addr, uint64_t len)
    GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  PageTable& pt = mm.page_table();
  for (uint64_t off = 0; off < len;) {
    const Va s = old_addr + off, d = new_addr + off;
    const uint64_t step = std::min({pmd_align_down(s) + kPmdSize - s, pmd_align_down(d) + kPmdSize - d,
                                    len - off});
    PmdSlot src = pt.pmd_lookup(s);
    if (src) {
      PmdSlot dst = pt.pmd_lookup(d);
      Pmd pmd = src.load_lockless();
      if (pmd.is_leaf()) {
        if (step == kPmdSize && pmd_aligned(s) && pmd_aligned(d) &&
            move_huge_pmd(mm, src, dst, s, d)) {
          off += step;
          continue;
        }
        split_huge_pmd(mm, src, pmd_align_down(s));
      }
      move_ptes(mm, src, dst, s, d, step);
    }
    off += step;
  }
}

// move_vma: moves [old_addr, old_addr + move_len), which lies inside `vma`, to new_addr (free,
// or made free by the caller) and gives the new VMA nlen bytes. mmap lock held for write.
Result<Va> move_vma(AddressSpace& mm, VmaTree& vmas, Vma* vma, Va old_addr, uint64_t move_len,
                    Va new_addr, uint64_t nlen, int flags) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  // Isolate the source VMA, prepare tables, move entries, then switch VMAs.
  if (vma->start < old_addr) {
    split_huge_pmd_address(mm, old_addr);
    vma = vmas.split(vma, old_addr);
  }
  if (vma->end > old_addr + move_len) {
    split_huge_pmd_address(mm, old_addr + move_len);
    vmas.split(vma, old_addr + move_len);
  }
  if (int rc = prepare_destination(mm, new_addr, move_len)) return Err{rc};
  {
    // Each move takes the rmap walk lock exclusive (take_rmap_locks above): it moves migration
    // records too, which no rmap walker may hold meanwhile.
    MmuInvalidation inv(mm, old_addr, old_addr + move_len, MmuNotifyEvent::kUnmap);
    move_page_tables(mm, old_addr, new_addr, move_len);
  }
  auto moved = std::make_unique<Vma>(*vma);
  moved->start = new_addr;
  moved->end = new_addr + nlen;
  if (!(flags & MREMAP_DONTUNMAP)) (void)vmas.erase(vma);
  vmas.try_merge(vmas.insert(std::move(moved)));
  if (!(flags & MREMAP_DONTUNMAP)) free_pgtables(mm, vmas, old_addr, old_addr + move_len);
  return new_addr;
}

// remap_move (Linux >= 6.17): MREMAP_FIXED without resizing moves every VMA in
// [old_addr, old_addr + len), each to new_addr plus its distance from old_addr, so the gaps
// between them stay (the destination's part of a gap is left as it was: each VMA unmaps only
// its own target). -EFAULT when no VMA starts the range (a gap at the start); a gap at the end
// is allowed. A VMA that fails stops the walk with its error, the earlier ones moved. mmap
// lock held for write; every model VMA may take part (Linux refuses uffd-armed VMAs and files
// with their own get_unmapped_area, which the model does not have).
Result<Va> remap_move(AddressSpace& mm, VmaTree& vmas, Va old_addr, uint64_t len, Va new_addr,
                      int flags) GPUSVM_REQUIRES(mm.mmap_lock()) {
  mm.mmap_assert_write_locked();
  const Va end = old_addr + len;
  Vma* first = vmas.lookup(old_addr);
  if (!first) return Err{-EFAULT};
  // The pieces, collected before anything moves (moving splits and merges VMAs).
  std::vector<std::pair<Va, Va>> pieces;
  for (Vma* v = first; v && v->start < end; v = vmas.next(v)) {
    if (v->is_hugetlb()) return Err{-EINVAL};  // model gap, as for a single VMA
    pieces.push_back({std::max(v->start, old_addr), std::min(v->end, end)});
  }
  if (hugetlb_check_split(vmas, new_addr, new_addr + len)) return Err{-EINVAL};
  for (auto [s, e] : pieces) {
    const Va target = new_addr + (s - old_addr);
    do_munmap(mm, vmas, target, target + (e - s));
    Vma* v = vmas.lookup(s);
    if (!v) return Err{-EFAULT};
    Result<Va> r = move_vma(mm, vmas, v, s, e - s, target, e - s, flags);
    if (!r) return r;
  }
  return new_addr;
}

}  // namespace

Result<Va> AddressSpace::mremap(Va old_addr, uint64_t old_len, uint64_t new_len, int flags,
                                Va new_addr) {
  if (flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP)) return Err{-EINVAL};
  if ((flags & MREMAP_FIXED) && !(flags & MREMAP_MAYMOVE)) return Err{-EINVAL};
  if ((flags & MREMAP_DONTUNMAP) && (!(flags & MREMAP_MAYMOVE) || old_len != new_len)) {
    return Err{-EINVAL};
  }
  if (!page_aligned(old_addr)) return Err{-EINVAL};
  const uint64_t olen = page_align_up(old_len), nlen = page_align_up(new_len);
  // old_len == 0 duplicates a shared mapping in Linux; the model does not support it.
  if (olen == 0 || nlen == 0 || olen < old_len || nlen < new_len) return Err{-EINVAL};
  if (old_addr + olen < old_addr || old_addr + olen > kTaskSize) return Err{-EINVAL};
  const bool fixed = flags & MREMAP_FIXED;
  if (fixed) {
    if (!page_aligned(new_addr) || new_addr + nlen < new_addr || new_addr + nlen > kTaskSize ||
        new_addr < kMmapMinAddr) {
      return Err{-EINVAL};
    }
    if (new_addr < old_addr + olen && old_addr < new_addr + nlen) return Err{-EINVAL};
  }

  WriteLock g(&mmap_lock_);
  Vma* vma = vmas_.lookup(old_addr);
  if (!vma) return Err{-EFAULT};
  // hugetlb VMAs are not remapped (model gap: Linux >= 5.16 moves 2 MiB aligned ranges), and
  // a FIXED target may not cut one at an unaligned address.
  if (vma->is_hugetlb()) return Err{-EINVAL};
  // A move without resizing may span several VMAs (vrm_move_only, Linux >= 6.17).
  if (fixed && olen == nlen) return remap_move(*this, vmas_, old_addr, olen, new_addr, flags);
  // Neither a shrink nor a no-op resize looks past the first VMA (vrm_will_map_new): the
  // tail is unmapped whatever it spans.
  if (!fixed && !(flags & MREMAP_DONTUNMAP) && nlen <= olen) {
    if (nlen < olen) do_munmap(*this, vmas_, old_addr + nlen, old_addr + olen);
    return old_addr;
  }
  if (old_addr + olen > vma->end) return Err{-EFAULT};
  if (fixed && hugetlb_check_split(vmas_, new_addr, new_addr + nlen)) return Err{-EINVAL};

  uint64_t move_len = olen;
  if (!fixed && !(flags & MREMAP_DONTUNMAP)) {
    // Grow in place when the VMA ends at the old range and the space above is free.
    Vma* next = vmas_.next(vma);
    const Va want_end = old_addr + nlen;
    if (old_addr + olen == vma->end && want_end <= kTaskSize && want_end > old_addr &&
        (!next || next->start >= want_end)) {
      vma->end = want_end;
      return old_addr;
    }
    if (!(flags & MREMAP_MAYMOVE)) return Err{-ENOMEM};
  }
  if (fixed) {
    do_munmap(*this, vmas_, new_addr, new_addr + nlen);
    if (nlen < olen) {
      do_munmap(*this, vmas_, old_addr + nlen, old_addr + olen);
      move_len = nlen;
    }
    vma = vmas_.lookup(old_addr);
  } else {
    const uint64_t align = vma->is_anonymous() && nlen % kPmdSize == 0 ? kPmdSize : kPageSize;
    new_addr = vmas_.find_gap_topdown(nlen, kMmapMinAddr, kMmapBase, align);
    if (!new_addr) return Err{-ENOMEM};
  }

  return move_vma(*this, vmas_, vma, old_addr, move_len, new_addr, nlen, flags);
}

}  // namespace gpusvm::mm
