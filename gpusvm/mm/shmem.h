// ShmemObject: a page cache of 4 KiB folios indexed by page offset. It backs MAP_SHARED
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
// Locking: lock_ (rank kShmemLockClass, above the folio lock in the order) guards the page
// map. The cache holds one reference on every folio in it; lookups return an extra reference
// for the caller.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

class ShmemObject {
 public:
  // A new object of `size` bytes (rounded up to pages). -EINVAL for size 0 or > 1 TiB.
  static Result<std::shared_ptr<ShmemObject>> create(PhysMem* mem, uint64_t size,
                                                      std::string name = "shmem");
  ~ShmemObject();  // drops the cache references
  ShmemObject(const ShmemObject&) = delete;
  ShmemObject& operator=(const ShmemObject&) = delete;

  // The folio at page offset pgoff with an extra reference, allocating a zeroed one when
  // absent. nullptr for -ENOMEM (injected or real); `*beyond_eof` set when pgoff >= size.
  Folio* get_folio(uint64_t pgoff, bool* beyond_eof);
  // The cached folio at pgoff with an extra reference, or nullptr when none is cached (a hole
  // or beyond the end). Never allocates.
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
  uint64_t size_pages() const { return size_pages_; }
  uint64_t size_bytes() const { return size_pages_ << kPageShift; }
  const std::string& name() const { return name_; }
  // Cache content for the checker: calls fn(pgoff, folio) with the lock held.
  template <typename Fn>
  void for_each_cached(Fn&& fn) const {
    MutexLock g(&lock_);
    for (auto& [pgoff, folio] : pages_) fn(pgoff, folio);
  }

 private:
  ShmemObject(PhysMem* mem, uint64_t size_pages, std::string name)
      : mem_(mem), size_pages_(size_pages), name_(std::move(name)) {}
  PhysMem* const mem_;
  const uint64_t size_pages_;
  const std::string name_;
  mutable Mutex lock_{&kShmemLockClass};
  std::map<uint64_t, Folio*> pages_ GPUSVM_GUARDED_BY(lock_);
};

}  // namespace gpusvm::mm
