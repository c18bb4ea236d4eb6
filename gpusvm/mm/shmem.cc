#include "gpusvm/mm/shmem.h"

#include <cerrno>

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

Folio* ShmemObject::get_folio(uint64_t pgoff, bool* beyond_eof) {
  *beyond_eof = pgoff >= size_pages_;
  if (*beyond_eof) return nullptr;
  MutexLock g(&lock_);
  auto it = pages_.find(pgoff);
  if (it != pages_.end()) {
    it->second->get();
    return it->second;
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
