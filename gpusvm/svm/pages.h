// Pages: the device's view of the CPU pages behind a range (the kernel's drm_gpusvm_pages).
//
// A Pages object holds, for one device for its whole life (the "DMA device"):
//  - the address array: one PagemapAddr per folio as hmm mapped it (order 0, or kPmdOrder for
//    a PMD-mapped THP), or a single folded entry when the whole span is one contiguous run of
//    one kind of memory and a power of two pages long (a fully contiguous range costs one
//    entry and one mapping call);
//  - its flags word (has_dma_mapping, has_devmem_pages, unmapped, partial_unmap), atomic so a
//    driver may read it without the lock as a hint (pages_valid_unlocked);
//  - the notifier sequence the array was built under;
//  - a reference on the pagemap its device pages belong to (at most one pagemap per Pages).
//
// Locking: the address array, the sequence and the pagemap reference change only under the
// owning Gpusvm's notifier lock: get_pages publishes under it held for read, while the caller
// serializes get_pages / unmap_pages / free_pages of one Pages object (for a range: the
// driver's range lock, asserted); the invalidation path unmaps under it held for write. So
// whoever holds the notifier lock (either mode) reads a stable array. The authoritative
// validity check is pages_valid() under the notifier lock; the flags word read without it is
// only a hint.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "gpusvm/svm/device.h"
#include "gpusvm/svm/pagemap.h"

namespace gpusvm::svm {

class Gpusvm;

namespace pages_flags {
inline constexpr uint32_t kHasDmaMapping = 1u << 0;   // the address array is valid
inline constexpr uint32_t kHasDevmemPages = 1u << 1;  // some entries are device pages
inline constexpr uint32_t kUnmapped = 1u << 2;        // the CPU range went away (UNMAP)
inline constexpr uint32_t kPartialUnmap = 1u << 3;    // only part of it did
}  // namespace pages_flags

class Pages {
 public:
  // Bound for life to `dev` (not null).
  explicit Pages(Device* dev) : dev_(dev) {}
  ~Pages();  // panics when still mapped: free_pages (or range_remove) first
  Pages(const Pages&) = delete;
  Pages& operator=(const Pages&) = delete;

  Device* device() const { return dev_; }

  // The flags word (pages_flags::*). acquire: pairs with the release store that publishes a
  // new array, so a reader that sees kHasDmaMapping also sees the array (a hint only: the
  // array may be unmapped right after; check pages_valid under the notifier lock).
  uint32_t flags() const { return flags_.load(std::memory_order_acquire); }
  bool has_dma_mapping() const { return flags() & pages_flags::kHasDmaMapping; }
  bool has_devmem_pages() const { return flags() & pages_flags::kHasDevmemPages; }
  bool unmapped() const { return flags() & pages_flags::kUnmapped; }
  bool partial_unmap() const { return flags() & pages_flags::kPartialUnmap; }

  // The address array, in VA order: entry i covers 2^addr(i).order pages. Read under the
  // notifier lock (either mode) while has_dma_mapping().
  uint32_t nr_addrs() const { return nr_addrs_; }
  const PagemapAddr& addr(uint32_t i) const { return addrs_[i]; }
  // Pages spanned (the range's size in pages when mapped).
  uint64_t npages() const { return npages_; }
  // Sequence of the notifier at the hmm_range_fault the array came from.
  uint64_t notifier_seq() const { return notifier_seq_; }
  // The pagemap of its device pages (a reference is held while mapped), or nullptr.
  Pagemap* pagemap() const { return pagemap_; }
  // The device address of the page at `page_index` pages from the start (an entry's address
  // plus the offset into it); kDmaMappingError past the end. Notifier lock held.
  DmaAddr addr_of(uint64_t page_index) const;

  // Bytes of metadata this object owns (itself and its address array).
  uint64_t metadata_bytes() const { return sizeof(*this) + nr_addrs_ * sizeof(PagemapAddr); }

 private:
  friend class Gpusvm;
  void set_flag(uint32_t f) { flags_.fetch_or(f, std::memory_order_acq_rel); }
  void clear_flag(uint32_t f) { flags_.fetch_and(~f, std::memory_order_acq_rel); }

  Device* const dev_;
  std::atomic<uint32_t> flags_{0};
  // Below: notifier lock (see the file comment).
  std::unique_ptr<PagemapAddr[]> addrs_;
  uint32_t nr_addrs_ = 0;
  uint64_t npages_ = 0;
  uint64_t notifier_seq_ = 0;
  Pagemap* pagemap_ = nullptr;
  bool writable_ = false;       // mapped for device writes (not ctx.read_only)
  bool published_now_ = false;  // mapped by the get_pages in progress (for its rollback)
};

}  // namespace gpusvm::svm
