// vm_insert_page and the device-file mmap (AddressSpace::mmap_device).
#include "gpusvm/mm/insert_page.h"

#include <cerrno>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/mm_internal.h"

namespace gpusvm::mm {
namespace {

// The pages vm_insert_page accepts: small, live, ordinary system pages (not anonymous, not in
// a page cache, not device memory, not the zero page).
bool insertable_page(Folio* page) {
  Folio* head = page->head();
  constexpr uint32_t kRefused = kFolioAnon | kFolioShmem | kFolioZero | kFolioDevicePrivate |
                                kFolioDeviceCoherent | kFolioFree;
  return head == page && !head->large() && !page->pagemap() && !(head->flags() & kRefused) &&
         head->refcount() > 0;
}

}  // namespace

int vm_insert_page(AddressSpace& mm, Vma& vma, Va addr, Folio* page) {
  mm.mmap_assert_locked();
  if (!page || !page_aligned(addr)) return -EINVAL;
  if (addr < vma.start || addr >= vma.end) return -EFAULT;
  // Only into a device file's mapping (mmap_device): not anonymous, hugetlb or page-cache VMAs.
  if (!vma.vm_file || (vma.flags & VM_PFNMAP) || !insertable_page(page)) {
    return -EINVAL;
  }
  if (!(vma.flags & VM_MIXEDMAP)) {
    mm.mmap_assert_write_locked();  // vm_flags change only under the write lock
    vma.flags |= VM_MIXEDMAP;
  }
  Result<PmdSlot> slot = mm.page_table().pmd_alloc(addr);
  if (!slot) return -ENOMEM;
  if (mm.page_table().pte_alloc(*slot) != 0) return -ENOMEM;
  PteTable* t = mm.page_table().pte_offset_map_lock(*slot);
  if (!t) return -EBUSY;  // a huge leaf: cannot happen in a non-anonymous VMA, but not ours
  const unsigned i = pte_index(addr);
  int rc = -EBUSY;
  if (t->get(i).is_none()) {
    page->get();  // the mapping's reference (the caller keeps its own)
    page_add_rmap_pte(page, &mm, addr);
    t->set(i, Pte::make_present(page->pfn(), vma.is_shared() && (vma.flags & VM_WRITE)));
    rc = 0;
  }
  PageTable::pte_unmap_unlock(t);
  return rc;
}

Result<Va> AddressSpace::mmap_device(Va addr, uint64_t len, int prot, int flags, const void* vm_file,
                                     const std::function<int(Vma&)>& f_mmap, uint64_t offset) {
  constexpr int kKnown = MAP_SHARED | MAP_PRIVATE | MAP_FIXED | MAP_FIXED_NOREPLACE | MAP_NORESERVE;
  if (!vm_file || !f_mmap || len == 0 || (prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC)) ||
      (flags & ~kKnown)) {
    return Err{-EINVAL};
  }
  const int type = flags & (MAP_SHARED | MAP_PRIVATE);
  if (type != MAP_SHARED && type != MAP_PRIVATE) return Err{-EINVAL};
  const uint64_t alen = page_align_up(len);
  if (alen < len || alen > kTaskSize) return Err{-ENOMEM};
  if (!page_aligned(offset) || offset + alen < offset) return Err{-EINVAL};
  const bool fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE);
  if (fixed) {
    if (int rc = check_fixed_addr(addr, alen)) return Err{rc};
  }
  WriteLock g(&mmap_lock_);
  if (exited()) return Err{-ENOMEM};
  Va start = 0;
  if (fixed) {
    if (flags & MAP_FIXED_NOREPLACE) {
      Vma* v = vmas_.find(addr);
      if (v && v->start < addr + alen) return Err{-EEXIST};
    } else {
      do_munmap(*this, vmas_, addr, addr + alen);
    }
    start = addr;
  } else {
    start = get_unmapped_area(vmas_, addr, alen, kPageSize);  // as mmap() does for files
    if (!start) return Err{-ENOMEM};
  }
  auto vma = std::make_unique<Vma>();
  vma->start = start;
  vma->end = start + alen;
  vma->flags = prot_to_vm_flags(prot) | VM_MAYWRITE | (type == MAP_SHARED ? uint32_t{VM_SHARED} : 0u);
  vma->vm_file = vm_file;
  vma->pgoff = offset >> kPageShift;
  Vma* v = vmas_.insert(std::move(vma));  // never merged: vm_file is set
  if (int rc = f_mmap(*v); rc != 0) {
    // The hook failed: undo the mapping and whatever it inserted (unmap_region).
    do_munmap(*this, vmas_, start, start + alen);
    return Err{rc};
  }
  return start;
}

}  // namespace gpusvm::mm
