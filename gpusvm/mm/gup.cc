// get_user_pages / pin_user_pages: see gup.h.
#include "gpusvm/mm/gup.h"

#include <cerrno>
#include <chrono>
#include <string>

#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/fault.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {

void folio_pin(Folio* folio) {
  folio->get();
  folio->pincount_.fetch_add(1, std::memory_order_acq_rel);
}

void folio_unpin(Folio* folio) {
  // The pin goes before its reference: the reference may be the last one.
  if (folio->pincount_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
    panic("unpin_user_page: pfn " + std::to_string(folio->pfn()) + " is not pinned");
  }
  folio->put();
}

namespace {

constexpr unsigned kFollPin = 1u << 17;  // internal: pin_user_pages*
constexpr int kRoundsPerClockCheck = 64;

enum class Follow { kGot, kFault, kError };

bool is_zero_page(PhysMem* mem, Pfn pfn) { return mem->is_zero_pfn(pfn) || mem->is_huge_zero_pfn(pfn); }

// Takes what the caller asked for on the page mapped by a present entry. The entry's
// page-table lock is held: its mapping reference keeps the folio alive meanwhile.
Folio* grab_page(PhysMem* mem, Pfn pfn, unsigned flags) {
  Folio* page = mem->pfn_to_page(pfn);
  if (is_zero_page(mem, pfn)) return page;  // not refcounted (gup.h)
  if (flags & kFollPin) {
    folio_pin(page->head());
  } else {
    page->head()->get();
  }
  return page;
}

// follow_page_mask: the page at va if its entry allows the access; the lock of the entry is
// taken and dropped here. kFault: the caller must fault and look again.
// mmap lock held (read).
Follow follow_page(AddressSpace& mm, Va va, unsigned flags, Folio** out)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  PhysMem* mem = mm.mem();
  const bool write = flags & FOLL_WRITE;
  PmdSlot slot = mm.page_table().pmd_lookup(va);
  if (!slot) return Follow::kFault;
  if (slot.load_lockless().is_leaf()) {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (!pmd.is_leaf()) return Follow::kFault;  // split meanwhile: look again after a no-op fault
    const Pte leaf = pmd.leaf();
    if (!leaf.present() || (write && !leaf.write())) return Follow::kFault;
    *out = grab_page(mem, leaf.pfn() + pte_index(va), flags);
    return Follow::kGot;
  }
  PteTable* t = mm.page_table().pte_offset_map_lock(slot);
  if (!t) return Follow::kFault;
  const Pte pte = t->get(pte_index(va));
  Follow r = Follow::kFault;
  if (pte.present() && (!write || pte.write())) {
    if (pte.special() && !mem->is_zero_pfn(pte.pfn())) {
      r = Follow::kError;  // a mapping without a page behind it
    } else {
      *out = grab_page(mem, pte.pfn(), flags);
      r = Follow::kGot;
    }
  }
  PageTable::pte_unmap_unlock(t);
  return r;
}

// check_vma_flags: may this VMA be accessed the way gup_flags ask?
bool vma_permits(const Vma* vma, unsigned flags) {
  if (!vma || (vma->flags & (VM_IO | VM_PFNMAP)) || !(vma->flags & VM_READ)) return false;
  return !(flags & FOLL_WRITE) || (vma->flags & VM_WRITE);
}

// A FOLL_LONGTERM pin must not hold device memory (check_and_migrate_movable_folios): the pin
// just taken on a device-coherent page becomes a plain reference, which
// migrate_device_coherent_folio consumes while moving the page to system memory. Returns
// -EAGAIN (moved: look up again), -EBUSY or -ENOMEM (the pin fails, as in Linux).
int move_coherent_out(Folio* page) {
  Folio* folio = page->head();
  folio->get();
  folio_unpin(folio);
  const int rc = migrate_device_coherent_folio(folio);
  return rc == 0 ? -EAGAIN : rc;
}

