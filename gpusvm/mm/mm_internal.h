// Internal interfaces shared by the .cc files of gpusvm/mm. Not for other layers.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <vector>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/page_table.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/vma.h"

namespace gpusvm::mm {

// An invalidation bracket: invalidate_range_start on construction, _end on destruction.
// Context: mmap lock held, no page-table lock held (asserted by the lock order: the
// subscriptions lock ranks below the page-table locks).
class MmuInvalidation {
 public:
  MmuInvalidation(AddressSpace& mm, Va start, Va end, MmuNotifyEvent event,
                  const void* owner = nullptr);
  ~MmuInvalidation();
  MmuInvalidation(const MmuInvalidation&) = delete;
  MmuInvalidation& operator=(const MmuInvalidation&) = delete;

 private:
  AddressSpace& mm_;
  MmuNotifierRange range_;
};

// Top of the mmap area: top-down allocation starts below a stack gap, as on x86-64.
inline constexpr Va kMmapBase = kTaskSize - (128ULL << 20);

// get_unmapped_area: `hint` when [hint, hint + len) is free user space, else the highest free
// gap below the mmap base aligned to `align`; 0 when there is none. mmap lock held.
Va get_unmapped_area(const VmaTree& vmas, Va hint, uint64_t len, uint64_t align);

// VMA helpers of mmap, mprotect and madvise (mmap.cc). split_vma_at splits the VMA containing
// addr so that a VMA boundary falls on addr, first splitting a PMD mapping that straddles it
// (mmap lock held for write). vmas_in lists the VMAs inside [start, end) after split_vma_at
// of both ends. merge_range re-merges the VMAs around [start, end) after their flags changed.
// mapped_run_end is the end of the run of VMAs without holes from start, clamped to end (start
// when no VMA contains it); fully_mapped says whether that run reaches end. mmap lock held.
void split_vma_at(AddressSpace& mm, VmaTree& vmas, Va addr) GPUSVM_REQUIRES(mm.mmap_lock());
std::vector<Vma*> vmas_in(VmaTree& vmas, Va start, Va end);
void merge_range(VmaTree& vmas, Va start, Va end);
Va mapped_run_end(const VmaTree& vmas, Va start, Va end);
bool fully_mapped(const VmaTree& vmas, Va start, Va end);

// munmap of [start, end) with the mmap lock held for write: splits VMAs (and PMD mappings)
// at the ends, fires one UNMAP invalidation, zaps and removes the VMAs.
void do_munmap(AddressSpace& mm, VmaTree& vmas, Va start, Va end) GPUSVM_REQUIRES(mm.mmap_lock());

// Frees the PTE tables of the 2 MiB regions of [start, end) that no VMA touches any more
// (free_pgtables), so a later mapping there starts from a none PMD (and may get a THP).
// mmap lock held for write.
void free_pgtables(AddressSpace& mm, const VmaTree& vmas, Va start, Va end)
    GPUSVM_REQUIRES(mm.mmap_lock());

// Unmaps every entry in [start, end) (inside one VMA), dropping mapcounts, rmap items and
// mapping references; splits a huge leaf that is only partly covered. The caller has started
// the matching invalidation. mmap lock held (read suffices), no page-table lock held.
void zap_range(AddressSpace& mm, Va start, Va end) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// Splits the huge leaf at slot (if it still is one) into 512 PTEs using the deposited table:
// a THP becomes PTE-mapped (the folio stays large), the huge zero folio becomes 512 zero-page
// PTEs, a device-private PMD becomes 512 device-private PTEs. A page-cache THP's PMD (no
// deposit) is zapped instead and left none: its pages refault from the cache. Fires a CLEAR invalidation over
// the 2 MiB. mmap lock held, no page-table lock held. Never fails.
// A PMD migration entry becomes 512 PTE migration entries and its migration record 512 PTE
// records; that record change is serialized with a split during migration
// (split_migrating_folio moves records between folios under the rmap walk lock held for
// write), so split_huge_pmd takes the rmap walk lock shared, as fork and mremap do when they
// change records. The _walk_locked variant is for a caller that holds it already (either mode).
void split_huge_pmd(AddressSpace& mm, PmdSlot slot, Va haddr) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());
void split_huge_pmd_walk_locked(AddressSpace& mm, PmdSlot slot, Va haddr)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock(), mm.mem()->rmap_walk_lock());

// Calls fn(slot, addr, next) for each 2 MiB chunk [addr, next) of [start, end) that has a PMD
// slot, after splitting a huge leaf that the chunk covers only in part. mmap lock held.
template <typename Fn>
void for_each_pmd_range(AddressSpace& mm, Va start, Va end, Fn&& fn) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PageTable& pt = mm.page_table();
  for (Va addr = start; addr < end;) {
    const Va haddr = pmd_align_down(addr);
    const Va next = std::min(haddr + kPmdSize, end);
    PmdSlot slot = pt.pmd_lookup(addr);
    if (slot) {
      if (slot.load_lockless().is_leaf() && (addr != haddr || next != haddr + kPmdSize)) {
        split_huge_pmd(mm, slot, haddr);
      }
      fn(slot, addr, next);
    }
    addr = next;
  }
}

