#include "gpusvm/mm/shmem.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace gpusvm::mm {

Result<std::shared_ptr<ShmemObject>> ShmemObject::create(PhysMem* mem, uint64_t size,
                                                         std::string name) {
  if (!mem || size == 0 || size > (1ULL << 40)) return Err{-EINVAL};
  return std::shared_ptr<ShmemObject>(
      new ShmemObject(mem, page_align_up(size) >> kPageShift, std::move(name)));
}

ShmemObject::~ShmemObject() {
  MutexLock g(&lock_);
  for (auto& [pgoff, folio] : pages_) {
    folio->clear(kFolioShmem);
    folio->mapping_ = nullptr;
    folio->put();
  }
  pages_.clear();
}

Folio* ShmemObject::lookup_locked(uint64_t pgoff) const {
  lock_.assert_held();
  auto it = pages_.upper_bound(pgoff);
  if (it == pages_.begin()) return nullptr;
  --it;
  return pgoff - it->first < it->second->nr_pages() ? it->second : nullptr;
}

Folio* ShmemObject::get_folio(uint64_t pgoff, bool* beyond_eof) {
  *beyond_eof = pgoff >= size_pages_;
  if (*beyond_eof) return nullptr;
  MutexLock g(&lock_);
  if (Folio* folio = lookup_locked(pgoff)) {
    folio->get();
    return folio;
  }
  Folio* folio = mem_->folio_alloc(0, true);
  if (!folio) return nullptr;
  folio->set(kFolioShmem);
  folio->mapping_ = this;
  folio->index_ = pgoff;
  pages_.emplace(pgoff, folio);  // the cache's reference is the allocation's
  folio->get();                  // the caller's
  return folio;
}

}  // namespace gpusvm::mm

namespace gpusvm::mm {

Folio* ShmemObject::find_folio(uint64_t pgoff) {
  MutexLock g(&lock_);
  Folio* folio = lookup_locked(pgoff);
  if (folio) folio->get();
  return folio;
}

int64_t ShmemObject::pwrite(const void* buf, uint64_t len, uint64_t off) {
  if ((!buf && len) || off + len < off) return -EINVAL;
  if (off + len > size_bytes()) return -EFBIG;
  const auto* in = static_cast<const std::byte*>(buf);
  uint64_t done = 0;
  while (done < len) {
    const uint64_t pos = off + done;
    const uint64_t in_page = pos & (kPageSize - 1);
    const uint64_t n = std::min(len - done, kPageSize - in_page);
    bool beyond = false;
    Folio* folio = get_folio(pos >> kPageShift, &beyond);
    if (!folio) break;  // -ENOMEM (beyond is impossible: checked above)
    // The folio lock serialises writers of the same page (write_begin / write_end).
    folio_lock(folio);
    std::memcpy(folio_file_page(folio, pos >> kPageShift)->data() + in_page, in + done, n);
    folio->set(kFolioDirty);
    folio_unlock(folio);
    folio->put();
    done += n;
  }
  if (done == 0 && len > 0) return -ENOMEM;
  return static_cast<int64_t>(done);
}

int64_t ShmemObject::pread(void* buf, uint64_t len, uint64_t off) {
  if ((!buf && len) || off + len < off) return -EINVAL;
  if (off >= size_bytes()) return 0;
  len = std::min(len, size_bytes() - off);
  auto* out = static_cast<std::byte*>(buf);
  for (uint64_t done = 0; done < len;) {
    const uint64_t pos = off + done;
    const uint64_t in_page = pos & (kPageSize - 1);
    const uint64_t n = std::min(len - done, kPageSize - in_page);
    if (Folio* folio = find_folio(pos >> kPageShift)) {
      folio_lock(folio);
      std::memcpy(out + done, folio_file_page(folio, pos >> kPageShift)->data() + in_page, n);
      folio_unlock(folio);
      folio->put();
    } else {
      std::memset(out + done, 0, n);  // a hole reads as zeroes (shmem's ZERO_PAGE read)
    }
    done += n;
  }
  return static_cast<int64_t>(len);
}

}  // namespace gpusvm::mm
