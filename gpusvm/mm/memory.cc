// CPU page faults (handle_mm_fault) on PTE and PMD entries.
#include <cstring>
#include <optional>

#include "gpusvm/base/log.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/hugetlb.h"
#include "gpusvm/mm/mm_internal.h"
#include "gpusvm/mm/shmem.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {

// Held: the mmap lock (read), no page-table lock. A fault (or a walk) read a migration entry
// of `page` and is about to wait on the folio that holds the page now (page->head()).
GPUSVM_SCHED_POINT(g_sp_migration_wait, "mm.fault.migration_wait");

int vm_fault_errno(VmFault f) {
  switch (f) {
    case VmFault::kOk:
    case VmFault::kRetry: return 0;
    case VmFault::kSigsegv:
    case VmFault::kSigbus: return -EFAULT;
    case VmFault::kOom: return -ENOMEM;
    case VmFault::kTimeout: return -ETIMEDOUT;
  }
  return -EFAULT;
}

const char* vm_fault_name(VmFault f) {
  switch (f) {
    case VmFault::kOk: return "OK";
    case VmFault::kRetry: return "RETRY";
    case VmFault::kSigsegv: return "SIGSEGV";
    case VmFault::kSigbus: return "SIGBUS";
    case VmFault::kOom: return "OOM";
    case VmFault::kTimeout: return "TIMEOUT";
  }
  return "?";
}

VmFault fault_wait_unlocked(Folio* folio, Va va, const char* what) {
  if (folio_wait_unlocked(folio, hang_timeout())) return VmFault::kRetry;
  log::get().error("fault at {:#x} on a {}: folio {} stayed locked for {} ms (a leaked folio "
                   "lock or a deadlock); the waiter holds {}",
                   va, what, folio_describe(folio), hang_timeout().count(),
                   lockdep::held_locks_string());
  return VmFault::kTimeout;
}

VmFault wait_for_migration(Folio* page, Va va) {
  // The migrating (or splitting) thread holds the folio lock from installing the migration
  // entries until it removes them; waiting for the unlock is waiting for the migration. No
  // reference is taken - it would make the migration's refcount freeze fail, which is why
  // Linux waits without one too. Folio descriptors are never freed, so a descriptor reused
  // meanwhile costs at most a spurious wakeup and a retry. A device pfn whose pagemap was
  // removed since the entry was read (the caller looked it up after dropping the PTL) has no
  // descriptor any more: its migration (the eviction) is over.
  if (!page) return VmFault::kRetry;
  g_sp_migration_wait.reach();
  return fault_wait_unlocked(page->head(), va, "migration entry");
}

