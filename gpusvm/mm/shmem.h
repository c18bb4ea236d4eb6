// ShmemObject: a page cache of 4 KiB folios indexed by page offset. It backs MAP_SHARED
// anonymous mappings (shmem) and stands in for a file in file-like mappings (MAP_PRIVATE of a
// file reads from it and copies on write; MAP_SHARED writes go to it).
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
#include "gpusvm/mm/lock_order.h"
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
  uint64_t size_pages() const { return size_pages_; }
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
