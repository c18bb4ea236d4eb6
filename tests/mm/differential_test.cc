// Differential tests: the same memory-management scenario on this machine's Linux kernel and
// on gpusvm/mm, page state compared page by page (kind, per-page mapcount, which pages share a
// frame or a folio). See linux_oracle.h and docs/differential-testing.md.
#include <gtest/gtest.h>

#include <cstdlib>
#include <ostream>
#include <string>

#include "gpusvm/base/errno.h"
#include "tests/mm/linux_oracle.h"

namespace gpusvm::mm::oracle {

namespace {
constexpr uint64_t P = kPageSize;
constexpr uint64_t M2 = kPmdSize;
}  // namespace

// The scenarios. linux_behaviour records what Linux 6.18 (THP enabled=madvise,
// use_zero_page=1, defrag=madvise) was observed to do; the test compares against the kernel
// it runs on, not against this text.
std::vector<Scenario> all_scenarios() {
  std::vector<Scenario> v;

  // --- 4 KiB anonymous memory -----------------------------------------------------------
  v.push_back(Scenario("anon_small_faults",
                       "read fault maps the shared zero page; write fault a new small folio; a "
                       "write to a zero-page PTE replaces it by a small folio")
                  .mmap(0, 8 * P)
                  .read(0, 0 * P)
                  .write(0, 1 * P)
                  .read(0, 2 * P)
                  .snapshot("p0 read, p1 written, p2 read")
                  .write(0, 2 * P)
                  .snapshot("p2 written after read"));
  v.push_back(Scenario("anon_write_to_readonly_faults",
                       "a store to a PROT_READ page is SIGSEGV (-EFAULT) and leaves the zero page")
                  .mmap(0, 4 * P, PROT_READ)
                  .read(0, 0)
                  .write(0, 0)
                  .write(0, P));
  v.push_back(Scenario("map_populate",
                       "MAP_POPULATE write-faults a private writable mapping (small folios) and "
                       "read-faults a read-only one (zero pages); no THP without MADV_HUGEPAGE")
                  .mmap(0, 8 * P, kRW, MAP_POPULATE)
                  .mmap(1, 8 * P, PROT_READ, MAP_POPULATE)
                  .mmap(2, M2, kRW, MAP_POPULATE));

  // --- THP faults --------------------------------------------------------------------------
  v.push_back(Scenario("thp_read_maps_huge_zero",
                       "read fault in an aligned MADV_HUGEPAGE range maps the huge zero folio by "
                       "a PMD")
                  .mmap_huge(0, M2)
                  .read(0, 5 * P));
  v.push_back(Scenario("thp_write_maps_pmd",
                       "write fault in an aligned MADV_HUGEPAGE range allocates a THP mapped by "
                       "a PMD (every page mapcount 1)")
                  .mmap_huge(0, M2)
                  .write(0, 3 * P));
  v.push_back(Scenario("thp_unaligned_vma_falls_back",
                       "a MADV_HUGEPAGE VMA that covers no aligned 2 MiB gets small folios and "
                       "4 KiB zero pages")
                  .mmap_huge(0, M2, 16 * P)
                  .write(0, 0)
                  .read(0, P));
  v.push_back(Scenario("huge_zero_write_allocates_thp",
                       "a write to a huge-zero PMD allocates a whole PMD-mapped THP (since 6.13; "
                       "before, the PMD was split into 511 zero PTEs + 1 small folio)")
                  .needs(613, "Linux < 6.13 splits the huge zero PMD on a write fault")
                  .mmap_huge(0, M2)
                  .read(0, 5 * P)
                  .snapshot("after read")
                  .write(0, 7 * P)
                  .snapshot("after write"));
  v.push_back(Scenario("thp_nohugepage_keeps_existing",
                       "MADV_NOHUGEPAGE does not split an existing THP; later faults in the range "
                       "use small folios and the 4 KiB zero page")
                  .mmap_huge(0, 2 * M2)
                  .write(0, 0)
                  .madvise(0, 0, 0, MADV_NOHUGEPAGE)
                  .write(0, M2)
                  .read(0, M2 + 8 * P));

  // --- Partial changes of a THP ------------------------------------------------------------
  v.push_back(Scenario("thp_mprotect_partial_splits_pmd",
                       "mprotect of part of a THP splits the PMD: all 512 pages stay mapped as "
                       "PTEs of the same large folio")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .mprotect(0, 4 * P, 2 * P, PROT_READ));
  v.push_back(Scenario("thp_mprotect_whole_keeps_pmd",
                       "mprotect of the whole 2 MiB keeps the PMD mapping")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .mprotect(0, 0, 0, PROT_READ));
  v.push_back(Scenario("huge_zero_mprotect_partial",
                       "mprotect of part of a huge-zero PMD splits it into 512 4 KiB zero-page "
                       "PTEs")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .mprotect(0, 4 * P, 2 * P, PROT_READ));
  v.push_back(Scenario("thp_munmap_partial",
                       "munmap of part of a THP splits the PMD; the rest stays mapped by PTEs of "
                       "the large folio (queued for deferred split)")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .munmap(0, 4 * P, 2 * P));
  v.push_back(Scenario("huge_zero_munmap_partial",
                       "munmap of part of a huge-zero PMD leaves 4 KiB zero pages around the hole")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .munmap(0, 4 * P, 2 * P));
  v.push_back(Scenario("thp_dontneed_partial_then_write",
                       "MADV_DONTNEED of part of a THP splits the PMD and zaps the pages; a later "
                       "write into the hole gets a small folio")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .madvise(0, 4 * P, 2 * P, MADV_DONTNEED)
                  .snapshot("after DONTNEED [4,6)")
                  .write(0, 4 * P)
                  .snapshot("after write p4"));
  v.push_back(Scenario("thp_dontneed_full_then_read",
                       "MADV_DONTNEED of the whole 2 MiB zaps the PMD; a read maps the huge zero "
                       "folio again")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .madvise(0, 0, 0, MADV_DONTNEED)
                  .snapshot("after DONTNEED")
                  .read(0, 0)
                  .snapshot("after read"));
  v.push_back(Scenario("huge_zero_dontneed_partial",
                       "MADV_DONTNEED of part of a huge-zero PMD: zero-page PTEs around a hole")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .madvise(0, 4 * P, 2 * P, MADV_DONTNEED));
  v.push_back(Scenario("thp_free_full_keeps_pmd",
                       "MADV_FREE of a whole THP keeps it PMD-mapped (lazily freed under "
                       "pressure); MADV_FREE on small folios keeps them mapped")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .madvise(0, 0, 0, MADV_FREE)
                  .mmap(1, 4 * P)
                  .write(1, 0)
                  .write(1, P)
                  .read(1, 2 * P)
                  .madvise(1, 0, 0, MADV_FREE));
  v.push_back(Scenario("thp_free_partial_splits_folio",
                       "MADV_FREE of part of a THP splits the folio itself (split_folio): 512 "
                       "small folios, the freed ones still mapped until reclaim")
                  .mmap_huge(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 4 * P, 2 * P, MADV_FREE));
  v.push_back(Scenario("thp_free_partial_remaps_zero_subpages",
                       "when a partly written THP is split, subpages that contain only zeroes are "
                       "remapped to the shared zero page (since 6.12): 1 small folio + 511 zero "
                       "pages")
                  .needs(612, "zero-filled subpages are remapped to the zero page on split "
                              "since Linux 6.12")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .madvise(0, 4 * P, 2 * P, MADV_FREE));

  // --- MADV_COLLAPSE -----------------------------------------------------------------------
  v.push_back(Scenario("collapse_small_folios",
                       "MADV_COLLAPSE of 512 written small folios (VMA without MADV_HUGEPAGE) "
                       "makes one PMD-mapped THP")
                  .mmap(0, M2)
                  .fill(0, 0, M2)
                  .snapshot("before collapse")
                  .madvise(0, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_sparse",
                       "MADV_COLLAPSE ignores max_ptes_none: one written page + a zero page + "
                       "510 empty PTEs collapse into a PMD-mapped THP")
                  .mmap(0, M2)
                  .write(0, 3 * P)
                  .read(0, 5 * P)
                  .madvise(0, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_without_anon_page_fails",
                       "MADV_COLLAPSE fails with EINVAL when the range has only zero-page PTEs "
                       "(no writable PTE) or nothing at all; nothing changes")
                  .mmap(0, M2)
                  .read(0, 0)
                  .read(0, P)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .mmap(1, M2)
                  .madvise(1, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_nohugepage_fails",
                       "MADV_COLLAPSE in a MADV_NOHUGEPAGE VMA fails with EINVAL")
                  .mmap(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_NOHUGEPAGE)
                  .madvise(0, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_pte_mapped_thp",
                       "a THP left PTE-mapped (mprotect split then restore) is collapsed back "
                       "into a PMD mapping (of a new folio)")
                  .mmap_huge(0, M2)
                  .fill(0, 0, M2)
                  .mprotect(0, 0, P, PROT_READ)
                  .mprotect(0, 0, P, kRW)
                  .snapshot("PTE-mapped")
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("collapsed"));

  // --- fork and COW ------------------------------------------------------------------------
  v.push_back(Scenario("fork_small_cow",
                       "fork shares small folios (mapcount 2) and zero pages; the writer gets a "
                       "copy; the other side's page becomes exclusive (mapcount 1) and is reused "
                       "on its next write")
                  .mmap(0, 4 * P)
                  .write(0, 0)
                  .write(0, P)
                  .read(0, 2 * P)
                  .fork()
                  .snapshot("after fork")
                  .in(1)
                  .write(0, P)
                  .snapshot("child wrote p1")
                  .in(0)
                  .write(0, 0)
                  .snapshot("parent wrote p0")
                  .write(0, P)
                  .snapshot("parent wrote p1 (sole owner: reuse)"));
  v.push_back(Scenario("fork_thp_child_write",
                       "fork shares the THP PMD-mapped in both (map 2); the child's write splits "
                       "only the child's PMD and copies one 4 KiB page; the parent's later write "
                       "splits its PMD and copies one page; after the child exits every page is "
                       "map 1")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .fork()
                  .snapshot("after fork")
                  .in(1)
                  .write(0, 3 * P)
                  .snapshot("child wrote p3")
                  .in(0)
                  .write(0, 9 * P)
                  .snapshot("parent wrote p9")
                  .exit_proc(1)
                  .snapshot("child exited"));
  v.push_back(Scenario("fork_thp_pte_reuse_after_child_exit",
                       "a write-protected PTE of a large folio that this process alone maps again "
                       "(the child exited) is reused in place on a write fault, no copy (COW "
                       "reuse of PTE-mapped THP, Linux 6.15+)")
                  .needs(615, "Linux < 6.15 never reuses a page of a PTE-mapped large folio on "
                              "a write fault; it copies")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .fork()
                  .in(0)
                  .write(0, 9 * P)
                  .exit_proc(1)
                  .in(0)
                  .snapshot("child exited")
                  .write(0, 11 * P)
                  .snapshot("parent wrote p11"));
  v.push_back(Scenario("fork_thp_parent_write",
                       "the parent writing a shared THP splits its own PMD and copies one page; "
                       "the child keeps its PMD mapping")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .fork()
                  .in(0)
                  .write(0, P));
  v.push_back(Scenario("fork_thp_reuse_after_child_exit",
                       "after the child exits, the parent's write reuses the whole THP: still "
                       "PMD-mapped, same folio")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .fork()
                  .exit_proc(1)
                  .in(0)
                  .write(0, P));
  v.push_back(Scenario("fork_huge_zero_child_write",
                       "the huge zero PMD is shared by fork; a child write gives the child a new "
                       "PMD-mapped THP, the parent keeps the huge zero folio")
                  .needs(613, "Linux < 6.13 splits the huge zero PMD on a write fault")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .fork()
                  .in(1)
                  .write(0, 2 * P));

  // --- mremap ------------------------------------------------------------------------------
  v.push_back(Scenario("mremap_thp_aligned",
                       "moving a THP to a 2 MiB-aligned address moves the PMD: still PMD-mapped")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .reserve(1, 3 * M2)
                  .mremap(0, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 1, M2));
  v.push_back(Scenario("mremap_thp_unaligned",
                       "moving a THP to an unaligned address splits the PMD: 512 PTEs of the same "
                       "folio at the new place")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .reserve(1, 3 * M2)
                  .mremap(0, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 16 * P));
  v.push_back(Scenario("mremap_dontunmap",
                       "MREMAP_DONTUNMAP moves the pages (a THP stays PMD-mapped at an aligned "
                       "target) and leaves the old range mapped but empty")
                  .mmap_huge(0, M2)
                  .write(0, 0)
                  .mmap(1, 4 * P)
                  .write(1, 0)
                  .read(1, P)
                  .reserve(2, 4 * M2)
                  .mremap(0, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, 2, 0)
                  .mremap(1, 0, 4 * P, 4 * P, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP,
                          2, 2 * M2)
                  .snapshot("moved")
                  .read(0, 0)
                  .write(1, 0)
                  .snapshot("old ranges touched again"));
  v.push_back(Scenario("mremap_huge_zero",
                       "a huge zero PMD moved to an aligned address stays a huge zero PMD; moved "
                       "to an unaligned one it becomes 512 zero-page PTEs")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .mmap_huge(1, M2)
                  .read(1, 0)
                  .reserve(2, 4 * M2)
                  .mremap(0, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 2, 0)
                  .mremap(1, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 2, 2 * M2 + 16 * P));

  // --- issue 10: rules where the model used to differ from Linux 6.18 -----------------------
  v.push_back(Scenario("free_partial_huge_zero_keeps_pmd",
                       "MADV_FREE of part of a huge-zero PMD leaves it whole "
                       "(madvise_free_huge_pmd skips the huge zero folio); a later write gets a "
                       "whole PMD-mapped THP")
                  .needs(613, "a write to a huge-zero PMD allocates a THP since Linux 6.13")
                  .mmap_huge(0, M2)
                  .read(0, 0)
                  .madvise(0, 4 * P, 2 * P, MADV_FREE)
                  .snapshot("after MADV_FREE")
                  .write(0, 8 * P)
                  .snapshot("after write"));
  v.push_back(Scenario("fork_thp_free_partial_skips_shared",
                       "MADV_FREE of part of a THP that a fork child still maps does nothing: "
                       "no PMD split, no folio split, both stay PMD-mapped (map 2)")
                  .mmap_huge(0, M2)
                  .fill(0, 0, M2)
                  .fork()
                  .in(0)
                  .madvise(0, 4 * P, 2 * P, MADV_FREE)
                  .snapshot("parent freed p4-p5")
                  .in(1)
                  .madvise(0, 0, 0, MADV_FREE)
                  .snapshot("child freed all"));
  v.push_back(Scenario("collapse_range_inside_one_block_fails",
                       "MADV_COLLAPSE of a range that starts past a 2 MiB boundary and ends "
                       "before the next one (hstart > hend) is -EINVAL, nothing changes")
                  .mmap(0, 2 * M2)
                  .fill(0, 0, 2 * M2)
                  .madvise(0, P, 16 * P, MADV_COLLAPSE)
                  .madvise(0, M2 - 16 * P, 32 * P, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_aligned_start_short_range",
                       "MADV_COLLAPSE of [aligned, aligned + 64 KiB): hstart == hend, no block "
                       "to collapse")
                  .mmap(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 16 * P, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_vma_without_aligned_block_fails",
                       "MADV_COLLAPSE in a VMA that holds no aligned 2 MiB block is -EINVAL "
                       "(thp_vma_allowable_order)")
                  .mmap(0, M2, kRW, 0, 16 * P)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("collapse_refused_while_page_referenced",
                       "MADV_COLLAPSE with a page held by a GUP reference (vmsplice) is -EAGAIN "
                       "(SCAN_PAGE_COUNT: refcount != mapcount); nothing changes; after the "
                       "reference is dropped the collapse succeeds")
                  .mmap(0, M2)
                  .fill(0, 0, M2)
                  .gup_ref(0, 5 * P, P)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("referenced")
                  .put_refs()
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("released"));
  v.push_back(Scenario("collapse_multi_vma_first_error_stops",
                       "MADV_COLLAPSE over two VMAs: the first VMA's error ends the walk, the "
                       "second VMA is not collapsed")
                  .mmap(0, 2 * M2)
                  .fill(0, 0, 2 * M2)
                  .madvise(0, 0, M2, MADV_NOHUGEPAGE)
                  .madvise(0, 0, 0, MADV_COLLAPSE));
  v.push_back(Scenario("shmem_read_fault_around",
                       "a read fault on shared anonymous memory also maps the pages of the "
                       "aligned 64 KiB window already in the page cache (fault-around); a "
                       "write fault maps only its page")
                  .mmap_shared(0, 64 * P)
                  .fill(0, 0, 8 * P)
                  .write(0, 12 * P)
                  .write(0, 40 * P)
                  .write(0, 60 * P)
                  .madvise(0, 0, 0, MADV_DONTNEED)
                  .snapshot("cached, unmapped")
                  .read(0, 3 * P)
                  .read(0, 33 * P)
                  .write(0, 62 * P)
                  .snapshot("after faults"));
  v.push_back(Scenario("shmem_fault_around_clamped_to_vma",
                       "fault-around stays inside the VMA: a neighbour VMA of the same shmem "
                       "object is not filled")
                  .mmap_shared(0, 32 * P)
                  .fill(0, 0, 32 * P)
                  .mprotect(0, 8 * P, 8 * P, PROT_READ)
                  .madvise(0, 0, 0, MADV_DONTNEED)
                  .read(0, 9 * P)
                  .snapshot("after read in the middle VMA"));
  v.push_back(Scenario("dontneed_whole_table_frees_it",
                       "MADV_DONTNEED of a whole 2 MiB PTE table frees the table (page-table "
                       "reclaim, CONFIG_PT_RECLAIM): a read in a MADV_HUGEPAGE VMA then maps the "
                       "huge zero PMD, a write a THP")
                  .mmap(0, 2 * M2)
                  .fill(0, 0, 2 * M2)
                  .madvise(0, 0, 0, MADV_HUGEPAGE)
                  .madvise(0, 0, 0, MADV_DONTNEED)
                  .snapshot("after DONTNEED")
                  .read(0, 0)
                  .write(0, M2 + P)
                  .snapshot("after read and write"));
  v.push_back(Scenario("dontneed_part_of_table_keeps_it",
                       "MADV_DONTNEED of less than a whole PTE table keeps the table, even when "
                       "every entry is none afterwards: a read maps a 4 KiB zero page")
                  .mmap(0, M2)
                  .fill(0, 0, 8 * P)
                  .madvise(0, 0, 0, MADV_HUGEPAGE)
                  .madvise(0, 0, M2 - P, MADV_DONTNEED)
                  .read(0, 0)
                  .snapshot("after read"));
  v.push_back(Scenario("free_whole_table_keeps_it",
                       "MADV_FREE does not reclaim page tables: its pages stay mapped")
                  .mmap(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_HUGEPAGE)
                  .madvise(0, 0, 0, MADV_FREE)
                  .read(0, 0));
  v.push_back(Scenario("mremap_moves_several_vmas_keeping_gaps",
                       "mremap(MAYMOVE|FIXED) without resizing over several VMAs with gaps "
                       "moves each VMA and keeps the gaps (Linux 6.17+)")
                  .needs(617, "mremap moves several VMAs at once since Linux 6.17")
                  .mmap(0, 16 * P)
                  .fill(0, 0, 16 * P)
                  .munmap(0, 4 * P, 2 * P)
                  .mprotect(0, 10 * P, 2 * P, PROT_READ)
                  .reserve(1, 2 * M2)
                  .mremap(0, 0, 16 * P, 16 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 0)
                  .snapshot("moved")
                  .write(1, 8 * P)
                  .write(1, 10 * P));
  v.push_back(Scenario("mremap_several_vmas_refused_cases",
                       "a multi-VMA mremap fails with -EFAULT when the range starts in a gap, "
                       "when it resizes, or without MREMAP_FIXED; nothing moves")
                  .mmap(0, 16 * P)
                  .fill(0, 0, 16 * P)
                  .munmap(0, 4 * P, 2 * P)
                  .reserve(1, 2 * M2)
                  .mremap(0, 4 * P, 12 * P, 12 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 0)
                  .mremap(0, 0, 16 * P, 32 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 0)
                  .mremap(0, 0, 16 * P, 16 * P, MREMAP_MAYMOVE));
  v.push_back(Scenario("mremap_single_vma_trailing_gap_and_shrink",
                       "a same-size MREMAP_FIXED move of one VMA followed by a gap moves the VMA "
                       "(a gap at the end is allowed); a shrink across a gap and a VMA unmaps "
                       "the tail")
                  .needs(617, "mremap moves several VMAs at once since Linux 6.17")
                  .mmap(0, 8 * P)
                  .fill(0, 0, 8 * P)
                  .munmap(0, 6 * P, 2 * P)
                  .reserve(1, 2 * M2)
                  .mremap(0, 0, 8 * P, 8 * P, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 0)
                  .mmap(2, 16 * P)
                  .fill(2, 0, 16 * P)
                  .munmap(2, 4 * P, 2 * P)
                  .mremap(2, 0, 16 * P, 2 * P, 0));
  v.push_back(Scenario("mprotect_over_hole",
                       "mprotect over a hole changes the VMAs before the hole, then fails with "
                       "-ENOMEM; a range that starts in a hole changes nothing; a trailing hole "
                       "also fails after the change")
                  .mmap(0, 8 * P)
                  .fill(0, 0, 8 * P)
                  .munmap(0, 4 * P, P)
                  .mprotect(0, 0, 8 * P, PROT_READ)
                  .write(0, 0)
                  .write(0, 3 * P)
                  .write(0, 6 * P)
                  .mmap(1, 8 * P)
                  .fill(1, 0, 8 * P)
                  .munmap(1, 2 * P, P)
                  .mprotect(1, 2 * P, 4 * P, PROT_READ)
                  .write(1, 3 * P)
                  .munmap(1, 7 * P, P)
                  .mprotect(1, 5 * P, 3 * P, PROT_READ)
                  .write(1, 5 * P)
                  .write(1, 6 * P));
  // --- MADV_COLLAPSE of shared anonymous memory (shmem THPs, collapse_file) ----------------
  v.push_back(Scenario("shmem_collapse_whole",
                       "MADV_COLLAPSE of 512 written shmem pages (shmem_enabled=never) builds a "
                       "shmem THP in the page cache and maps it by a PMD (collapse_file + "
                       "collapse_pte_mapped_thp); accesses keep it")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("collapsed")
                  .write(0, 7 * P)
                  .read(0, 300 * P)
                  .snapshot("after accesses"));
  v.push_back(Scenario("shmem_collapse_holes",
                       "holes and cached-but-unmapped pages are collapsed too (holes become zero "
                       "pages of the THP); a read of a former hole hits the PMD")
                  .mmap_shared(0, M2)
                  .write(0, 0)
                  .write(0, 100 * P)
                  .madvise(0, 2 * P, 8 * P, MADV_DONTNEED)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("collapsed")
                  .read(0, 200 * P)
                  .snapshot("after a read of a hole"));
  v.push_back(Scenario("shmem_collapse_empty",
                       "nothing in the page cache: -EINVAL, nothing collapsed; a later read "
                       "allocates a 4 KiB page")
                  .mmap_shared(0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("collapsed")
                  .read(0, 5 * P)
                  .snapshot("after a read"));
  v.push_back(Scenario("shmem_collapse_cached_unmapped",
                       "every page cached but unmapped (DONTNEED also freed the PTE table): 0, the"
                       " new THP is PMD-mapped")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_DONTNEED)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("collapsed"));
  v.push_back(Scenario("shmem_collapse_partial_ranges",
                       "the range rules of anonymous memory: inside one block -EINVAL, [p0,p16) "
                       "and a range crossing a boundary without covering a block 0 with nothing "
                       "done")
                  .mmap_shared(0, 2 * M2)
                  .fill(0, 0, 2 * M2)
                  .madvise(0, P, 16 * P, MADV_COLLAPSE)
                  .madvise(0, 0, 16 * P, MADV_COLLAPSE)
                  .madvise(0, 496 * P, 32 * P, MADV_COLLAPSE)
                  .snapshot("nothing collapsed")
                  .madvise(0, 256 * P, M2, MADV_COLLAPSE)
                  .snapshot("range over half of each block"));
  v.push_back(Scenario("shmem_collapse_unaligned_vma",
                       "a VMA 64 KiB off a 2 MiB boundary: no block aligned both in memory and in "
                       "the object, -EINVAL")
                  .mmap(0, 2 * M2, kRW, MAP_SHARED, 64 * kKiB)
                  .fill(0, 0, 2 * M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("after collapse"));
  v.push_back(Scenario("shmem_collapse_referenced_page",
                       "a page held by vmsplice: -EAGAIN (SCAN_PAGE_COUNT) before anything "
                       "changes; after the pipe is closed 0, PMD-mapped")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .gup_ref(0, 5 * P, P)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("referenced")
                  .put_refs()
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("released"));
  v.push_back(Scenario("shmem_collapse_with_fork_child",
                       "fork copies no shared PTEs (the child refaults, 16-page fault-around); the"
                       " parent's collapse unmaps the child's pages and retracts its empty PTE "
                       "table, so the child's next fault maps the THP by a PMD (map=2)")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .fork()
                  .in(1).read(0, 0).read(0, 64 * P)
                  .snapshot("child maps p0-p15 and p64-p79")
                  .in(0).madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("parent collapsed")
                  .in(1).read(0, 3 * P)
                  .write(0, 400 * P)
                  .snapshot("child faulted")
                  .in(0).exit_proc(1));
  v.push_back(Scenario("shmem_collapse_after_partial_munmap",
                       "a 4 MiB VMA with a hole in the second block: the first block is collapsed,"
                       " the second VMA covers no block: -EINVAL")
                  .mmap_shared(0, 2 * M2)
                  .fill(0, 0, 2 * M2)
                  .munmap(0, M2 + 4 * P, 2 * P)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("after collapse"));
  v.push_back(Scenario("shmem_thp_dontneed_partial",
                       "DONTNEED of p4-p5 of a PMD-mapped shmem THP zaps the whole PMD (a file PMD"
                       " split is a zap); a read maps the whole PMD again")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .madvise(0, 4 * P, 2 * P, MADV_DONTNEED)
                  .snapshot("after DONTNEED")
                  .read(0, 4 * P)
                  .snapshot("after a read"));
  v.push_back(Scenario("shmem_thp_munmap_partial",
                       "munmap of p4-p5 zaps the PMD; the VMAs left cannot hold the THP: reads map"
                       " by PTEs with the 16-page fault-around clamped to the VMA, writes one page")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .munmap(0, 4 * P, 2 * P)
                  .snapshot("after munmap")
                  .read(0, 0)
                  .write(0, 100 * P)
                  .snapshot("after faults"));
  v.push_back(Scenario("shmem_thp_mprotect_partial",
                       "mprotect of p4-p5 zaps the PMD; faults PTE-map pages of the THP; after "
                       "mprotect back (VMAs merge) one read PTE-maps the whole folio (6.18 fault-"
                       "around maps a tmpfs large folio completely)")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .mprotect(0, 4 * P, 2 * P, PROT_READ)
                  .snapshot("after mprotect")
                  .read(0, 4 * P)
                  .read(0, 0)
                  .write(0, 200 * P)
                  .snapshot("after faults")
                  .mprotect(0, 4 * P, 2 * P, kRW)
                  .snapshot("after mprotect back")
                  .read(0, 300 * P)
                  .snapshot("after a read"));
  v.push_back(Scenario("shmem_thp_fork",
                       "fork does not copy the shmem PMD; the child's write faults it in by a PMD "
                       "(map=2 in both)")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .fork()
                  .snapshot("after fork")
                  .in(1).write(0, 9 * P, 0x33)
                  .snapshot("child wrote")
                  .in(0).exit_proc(1)
                  .snapshot("child exited"));
  v.push_back(Scenario("shmem_thp_mremap",
                       "an aligned mremap moves the PMD; an unaligned one zaps it and a read maps "
                       "a 16-page window by PTEs")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .reserve(1, 2 * M2)
                  .mremap(0, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 1, 0)
                  .snapshot("aligned move")
                  .reserve(2, 2 * M2)
                  .mremap(1, 0, M2, M2, MREMAP_MAYMOVE | MREMAP_FIXED, 2, 16 * P)
                  .snapshot("unaligned move")
                  .read(2, 16 * P)
                  .snapshot("after a read"));
  v.push_back(Scenario("shmem_thp_collapse_again",
                       "a shmem THP left PTE-mapped is mapped by a PMD again by MADV_COLLAPSE "
                       "(collapse_pte_mapped_thp: the cache holds the THP already)")
                  .mmap_shared(0, M2)
                  .fill(0, 0, M2)
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .mprotect(0, 4 * P, 2 * P, PROT_READ)
                  .read(0, 0)
                  .mprotect(0, 4 * P, 2 * P, kRW)
                  .read(0, 300 * P)
                  .snapshot("PTE-mapped")
                  .madvise(0, 0, 0, MADV_COLLAPSE)
                  .snapshot("after collapse"));

  return v;
}

void PrintTo(const Scenario& s, std::ostream* os) { *os << s.name; }

namespace {

// The steps, with the value each returned on Linux (and on the model, when they differ).
std::string steps_text(const Scenario& s, const RunResult* lx = nullptr,
                       const RunResult* md = nullptr) {
  std::string out;
  for (size_t i = 0; i < s.steps.size(); ++i) {
    out += "    " + std::to_string(i) + ": " + s.steps[i].to_string();
    int a = lx && i < lx->rc.size() ? lx->rc[i] : 0;
    int b = md && i < md->rc.size() ? md->rc[i] : a;
    if (a) out += std::string("  -> ") + (a < 0 ? "-" : "") + errno_name(a);
    if (b != a) out += std::string("  (model: ") + (b < 0 ? "-" : "") + errno_name(b) + ")";
    out += "\n";
  }
  return out;
}

std::string result_text(const RunResult& r) {
  std::string out;
  for (const Snapshot& snap : r.snapshots) {
    out += "  snapshot \"" + snap.label + "\"\n";
    for (const Region& reg : snap.regions)
      out += "   process " + std::to_string(reg.proc) + " slot " + std::to_string(reg.slot) +
             ":\n" + render_region(reg);
  }
  return out;
}

bool verbose() {
  const char* v = std::getenv("GPUSVM_ORACLE_VERBOSE");
  return v && *v && *v != '0';
}

// Runs a scenario on the real kernel, retrying when khugepaged or a THP allocation failure
// disturbed the run. Returns false (with *skip set) when every attempt was disturbed.
bool run_real(const Scenario& s, RunResult* out, std::string* skip) {
  std::string interference;
  for (int attempt = 0; attempt < 4; ++attempt) {
    InterferenceCounters before = InterferenceCounters::read();
    {
      RealExecutor real;
      *out = real.run(s);
    }
    interference = InterferenceCounters::read().changed_since(before);
    if (interference.empty() || !out->error.empty()) return true;
  }
  *skip = "kernel activity disturbed every attempt: " + interference;
  return false;
}

// Why this host cannot run s, or "".
std::string host_skip_reason(const Scenario& s) {
  const HostInfo& h = host_info();
  if (!h.usable) return h.why_not;
  if (s.needs_thp && h.thp == ThpMode::kNever)
    return "transparent_hugepage/enabled is never on this host";
  if (s.needs_collapse && h.kernel < 601) return "MADV_COLLAPSE needs Linux 6.1";
  if (s.min_kernel && h.kernel < s.min_kernel)
    return "host kernel " + h.kernel_release + ": " + s.min_kernel_why;
  return "";
}

}  // namespace

class DifferentialTest : public ::testing::TestWithParam<Scenario> {};

TEST_P(DifferentialTest, ModelMatchesLinux) {
  const Scenario& s = GetParam();
  std::string why = host_skip_reason(s);
  if (!why.empty()) GTEST_SKIP() << why;
  const HostInfo& h = host_info();

  RunResult lx;
  std::string skip;
  if (!run_real(s, &lx, &skip)) GTEST_SKIP() << skip;
  ASSERT_TRUE(lx.error.empty()) << "the real-kernel executor failed: " << lx.error;
  if (verbose())
    std::printf("%s (%s)\nsteps:\n%slinux:\n%s", s.name.c_str(), h.notes.c_str(),
                steps_text(s, &lx).c_str(), result_text(lx).c_str());

  PhysMem::Config cfg;
  cfg.ram_bytes = 256 * kMiB;
  cfg.thp = h.thp;  // the model runs with this host's THP policy
  cfg.use_zero_page = h.use_zero_page;
  RunResult md;
  {
    ModelExecutor model(cfg);
    ASSERT_TRUE(model.setup_error().empty()) << model.setup_error();
    md = model.run(s);
  }
  ASSERT_TRUE(md.error.empty()) << "the model executor failed: " << md.error
                                << "\nscenario steps:\n" << steps_text(s);

  std::string d = diff_results(s, lx, md, h.precise_mapcount);
  EXPECT_TRUE(d.empty()) << "scenario " << s.name << " (" << h.notes << ")\n"
                         << "Linux: " << s.linux_behaviour << "\nsteps:\n"
                         << steps_text(s, &lx, &md) << "differences (linux vs model):\n"
                         << d;
  for (const std::string& note : md.notes) ADD_FAILURE() << note;
}

INSTANTIATE_TEST_SUITE_P(Scenarios, DifferentialTest, ::testing::ValuesIn(all_scenarios()),
                         [](const ::testing::TestParamInfo<Scenario>& param_info) {
                           return param_info.param.name;
                         });

// The oracle alone: every category must be recognised on the real kernel (behaviour that has
// been stable since Linux 4.x), so a broken classifier cannot make both sides agree on noise.
TEST(LinuxOracle, RecognisesEveryCategory) {
  const HostInfo& h = host_info();
  if (!h.usable) GTEST_SKIP() << h.why_not;
  if (h.thp == ThpMode::kNever || !h.use_zero_page)
    GTEST_SKIP() << "needs THP (madvise or always) and use_zero_page=1";
  Scenario s("oracle_self_test", "");
  s.mmap(0, 4 * P)
      .read(0, 0)
      .write(0, P)
      .mmap_huge(1, M2)
      .read(1, 0)
      .mmap_huge(2, M2)
      .write(2, 0)
      .mmap_huge(3, M2)
      .write(3, 0)
      .mprotect(3, 0, P, PROT_READ)
      .snapshot("all");
  RunResult r;
  std::string skip;
  if (!run_real(s, &r, &skip)) GTEST_SKIP() << skip;
  ASSERT_TRUE(r.error.empty()) << r.error;
  ASSERT_EQ(r.snapshots.size(), 1u);
  const auto& regs = r.snapshots[0].regions;
  ASSERT_EQ(regs.size(), 4u);
  auto kind = [&](int slot, int page) { return regs[slot].pages[page].kind; };
  EXPECT_EQ(kind(0, 0), PageKind::kZeroPage);
  EXPECT_EQ(kind(0, 1), PageKind::kSmall);
  EXPECT_EQ(regs[0].pages[1].mapcount, 1);
  EXPECT_EQ(kind(0, 2), PageKind::kNone);
  for (int i : {0, 1, 511}) {
    EXPECT_EQ(kind(1, i), PageKind::kHugeZero) << i;
    EXPECT_EQ(kind(2, i), PageKind::kThpPmd) << i;
    EXPECT_EQ(kind(3, i), PageKind::kThpPte) << i;
  }
  // One folio per THP, 512 distinct frames, mapcount 1.
  EXPECT_EQ(regs[2].pages[0].folio, regs[2].pages[511].folio);
  EXPECT_NE(regs[2].pages[0].frame, regs[2].pages[511].frame);
  EXPECT_EQ(regs[2].pages[7].mapcount, 1);
  EXPECT_EQ(regs[3].pages[0].folio, regs[3].pages[300].folio);
  // The oracle must not report pages outside what the scenario mapped.
  EXPECT_EQ(regs[1].pages.size(), 512u);
  std::printf("%s\n", h.notes.c_str());
}

// A real fork child reports its own page tables, not its parent's (a pagemap file opened
// before fork would keep reading the parent's mm).
TEST(LinuxOracle, ForkChildReportsItsOwnPages) {
  const HostInfo& h = host_info();
  if (!h.usable) GTEST_SKIP() << h.why_not;
  Scenario s("oracle_fork", "");
  s.mmap(0, 2 * P).write(0, 0).fork().in(1).write(0, 0).snapshot("child wrote");
  RunResult r;
  std::string skip;
  if (!run_real(s, &r, &skip)) GTEST_SKIP() << skip;
  ASSERT_TRUE(r.error.empty()) << r.error;
  const auto& regs = r.snapshots.at(0).regions;
  ASSERT_EQ(regs.size(), 2u);
  EXPECT_EQ(regs[0].proc, 0);
  EXPECT_EQ(regs[1].proc, 1);
  EXPECT_NE(regs[0].pages[0].frame, regs[1].pages[0].frame);
  EXPECT_EQ(regs[0].pages[0].mapcount, 1);
  EXPECT_EQ(regs[1].pages[0].mapcount, 1);
}

}  // namespace gpusvm::mm::oracle