namespace {

// wp_page_copy: the new page is allocated and filled, the PTE not re-read yet. Held: mmap
// read lock, a reference on the source page.
GPUSVM_SCHED_POINT(g_sp_cow_copied, "mm.fault.cow_copied");
// do_swap_page read the swap entry and dropped the PTL; it is about to look the slot up in
// the swap cache. Held: the mmap read lock.
GPUSVM_SCHED_POINT(g_sp_swap_entry_read, "mm.fault.swap_entry_read");
// do_swap_page found the slot's folio in the swap cache (referenced) but locked by someone
// else (a swap-in reading it, reclaim writing it); it is about to wait for the unlock. Held:
// the mmap read lock, a reference on the folio.
GPUSVM_SCHED_POINT(g_sp_swap_cache_busy, "mm.fault.swap_cache_busy");

struct FaultCtx {
  AddressSpace& mm;
  Vma& vma;
  Va va;
  bool write;
  PmdSlot slot;
  bool nowait = false;  // kFaultRetryNowait
};

// Installs a fresh anonymous page at the (none) PTE. Allocation happens before the PTL is
// taken; if the entry changed meanwhile the page is dropped and the access retried.
VmFault do_anonymous_page(FaultCtx& f) {
  f.mm.mmap_assert_locked();
  PhysMem* mem = f.mm.mem();
  const unsigned i = pte_index(f.va);
  if (!f.write) {
    PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
    if (!t) return VmFault::kRetry;
    if (t->get(i).is_none()) {
      t->set(i, Pte::make_zero(mem->zero_pfn()));
      f.mm.stats().faults_read_zero.add();
    }
    PageTable::pte_unmap_unlock(t);
    return VmFault::kOk;
  }
  Folio* folio = mem->folio_alloc_reclaim(0, /*zero=*/true);
  if (!folio) return VmFault::kOom;
  folio->set(kFolioAnon);
  folio->set_page(kPageAnonExclusive);
  PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
  if (!t) {
    folio->put();
    return VmFault::kRetry;
  }
  VmFault r = VmFault::kRetry;
  if (t->get(i).is_none()) {
    page_add_rmap_pte(folio, &f.mm, f.va);
    t->set(i, Pte::make_present(folio->pfn(), f.vma.flags & VM_WRITE).mkdirty().mkyoung());
    folio = nullptr;
    f.mm.stats().faults_anon.add();
    r = VmFault::kOk;
  }
  PageTable::pte_unmap_unlock(t);
  if (folio) folio->put();
  return r;
}

// Replaces the read-only entry `orig` by a private copy of `src` (nullptr: the zero page).
// The copy is made without the PTL; the entry must still be `orig` when we retake it
// (pte_same), else someone else resolved the fault first.
VmFault wp_page_copy(FaultCtx& f, Pte orig, Folio* src) {
  f.mm.mmap_assert_locked();
  PhysMem* mem = f.mm.mem();
  Folio* folio = mem->folio_alloc_reclaim(0, /*zero=*/src == nullptr);
  if (!folio) {
    if (src) src->head()->put();
    return VmFault::kOom;
  }
  if (src) copy_page_data(folio, src);
  folio->set(kFolioAnon);
  folio->set_page(kPageAnonExclusive);
  g_sp_cow_copied.reach();
  const unsigned i = pte_index(f.va);
  Folio* old_page = nullptr;
  // Replacing a present page must reach device mirrors (they may map the old one); filling a
  // none entry needs no invalidation.
  std::optional<MmuInvalidation> inv;
  if (orig.present()) inv.emplace(f.mm, f.va, f.va + kPageSize, MmuNotifyEvent::kClear);
  PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
  VmFault r = VmFault::kRetry;
  if (t && t->get(i) == orig) {
    if (orig.present() && !orig.special()) {
      old_page = mem->pfn_to_page(orig.pfn());
      page_remove_rmap_pte(old_page, &f.mm, f.va);
    }
    page_add_rmap_pte(folio, &f.mm, f.va);
    t->set(i, Pte::make_present(folio->pfn(), true).mkdirty().mkyoung());
    folio = nullptr;
    f.mm.stats().faults_cow.add();
    f.mm.stats().cow_copies.add();
    r = VmFault::kOk;
  }
  if (t) PageTable::pte_unmap_unlock(t);
  if (folio) folio->put();
  if (old_page) old_page->head()->put();   // the old mapping's reference
  if (src) src->head()->put();             // our temporary reference
  return r;
}

// Write fault on a present read-only PTE in a writable VMA (do_wp_page).
// Called with the PTE lock of t held; returns with it dropped. Callers are checked against
// RELEASE; the body is exempt because it drops the lock through pte_unmap_unlock, which the
// analysis cannot follow (it would report t->ptl still held at the end).
VmFault do_wp_page(FaultCtx& f, PteTable* t, Pte pte) GPUSVM_RELEASE(t->ptl)
    GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  t->ptl.assert_held();
  f.mm.mmap_assert_locked();
  PhysMem* mem = f.mm.mem();
  const unsigned i = pte_index(f.va);
  if (pte.special()) {  // the zero page: replace by a zeroed private page
    PageTable::pte_unmap_unlock(t);
    return wp_page_copy(f, pte, nullptr);
  }
  Folio* page = mem->pfn_to_page(pte.pfn());
  Folio* head = page->head();
  if (f.vma.is_shared()) {  // shared mapping: write in place
    t->set(i, pte.mkwrite().mkdirty().mkyoung());
    PageTable::pte_unmap_unlock(t);
    return VmFault::kOk;
  }
  if (head->test(kFolioAnon)) {
    // Reuse when only this mapping can reach the page: it is marked exclusive, or it is a
    // small folio whose one reference is this mapping (the other side of a COW already
    // copied). Checked under the PTL: a new sharer (fork) needs this PTL to map it.
    bool reuse = page->test_page(kPageAnonExclusive) ||
                 (!head->large() && head->refcount() == 1 && head->page_mapcount() == 1) ||
                 // A large folio mapped only by this mm (the other side of a fork is gone):
                 // Linux >= 6.15 reuses it instead of copying.
                 (head->large() && folio_mapped_only_by(head, &f.mm));
    if (reuse) {
      page->set_page(kPageAnonExclusive);
      t->set(i, pte.mkwrite().mkdirty().mkyoung());
      PageTable::pte_unmap_unlock(t);
      f.mm.stats().faults_reuse.add();
      return VmFault::kOk;
    }
  }
  head->get();  // keeps the source alive while we copy without the PTL
  PageTable::pte_unmap_unlock(t);
  return wp_page_copy(f, pte, page);
}