// Splits every huge leaf that straddles `addr` (not 2 MiB aligned) in the VMA containing it,
// so that a VMA boundary at addr cuts no PMD mapping. mmap lock held.
void split_huge_pmd_address(AddressSpace& mm, Va addr) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// Installs a PMD-mapped THP or huge zero folio at haddr; allocates the deposit table first.
// Returns kOk, kRetry (the PMD is no longer none), kOom, or kSigbus-free fallback signalled
// by returning false in *fallback. mmap lock held.
VmFault do_huge_pmd_anonymous_page(AddressSpace& mm, Vma& vma, PmdSlot slot, Va va,
                                   bool write, bool* fallback) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// MADV_COLLAPSE of the aligned 2 MiB at haddr (fully inside `vma`). mmap lock held for write.
// Returns 0, -ENOMEM (no THP), -EAGAIN (a page is busy: locked, referenced beyond its mappings
// by GUP or a pin, or a soft leaf).
[[nodiscard]] int collapse_huge_page(AddressSpace& mm, Vma& vma, Va haddr) GPUSVM_REQUIRES(mm.mmap_lock());

// collapse_pte_mapped_thp (install_pmd): after collapse_file, maps the PMD-sized page-cache
// folio of `vma`'s object at haddr by one PMD leaf in `mm`: PTEs that still map its pages
// (a shmem THP left PTE-mapped by a partial munmap or mprotect) are cleared and their table
// detached. Returns 0 (also when the PMD maps the folio already), -EINVAL when the cache holds
// no such folio or the table maps something else, -ENOMEM (no PMD table). mmap lock held for
// write, no other lock; may sleep (notifier callbacks).
[[nodiscard]] int collapse_pte_mapped_thp(AddressSpace& mm, Vma& vma, Va haddr)
    GPUSVM_REQUIRES(mm.mmap_lock());

// split_folio for a large anonymous folio mapped only by PTEs of `mm` (the kernel's
// split_huge_page as MADV_FREE uses it): unmaps every mapping to a migration entry, freezes the
// refcount, turns the folio into 4 KiB folios and maps them back; subpages that hold only
// zeroes are mapped to the shared zero page instead (Linux >= 6.12) and freed.
// Context: mmap lock of `mm` held, folio locked, one reference held by the caller (kept on
// the first page, which stays locked). Returns 0, -EBUSY (PMD-mapped, mapped by another
// process, not anonymous) or -EAGAIN (an unexpected reference: nothing changed).
[[nodiscard]] int split_folio_exclusive(AddressSpace& mm, Folio* folio)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// The address rules of a MAP_FIXED / MAP_FIXED_NOREPLACE mapping of alen (page-aligned)
// bytes at addr: 0, -EINVAL (unaligned), -EPERM (below mmap_min_addr) or -ENOMEM (past the
// user address space).
inline int check_fixed_addr(Va addr, uint64_t alen) {
  if (!page_aligned(addr)) return -EINVAL;
  if (addr < kMmapMinAddr) return -EPERM;
  if (addr + alen > kTaskSize || addr + alen < addr) return -ENOMEM;
  return 0;
}

// split_folio for a large anonymous folio mapped by any number of processes, by PTEs or PMDs
// (the kernel's unmap_folio + __split_huge_page + remap_page): every mapping becomes a
// migration entry through the reverse map (a CLEAR invalidation in each address space), the
// unmapped folio is split as a migration would split it, and each 4 KiB folio is mapped back
// where its page was. Context and result as split_folio_exclusive (mm's mmap lock held, folio
// locked, one reference held by the caller and kept on the first page, which stays locked);
// -EBUSY also when a mapping could not be taken, -EAGAIN for an unexpected reference. May
// sleep (notifier callbacks).
[[nodiscard]] int split_folio_rmap(AddressSpace& mm, Folio* folio) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// Copies one 4 KiB page's bytes.
void copy_page_data(Folio* dst, const Folio* src);

// migration_entry_wait: sleeps until the folio holding `page` is unlocked, then returns
// kRetry. page may be null (pfn_to_page of a device pfn whose pagemap is gone): the migration
// is over, retry at once. Called with no page-table lock held. `va` (the entry's address) is
// for the diagnostic: after hang_timeout() it logs the address, the folio and its holder and
// returns kTimeout (a leftover migration entry or a leaked folio lock).
VmFault wait_for_migration(Folio* page, Va va);
// folio_lock_or_retry's wait: the fault found `folio` locked by another thread (`what`: the
// kind of entry that led to it, for the log) and waits for the unlock. kRetry once unlocked;
// after hang_timeout() kTimeout, logged as for wait_for_migration. No page-table lock held.
VmFault fault_wait_unlocked(Folio* folio, Va va, const char* what);

}  // namespace gpusvm::mm
