// hmm_range_fault: mirror a range of a CPU address space into a device.
//
// The caller describes [start, end) and gets one word per page: the pfn in the low bits and
// flags in the high bits (same layout as the kernel, including the seed-002 MIGRATE and
// COMPOUND bits that the migration issue fills).
//
// Input per page is hmm_pfns[i] & pfn_flags_mask | default_flags:
//   nothing requested     snapshot: report what is there, fault nothing
//   HMM_PFN_REQ_FAULT     the page must be present (VALID) or the call faults it in
//   ... | HMM_PFN_REQ_WRITE  and writable (WRITE)
// Output per page:
//   HMM_PFN_VALID | pfn   present (zero page included, read-only); HMM_PFN_WRITE if writable
//   HMM_PFN_ERROR         no VMA, PROT_NONE VMA or a VM_IO/VM_PFNMAP VMA (snapshot only)
//   0                     nothing there (none, swap-like entry or another owner's device page)
//   order (hmm_pfn_to_map_order) kPmdOrder for a page mapped by a PMD, else 0
// Device-private pages are reported (VALID|pfn, WRITE if the entry is writable) only when
// their pagemap's owner equals dev_private_owner; any other device-private page is treated
// like a swap entry: 0, or faulted back to RAM (its owner's migrate_to_ram) when a fault was
// requested.
//
// Fault and migrate in one walk (seed 002, DESIGN §3.8): with HMM_PFN_REQ_MIGRATE in
// default_flags and range.migrate set, the same walk also collects every page it may migrate:
// under the page-table lock held from reading an entry to replacing it, a page that needs no
// (more) fault is locked and replaced by a migration entry, and its word gains HMM_PFN_MIGRATE
// (VALID|MIGRATE|pfn, WRITE if it was writable). A hole or the zero page of an anonymous VMA
// gets VALID|MIGRATE without a source page (hmm_pfn_migrate_has_source) and is not faulted
// even when a (write) fault is requested: the migration gives it a new, zeroed page anyway. Which pages are taken
// follows migrate->flags (REQ_MIGRATE implies MIGRATE_VMA_SELECT_SYSTEM) and
// dev_private_owner. Then migrate_hmm_range_setup() (migrate.h) turns the words into the
// migrate src array, and the driver goes on with migrate_vma_pages / _finalize.
// While migrating: the range must lie in one VMA (-ERANGE); one MIGRATE invalidation tagged
// with dev_private_owner covers the walk; the notifier sequence is checked only before it
// starts (after that the migration entries, not the sequence, keep the collected pages
// stable, and the walk's own invalidation must not make it fail); entries under another
// migration are skipped, never waited on; on any error every migration entry installed is
// restored before returning, so no caller ever meets a leftover one (seed 000).
#pragma once

#include <cstdint>

#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class MmuIntervalNotifier;
struct MigrateVma;

inline constexpr unsigned kBitsPerLong = 64;
inline constexpr uint64_t HMM_PFN_VALID = 1ULL << (kBitsPerLong - 1);
inline constexpr uint64_t HMM_PFN_WRITE = 1ULL << (kBitsPerLong - 2);
inline constexpr uint64_t HMM_PFN_ERROR = 1ULL << (kBitsPerLong - 3);
inline constexpr uint64_t HMM_PFN_DMA_MAPPED = 1ULL << (kBitsPerLong - 4);
inline constexpr uint64_t HMM_PFN_P2PDMA = 1ULL << (kBitsPerLong - 5);
inline constexpr uint64_t HMM_PFN_P2PDMA_BUS = 1ULL << (kBitsPerLong - 6);
inline constexpr uint64_t HMM_PFN_MIGRATE = 1ULL << (kBitsPerLong - 7);
inline constexpr uint64_t HMM_PFN_COMPOUND = 1ULL << (kBitsPerLong - 8);
inline constexpr unsigned HMM_PFN_ORDER_SHIFT = kBitsPerLong - 13;
inline constexpr uint64_t HMM_PFN_ORDER_MASK = 0x1fULL << HMM_PFN_ORDER_SHIFT;
inline constexpr uint64_t HMM_PFN_REQ_FAULT = HMM_PFN_VALID;
inline constexpr uint64_t HMM_PFN_REQ_WRITE = HMM_PFN_WRITE;
inline constexpr uint64_t HMM_PFN_REQ_MIGRATE = HMM_PFN_MIGRATE;
inline constexpr uint64_t HMM_PFN_FLAGS = ~((1ULL << HMM_PFN_ORDER_SHIFT) - 1);
// Bits the caller owns: preserved from input to output.
inline constexpr uint64_t HMM_PFN_INOUT_FLAGS =
    HMM_PFN_DMA_MAPPED | HMM_PFN_P2PDMA | HMM_PFN_P2PDMA_BUS;

inline constexpr Pfn hmm_pfn_to_pfn(uint64_t hmm_pfn) { return hmm_pfn & ~HMM_PFN_FLAGS; }
inline constexpr unsigned hmm_pfn_to_map_order(uint64_t hmm_pfn) {
  return static_cast<unsigned>((hmm_pfn & HMM_PFN_ORDER_MASK) >> HMM_PFN_ORDER_SHIFT);
}

struct HmmRange {
  MmuIntervalNotifier* notifier = nullptr;  // required: gives the address space
  uint64_t notifier_seq = 0;                // from notifier->read_begin()
  Va start = 0;
  Va end = 0;                 // exclusive
  uint64_t* hmm_pfns = nullptr;  // (end - start) / kPageSize words, in and out
  uint64_t default_flags = 0;
  uint64_t pfn_flags_mask = 0;
  const void* dev_private_owner = nullptr;
  // Fault-and-migrate: where migrate_hmm_range_setup() puts the result (src, dst, flags).
  MigrateVma* migrate = nullptr;
};

// A VALID|MIGRATE word with a page behind it (not a hole or the zero page, whose pfn is 0).
inline constexpr bool hmm_pfn_migrate_has_source(uint64_t hmm_pfn) {
  return (hmm_pfn & (HMM_PFN_VALID | HMM_PFN_MIGRATE)) == (HMM_PFN_VALID | HMM_PFN_MIGRATE) &&
         hmm_pfn_to_pfn(hmm_pfn) != 0;
}

// Returns 0 when every page was processed (which does not mean every page is VALID: check
// each word), or:
//   -EINVAL  no notifier, unaligned/empty range, range outside the notifier, unknown flags
//   -EBUSY   the notifier was invalidated since notifier_seq: read_begin() again and retry
//   -EFAULT  a fault was requested for a page that cannot be faulted (no VMA, PROT_NONE,
//            VM_IO/VM_PFNMAP, the fault failed with SIGSEGV/SIGBUS/OOM: as in Linux, any
//            VM_FAULT_ERROR is -EFAULT)
//   -EPERM   a write fault was requested on a VMA without VM_WRITE
//   -ERANGE  migrating, and the range is not inside one VMA
//   -ETIMEDOUT  a fault waited hang_timeout() for a folio lock (a migration that does not
//            end, a leaked lock), or the walk kept restarting for hang_timeout() without
//            getting through (a livelock); logged with the address and the folio. Do not
//            retry as for -EBUSY: the page stays busy.
// HMM_PFN_REQ_MIGRATE without range.migrate (or in pfn_flags_mask) is -EINVAL.
// Context: the caller holds the address space's mmap lock (read) - asserted - and no other
// gpusvm lock. Faulting may sleep. Page-table locks are taken per PMD and never held across
// a fault (asserted).
[[nodiscard]] int hmm_range_fault(HmmRange* range);

}  // namespace gpusvm::mm
