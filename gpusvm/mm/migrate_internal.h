// Migration internals shared by the unified walk (hmm.cc), migrate_vma / migrate_device
// (migrate_device.cc) and the reverse-map side of migration (migrate_rmap.cc).
// Not for other layers.
#pragma once

#include <cstdint>
#include <vector>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/page_table.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

struct HmmRange;

// The one walk behind hmm_range_fault and migrate_vma_setup (hmm.cc). select == 0: snapshot
// or fault as range's flags ask. select != 0: a migrating walk collecting what select and
// range->dev_private_owner allow (see hmm.h), with one MIGRATE invalidation over the range,
// which must lie in one VMA (-ERANGE). range->notifier may be null (migrate_vma_setup); if
// set, its sequence is checked before the walk (and between passes of a non-migrating walk).
// fault_page: the folio a CPU fault is migrating, locked by the fault handler. no_wait: the
// caller holds folio locks of a migration (implied when migrating): migration entries are
// skipped, never waited on, and faults do not wait on them either.
// On error a migrating walk has restored every entry it replaced. mmap lock held.
[[nodiscard]] int hmm_walk_range(AddressSpace& mm, HmmRange* range, unsigned select, Folio* fault_page,
                                 bool no_wait) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

// The migration entry that replaces a present, device-private or device-exclusive mapping of
// `page`: writable iff the mapping was, read-exclusive for a read-only anon-exclusive page,
// carrying young/dirty/soft-dirty. A device-exclusive entry becomes a read-only one (the
// device loses its exclusive access; seed 004).
Pte make_migration_entry(Pte orig, const Folio* page);

// Replaces the mapping `orig` of `page` at (mm, va) in the locked table `t` by its migration
// entry and turns the rmap record into a migration record. The mapping's folio reference is
// the caller's to drop after the PTL is released (returned for convenience: page->head()).
// Context: PTE lock of t held (asserted), folio locked by the migration.
Folio* install_migration_pte(AddressSpace& mm, PteTable* t, Va va, Pte orig, Folio* page)
    GPUSVM_REQUIRES(t->ptl);

// try_to_migrate: every mapping of the locked folio in any address space (found through the
// reverse map) becomes a migration entry, each after a CLEAR invalidation in that address
// space (as the kernel's rmap walk does: no owner, every mirror drops the page). Returns true when the folio is mapped nowhere any more.
// PMD mappings become PMD migration entries. Context: folio locked; no page-table lock; the
// caller may hold one mmap lock (read) but needs none: the rmap walk lock keeps the other
// address spaces' tables alive. May sleep (notifier callbacks).
bool try_to_migrate(Folio* folio);

// remove_migration_ptes: every migration entry of `src` (every migration record, in every
// address space, including those fork copied meanwhile) becomes a mapping of the matching
// page of `dst` (src itself to restore): a present PTE (system or device-coherent memory), or
// a device-private entry when dst is device-private memory; writability and young/dirty from the entry; each takes a reference and a
// mapcount on dst. Entries zapped meanwhile are skipped. Context: src locked; no page-table
// lock held.
void remove_migration_ptes(Folio* src, Folio* dst);

// Splits a large folio that a migration holds - locked, mapped nowhere (every mapping is a
// migration entry), referenced only by the migration (+ extra_refs, the fault handler's for
// fault_page) - into 4 KiB folios (seed 003's split during migration): PMD migration entries
// become 512 PTE migration entries (from the deposited table), every new folio is locked with
// one reference (the first keeps the old ones) and owns its pages' migration records.
// Returns 0, or -EAGAIN when an unexpected reference appeared (the folio stays whole; its
// entries may now be PTE migration entries, which restore correctly).
// Context: no page-table lock; takes the rmap walk lock exclusive.
[[nodiscard]] int split_migrating_folio(Folio* folio, int extra_refs);

}  // namespace gpusvm::mm
