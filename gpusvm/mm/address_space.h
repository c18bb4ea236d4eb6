// AddressSpace: one simulated process's virtual memory (the kernel's mm_struct).
//
// It owns the VMAs, the page table, the MMU notifier subscriptions and the mmap lock, and
// implements the memory system calls with Linux's semantics: mmap, munmap, mprotect, madvise,
// mremap, fork and exit. Every call validates its arguments first and returns a negative
// errno with nothing changed on bad input. Every page-table change is announced to MMU
// notifiers with the matching event before it happens and finished after it.
//
// Locking: see gpusvm/base/lock_order.h. The system calls take the mmap lock themselves (write, except
// madvise(DONTNEED/FREE) which, as in Linux, needs only read) and must be called with no
// gpusvm lock held. Functions marked "mmap lock held" expect the caller to hold it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/mm/mm_stats.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/page_table.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/vma.h"

namespace gpusvm::mm {

class ShmemObject;

class AddressSpace {
 public:
  // Returns a new empty address space on `mem`, or -ENOMEM.
  static Result<std::unique_ptr<AddressSpace>> create(PhysMem* mem);
  ~AddressSpace();  // exit() if not yet done
  AddressSpace(const AddressSpace&) = delete;
  AddressSpace& operator=(const AddressSpace&) = delete;

  // mmap(2). addr is a hint unless MAP_FIXED / MAP_FIXED_NOREPLACE. flags: exactly one of
  // MAP_PRIVATE / MAP_SHARED, plus MAP_ANONYMOUS (file must then be null), MAP_FIXED,
  // MAP_FIXED_NOREPLACE, MAP_POPULATE, MAP_NORESERVE. Without MAP_ANONYMOUS, `file` is the
  // object to map at page offset offset / kPageSize.
  // Errors: -EINVAL (len 0, unaligned addr with MAP_FIXED or unaligned offset, bad flags,
  // bad prot bits), -ENOMEM (no room, len overflow), -EEXIST (FIXED_NOREPLACE overlap),
  // -EBADF (file mapping without file).
  Result<Va> mmap(Va addr, uint64_t len, int prot, int flags,
                  std::shared_ptr<ShmemObject> file = nullptr, uint64_t offset = 0);
  // mmap(2) of a device file (mmap_region calling file->f_op->mmap). Creates a VMA that is not
  // anonymous and has no page cache (`vm_file` = the file's identity), then calls
  // f_mmap(vma) with the mmap lock held for write, before anyone can see the range: the
  // driver sets it up, typically with vm_insert_page (insert_page.h), which makes it
  // VM_MIXEDMAP. A none entry later is SIGBUS (no fault handler). flags: MAP_SHARED or
  // MAP_PRIVATE, plus MAP_FIXED / MAP_FIXED_NOREPLACE (no MAP_ANONYMOUS, MAP_POPULATE).
  // Errors: those of mmap (-EINVAL, -ENOMEM, -EEXIST, -EPERM), -EINVAL for a null file or
  // hook, and the hook's own error, after which the range is unmapped again (whatever the
  // hook inserted is zapped) - with MAP_FIXED the old mapping there is gone, as in Linux.
  Result<Va> mmap_device(Va addr, uint64_t len, int prot, int flags, const void* vm_file,
                         const std::function<int(Vma&)>& f_mmap, uint64_t offset = 0);
  // munmap(2). Errors: -EINVAL (unaligned start, len 0, outside user space).
  [[nodiscard]] int munmap(Va start, uint64_t len);
  // mprotect(2). Errors: -EINVAL (unaligned, bad prot), -ENOMEM (range not fully mapped: as
  // in Linux, the VMAs from start up to the first hole are changed first; a hole at start
  // changes nothing).
  [[nodiscard]] int mprotect(Va start, uint64_t len, int prot);
  // madvise(2): MADV_DONTNEED, MADV_FREE, MADV_COLD, MADV_PAGEOUT, MADV_HUGEPAGE,
  // MADV_NOHUGEPAGE, MADV_COLLAPSE,
  // MADV_DONTFORK, MADV_DOFORK, MADV_WIPEONFORK, MADV_KEEPONFORK. Errors: -EINVAL (unknown
  // advice, unaligned start, DONTNEED on locked VMAs), -ENOMEM (unmapped hole in the range),
  // -EAGAIN/-ENOMEM from COLLAPSE when a THP cannot be allocated.
  [[nodiscard]] int madvise(Va start, uint64_t len, int advice);
  // mremap(2) with MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP. Errors as Linux: -EINVAL
  // (bad flags/alignment, overlapping FIXED ranges, DONTUNMAP without MAYMOVE or with a size
  // change), -EFAULT (no VMA at old_addr; a resize or non-FIXED move of a range not inside
  // one VMA), -ENOMEM (cannot grow in place without MAYMOVE, or no room). MREMAP_FIXED without
  // a size change moves every VMA of the range and keeps the gaps between them (Linux 6.17+);
  // a shrink or same-size non-FIXED call unmaps the tail whatever it spans.
  Result<Va> mremap(Va old_addr, uint64_t old_len, uint64_t new_len, int flags,
                    Va new_addr = 0);
  // fork(2): a child with copies of the VMAs; private pages are shared copy-on-write
  // (write-protected on both sides after a PROTECTION_PAGE invalidation of the parent),
  // shared mappings share their pages, VM_DONTCOPY VMAs are skipped and VM_WIPEONFORK VMAs
  // start empty. Returns -ENOMEM (injected allocation failure) with the parent unchanged
  // and no child.
  Result<std::unique_ptr<AddressSpace>> fork();
  // exit_mmap: releases notifiers, unmaps everything, frees the page tables. Idempotent.
  void exit();

  // mmap lock helpers (mmap_read_lock & co).
  RwLock& mmap_lock() GPUSVM_RETURN_CAPABILITY(mmap_lock_) { return mmap_lock_; }
  void mmap_assert_locked() const GPUSVM_ASSERT_SHARED_CAPABILITY(mmap_lock_) {
    mmap_lock_.assert_held();
  }
  void mmap_assert_write_locked() const GPUSVM_ASSERT_CAPABILITY(mmap_lock_) {
    mmap_lock_.assert_write_held();
  }

  // VMA lookup. mmap lock held.
  Vma* vma_lookup(Va va) const GPUSVM_REQUIRES_SHARED(mmap_lock_) { return vmas_.lookup(va); }
  Vma* find_vma(Va va) const GPUSVM_REQUIRES_SHARED(mmap_lock_) { return vmas_.find(va); }
  const VmaTree& vmas() const GPUSVM_REQUIRES_SHARED(mmap_lock_) { return vmas_; }

  PhysMem* mem() const { return mem_; }
  PageTable& page_table() { return pt_; }
  MmuNotifierSubscriptions& notifier_subscriptions() { return notifiers_; }
  MmStats& stats() { return stats_; }
  bool exited() const { return exited_.load(std::memory_order_acquire); }

  // Whether a THP may be used at va in vma (policy + VMA hints + alignment).
  bool thp_allowed(const Vma& vma, Va va) const;

 private:
  explicit AddressSpace(PhysMem* mem);

  PhysMem* const mem_;
  mutable RwLock mmap_lock_{&kMmapLockClass};
  VmaTree vmas_ GPUSVM_GUARDED_BY(mmap_lock_);
  PageTable pt_;
  MmuNotifierSubscriptions notifiers_{this};
  MmStats stats_;
  std::atomic<bool> exited_{false};
};

}  // namespace gpusvm::mm