// fault_around_bytes (64 KiB): the window a read fault on a file-backed VMA fills from the
// page cache.
constexpr uint64_t kFaultAroundPages = 16;

// do_fault_around + filemap_map_pages for a read fault at f.va: every none PTE of the
// 16-page window aligned in the PTE table (clamped to the VMA and the table) whose page is
// already in the page cache is mapped too, as the faulting page would be (writable in a
// shared writable VMA, young); nothing is allocated, a locked folio is skipped. mmap lock
// held, no other lock.
// The window grows to the whole folio of the faulting page when that is a shmem THP lying
// inside the VMA (it is PMD-aligned, so inside one PTE table): Linux 6.18's
// filemap_map_pages maps a tmpfs large folio completely where it can (observed: one read
// after a partial mprotect was undone maps all 512 pages).
// `whole_folio`: the faulting page's folio is large and lies inside the VMA and one PTE table
// from `folio_first` (computed by the caller while it held a reference).
void do_fault_around(FaultCtx& f, bool whole_folio, Va folio_first) {
  f.mm.mmap_assert_locked();
  // The window divides 2 MiB, so the aligned window lies inside f.va's PTE table.
  constexpr uint64_t kWindow = kFaultAroundPages * kPageSize;
  const Va fault_va = page_align_down(f.va);
  Va from = std::max(fault_va & ~(kWindow - 1), f.vma.start);
  Va to = std::min((fault_va & ~(kWindow - 1)) + kWindow, f.vma.end);
  if (whole_folio) {
    from = folio_first;
    to = folio_first + kPmdSize;
  }
  const bool writable = f.vma.is_shared() && (f.vma.flags & VM_WRITE);
  for (Va va = from; va < to; va += kPageSize) {
    if (va == fault_va) continue;
    const uint64_t pgoff = f.vma.pgoff_of(va);
    Folio* folio = f.vma.file->find_folio(pgoff);
    if (!folio) continue;
    if (!folio_trylock(folio)) {  // next_uptodate_folio skips a locked folio
      folio->put();
      continue;
    }
    Folio* page = folio_file_page(folio, pgoff);
    PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
    if (t && t->get(pte_index(va)).is_none()) {
      page_add_rmap_pte(page, &f.mm, va);  // our reference becomes the mapping's
      t->set(pte_index(va), Pte::make_present(page->pfn(), writable).mkyoung());
      folio_unlock(folio);
      folio = nullptr;
    }
    if (t) PageTable::pte_unmap_unlock(t);
    if (folio) {
      folio_unlock(folio);
      folio->put();
    }
  }
}

// A fault on a none PTE of a shared or file-backed VMA. A driver's mapping without a page
// cache (mmap_device: the driver inserted its pages and has no fault handler) is SIGBUS, as
// Linux's do_fault without vm_ops->fault.
VmFault do_file_fault(FaultCtx& f) {
  f.mm.mmap_assert_locked();
  if (!f.vma.file) return VmFault::kSigbus;
  bool beyond = false;
  const uint64_t pgoff = f.vma.pgoff_of(f.va);
  Folio* folio = f.vma.file->get_folio(pgoff, &beyond);
  if (!folio) return beyond ? VmFault::kSigbus : VmFault::kOom;
  f.mm.stats().faults_shmem.add();
  Folio* page = folio_file_page(folio, pgoff);  // a page of a shmem THP mapped by a PTE
  if (!f.vma.is_shared() && f.write) {
    // Private file mapping, first access is a write: copy straight into an anonymous page.
    return wp_page_copy(f, Pte::none(), page);
  }
  const unsigned i = pte_index(f.va);
  // finish_fault for shmem: a large folio that lies inside the VMA is mapped whole by PTEs
  // when none of its entries is filled yet (a PMD table there is left by a partial
  // munmap/mprotect that was undone, or kept by retract_page_tables); else just this page.
  const Va first = page_align_down(f.va) - ((pgoff - folio->index()) << kPageShift);
  // ... and inside one PTE table: a PMD-sized folio must start on a 2 MiB boundary.
  const bool whole = folio->large() && pmd_aligned(first) && first >= f.vma.start &&
                     first + (folio->nr_pages() << kPageShift) <= f.vma.end;
  PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
  VmFault r = VmFault::kRetry;
  if (t && t->get(i).is_none()) {
    bool writable = f.vma.is_shared() && (f.vma.flags & VM_WRITE);
    bool all_none = whole;
    for (unsigned k = 0; all_none && k < folio->nr_pages(); k++) {
      all_none = t->get(pte_index(first) + k).is_none();
    }
    const unsigned n = all_none ? static_cast<unsigned>(folio->nr_pages()) : 1;
    const Va va0 = all_none ? first : page_align_down(f.va);
    Folio* page0 = all_none ? folio : page;
    if (n > 1) folio->get(static_cast<int>(n - 1));  // one reference per PTE mapping
    for (unsigned k = 0; k < n; k++) {
      Pte pte = Pte::make_present(page0->page(k)->pfn(), writable).mkyoung();
      if (f.write) pte = pte.mkdirty();
      page_add_rmap_pte(page0->page(k), &f.mm, va0 + k * kPageSize);  // a reference each
      t->set(pte_index(va0) + k, pte);
    }
    folio = nullptr;
    r = VmFault::kOk;
  }
  if (t) PageTable::pte_unmap_unlock(t);
  if (folio) folio->put();
  if (r == VmFault::kOk && !f.write) do_fault_around(f, whole, first);  // do_read_fault
  return r;
}

