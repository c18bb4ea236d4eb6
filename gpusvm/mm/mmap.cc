// mmap and munmap (mm/mmap.c), and the VMA helpers mprotect and madvise share with them.
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

}  // namespace

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

}  // namespace gpusvm::mm
