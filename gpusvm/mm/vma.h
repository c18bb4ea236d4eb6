// Virtual memory areas and the per-address-space set of them.
#pragma once

#include <cstdint>
#include <map>
#include <memory>

#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class ShmemObject;

// VMA flags (vm_flags), Linux names.
enum VmFlag : uint32_t {
  VM_READ = 1u << 0,
  VM_WRITE = 1u << 1,
  VM_EXEC = 1u << 2,
  VM_SHARED = 1u << 3,
  VM_MAYWRITE = 1u << 4,
  VM_HUGEPAGE = 1u << 5,    // MADV_HUGEPAGE
  VM_NOHUGEPAGE = 1u << 6,  // MADV_NOHUGEPAGE
  VM_LOCKED = 1u << 7,
  VM_DONTCOPY = 1u << 8,    // MADV_DONTFORK
  VM_WIPEONFORK = 1u << 9,  // MADV_WIPEONFORK
  VM_IO = 1u << 10,         // device I/O mapping: hmm reports ERROR
  VM_PFNMAP = 1u << 11,     // raw pfn mapping without folios: hmm reports ERROR
  // A driver's mapping with pages it inserted itself (vm_insert_page): normal, refcounted
  // pages that hmm and the CPU see as such; never migrated, never merged (VM_SPECIAL).
  VM_MIXEDMAP = 1u << 16,
  // MAP_HUGETLB: backed by 2 MiB pages of PhysMem's hugetlb pool, mapped only by PMDs. The
  // VMA's bounds are 2 MiB aligned and every operation keeps them so (hugetlb.h).
  VM_HUGETLB = 1u << 12,
};

// Mappings the core must not treat as ordinary memory: no merge, no migrate_vma.
inline constexpr uint32_t VM_SPECIAL = VM_IO | VM_PFNMAP | VM_MIXEDMAP;

uint32_t prot_to_vm_flags(int prot);
int vm_flags_to_prot(uint32_t flags);

struct Vma {
  Va start = 0;  // page aligned
  Va end = 0;    // exclusive, page aligned
  uint32_t flags = 0;
  // Shared or file-backed mappings: the object and the page offset of `start` in it.
  // Private file mappings read from the object and copy on write.
  std::shared_ptr<ShmemObject> file;
  uint64_t pgoff = 0;
  // A device file mapped here (vm_file of a driver's mmap, AddressSpace::mmap_device): its
  // identity only, never dereferenced. The model's mapping does not keep the file open.
  const void* vm_file = nullptr;

  // vma_is_anonymous: private or shared anonymous memory without a backing object. hugetlb
  // mappings are not (Linux backs them with a hugetlbfs file): no THP, no migration, no
  // MADV_FREE/COLLAPSE/WIPEONFORK.
  bool is_anonymous() const { return !file && !vm_file && !(flags & VM_HUGETLB); }
  bool is_hugetlb() const { return flags & VM_HUGETLB; }
  bool is_shared() const { return flags & VM_SHARED; }
  bool contains(Va va) const { return va >= start && va < end; }
  uint64_t size() const { return end - start; }
  uint64_t pgoff_of(Va va) const { return pgoff + ((va - start) >> kPageShift); }
  // Can a PMD-sized THP be mapped at the aligned 2 MiB containing va?
  bool thp_fits(Va va) const {
    Va a = pmd_align_down(va);
    return a >= start && a + kPmdSize <= end;
  }
};

// The VMAs of one address space: non-overlapping, keyed by start, so a lookup is one
// ordered-map search. Guarded by the owner's mmap lock (read to look up, write to change).
class VmaTree {
 public:
  // The VMA containing va, or nullptr (vma_lookup).
  Vma* lookup(Va va) const;
  // The first VMA ending above va (find_vma), or nullptr.
  Vma* find(Va va) const;
  // The VMA starting strictly after `vma`, or nullptr.
  Vma* next(const Vma* vma) const;
  Vma* insert(std::unique_ptr<Vma> vma);
  std::unique_ptr<Vma> erase(Vma* vma);
  // Splits `vma` at addr (start < addr < end); returns the upper part. -ENOMEM never: the
  // model's split cannot fail, but the caller must re-fetch pointers into the tree.
  Vma* split(Vma* vma, Va addr);
  // Merges `vma` with its neighbours where they are adjacent and identical in flags/file.
  void try_merge(Vma* vma);
  bool empty() const { return map_.empty(); }
  size_t size() const { return map_.size(); }
  template <typename Fn>
  void for_each(Fn&& fn) const {
    for (auto& [s, v] : map_) fn(v.get());
  }
  // Lowest gap of at least len bytes at or above `low` and ending at or below `high`,
  // searching top-down like Linux's mmap layout. Returns 0 if none.
  Va find_gap_topdown(uint64_t len, Va low, Va high, uint64_t align) const;

 private:
  std::map<Va, std::unique_ptr<Vma>> map_;
};

}  // namespace gpusvm::mm