// A CPU access to a page a device holds exclusively (remove_device_exclusive_entry): the
// device loses its access through a CLEAR invalidation with no owner (the newer mainline
// event; 6.12 fired EXCLUSIVE here) and the PTE becomes present again. Called with the PTE
// lock of `t` held (the entry read there is `orig`); returns with it dropped.
//
// The reference is taken under the PTE lock: once it is dropped, a racing zap may remove the
// entry and free the folio. A folio that is already free means the entry is gone. A busy folio
// is waited for and the fault retried (folio_lock_or_retry); the entry is re-checked under
// the PTE lock after the folio lock and the invalidation start, which cannot be done under it.
// Body exempt from the analysis for the reason given at do_wp_page (the lock is dropped
// through pte_unmap_unlock); callers are checked against RELEASE.
VmFault remove_device_exclusive_entry(FaultCtx& f, PteTable* t, Pte orig) GPUSVM_RELEASE(t->ptl)
    GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  t->ptl.assert_held();
  f.mm.mmap_assert_locked();
  Folio* page = f.mm.mem()->pfn_to_page(orig.pfn());
  Folio* folio = page->head();
  const bool got = folio->try_get();
  PageTable::pte_unmap_unlock(t);
  if (!got) return VmFault::kRetry;
  if (!folio_trylock(folio)) {
    const VmFault r = fault_wait_unlocked(folio, f.va, "device-exclusive entry");
    folio->put();
    return r;
  }
  bool restored = false;
  {
    MmuInvalidation inv(f.mm, f.va, f.va + kPageSize, MmuNotifyEvent::kClear);
    t = f.mm.page_table().pte_offset_map_lock(f.slot);
    if (t) {
      restored = t->get(pte_index(f.va)) == orig;
      if (restored) restore_exclusive_pte_locked(f.mm, f.vma, t, f.va, orig, page);
      PageTable::pte_unmap_unlock(t);
    }
    folio_unlock(folio);
  }
  folio->put();
  // Either way the access runs again: on the restored PTE (a write to a page restored
  // read-only then takes the write-protect fault), or on whatever replaced the entry.
  return restored ? VmFault::kOk : VmFault::kRetry;
}

