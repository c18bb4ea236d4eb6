// migrate_vma: move the pages of a range between system memory and device memory, private or
// coherent (mm/migrate_device.c's contract, with seed 002's unified fault-and-migrate walk).
//
// A driver migrates [start, end) of one VMA in three steps, holding the mmap lock (read):
//
//   MigrateVma m{.mm, .start, .end, .src, .dst, .pgmap_owner, .flags = SELECT_* [| FAULT]};
//   migrate_vma_setup(&m);      // collect: lock each page that may move, replace its entries
//                               // (in every address space that maps it) by migration
//                               // entries (CPU accesses now wait); src[i] says what was
//                               // found; cpages counts the pages that may move
//   for each i with src[i] & MIGRATE_PFN_MIGRATE:
//       allocate a destination folio, folio_lock() it, copy the data (the src page, or zeroes
//       when src[i] has no MIGRATE_PFN_VALID: a hole or the zero page),
//       dst[i] = migrate_pfn(dst_pfn)
//   migrate_vma_pages(&m);      // commit: pages whose destination the driver did not provide,
//                               // or that cannot move, lose MIGRATE_PFN_MIGRATE in src[i]
//   migrate_vma_finalize(&m);   // map the destination (or restore the source) where the
//                               // migration entries are, unlock and release everything
//
// "0 from setup means the call ran, not that every page can move": check src[i].
//
// The collection is the unified walk of hmm_range_fault (hmm.h): with MIGRATE_VMA_FAULT,
// pages that are not present (another device's memory, ...) are faulted in and collected in
// the same walk. A driver that already has an hmm_range (drm_gpusvm's get_pages) can instead
// call hmm_range_fault with HMM_PFN_REQ_MIGRATE and then migrate_hmm_range_setup().
//
// Large folios: with MIGRATE_VMA_SELECT_COMPOUND, a THP or device-private PMD mapping (or a
// hole, or the huge zero folio) covering an aligned 2 MiB of the range is collected whole:
// src[i] of its first page gets MIGRATE_PFN_COMPOUND and the other 511 words are 0. The driver
// then provides one 2 MiB destination (dst[i] = migrate_pfn(pfn) | MIGRATE_PFN_COMPOUND,
// tails 0) or 512 small ones in dst[i..i+511]; migrate_vma_pages then splits the source
// folio (seed 003: it is already unmapped) or inserts 512 small pages for a hole. Without
// the flag, and for a folio only partly inside the range, the folio is split first (in every
// process that maps it) and its pages collected one by one; one that cannot be split (pinned)
// stays.
//
// Eviction by device pfn, without a VMA or an mmap lock (the driver's memory is being taken
// away): migrate_device_range / _pfns, then the driver fills dst, then migrate_device_pages
// and migrate_device_finalize. Busy pages are left out (src = 0): the caller retries.
#pragma once

#include <cstdint>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class Folio;
class PhysMem;
struct HmmRange;

inline constexpr uint64_t MIGRATE_PFN_VALID = 1ULL << 0;
inline constexpr uint64_t MIGRATE_PFN_MIGRATE = 1ULL << 1;
inline constexpr uint64_t MIGRATE_PFN_WRITE = 1ULL << 3;
inline constexpr uint64_t MIGRATE_PFN_COMPOUND = 1ULL << 4;
inline constexpr unsigned MIGRATE_PFN_SHIFT = 6;

inline constexpr uint64_t migrate_pfn(Pfn pfn) { return (pfn << MIGRATE_PFN_SHIFT) | MIGRATE_PFN_VALID; }
inline constexpr Pfn migrate_pfn_to_pfn(uint64_t mpfn) { return mpfn >> MIGRATE_PFN_SHIFT; }

enum MigrateVmaFlags : unsigned {
  MIGRATE_VMA_SELECT_SYSTEM = 1u << 0,          // collect system-memory pages (and holes)
  MIGRATE_VMA_SELECT_DEVICE_PRIVATE = 1u << 1,  // collect device-private pages of pgmap_owner
  MIGRATE_VMA_SELECT_DEVICE_COHERENT = 1u << 2,  // collect device-coherent pages of pgmap_owner
  MIGRATE_VMA_SELECT_COMPOUND = 1u << 3,        // collect an aligned 2 MiB folio (or hole) whole
  MIGRATE_VMA_FAULT = 1u << 4,                  // fault non-present pages in, in the same walk
};

