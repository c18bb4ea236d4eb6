// Vm: one GPU VM of the reference GPU (what xe_vm.c's struct xe_vm is, with xe_svm.c's
// mirror). One per vm_create.
//
// A Vm has its GPU page table, its device TLB and the GpuMmu engines translate through; in
// fault mode it mirrors the process's AddressSpace with an svm::Gpusvm (the CPU_ADDR_MIRROR
// regions: GPU VA == CPU VA, pages come from GPU faults). What is bound where is the GPU VMA
// tree: CPU_ADDR_MIRROR regions (with MADVISE_AUTORESET) and, inside or outside them, buffer
// object mappings. The attributes madvise sets live in a MemAttrTree (vm_madvise.h).
//
// The ioctl layer translates the uapi structs (uapi/refgpu.h) into these calls; errnos are the
// ones docs/uapi.md documents.
//
// Locking (ranks in gpusvm/base/lock_order.h):
//   vm lock (kRefgpuVmLockClass, a Mutex): the Gpusvm's driver lock. Held by a fault's
//   service, by every bind op, madvise and the attribute query, and by the garbage
//   collector; guards the GPU VMA tree and the attribute tree.
//     -> mmap lock (inside gpusvm/svm and mm only)
//       -> notifier lock (the commit of PTEs, read; the invalidate callback, write)
//         -> TLB access fence -> page-table lock -> TLB entries (tlb.h)
//   The invalidate callback runs with the notifier lock held for write from the thread
//   changing the CPU page tables; it zaps GPU PTEs of the ranges it covers, invalidates the
//   TLB over exactly the zapped extents (waiting out accesses in flight) and unmaps the pages
//   before it returns. It never takes the vm lock and never allocates.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"
#include "gpusvm/base/stats.h"
#include "gpusvm/svm/gpusvm.h"
#include "drivers/refgpu/fault_queue.h"
#include "drivers/refgpu/gpu_mmu.h"
#include "drivers/refgpu/gpu_page_table.h"
#include "drivers/refgpu/tlb.h"
#include "drivers/refgpu/vm_bo.h"
#include "drivers/refgpu/vm_madvise.h"
#include "drivers/refgpu/vram_pagemap.h"
#include "uapi/refgpu.h"

namespace gpusvm::mm {
class AddressSpace;
}