// The folio holding swap slot `slot`'s bytes, referenced and locked: the swap cache's if one
// is cached (a concurrent swap-in, or reclaim that has not freed it yet), else a new folio
// that this fault adds to the cache and reads the slot into. nullptr with *r set: kOom (no
// folio), kRetry (the entry went away meanwhile, or the cached folio was busy and is unlocked
// now), kTimeout. Context: mmap read lock, no other lock; allocates and may reclaim.
Folio* swapin_folio(FaultCtx& f, uint64_t slot, VmFault* r) {
  f.mm.mmap_assert_locked();
  PhysMem* mem = f.mm.mem();
  SwapArea& swap = mem->swap();
  for (;;) {
    if (Folio* cached = swap.cache_get(slot)) {
      // swap cache hit: another fault is reading it in (it holds the lock until the bytes are
      // there) or reclaim has it; wait for the unlock and retry (folio_lock_or_retry).
      if (folio_trylock(cached)) {
        if (cached->test(kFolioSwapCache) && cached->swap_slot() == slot) return cached;
        folio_unlock(cached);  // left the cache before we locked it: look again
        cached->put();
        continue;
      }
      g_sp_swap_cache_busy.reach();
      *r = f.nowait ? VmFault::kRetry : fault_wait_unlocked(cached, f.va, "swap cache folio");
      cached->put();
      return nullptr;
    }
    Folio* folio = mem->folio_alloc_reclaim(0, /*zero=*/false);
    if (!folio) {
      *r = VmFault::kOom;
      return nullptr;
    }
    folio->set(kFolioAnon);
    if (!folio_trylock(folio)) panic("swap-in: a new folio is locked");
    const int rc = swap.cache_add(slot, folio);
    if (rc == 0) {
      swap.read(slot, folio);  // under the folio lock: concurrent faults wait for the bytes
      mem->stat_pswpin.add();
      f.mm.stats().faults_swapin.add();
      return folio;
    }
    folio_unlock(folio);
    folio->put();
    if (rc == -ENOENT) {
      *r = VmFault::kRetry;  // no entry names the slot: ours was zapped or swapped in
      return nullptr;
    }
    // -EEXIST: another fault added its folio first; use that one.
  }
}

// do_swap_page: a fault on a swap entry. The folio comes from the swap cache or is read
// from the slot (swapin_folio), then replaces the entry if the PTE still holds it (pte_same
// under the PTL). The page is exclusive to this mapping when this entry was the slot's last
// and nobody maps the folio: then it is mapped anon-exclusive, writable on a write fault (the
// slot is freed then, as should_try_to_free_swap does for a write: the bytes would go stale),
// else read-only and left in the swap cache, so that reclaim can drop it again without a write
// while it stays clean. A shared slot (fork) maps the folio read-only, not exclusive; a write
// then retries into do_wp_page, which copies. Called with the PTE lock of `t` held (the entry
// read there is `orig`); returns with it dropped. Body exempt from the analysis for the
// reason given at do_wp_page.
VmFault do_swap_page(FaultCtx& f, PteTable* t, Pte orig) GPUSVM_RELEASE(t->ptl)
    GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
  t->ptl.assert_held();
  f.mm.mmap_assert_locked();
  PageTable::pte_unmap_unlock(t);
  g_sp_swap_entry_read.reach();
  PhysMem* mem = f.mm.mem();
  SwapArea& swap = mem->swap();
  const uint64_t slot = orig.swap_slot();
  VmFault r = VmFault::kRetry;
  Folio* folio = swapin_folio(f, slot, &r);
  if (!folio) return r;
  Folio* drop_cache = nullptr;
  bool mapped = false;
  bool write = false;
  t = f.mm.page_table().pte_offset_map_lock(f.slot);
  if (t && t->get(pte_index(f.va)) == orig) {
    // The entry goes either way (swap_free); it was the last one iff exclusive.
    const bool exclusive = !folio->mapped() && swap.take_last_entry(slot);
    if (!exclusive && swap.free_entry(slot)) {
      panic("swap-in: the cached folio left the cache while locked: " + folio_describe(folio));
    }
    write = f.write && exclusive && (f.vma.flags & VM_WRITE);
    Pte pte = Pte::make_present(folio->pfn(), write).mkyoung();
    if (write) pte = pte.mkdirty();
    if (orig.soft_dirty()) pte = Pte(pte.raw() | pte_bits::kSoftDirty);
    if (exclusive) folio->set_page(kPageAnonExclusive);
    folio->get();  // the mapping's
    page_add_rmap_pte(folio, &f.mm, f.va);
    t->set(pte_index(f.va), pte);
    mapped = true;
    if (write && swap.free_swap(folio)) drop_cache = folio;
  }
  if (t) PageTable::pte_unmap_unlock(t);
  if (!mapped && !drop_cache) drop_cache = swap.release_if_unused(folio);
  folio_unlock(folio);
  folio->put();  // ours
  if (drop_cache) drop_cache->put();
  if (!mapped) return VmFault::kRetry;
  // A write that could not reuse the page (shared slot) runs again: do_wp_page copies.
  return f.write && !write ? VmFault::kRetry : VmFault::kOk;
}

