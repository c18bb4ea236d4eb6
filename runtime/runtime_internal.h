// The runtime's objects behind the C handles of runtime.h, and the pieces the .cc files share.
// Not installed (the C API is the interface).
//
// Locking: the heap lock (kRtHeapLockClass) guards one heap's block maps; it is held across
// the mmap of a new arena and across the madvise ioctl that resets the advice of freed pages
// (so that no malloc can hand those pages out, and advise them, before the reset lands). It
// is taken with no other gpusvm lock held and nothing the runtime calls under it takes it
// again, so it ranks before every driver lock (rank 5 in gpusvm/base/lock_order.h, which
// defines both classes). The fence settle lock (kRtFenceLockClass, submit.cc) is a leaf.
// Devices, contexts and fences are otherwise immutable after creation or use atomics.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "drivers/devfs/process.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/thread_annotations.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/shmem.h"
#include "gpusvm/runtime.h"
#include "uapi/refgpu.h"

namespace gpusvm::rt {

// drmIoctl: ioctl(2) on the device file, restarted while it fails with -EINTR or -EAGAIN
// (bounded by hang_timeout(): then the last error is returned).
int drm_ioctl(devfs::Process& proc, int fd, unsigned long request, void* arg);

inline uint64_t uptr(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

// A malloc heap in the process: 2 MiB arenas (anonymous private mappings) carved first fit
// with coalescing, and blocks of GPUSVM_RT_MMAP_THRESHOLD or more as mappings of their own.
// `pages_fn(start, len)` is called with the heap lock held for page ranges that become
// heap-owned and unused: every page of a new arena, and the whole pages inside the coalesced
// free space after a free. The context uses it to reset (user heap) or set (internal heap)
// the GPU advice of those pages. Thread safe.
class Heap {
 public:
  using PagesFn = std::function<int(mm::Va start, uint64_t len)>;
  static constexpr uint64_t kArenaBytes = 2ull << 20;
  static constexpr uint64_t kMinAlign = 16;

  Heap(mm::AddressSpace& mm, PagesFn pages_fn) : mm_(mm), pages_fn_(std::move(pages_fn)) {}
  ~Heap();  // unmaps every arena and large block
  Heap(const Heap&) = delete;
  Heap& operator=(const Heap&) = delete;

  // align: a power of two (kMinAlign at least). Errors: -EINVAL (size 0 or overflow, bad
  // align), -ENOMEM (mmap failed), the pages_fn error of a new arena (arena unmapped again).
  Result<mm::Va> alloc(uint64_t size, uint64_t align) GPUSVM_EXCLUDES(lock_);
  // -EINVAL for an address alloc did not return (or already freed).
  int free(mm::Va p) GPUSVM_EXCLUDES(lock_);
  Result<uint64_t> usable_size(mm::Va p) GPUSVM_EXCLUDES(lock_);
  // Bytes in live blocks (tests: leak checks).
  uint64_t live_bytes() GPUSVM_EXCLUDES(lock_);

 private:
  struct Large {
    mm::Va map_start;
    uint64_t map_len;
    uint64_t size;
  };
  Result<mm::Va> alloc_large(uint64_t size, uint64_t align) GPUSVM_REQUIRES(lock_);
  Result<mm::Va> carve(uint64_t size, uint64_t align) GPUSVM_REQUIRES(lock_);
  // Inserts [s, s + len) into free_, merging with its neighbours; returns the merged span.
  std::pair<mm::Va, uint64_t> insert_free(mm::Va s, uint64_t len) GPUSVM_REQUIRES(lock_);

  mm::AddressSpace& mm_;
  const PagesFn pages_fn_;
  Mutex lock_{&kRtHeapLockClass};
  std::map<mm::Va, uint64_t> free_ GPUSVM_GUARDED_BY(lock_);    // start -> length
  std::map<mm::Va, uint64_t> used_ GPUSVM_GUARDED_BY(lock_);    // arena blocks: start -> length
  std::map<mm::Va, Large> large_ GPUSVM_GUARDED_BY(lock_);      // user address -> mapping
  std::vector<mm::Va> arenas_ GPUSVM_GUARDED_BY(lock_);
  uint64_t live_ GPUSVM_GUARDED_BY(lock_) = 0;
};

}  // namespace gpusvm::rt

struct gpusvm_rt_device {
  gpusvm::devfs::Process* proc = nullptr;
  int fd = -1;
  uint32_t index = 0;
  drm_refgpu_query_config config{};
  drm_refgpu_query_mem_regions regions{};
  drm_refgpu_query_engines engines{};
  std::atomic<int> contexts{0};
};

struct gpusvm_rt_context {
  gpusvm_rt_device* dev = nullptr;
  uint32_t vm_id = 0;
  std::unique_ptr<gpusvm::rt::Heap> heap;      // the program's malloc
  std::unique_ptr<gpusvm::rt::Heap> internal;  // batches and fence slots: advised to system memory
  std::atomic<uint64_t> seqno{0};
  std::atomic<int> queues{0};
  std::atomic<int> fences{0};
  std::atomic<int> bos{0};
  gpusvm::mm::AddressSpace& mm() { return dev->proc->mm(); }
  int io(unsigned long req, void* arg) { return gpusvm::rt::drm_ioctl(*dev->proc, dev->fd, req, arg); }
};

struct gpusvm_rt_queue {
  gpusvm_rt_context* ctx = nullptr;
  uint32_t id = 0;
};

// A fence: two qwords in the internal heap. `done` is written by the driver (the exec's or
// bind's user-fence sync, whatever the job's status); `ok` by the batch's last FENCE_WRITE,
// which a failed job never reaches. A job succeeded iff ok == seqno once done == seqno.
struct gpusvm_rt_fence {
  gpusvm_rt_context* ctx = nullptr;
  uint32_t queue_id = 0;  // 0 for a bind (prefetch) fence
  bool is_job = false;
  gpusvm::mm::Va slots = 0;  // done at +0, ok at +8; the batch follows for jobs
  uint64_t seqno = 0;
  uint64_t submit_ns = 0;  // steady_clock, the clock of the driver's fault records
  // 1 pending, else the final status; and the fault that failed the job.
  std::atomic<int> status{1};
  gpusvm_rt_job_error err{};
};

// A GEM buffer object of the context's VM (created private to it), its GPU bindings (each
// a whole VM_BIND MAP, unbound whole) and its one CPU mapping (an mmap of the device file at
// the BO's fake offset).
struct gpusvm_rt_bo {
  struct Binding {
    gpusvm::mm::Va addr;
    uint64_t len;
  };
  gpusvm_rt_context* ctx = nullptr;
  uint32_t handle = 0;
  uint64_t size = 0;
  uint32_t placement = 0;
  gpusvm::Mutex lock{&gpusvm::rt::kRtBoLockClass};
  std::vector<Binding> bindings GPUSVM_GUARDED_BY(lock);
  gpusvm::mm::Va cpu_va GPUSVM_GUARDED_BY(lock) = 0;  // 0: not CPU-mapped
};

struct gpusvm_rt_file {
  std::shared_ptr<gpusvm::mm::ShmemObject> obj;  // mappings hold their own reference
};

struct gpusvm_rt_cmdbuf {
  std::vector<uint32_t> dw;
};
