// ShmemObject: a page cache of folios indexed by page offset. It backs MAP_SHARED
// anonymous mappings (shmem) and stands in for a file in file-like mappings (MAP_PRIVATE of a
// file reads from it and copies on write; MAP_SHARED writes go to it).
//
// As a file (what hmm-tests does with O_TMPFILE + ftruncate + pwrite + mmap + pread): create()
// is the open and the ftruncate; pwrite/pread move bytes through the page cache without a
// mapping, so they see exactly what MAP_SHARED mappings see (same folios), and a MAP_PRIVATE
// mapping sees them until it copies a page on write. Differences from a Linux file: the size
// is fixed at creation (a pwrite past it is -EFBIG rather than growing the file), and a
// pread/pwrite racing with stores through a mapping to the same bytes is not a supported
// pattern (the bytes are copied under the folio lock, which CPU stores do not take).
//
// Folios are 4 KiB, or PMD-sized (2 MiB) at an index that is a multiple of 512: the shmem
// THPs that MADV_COLLAPSE builds (collapse_file, collapse_file.cc). A large folio covers the
// indices [folio->index(), folio->index() + 512); a lookup at any of them returns the folio
// (head), and folio_file_page() gives the page for an index, as in Linux. No fault allocates a
// large folio: shmem_enabled is "never" on the reference host and the model has no other mode.
//
// Locking: lock_ (rank kShmemLockClass, above the folio lock in the order) guards the page
// map. The cache holds one reference on every folio in it, large or small (Linux holds
// folio_nr_pages(); the model counts the cache once, as mm::check expects); lookups return an
// extra reference for the caller.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

class AddressSpace;

class ShmemObject {
 public:
  // A new object of `size` bytes (rounded up to pages). -EINVAL for size 0 or > 1 TiB.
  static Result<std::shared_ptr<ShmemObject>> create(PhysMem* mem, uint64_t size,
                                                      std::string name = "shmem");
  ~ShmemObject();  // drops the cache references
  ShmemObject(const ShmemObject&) = delete;
  ShmemObject& operator=(const ShmemObject&) = delete;

  // The folio holding page offset pgoff (its head: use folio_file_page for the page) with an
  // extra reference, allocating a zeroed 4 KiB one when absent. nullptr for -ENOMEM
  // (injected or real); `*beyond_eof` set when pgoff >= size.
  Folio* get_folio(uint64_t pgoff, bool* beyond_eof);
  // The cached folio holding pgoff (head) with an extra reference, or nullptr when none is
  // cached (a hole or beyond the end). Never allocates.
  Folio* find_folio(uint64_t pgoff);
  // pwrite(2): copies len bytes from buf to offset off, allocating (zeroed) page-cache folios
  // for holes and marking every folio written dirty. Returns the bytes written (len, or fewer
  // when an allocation fails after the first page), or -EINVAL (null buf with len > 0, offset
  // overflow), -EFBIG (the range goes past the object's size), -ENOMEM (the first page could
  // not be allocated; injectable as "mm.alloc_folio"). Context: no gpusvm lock held; may
  // sleep (folio lock).
  [[nodiscard]] int64_t pwrite(const void* buf, uint64_t len, uint64_t off);
  // pread(2): copies up to len bytes at offset off into buf; holes read as zeroes without
  // allocating. Returns the bytes read (short at the end of the object, 0 at or past it), or
  // -EINVAL (null buf with len > 0, offset overflow). Context as pwrite.
  [[nodiscard]] int64_t pread(void* buf, uint64_t len, uint64_t off);
  // collapse_file (mm/khugepaged.c, collapse_file.cc): builds a PMD-sized folio for the 512
  // page offsets from `start` (a multiple of 512, inside the object): locks every 4 KiB folio
  // there, unmaps it from every address space through the reverse map, copies it into a new
  // 2 MiB folio (holes stay zero, as shmem collapses them), puts that folio in the cache in
  // their place, and frees them. Returns 0 when it did, 1 when a PMD-sized folio is there
  // already (SCAN_PTE_MAPPED_HUGEPAGE: nothing to do in the cache), -EAGAIN when a folio is
  // locked or holds a reference beyond the cache and its mappings (GUP, a pin, a lookup in
  // flight), -ENOMEM when no 2 MiB folio can be allocated ("mm.alloc_folio_thp"), -EINVAL
  // for a bad `start`. On failure the cache is unchanged; pages already unmapped stay
  // unmapped and refault (as Linux's rollback). Context: no page-table lock, no folio lock
  // held; any mmap lock (the caller's own may be held); may sleep (folio locks, notifier
  // callbacks). Holds the object lock throughout, so faults on the object wait until done.
  [[nodiscard]] int collapse_file(uint64_t start);
  uint64_t size_pages() const { return size_pages_; }
  uint64_t size_bytes() const { return size_pages_ << kPageShift; }
  const std::string& name() const { return name_; }
  // Cache content for the checker: calls fn(index, folio) with the lock held, once per folio
  // (index = the folio's first page offset).
  template <typename Fn>
  void for_each_cached(Fn&& fn) const {
    MutexLock g(&lock_);
    for (auto& [pgoff, folio] : pages_) fn(pgoff, folio);
  }

 private:
  // collapse_file's last step (collapse_file.cc). Lock held.
  void retract_page_tables(uint64_t start, std::vector<std::pair<AddressSpace*, Va>> mapped_in)
      GPUSVM_REQUIRES(lock_);
  // The folio covering pgoff, or nullptr. Lock held.
  Folio* lookup_locked(uint64_t pgoff) const GPUSVM_REQUIRES(lock_);
  ShmemObject(PhysMem* mem, uint64_t size_pages, std::string name)
      : mem_(mem), size_pages_(size_pages), name_(std::move(name)) {}
  PhysMem* const mem_;
  const uint64_t size_pages_;
  const std::string name_;
  mutable Mutex lock_{&kShmemLockClass};
  std::map<uint64_t, Folio*> pages_ GPUSVM_GUARDED_BY(lock_);
};

// The page of page-cache folio `folio` (a head returned by get_folio / find_folio) at page
// offset pgoff, which the folio must cover (folio_file_page).
inline Folio* folio_file_page(Folio* folio, uint64_t pgoff) {
  return folio->page(pgoff - folio->index());
}

}  // namespace gpusvm::mm
