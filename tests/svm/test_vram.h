// TestVram: a small device-memory double for the provider tests (a driver's VRAM manager,
// written in the test folder). It owns an mm::DevPagemap with storage (so copies are real
// memcpy of real bytes), a Device, the svm Pagemap over it (holding the driver's reference),
// and a bitmap allocator handing out allocations as aligned 2 MiB blocks and 4 KiB pages. It implements PagemapOps and DevmemOps, with
// failure injection for every op (fail the nth call from arming).
#pragma once

#include <atomic>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap.h"

namespace gpusvm::svm::testing {

class TestVram;

// One allocation: its frames, in address order.
class TestDevmem : public Devmem {
 public:
  TestDevmem(TestVram* vram, mm::AddressSpace* as, uint64_t size, std::vector<mm::Pfn> pfns,
             std::shared_ptr<Fence> fence);
  const std::vector<mm::Pfn>& pfns() const { return pfns_; }
  bool released() const { return released_.load(std::memory_order_acquire); }

 private:
  friend class TestVram;
  const std::vector<mm::Pfn> pfns_;
  std::atomic<bool> released_{false};
};

// Fail the nth call of an op from now (1-based; 0: never).
struct FailAt {
  std::atomic<int> nth{0};
  std::atomic<int> calls{0};
  void arm(int n) {
    calls.store(0);
    nth.store(n);
  }
  bool hit() {
    const int n = nth.load();
    if (n == 0) return false;
    if (calls.fetch_add(1) + 1 != n) return false;
    nth.store(0);
    return true;
  }
};

class TestVram final : public PagemapOps, public DevmemOps {
 public:
  // nr_pages: a multiple of 512. owner: the device-private owner (an owner group's, or null
  // for this VRAM's own).
  TestVram(mm::PhysMem* mem, uint64_t nr_pages, std::string name, const void* owner = nullptr);
  // Drops the driver's pagemap reference if still held, waits for the deferred destroy and
  // checks that nothing leaked (every frame free, pagemap destroyed).
  ~TestVram() override;

  bool ok() const { return pagemap_ != nullptr; }
  Device* device() { return &dev_; }
  Pagemap* pagemap() { return pagemap_; }
  mm::DevPagemap* dev_pagemap() { return dpm_.get(); }
  mm::PhysMem* mem() { return mem_; }

  // A new allocation of `size` bytes (a free aligned 2 MiB block for each full 2 MiB while
  // there is one, 4 KiB pages for the rest), or nullptr when the memory is exhausted. Owned by the VRAM (kept until its
  // destruction, so an evict_to_ram after release still sees valid memory).
  TestDevmem* alloc_devmem(mm::AddressSpace* as, uint64_t size, std::shared_ptr<Fence> fence = nullptr);
  uint64_t free_pages() const;
  // Drops the driver's reference on the pagemap (driver unbind); the pagemap lives on while
  // device pages hold it.
  void put_pagemap();
  // Devices that reach this memory over an interconnect (device_map succeeds for them).
  void add_peer(Device* dev) { peers_.insert(dev); }

  // A fragmented VRAM: allocations get 4 KiB pages only (so THPs get small destinations).
  std::atomic<bool> fragmented{false};
  // devmem_release frees the TestDevmem (as a driver frees its allocation object there:
  // Xe's devmem_release drops the bo). Such an allocation must not be touched after its
  // release (evict_to_ram on it is then the caller's to keep alive).
  std::atomic<bool> free_on_release{false};
  FailAt fail_populate, fail_copy_to_devmem, fail_copy_to_ram, fail_device_map;
  std::atomic<int> copies_to_devmem{0}, copies_to_ram{0}, released{0}, destroyed{0};
  std::atomic<int64_t> live_device_maps{0};
  std::atomic<pid_t> destroy_tid{0};  // the thread that ran destroy
  // Whether the pre-migrate fence of each copy had signalled when its bytes moved.
  std::atomic<int> copies_after_fence{0}, copies_before_fence{0};

  // PagemapOps.
  PagemapAddr device_map(Pagemap* pagemap, Device* dev, mm::Folio* page, unsigned order, DmaDirection dir) override;
  void device_unmap(Pagemap* pagemap, Device* dev, const PagemapAddr& addr) override;
  int populate_mm(Pagemap* pagemap, mm::Va start, mm::Va end, mm::AddressSpace* as, unsigned timeslice_ms) override;
  void destroy(Pagemap* pagemap) override;
  // DevmemOps.
  void devmem_release(Devmem* devmem) override;
  int populate_devmem_pfn(Devmem* devmem, uint64_t npages, uint64_t* pfns) override;
  int copy_to_devmem(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages, Fence* fence) override;
  int copy_to_ram(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages, Fence* fence) override;

 private:
  // The bytes behind an address this model hands out (system DMA or device address: both
  // are pfn << 12).
  std::byte* bytes(DmaAddr addr, uint64_t page) const;
  int wait_fence(Fence* fence);

  mm::PhysMem* const mem_;
  Device dev_;
  std::unique_ptr<mm::DevPagemap> dpm_;
  Pagemap* pagemap_ = nullptr;  // the driver's reference (null after put_pagemap)
  Pagemap* pagemap_seen_ = nullptr;
  std::set<Device*> peers_;
  mutable SpinLock lock_{&kTestVramLockClass};
  std::vector<bool> used_ GPUSVM_GUARDED_BY(lock_);
  std::vector<std::unique_ptr<TestDevmem>> devmems_ GPUSVM_GUARDED_BY(lock_);
};

}  // namespace gpusvm::svm::testing