// One page: look up, fault, look up again, within hang_timeout(). Returns 0 with *out set, or
// a negative errno. mmap lock held (read).
int gup_one(AddressSpace& mm, Va va, unsigned flags, Folio** out) GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  const auto deadline = std::chrono::steady_clock::now() + hang_timeout();
  for (uint64_t round = 0;; round++) {
    if (round % kRoundsPerClockCheck == kRoundsPerClockCheck - 1 &&
        std::chrono::steady_clock::now() > deadline) {
      log::get().error("gup at {:#x} ({}) still faulting after {} rounds", va,
                       (flags & FOLL_WRITE) ? "write" : "read", round);
      return -EBUSY;
    }
    if (!vma_permits(mm.vma_lookup(va), flags)) return -EFAULT;
    switch (follow_page(mm, va, flags, out)) {
      case Follow::kGot:
        if ((flags & FOLL_LONGTERM) && folio_is_device_coherent((*out)->head())) {
          if (int rc = move_coherent_out(*out); rc != -EAGAIN) return rc;
          continue;  // look the (now system) page up again
        }
        return 0;
      case Follow::kError: return -EFAULT;
      case Follow::kFault: break;
    }
    const unsigned fault_flags = (flags & FOLL_WRITE) ? unsigned{kFaultWrite} : 0u;
    if (int rc = vm_fault_errno(handle_mm_fault(mm, va, fault_flags))) return rc;
  }
}

// Argument checks shared by every entry point (is_valid_gup_args). 0 or a negative errno;
// *end is set on success.
int gup_args(Va* start, unsigned long nr_pages, unsigned flags, Folio** pages, Va* end) {
  constexpr unsigned kKnown = FOLL_WRITE | FOLL_LONGTERM | kFollPin;
  if ((nr_pages && !pages) || (flags & ~kKnown)) return -EINVAL;
  if ((flags & FOLL_LONGTERM) && !(flags & kFollPin)) return -EINVAL;
  *start = page_align_down(*start);
  if (nr_pages > (~0ULL >> kPageShift)) return -EOVERFLOW;
  const uint64_t len = static_cast<uint64_t>(nr_pages) << kPageShift;
  if (*start + len < *start) return -EOVERFLOW;
  *end = *start + len;
  if (*end > kTaskSize) return -EFAULT;
  return 0;
}

long gup_locked(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned flags, Folio** pages)
    GPUSVM_REQUIRES_SHARED(mm.mmap_lock()) {
  mm.mmap_assert_locked();
  Va end = 0;
  if (int rc = gup_args(&start, nr_pages, flags, pages, &end)) return rc;
  unsigned long done = 0;
  for (; done < nr_pages; done++) {
    int rc = gup_one(mm, start + (static_cast<uint64_t>(done) << kPageShift), flags, &pages[done]);
    if (rc) return done ? static_cast<long>(done) : rc;
  }
  return static_cast<long>(done);
}

long gup_unlocked(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned flags, Folio** pages) {
  ReadLock g(&mm.mmap_lock());
  return gup_locked(mm, start, nr_pages, flags, pages);
}

}  // namespace

long get_user_pages(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned gup_flags,
                    Folio** pages) {
  mm.mmap_assert_locked();
  if (gup_flags & kFollPin) return -EINVAL;
  return gup_locked(mm, start, nr_pages, gup_flags, pages);
}

long get_user_pages_fast(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned gup_flags,
                         Folio** pages) {
  if (gup_flags & kFollPin) return -EINVAL;
  return gup_unlocked(mm, start, nr_pages, gup_flags, pages);
}

long pin_user_pages(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned gup_flags,
                    Folio** pages) {
  mm.mmap_assert_locked();
  if (gup_flags & kFollPin) return -EINVAL;
  return gup_locked(mm, start, nr_pages, gup_flags | kFollPin, pages);
}

long pin_user_pages_fast(AddressSpace& mm, Va start, unsigned long nr_pages, unsigned gup_flags,
                         Folio** pages) {
  if (gup_flags & kFollPin) return -EINVAL;
  return gup_unlocked(mm, start, nr_pages, gup_flags | kFollPin, pages);
}

void put_page(Folio* page) {
  PhysMem* mem = page->mem();
  if (mem && is_zero_page(mem, page->pfn())) return;
  page->head()->put();
}

void unpin_user_page(Folio* page) {
  PhysMem* mem = page->mem();
  if (mem && is_zero_page(mem, page->pfn())) return;
  folio_unpin(page->head());
}

void unpin_user_pages(Folio** pages, unsigned long n) {
  for (unsigned long i = 0; i < n; i++) unpin_user_page(pages[i]);
}

}  // namespace gpusvm::mm