VmFault handle_pte_fault(FaultCtx& f) {
  f.mm.mmap_assert_locked();
  PhysMem* mem = f.mm.mem();
  const unsigned i = pte_index(f.va);
  PteTable* t = f.mm.page_table().pte_offset_map_lock(f.slot);
  if (!t) return VmFault::kRetry;  // the PMD changed (a huge leaf raced in): start over
  t->ptl.assert_held();  // locked by pte_offset_map_lock, which the analysis cannot follow
  const Pte pte = t->get(i);
  if (pte.is_none()) {
    PageTable::pte_unmap_unlock(t);
    return f.vma.is_anonymous() ? do_anonymous_page(f) : do_file_fault(f);
  }
  if (pte.present()) {
    if (f.write && !pte.write()) return do_wp_page(f, t, pte);  // unlocks
    Pte young = f.write ? pte.mkyoung().mkdirty() : pte.mkyoung();
    if (young != pte) t->set(i, young);
    PageTable::pte_unmap_unlock(t);
    return VmFault::kOk;
  }
  if (pte.is_migration()) {
    PageTable::pte_unmap_unlock(t);
    if (f.nowait) return VmFault::kRetry;
    f.mm.stats().faults_migration_wait.add();
    return wait_for_migration(mem->pfn_to_page(pte.pfn()), f.va);
  }
  if (pte.is_device_private()) {
    // do_swap_page for device-private memory: the page's driver moves it back. The page is
    // referenced and locked for the call (the fault_page rules); a busy page is waited for.
    Folio* page = mem->pfn_to_page(pte.pfn());
    Folio* folio = page->head();
    if (!folio->try_get()) {
      PageTable::pte_unmap_unlock(t);
      return VmFault::kRetry;  // being freed: the entry is about to go
    }
    PageTable::pte_unmap_unlock(t);
    VmFault r = VmFault::kRetry;
    if (folio_trylock(folio)) {
      r = folio->pagemap()->ops()->migrate_to_ram(VmFaultInfo{&f.mm, f.va, f.write ? kFaultWrite : 0u, page});
      folio_unlock(folio);
    } else if (!f.nowait) {
      r = fault_wait_unlocked(folio, f.va, "device-private entry");
    }
    folio->put();
    return r;
  }
  if (pte.is_device_exclusive()) return remove_device_exclusive_entry(f, t, pte);  // unlocks
  if (pte.is_swap()) return do_swap_page(f, t, pte);  // unlocks
  PageTable::pte_unmap_unlock(t);
  return VmFault::kSigbus;  // an entry type this model does not create
}

// Write fault on the huge zero folio: map a new zeroed THP instead. Returns kSigbus (never a
// real result here) when no THP could be allocated, so the caller falls back to a split.
VmFault huge_zero_wp_pmd(FaultCtx& f, Pmd pmd) {
  f.mm.mmap_assert_locked();
  Folio* folio = f.mm.mem()->folio_alloc(kPmdOrder, /*zero=*/true);
  if (!folio) {
    f.mm.stats().faults_thp_fallback.add();
    return VmFault::kSigbus;
  }
  folio->set(kFolioAnon);
  for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->set_page(kPageAnonExclusive);
  const Va haddr = pmd_align_down(f.va);
  {
    // Mirrors may map the huge zero folio: they must drop it before it is replaced.
    MmuInvalidation inv(f.mm, haddr, haddr + kPmdSize, MmuNotifyEvent::kClear);
    SpinLockGuard g(&f.slot.table->lock);
    if (f.slot.table->get(f.slot.index) == pmd) {
      folio_add_rmap_pmd(folio, &f.mm, haddr);
      f.slot.table->set(f.slot.index, Pmd::make_leaf(Pte::make_present(folio->pfn(), true, true)
                                                          .mkdirty()
                                                          .mkyoung()));
      folio = nullptr;
    }
  }
  if (folio) {
    folio->put();
    return VmFault::kRetry;
  }
  f.mm.stats().faults_thp.add();
  f.mm.stats().faults_cow.add();
  return VmFault::kOk;
}

