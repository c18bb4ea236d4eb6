// The copy engine: moves pages between system frames (mm::PhysMem) and VRAM (a VramArena).
//
// Design notes:
//  - CopyEngine validates a whole request first (every pfn is RAM, every VRAM offset is in the
//    arena and page aligned): a bad request copies nothing and returns -EINVAL. Then it hands
//    the page copies to a CopyBackend.
//  - CopyBackend is the small interface a second implementation (Vulkan: vkCmdCopyBuffer on a
//    transfer queue, DESIGN.md §5b) fills in later. HostCopyBackend is memcpy, optionally
//    spread over worker threads: a request above a threshold is cut into chunks that the
//    workers and the caller take from a shared index.
//  - Statistics: bytes and nanoseconds per direction, requests, failures.
//  - Who may touch the pages while they are copied is the caller's contract: a migration
//    copies pages it has unmapped (migration entries) into device pages nobody maps yet.
//  - Failure injection: "refgpu.copy" fails a request with -EIO before it copies anything
//    (a device copy error, which the migration must survive).
//
// Locking: the host backend's pool lock (kCopyPoolLockClass) is a leaf; copy() may be called
// with folio locks held (a migration) and sleeps only waiting for its own workers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/mm/types.h"
#include "drivers/refgpu/vram.h"

namespace gpusvm::mm {
class PhysMem;
}

namespace gpusvm::refgpu {

struct CopyRegion {
  std::byte* dst = nullptr;
  const std::byte* src = nullptr;
  uint64_t bytes = 0;
};

// Bytes to zero: `dst` and `bytes` multiples of 4 (VRAM pages, in practice).
struct FillRegion {
  std::byte* dst = nullptr;
  uint64_t bytes = 0;
};

class CopyBackend {
 public:
  virtual ~CopyBackend() = default;
  virtual const char* name() const = 0;
  // Copies every region (they do not overlap). 0 or a negative errno. May sleep.
  [[nodiscard]] virtual int copy(std::span<const CopyRegion> regions) = 0;
  // Zeroes every region with the device (memset on the host backend, vkCmdFillBuffer on
  // Vulkan): the clears of a migration's holes and of a new buffer object. As copy().
  [[nodiscard]] virtual int fill_zero(std::span<const FillRegion> regions) = 0;
};

class HostCopyBackend : public CopyBackend {
 public:
  // threads: extra worker threads (0: the caller copies alone). Requests below
  // threshold_bytes are copied by the caller alone.
  explicit HostCopyBackend(unsigned threads = 0, uint64_t threshold_bytes = 1 << 20);
  ~HostCopyBackend() override;
  const char* name() const override { return "host"; }
  int copy(std::span<const CopyRegion> regions) override;
  int fill_zero(std::span<const FillRegion> regions) override;  // the caller's memset
  unsigned threads() const { return static_cast<unsigned>(threads_.size()); }
  uint64_t threshold_bytes() const { return threshold_; }

 private:
  struct Work;
  void worker();
  static void run_chunks(Work* w);

  const uint64_t threshold_;
  Mutex lock_{&kCopyPoolLockClass};  // serialises requests that use the workers
  std::mutex m_;                      // worker hand-off (std: waited on with a condvar)
  std::condition_variable cv_;
  Work* work_ = nullptr;              // under m_
  uint64_t generation_ = 0;           // under m_
  bool stop_ = false;                 // under m_
  unsigned active_ = 0;               // under m_: workers inside run_chunks
  std::vector<std::thread> threads_;
};

struct CopyStats {
  StatCounter requests;
  StatCounter failures;
  StatCounter bytes_to_vram;
  StatCounter bytes_to_ram;
  StatCounter ns_to_vram;
  StatCounter ns_to_ram;
};

class CopyEngine {
 public:
  CopyEngine(mm::PhysMem* mem, VramArena* vram, std::unique_ptr<CopyBackend> backend);

  // Copies npages system pages into VRAM pages (src_pfns[i] -> dst_offsets[i]).
  [[nodiscard]] int copy_to_vram(const mm::Pfn* src_pfns, const uint64_t* dst_offsets, uint64_t npages);
  // Copies npages VRAM pages into system pages (src_offsets[i] -> dst_pfns[i]).
  [[nodiscard]] int copy_to_ram(const uint64_t* src_offsets, const mm::Pfn* dst_pfns, uint64_t npages);
  // Zeroes VRAM pages (a migration of an unpopulated source, a new buffer object) through the
  // backend, adjacent pages as one region. -EINVAL (nothing cleared) for a bad offset.
  [[nodiscard]] int clear_vram(const uint64_t* offsets, uint64_t npages);

  CopyBackend& backend() { return *backend_; }
  VramArena* vram() const { return vram_; }
  const CopyStats& stats() const { return stats_; }

 private:
  bool valid_pfn(mm::Pfn pfn) const;
  bool valid_offset(uint64_t off) const;
  int run(std::span<const CopyRegion> regions, StatCounter* bytes, StatCounter* ns);

  mm::PhysMem* const mem_;
  VramArena* const vram_;
  const std::unique_ptr<CopyBackend> backend_;
  CopyStats stats_;
};

}  // namespace gpusvm::refgpu
