// TestGpu: a small driver over Gpusvm for the contract tests (a test double for a driver,
// not for any gpusvm layer). It has what a real driver has and nothing more:
//  - a VM lock (the Gpusvm driver lock),
//  - a GPU page table: one block of PTEs per committed range, keyed by the range start;
//  - the invalidate op: zap the blocks of the event's ranges, "flush the TLB", unmap_pages;
//  - a fault handler shaped as xe_svm_handle_pagefault: garbage collector, find_or_insert,
//    get_pages, reserve PT memory, notifier lock, pages_valid, commit or -EAGAIN and retry.
//
// Locking: vm_lock (kGpusvmDriverLockClass) outside everything. The GPU page table (ptes_) is
// changed only with the Gpusvm notifier lock held for write (invalidate, GC), or held for read
// together with vm_lock (commit: commits are serialized by vm_lock). Blocks are allocated
// before the notifier lock and freed after it is dropped.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/gpusvm.h"

namespace gpusvm::svm::testing {

struct GpuPte {
  DmaAddr addr = kDmaMappingError;
  bool valid = false;
  bool write = false;
  bool devmem = false;
};

struct GpuPteBlock {
  mm::Va start = 0;
  std::vector<GpuPte> ptes;  // one per page of the range
};

class TestGpu : public GpusvmOps {
 public:
  struct Options {
    std::string name = "gpu0";
    mm::Va mm_start = 0;
    uint64_t mm_range = 1ULL << 47;
    uint64_t notifier_size = kDefaultNotifierSize;
    std::vector<uint64_t> chunk_sizes;  // empty: default
    const void* owner = nullptr;        // device-private owner / migrate owner
    int devices = 1;                    // Pages objects per range
    // Devices to use instead of creating them (a VRAM's own device, so device_map is local).
    std::vector<Device*> use_devices;
  };
  // Creates the Gpusvm; *rc gets its init result.
  TestGpu(mm::AddressSpace* as, Options opts, int* rc);
  ~TestGpu() override;

  Gpusvm* gpusvm() { return gpusvm_.get(); }
  Device* device(int i = 0) { return device_ptrs_[i]; }
  Mutex& vm_lock() { return vm_lock_; }

  // The GPU page fault (xe_svm_handle_pagefault shape). 0 or a negative errno. Takes vm_lock.
  [[nodiscard]] int fault(mm::Va addr, bool write, Ctx ctx = {});
  // Reads / writes 8 bytes at addr through the GPU page table (system pages only): -EFAULT
  // when the GPU has no (writable) PTE. Takes vm_lock and the notifier lock (read).
  Result<uint64_t> gpu_load(mm::Va addr);
  [[nodiscard]] int gpu_store(mm::Va addr, uint64_t value);

  // Checks every valid GPU PTE against the CPU page table (quiescent: no CPU or GPU activity
  // in flight): the page is present for the CPU at that address, the PTE's address is that
  // page's, and a writable PTE has a writable CPU entry. Returns the number of mismatches
  // (reporting the first few). Takes vm_lock.
  int check_ptes();
  // Valid PTEs (pages the GPU can reach now).
  uint64_t valid_ptes();
  // Removes every range (zap, remove). Takes vm_lock.
  void unbind_all();

  // GpusvmOps.
  void invalidate(Gpusvm* gpusvm, Notifier* notifier, const mm::MmuNotifierRange& range) override;

  // Sleep between get_pages and the commit (widens the window races hit).
  std::atomic<int> commit_delay_us{0};
  std::atomic<uint64_t> invalidations{0};
  std::atomic<uint64_t> commits{0};
  std::atomic<uint64_t> eagain{0};
  std::atomic<uint64_t> gc_removed{0};

 private:
  // Zaps the block of `range` (notifier lock held for write): PTEs invalid, nothing freed.
  void zap_locked(Range* range);
  // Builds the PTEs of range from its pages (vm_lock held) and commits them if still valid.
  int commit(Range* range, bool write);
  void gc_range(Range* range);

  mm::AddressSpace* const as_;
  const Options opts_;
  Mutex vm_lock_{&kGpusvmDriverLockClass};
  std::vector<std::unique_ptr<Device>> devices_;
  std::vector<Device*> device_ptrs_;
  std::unique_ptr<Gpusvm> gpusvm_;
  // The GPU page table, by range start (see the file comment for its locking).
  std::map<mm::Va, GpuPteBlock> ptes_;
};

}  // namespace gpusvm::svm::testing