// do_set_pmd (mm/memory.c), reached from finish_fault and filemap_map_pmd: the PMD is none
// and the page cache holds a PMD-sized folio at the faulting offset, so map all of it by one
// PMD leaf - when the VMA can hold it: the aligned 2 MiB lies inside the VMA and is aligned in
// the object too (thp_vma_suitable_order), and THP is not disabled for the VMA
// (MADV_NOHUGEPAGE, vma_thp_disabled). shmem_enabled plays no part: the folio exists already.
// Writable iff the mapping is shared and VM_WRITE (vm_page_prot: shmem has no dirty
// tracking), dirty on a write fault. A file PMD has no deposited table (x86 needs none for
// file THPs): splitting it zaps it (split_huge_pmd). Sets *fallback when the PTE path must
// handle the fault (no such folio, unsuitable VMA). mmap lock held, no page-table lock.
VmFault do_set_pmd(FaultCtx& f, bool* fallback) {
  f.mm.mmap_assert_locked();
  *fallback = true;
  const Va haddr = pmd_align_down(f.va);
  if (!f.vma.thp_fits(f.va) || (f.vma.flags & VM_NOHUGEPAGE) ||
      f.vma.pgoff_of(haddr) % kPagesPerPmd != 0) {
    return VmFault::kOk;
  }
  Folio* folio = f.vma.file->find_folio(f.vma.pgoff_of(f.va));
  if (!folio) return VmFault::kOk;
  if (folio->order() != kPmdOrder || folio->index() != f.vma.pgoff_of(haddr)) {
    folio->put();
    return VmFault::kOk;
  }
  *fallback = false;
  const bool writable = f.vma.is_shared() && (f.vma.flags & VM_WRITE);
  {
    SpinLockGuard g(&f.slot.table->lock);
    if (f.slot.table->get(f.slot.index).is_none()) {
      Pte leaf = Pte::make_present(folio->pfn(), writable, /*huge=*/true).mkyoung();
      if (f.write) leaf = leaf.mkdirty();
      folio_add_rmap_pmd(folio, &f.mm, haddr);  // our reference becomes the mapping's
      f.slot.table->set(f.slot.index, Pmd::make_leaf(leaf));
      folio = nullptr;
    }
  }
  f.mm.stats().faults_shmem.add();
  if (folio) {
    folio->put();  // someone else filled the PMD: retry on what is there
    return VmFault::kRetry;
  }
  return VmFault::kOk;
}

// A fault on a present huge leaf: only writes to read-only leaves need work. Sets *fallback
// when it split the PMD and the caller must continue with the PTE fault.
// A CPU access to a device-private PMD: the driver migrates the whole 2 MiB folio back, as
// for a PTE (the fault_page rules): the folio is referenced under the PMD lock (a racing zap
// may free it once the lock is dropped), locked for the call (a busy folio is waited for and
// the fault retried).
VmFault do_huge_pmd_device_private(FaultCtx& f, Pte leaf) {
  f.mm.mmap_assert_locked();
  Folio* folio = nullptr;
  {
    SpinLockGuard g(&f.slot.table->lock);
    const Pmd now = f.slot.table->get(f.slot.index);
    if (!now.is_huge_soft_leaf() || now.leaf().raw() != leaf.raw()) return VmFault::kRetry;
    folio = f.mm.mem()->folio_of(leaf.pfn());
    if (!folio->try_get()) return VmFault::kRetry;
  }
  VmFault r = VmFault::kRetry;
  if (folio_trylock(folio)) {
    r = folio->pagemap()->ops()->migrate_to_ram(
        VmFaultInfo{&f.mm, f.va, f.write ? kFaultWrite : 0u, folio, /*pmd=*/true});
    folio_unlock(folio);
  } else if (!f.nowait) {
    r = fault_wait_unlocked(folio, f.va, "device-private PMD");
  }
  folio->put();
  return r;
}