namespace gpusvm::refgpu {

// Statistics of one VM (REFGPU_STAT_* are sums of these over the device's VMs).
struct VmStats {
  StatCounter faults_4k, faults_64k, faults_2m;  // serviced faults by range size
  StatCounter valid_faults;     // faults that found their range already bound (replay only)
  StatCounter fault_errors;     // faults that failed their job
  StatCounter fault_retries;    // -EAGAIN/-EBUSY retries inside one service
  StatCounter fault_ns;
  StatCounter migrations_to_vram, migrations_to_smem;
  StatCounter migrate_ns;
  StatCounter get_pages_ns;
  StatCounter bind_ns;
  StatCounter tlb_invalidations;
  StatCounter tlb_invalidated_bytes;
  StatCounter invalidate_callbacks;
  StatCounter gc_removed;       // ranges the garbage collector removed
  StatCounter bo_rebinds;       // BO bindings bound again after a move (no fault mode)
  StatCounter bo_rebind_errors; // revalidations/rebinds that failed (rolled back)
  // DEVICE atomics on system memory (vm_exclusive.cc): pages made device-exclusive, and our
  // own EXCLUSIVE invalidations the invalidate callback skipped.
  StatCounter exclusive_pages;
  StatCounter exclusive_skipped_invalidations;
};

// Where device memory comes from: VRAM region instance i (1..) is vram[i - 1].
struct VmConfig {
  uint32_t id = 0;                // never 0
  uint32_t flags = 0;             // REFGPU_VM_CREATE_FLAG_*
  mm::AddressSpace* as = nullptr; // the process this VM mirrors (required in fault mode)
  MemoryResolver* mem = nullptr;  // targets -> host bytes (required)
  svm::Device* device = nullptr;  // DMA mappings of system pages (required in fault mode)
  // This device's VRAM regions (refmem's VramPagemap; may be empty). Their Device must be
  // `device`, so that our own VRAM pages are device_map'ed locally.
  std::vector<VramPagemap*> vram;
  // The device can do atomics on system memory (REFGPU_CONFIG_FLAG_HAS_SMEM_ATOMICS): where
  // false, a device atomic forces VRAM (-EFAULT for the job when there is none).
  bool smem_atomics = true;
  // Resolves a madvise devmem_fd naming another device and a VRAM instance of it: the
  // pagemap, or -EBADF (not a refgpu fd) / -ENOLINK (no link to it) / -EINVAL (no such
  // instance). Null: every other fd is -EBADF.
  std::function<Result<svm::Pagemap*>(int32_t fd, uint16_t region_instance)> resolve_devmem;
  size_t tlb_entries = 4096;
};

// One op of a vm_bind array, in C++ form (the ioctl layer fills it from drm_refgpu_vm_bind_op
// and resolves the BO handle).
struct BindOp {
  uint32_t op = REFGPU_VM_BIND_OP_MAP;  // REFGPU_VM_BIND_OP_*
  uint32_t flags = 0;                   // REFGPU_VM_BIND_FLAG_*
  uint64_t addr = 0;
  uint64_t range = 0;
  uint32_t prefetch_region = 0;         // PREFETCH: instance or REFGPU_CONSULT_MEM_ADVISE_PREF_LOC
  BoRef bo;                             // MAP of a buffer object (the ioctl layer's lookup)
  uint64_t bo_offset = 0;               // page-aligned offset into it
};

// A GPU VMA: what one bind put at [start, end).
struct GpuVma {
  enum class Kind : uint8_t { kMirror, kBo };
  uint64_t start = 0;
  uint64_t end = 0;
  Kind kind = Kind::kMirror;
  uint32_t flags = 0;  // the bind's REFGPU_VM_BIND_FLAG_* (READONLY, MADVISE_AUTORESET)
  std::shared_ptr<BoBinding> binding;  // kBo
  // kBo carved out of a mirror region: UNMAP gives the VA back to the mirror with these flags.
  bool carved = false;
  uint32_t mirror_flags = 0;
};

class Vm : public svm::GpusvmOps {
 public:
  static constexpr unsigned kVaBits = GpuPageTable::kVaBits;
  // Attempts of one fault service before it gives up (-EAGAIN fails the job); strict
  // placement (devmem_only) grows its migration timeslice each attempt.
  static constexpr int kFaultAttempts = 32;

  // vm_create. Errors: -EINVAL (FAULT_MODE without LR_MODE, unknown flags, id 0, missing
  // as/device in fault mode, no resolver), -ENOMEM.
  static Result<std::unique_ptr<Vm>> create(VmConfig cfg);
  // vm_destroy: tears down every range, binding and PTE. The device must have stopped the
  // exec queues of this VM first (their jobs may still be stalled in a fault: those faults
  // are failed by the fault service once it sees the VM gone).
  ~Vm() override;
  Vm(const Vm&) = delete;
  Vm& operator=(const Vm&) = delete;

  uint32_t id() const { return cfg_.id; }
  uint32_t flags() const { return cfg_.flags; }
  bool fault_mode() const { return cfg_.flags & REFGPU_VM_CREATE_FLAG_FAULT_MODE; }
  GpuMmu* mmu() { return &mmu_; }
  GpuPageTable& page_table() { return pt_; }
  Tlb& tlb() { return tlb_; }
  svm::Gpusvm* gpusvm() { return gpusvm_.get(); }
  const VmStats& stats() const { return stats_; }
  Mutex& lock() GPUSVM_RETURN_CAPABILITY(lock_) { return lock_; }