// How migrate_vma_setup walks the page table (ours, for benchmarks and tests that compare
// the paths; the result is the same): one walk that faults and collects (the default), the
// two-step path (a fault walk, then the collect walk), or the three-step path (collect, fault
// what could not be taken, collect again). Without MIGRATE_VMA_FAULT all are one collect walk.
enum class MigrateWalkMode : uint8_t { kUnified, kTwoStep, kThreeStep };

struct MigrateVma {
  AddressSpace* mm = nullptr;
  Va start = 0;
  Va end = 0;          // exclusive; [start, end) inside one VMA
  uint64_t* src = nullptr;  // npages words, written by setup
  uint64_t* dst = nullptr;  // npages words, written by the driver
  uint64_t npages = 0;      // set by setup
  uint64_t cpages = 0;      // set by setup: pages that may migrate
  const void* pgmap_owner = nullptr;  // tags the MIGRATE invalidation; selects device pages
  unsigned flags = 0;
  // The folio a CPU fault is migrating back (already locked and referenced by the fault
  // handler): setup neither locks nor unlocks it (the fault_page rules of migrate_to_ram).
  Folio* fault_page = nullptr;
  MigrateWalkMode walk_mode = MigrateWalkMode::kUnified;
};

// Returns 0, or -EINVAL: no mm/src/dst, unaligned or empty range, range not inside one
// VMA, a hugetlb or VM_SPECIAL VMA (in a shared or file VMA only anonymous pages move), no
// SELECT flag or unknown flags, a fault_page that is not a locked device-private page. With
// MIGRATE_VMA_FAULT also the walk's errors (-EFAULT, -EPERM, -EBUSY, -ETIMEDOUT: see
// hmm_range_fault; -ETIMEDOUT also without it), after every entry it had
// replaced was restored (src is all 0 then).
// Context: mmap lock held (asserted), no page-table lock; may sleep (faults, notifier
// callbacks).
[[nodiscard]] int migrate_vma_setup(MigrateVma* args);
void migrate_vma_pages(MigrateVma* args) GPUSVM_REQUIRES_SHARED(args->mm->mmap_lock());
void migrate_vma_finalize(MigrateVma* args);

// After hmm_range_fault(range) with HMM_PFN_REQ_MIGRATE returned 0: fills range->migrate
// (mm, start, end, npages, src from the MIGRATE words, dst zeroed, cpages) and unmaps the
// collected pages everywhere else, as migrate_vma_setup does after its walk. Then
// migrate_vma_pages / _finalize as usual. Returns 0 or -EINVAL. mmap lock held.
[[nodiscard]] int migrate_hmm_range_setup(HmmRange* range);

// Collects the device pages [start, start + npages) of `mem` for eviction: every page in use
// is locked and unmapped from every address space (found through the reverse map); src[i]
// gets migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE, or 0 for a free, busy or pinned page. Returns
// 0, or -EINVAL for a range outside every registered pagemap. No mmap lock needed (none may be
// held: the unmap takes page-table locks of any address space). May sleep.
[[nodiscard]] int migrate_device_range(PhysMem* mem, uint64_t* src_pfns, Pfn start, uint64_t npages);
// The same for a list of device pfns: src_pfns[i] holds a pfn on entry.
[[nodiscard]] int migrate_device_pfns(PhysMem* mem, uint64_t* src_pfns, uint64_t npages);
// migrate_vma_pages without a VMA. A compound source (MIGRATE_PFN_COMPOUND) with small
// destinations is not split, unlike migrate_vma_pages: it stays unmigrated, src loses MIGRATE
// and COMPOUND (seed 003), so an evicting driver must give compound sources compound
// destinations; the small ones are released by migrate_device_finalize.
void migrate_device_pages(PhysMem* mem, uint64_t* src_pfns, uint64_t* dst_pfns, uint64_t npages);
void migrate_device_finalize(PhysMem* mem, uint64_t* src_pfns, uint64_t* dst_pfns, uint64_t npages);

// Moves one device-coherent folio to a new system folio of the same order (for a
// FOLL_LONGTERM pin, which must not keep device memory): unmaps it everywhere, copies it and
// maps the copy in its place.
// The caller holds one reference on `folio`, which this call consumes (it is the
// migration's reference). Returns 0, -EBUSY (the folio is pinned, still mapped somewhere or
// referenced elsewhere: it stays where it is), -ENOMEM, or -EINVAL (not the head of a
// device-coherent folio). Context: no page-table lock, the folio unlocked; may sleep.
[[nodiscard]] int migrate_device_coherent_folio(Folio* folio);

}  // namespace gpusvm::mm
