// Per-address-space statistics (what faults, walks and syscalls did). Read for reports and
// asserted by tests; see gpusvm/base/stats.h for the memory-ordering contract.
#pragma once

#include <cstdint>
#include <functional>

#include "gpusvm/base/stats.h"

namespace gpusvm::mm {

#define GPUSVM_MM_STATS(X)                                                         \
  X(faults, "CPU page faults handled")                                            \
  X(faults_read_zero, "read faults mapped to the zero page")                      \
  X(faults_anon, "faults that allocated a 4 KiB anonymous page")                  \
  X(faults_swapin, "faults that read a page back from swap (do_swap_page)")        \
  X(faults_thp, "faults that allocated a PMD-mapped THP")                         \
  X(faults_thp_fallback, "THP-eligible faults that fell back to 4 KiB")           \
  X(faults_huge_zero, "read faults mapped to the huge zero folio")                \
  X(faults_hugetlb, "faults that mapped a new hugetlb pool page (MAP_HUGETLB)")    \
  X(faults_cow, "write faults that copied a page (COW, zero-page replacement)")   \
  X(faults_reuse, "write faults that reused an exclusive page in place")          \
  X(faults_shmem, "faults on shared/file mappings")                               \
  X(faults_migration_wait, "faults that waited for a migration entry")            \
  X(faults_sigsegv, "faults that failed with SIGSEGV")                            \
  X(faults_oom, "faults that failed with OOM")                                    \
  X(thp_split_pmd, "PMD mappings split into PTE mappings")                        \
  X(thp_split_folio, "large folios split into small folios")                      \
  X(thp_collapse, "ranges collapsed into a THP (MADV_COLLAPSE)")                  \
  X(hmm_walks, "page walks done by hmm_range_fault")                              \
  X(hmm_faults, "pages hmm_range_fault faulted (handle_mm_fault calls)")         \
  X(hmm_restarts, "hmm_range_fault walk restarts after a fault or wait")          \
  X(migrate_walks, "page walks that installed migration entries (part of hmm_walks)") \
  X(migrate_collected, "mappings replaced by migration entries")                  \
  X(exclusive_made, "device-exclusive entries installed by make_device_exclusive") \
  X(exclusive_retries, "make_device_exclusive attempts that found the page changed") \
  X(exclusive_restored, "device-exclusive entries made present again (CPU fault, fork)") \
  X(cow_copies, "pages copied for copy-on-write")                                 \
  X(zapped_pages, "pages unmapped by munmap/madvise/exit")

struct MmStats {
#define GPUSVM_MM_STAT_FIELD(name, desc) StatCounter name;
  GPUSVM_MM_STATS(GPUSVM_MM_STAT_FIELD)
#undef GPUSVM_MM_STAT_FIELD

  // Calls fn(name, description, value) for every counter in declaration order.
  void for_each(const std::function<void(const char*, const char*, uint64_t)>& fn) const {
#define GPUSVM_MM_STAT_VISIT(name, desc) fn(#name, desc, name.get());
    GPUSVM_MM_STATS(GPUSVM_MM_STAT_VISIT)
#undef GPUSVM_MM_STAT_VISIT
  }
};

}  // namespace gpusvm::mm