  // ---- vm_bind (vm_bind.cc) ----
  // Validates every op first (nothing changes when one is invalid), then applies them in
  // order. Per op:
  //  MAP + CPU_ADDR_MIRROR: mirror [addr, addr + range); needs fault mode. -EINVAL when it
  //    overlaps a binding, is misaligned, empty, or beyond kVaBits.
  //  MAP of a BO (op.bo, op.bo_offset): binds [bo_offset, bo_offset + range) of it now
  //    (READONLY: no write bit). The span overlaps nothing, or lies inside one mirror region
  //    (carved out of it: -EBUSY while the mirror has ranges there). -EINVAL: no BO, offset
  //    misaligned or beyond the BO, overlap with another binding.
  //  UNMAP: [addr, addr + range) exactly (a mirror region may be trimmed or split). A mirror
  //    part that still has ranges is -EBUSY unless REFGPU_VM_BIND_FLAG_EVICT (then its ranges
  //    are evicted to system memory and removed). Unbound VA in the span is fine. A BO
  //    binding must be covered whole (-EINVAL); when it was carved out of a mirror, its VA
  //    returns to the mirror (as Xe does).
  //  PREFETCH: migrates [addr, addr + range) of a mirror to system memory (instance 0), a
  //    VRAM instance, or the madvised location, gets the pages and binds them now.
  //    -EINVAL not a mirror / unknown instance; fault errors of the pages otherwise.
  // Ops after a failing apply are not run; the error is returned (the ones before stay).
  [[nodiscard]] int bind(std::span<const BindOp> ops) GPUSVM_EXCLUDES(lock_);
  // The GPU VMAs intersecting [start, end) (for tests and the debug dump).
  std::vector<GpuVma> vmas(uint64_t start, uint64_t end) GPUSVM_EXCLUDES(lock_);

  // ---- madvise (vm_madvise.cc) ----
  // madvise type PREFERRED_LOC: devmem_fd DEFAULT_DEVICE (this device's VRAM instance
  // region_instance, 0: the first), DEFAULT_SYSTEM, or another device (resolve_devmem:
  // -EBADF/-ENOLINK). migration_policy REFGPU_MIGRATE_*. type ATOMIC: val REFGPU_ATOMIC_*.
  // [start, start + range) must be mirrored entirely (-EINVAL), page aligned, non-empty.
  // GPU mappings whose placement no longer matches are invalidated (zapped: they fault back
  // in with the new policy).
  [[nodiscard]] int madvise_preferred_loc(uint64_t start, uint64_t range, int32_t devmem_fd,
                                          uint16_t migration_policy, uint16_t region_instance)
      GPUSVM_EXCLUDES(lock_);
  [[nodiscard]] int madvise_atomic(uint64_t start, uint64_t range, uint32_t val)
      GPUSVM_EXCLUDES(lock_);
  // The range-attribute query's two calls. count: the number of attribute ranges in
  // [start, start + range) (0 is fine: nothing mirrored). fill: writes them into out
  // (out.size() is the caller's count) and returns how many; -ENOSPC when more are needed
  // now than out holds (the ranges changed since the count: call again). -EINVAL misaligned
  // or empty.
  Result<uint32_t> query_mem_range_attrs_count(uint64_t start, uint64_t range)
      GPUSVM_EXCLUDES(lock_);
  Result<uint32_t> query_mem_range_attrs(uint64_t start, uint64_t range,
                                         std::span<MemAttrRange> out) GPUSVM_EXCLUDES(lock_);

  // ---- BO revalidation and rebind without fault mode (vm_rebind.cc) ----
  // Before a job is queued on a VM without fault mode (xe_exec.c's xe_vm_validate_rebind):
  // every BO binding a move zapped (BoBinding::needs_rebind) is revalidated - its BO moved
  // back into VRAM when VRAM is an allowed placement and the BO is not CPU-mapped, or left
  // in system memory when VRAM stays full and the BO may live there - and bound again at
  // its new backing. While this runs every BO bound in the VM is marked busy, so moving one
  // back never evicts another of the same VM (Xe validates them under one ww-locked set).
  // On success, for a VM that is not LR, *hold keeps them busy: the caller keeps it until
  // the job ends (the job's dma-resv fence), so the LRU does not evict them under it. An LR
  // VM (preempt-fence mode) gets no hold: its BOs stay evictable, and a job that touches a
  // zapped binding is suspended on the fault and resumed after handle_fault rebinds it (the
  // rebind worker of xe_vm.c's preempt_rebind_work_func). A fault-mode VM: nothing to do.
  // Errors (nothing queued; every binding this call rebound is zapped again, so the VM is as
  // before): the BO move's (-EIO from the copy; -ENOSPC/-ENOMEM for a BO that may only live
  // in VRAM), -ENOMEM (page-table nodes), -EAGAIN (the backings kept moving), -ENODEV (the
  // VM is being destroyed). Context: no lock held; may sleep (moves, evictions).
  [[nodiscard]] int prepare_exec(BoBusyHold* hold) GPUSVM_EXCLUDES(lock_);

