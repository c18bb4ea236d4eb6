// Dmirror::mmap: the device file's mmap hook (test_hmm's dmirror_fops_mmap).
#include <cerrno>

#include "drivers/devfs/process.h"
#include "drivers/dmirror/dmirror.h"
#include "gpusvm/mm/insert_page.h"

namespace gpusvm::dmirror {

// Context: caller's mmap lock held for write (devfs::mmap -> AddressSpace::mmap_device).
// Neither the file mutex nor the device lock is needed: nothing of the device is touched.
int Dmirror::mmap(devfs::Process& caller, mm::Vma& vma) {
  mm::AddressSpace& as = caller.mm();
  as.mmap_assert_write_locked();
  for (mm::Va addr = vma.start; addr < vma.end; addr += mm::kPageSize) {
    mm::Folio* page = as.mem()->folio_alloc(0, /*zero=*/true);
    if (!page) return -ENOMEM;  // mmap_device unmaps what was inserted so far
    const int rc = mm::vm_insert_page(as, vma, addr, page);
    page->put();  // the allocation's reference: the mapping holds its own
    if (rc) return rc;
  }
  return 0;
}

}  // namespace gpusvm::dmirror
