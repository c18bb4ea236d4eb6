// Reclaim internals shared by vmscan.cc, madvise.cc and memory.cc (not for other layers).
// Design and lock contexts: docs/reclaim.md.
#pragma once

#include <cstdint>
#include <vector>

#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

// folio_referenced: how many mappings of the folio (locked) were young; clears their young
// bits through the reverse map (PTEs and PMD leaves, every address space). A device-exclusive
// entry (seed 004, folio_referenced_one) is not a present PTE: it has no accessed bit the CPU
// sets, so it counts as not referenced and is left exactly as it is (clearing "young" on it
// would clear a bit of its soft-leaf type). Takes the rmap walk lock (shared) and PTLs.
int folio_referenced(Folio* folio);

// try_to_unmap for a small anonymous folio (locked, referenced by the caller): every PTE that
// maps it - present, or device-exclusive (seed 004, try_to_unmap_one: handled like a present
// PTE; the device loses its access through the CLEAR invalidation) - becomes the swap entry
// of `slot` (one swap_duplicate each) or, with `discard` (a lazily freed clean folio), none.
// One MMU_NOTIFY_CLEAR invalidation per mapping, in its own address space. PTE dirty bits go
// to the folio; a discard stops at a mapping found dirty (written after MADV_FREE) and
// returns false. Returns whether the folio is unmapped now. Context: no spin lock, not the
// rmap walk lock (taken shared here); may sleep in notifier callbacks.
bool try_to_unmap(Folio* folio, bool discard, uint64_t slot);

enum class ReclaimResult { kFreed, kKeep, kActivate };
// shrink_folio_list for one folio: isolated (off the LRU, one reference held by the caller)
// and locked by the caller. kFreed: the caller's reference is the last (drop it after
// unlocking); otherwise put it back on the inactive (kKeep) or active list. With
// ignore_references (MADV_PAGEOUT's reclaim_pages) the young bits are not consulted.
ReclaimResult shrink_folio(Folio* folio, bool ignore_references);

// reclaim_pages: reclaims the folios (each referenced by the caller, small, anonymous),
// ignoring references, trylocking each; returns the number freed. Drops the references.
uint64_t reclaim_pages(PhysMem& mem, const std::vector<Folio*>& folios);

}  // namespace gpusvm::mm