  // ---- fault service (fault_service.cc) ----
  // Services one GPU fault of this VM (the Xe loop: GC -> attributes -> range ->
  // migrate -> get_pages -> reserve -> notifier lock -> pages_valid -> commit). 0: replay;
  // a negative errno fails the job: -EFAULT (no mirror, no VMA, PROT_NONE, a write to a
  // read-only mapping, an atomic with the CPU policy or one needing VRAM where there is
  // none, a DEVICE atomic on memory that cannot be made device-exclusive), -EAGAIN (attempts
  // exhausted), -ENODEV (VM being destroyed), -ENOMEM.
  // Without fault mode every fault is -EFAULT, except in an LR VM a fault on a BO binding a
  // move zapped: the binding is revalidated and bound again (prepare_exec's per-binding
  // step) and the job replays, as a preempted LR queue resumes after Xe's rebind worker.
  // on_range (optional) is told the range being serviced as soon as it is known (under the
  // vm lock: it must only record it); FaultService chains duplicate faults on it.
  // May sleep; takes the vm lock.
  using OnRange = std::function<void(uint64_t start, uint64_t end)>;
  [[nodiscard]] int handle_fault(const GpuFault& fault, const OnRange& on_range = {})
      GPUSVM_EXCLUDES(lock_);

  // Checks every valid GPU leaf against the CPU page table (quiescent: no CPU or GPU activity
  // in flight): a leaf on system memory maps the CPU's page at that VA, a writable leaf a
  // writable CPU entry, a VRAM leaf a device-private page of ours. Returns the number of
  // mismatches, logging the first few. Takes the vm lock.
  int check_ptes() GPUSVM_EXCLUDES(lock_);

  // svm::GpusvmOps.
  void invalidate(svm::Gpusvm* gpusvm, svm::Notifier* notifier,
                  const mm::MmuNotifierRange& range) override;

 private:
  explicit Vm(VmConfig cfg);
  friend class BoBinding;