VmFault huge_pmd_fault(FaultCtx& f, Pmd pmd, bool* fallback) {
  f.mm.mmap_assert_locked();
  *fallback = false;
  PhysMem* mem = f.mm.mem();
  const Pte leaf = pmd.leaf();
  const Va haddr = pmd_align_down(f.va);
  if (!f.write || leaf.write()) {
    SpinLockGuard g(&f.slot.table->lock);
    Pmd cur = f.slot.table->get(f.slot.index);
    if (cur != pmd) return VmFault::kRetry;
    Pte upd = f.write ? leaf.mkyoung().mkdirty() : leaf.mkyoung();
    if (upd != leaf) f.slot.table->set(f.slot.index, Pmd::make_leaf(upd));
    return VmFault::kOk;
  }
  if (mem->folio_of(leaf.pfn())->test(kFolioShmem)) {
    // A page-cache THP (read-only: a private file mapping, or a shared one without
    // VM_WRITE's protection yet). wp_huge_pmd: a shared mapping writes in place; a private
    // one splits the PMD - for a file PMD that zaps it - and the PTE fault copies 4 KiB.
    SpinLockGuard g(&f.slot.table->lock);
    if (f.slot.table->get(f.slot.index) != pmd) return VmFault::kRetry;
    if (f.vma.is_shared()) {
      f.slot.table->set(f.slot.index, Pmd::make_leaf(leaf.mkwrite().mkdirty().mkyoung()));
      return VmFault::kOk;
    }
  } else if (mem->is_huge_zero_pfn(leaf.pfn())) {
    // Linux >= 6.13 (do_huge_zero_wp_pmd): replace the huge zero folio by a fresh THP;
    // only when that allocation fails does the PMD split into zero PTEs.
    VmFault r = huge_zero_wp_pmd(f, pmd);
    if (r != VmFault::kSigbus) return r;
  } else {
    // Reuse an exclusive THP in place (do_huge_pmd_wp_page); otherwise fall back to a 4 KiB
    // COW after splitting the PMD, as Linux does.
    SpinLockGuard g(&f.slot.table->lock);
    Pmd cur = f.slot.table->get(f.slot.index);
    if (cur != pmd) return VmFault::kRetry;
    Folio* folio = mem->folio_of(leaf.pfn());
    if (folio->test_page(kPageAnonExclusive) ||
        (folio->refcount() == 1 && folio->entire_mapcount() == 1)) {
      for (uint64_t i = 0; i < kPagesPerPmd; i++) folio->page(i)->set_page(kPageAnonExclusive);
      f.slot.table->set(f.slot.index, Pmd::make_leaf(leaf.mkwrite().mkdirty().mkyoung()));
      f.mm.stats().faults_reuse.add();
      return VmFault::kOk;
    }
  }
  // Write to the huge zero folio (no THP available) or to a shared THP: split and let the PTE
  // path handle it in this same fault (VM_FAULT_FALLBACK).
  split_huge_pmd(f.mm, f.slot, haddr);
  *fallback = true;
  return VmFault::kOk;
}

}  // namespace

VmFault handle_mm_fault(AddressSpace& mm, Va va, unsigned flags) {
  mm.mmap_assert_locked();
  mm.stats().faults.add();
  Vma* vma = mm.vma_lookup(va);
  const bool write = flags & kFaultWrite;
  if (!vma || !(vma->flags & VM_READ) || (write && !(vma->flags & VM_WRITE))) {
    mm.stats().faults_sigsegv.add();
    return VmFault::kSigsegv;
  }
  if (vma->is_hugetlb()) return hugetlb_fault(mm, *vma, va, flags);  // PMD-level only
  Result<PmdSlot> slot = mm.page_table().pmd_alloc(va);
  if (!slot) {
    mm.stats().faults_oom.add();
    return VmFault::kOom;
  }
  FaultCtx f{mm, *vma, page_align_down(va), write, *slot, (flags & kFaultRetryNowait) != 0};
  Pmd pmd = slot->load_lockless();
  if (pmd.is_none() && vma->is_anonymous() && mm.thp_allowed(*vma, va)) {
    bool fallback = false;
    VmFault r = do_huge_pmd_anonymous_page(mm, *vma, *slot, va, write, &fallback);
    if (!fallback) {
      if (r == VmFault::kOom) mm.stats().faults_oom.add();
      return r;
    }
    pmd = slot->load_lockless();
  }
  if (pmd.is_none() && vma->file && !(!vma->is_shared() && write)) {
    // finish_fault / filemap_map_pmd: a shmem THP already in the page cache is mapped by a
    // PMD when the VMA can hold it (do_set_pmd); otherwise the PTE path maps its page.
    bool fallback = false;
    VmFault r = do_set_pmd(f, &fallback);
    if (!fallback) return r;
    pmd = slot->load_lockless();
  }
  if (pmd.is_huge_present()) {
    bool fallback = false;
    VmFault r = huge_pmd_fault(f, pmd, &fallback);
    if (!fallback) return r;
    return handle_pte_fault(f);  // the PMD now points to a PTE table
  }
  if (pmd.is_huge_soft_leaf()) {
    Pte leaf = pmd.leaf();
    if (leaf.is_migration()) {
      if (flags & kFaultRetryNowait) return VmFault::kRetry;
      mm.stats().faults_migration_wait.add();
      return wait_for_migration(mm.mem()->pfn_to_page(leaf.pfn()), va);
    }
    if (leaf.is_device_private()) return do_huge_pmd_device_private(f, leaf);
    return VmFault::kSigbus;
  }
  if (mm.page_table().pte_alloc(*slot) != 0) {
    mm.stats().faults_oom.add();
    return VmFault::kOom;
  }
  VmFault r = handle_pte_fault(f);
  if (r == VmFault::kOom) mm.stats().faults_oom.add();
  return r;
}

}  // namespace gpusvm::mm