  // The GPU VMA covering va, or nullptr.
  const GpuVma* vma_at_locked(uint64_t va) const GPUSVM_REQUIRES(lock_);
  // Zaps the PTEs of [start, end) and invalidates the TLB over what was cleared. Called with
  // the notifier lock held for write (invalidate, GC) or not (madvise, with the vm lock).
  void zap(uint64_t start, uint64_t end);
  void collect_garbage_locked() GPUSVM_REQUIRES(lock_);
  void gc_range_locked(svm::Range* range) GPUSVM_REQUIRES(lock_);
  // Removes every range intersecting [start, end) (zap, evict when asked, remove). -EBUSY
  // when some have device pages or mappings and !evict.
  int remove_ranges_locked(uint64_t start, uint64_t end, bool evict) GPUSVM_REQUIRES(lock_);
  // The VRAM pagemap the attributes place a range in (nullptr: system memory).
  Result<svm::Pagemap*> placement_locked(const MemAttrs& a) GPUSVM_REQUIRES(lock_);
  // Where a fault or prefetch puts a range: a VRAM pagemap (strict: devmem_only) or system
  // memory (pagemap null, strict: bring device pages home first).
  struct Placement {
    svm::Pagemap* pagemap = nullptr;
    bool strict = false;
  };
  // One service of a mirror fault (or prefetch) at addr (vm lock held). *range_end gets the
  // end of the range it bound.
  int service_locked(uint64_t addr, Access access, const Placement* force,
                     const OnRange& on_range, uint64_t* range_end) GPUSVM_REQUIRES(lock_);
  // Builds and commits the PTEs of range (reserve outside the notifier lock, pages_valid
  // under it). -EAGAIN: invalidated since get_pages.
  // atomic_ok: the attributes and placement allow device atomics (the leaves get the atomic
  // bit where their target allows it).
  // exclusive: the range's system pages were made device-exclusive for this commit
  // (make_exclusive_locked): under the DEVICE policy only then do system leaves get the
  // atomic bit.
  int commit_locked(svm::Range* range, bool write, uint32_t atomic_policy, bool exclusive)
      GPUSVM_REQUIRES(lock_);
  // Whether a device atomic on a leaf of `target` is allowed by the policy and the device.
  bool atomic_allowed(uint32_t policy, Target target) const;
  // ---- DEVICE atomics on system memory (vm_exclusive.cc) ----
  // Makes every page of range (got, all in system memory) device-exclusive to
  // exclusive_owner(). 0; -EAGAIN when a foreign invalidation unmapped the pages meanwhile
  // (the service runs again); -EFAULT when a page cannot be (shared or file memory, hugetlb,
  // no VM_WRITE); -ENOMEM. Takes the mmap lock (read) and, briefly, the notifier lock; may
  // sleep.
  int make_exclusive_locked(svm::Range* range) GPUSVM_REQUIRES(lock_);
  // Whether an invalidation is the EXCLUSIVE one of our own make_exclusive_locked in this
  // thread (invalidate skips it: the pages stay mapped, the commit after it must succeed).
  bool own_exclusive_invalidation(const mm::MmuNotifierRange& range) const;
  // The owner our device-exclusive entries carry: the device's pagemap owner, or this VM on
  // a device without VRAM.
  const void* exclusive_owner() const { return owner() ? owner() : this; }
  int prefetch_locked(uint64_t start, uint64_t end, uint32_t region) GPUSVM_REQUIRES(lock_);
  int validate_op_locked(const BindOp& op) GPUSVM_REQUIRES(lock_);
  int apply_op_locked(const BindOp& op) GPUSVM_REQUIRES(lock_);
  int map_bo_locked(const BindOp& op) GPUSVM_REQUIRES(lock_);
  // Revalidates the BO of a zapped binding and binds it again (vm_rebind.cc).
  int rebind_locked(BoBinding* b) GPUSVM_REQUIRES(lock_);
  // handle_fault without fault mode (vm_rebind.cc).
  int handle_fault_no_mirror(const GpuFault& fault) GPUSVM_EXCLUDES(lock_);
  // Inserts a mirror VMA, merging it with touching mirror neighbours of the same flags.
  void insert_mirror_locked(uint64_t start, uint64_t end, uint32_t flags) GPUSVM_REQUIRES(lock_);
  // The device-private owner of our VRAM pages (nullptr without VRAM).
  const void* owner() const { return cfg_.vram.empty() ? nullptr : cfg_.vram[0]->pagemap()->owner(); }
  // The pagemap of VRAM region instance i (1..), or nullptr.
  svm::Pagemap* region_pagemap(size_t instance) const {
    return instance >= 1 && instance <= cfg_.vram.size() ? cfg_.vram[instance - 1]->pagemap() : nullptr;
  }
  // Tells the MMU-facing parts that the VM is going away (faults fail with -ENODEV).
  bool dying() const { return dying_.load(std::memory_order_acquire); }

  const VmConfig cfg_;
  mutable Mutex lock_{&kRefgpuVmLockClass};
  GpuPageTable pt_;
  Tlb tlb_;
  GpuMmu mmu_;
  std::unique_ptr<svm::Gpusvm> gpusvm_;
  std::map<uint64_t, GpuVma> vmas_ GPUSVM_GUARDED_BY(lock_);  // by start; disjoint
  MemAttrTree attrs_ GPUSVM_GUARDED_BY(lock_);
  std::atomic<bool> dying_{false};
  VmStats stats_;
};

}  // namespace gpusvm::refgpu
