#include "tests/svm/test_vram.h"

#include <gtest/gtest.h>

#include <cstring>

#include "gpusvm/base/lock.h"

namespace gpusvm::svm::testing {

using mm::kPageShift;
using mm::kPageSize;
using mm::kPagesPerPmd;

TestDevmem::TestDevmem(TestVram* vram, mm::AddressSpace* as, uint64_t size, std::vector<mm::Pfn> pfns,
                       std::shared_ptr<Fence> fence)
    : Devmem(vram->device(), as, vram, vram->pagemap(), size, std::move(fence)), pfns_(std::move(pfns)) {}

TestVram::TestVram(mm::PhysMem* mem, uint64_t nr_pages, std::string name, const void* owner)
    : mem_(mem), dev_(std::move(name), mem) {
  Result<std::unique_ptr<mm::DevPagemap>> d =
      mm::DevPagemap::create(mem, nr_pages, owner ? owner : this, pagemap_dev_pagemap_ops(), /*storage=*/true);
  if (!d) return;
  dpm_ = std::move(*d);
  {
    SpinLockGuard g(&lock_);
    used_.assign(nr_pages, false);
  }
  Result<Pagemap*> p = Pagemap::create(&dev_, dpm_.get(), this);
  if (p) pagemap_ = pagemap_seen_ = *p;
}

TestVram::~TestVram() {
  put_pagemap();
  pagemap_flush_destroy_work();
  EXPECT_EQ(destroyed.load(), pagemap_seen_ ? 1 : 0) << dev_.name() << ": pagemap not destroyed";
  EXPECT_EQ(live_device_maps.load(), 0) << dev_.name() << ": device mappings leaked";
  if (dpm_) {
    EXPECT_EQ(free_pages(), dpm_->nr_pages()) << dev_.name() << ": device memory leaked";
  }
  {
    SpinLockGuard g(&lock_);
    for (const auto& d : devmems_) EXPECT_TRUE(d->released()) << dev_.name() << ": devmem not released";
  }
}

void TestVram::put_pagemap() {
  if (Pagemap* p = pagemap_) {
    pagemap_ = nullptr;
    p->put();
  }
}

uint64_t TestVram::free_pages() const {
  SpinLockGuard g(&lock_);
  uint64_t n = 0;
  for (bool u : used_) n += !u;
  return n;
}

TestDevmem* TestVram::alloc_devmem(mm::AddressSpace* as, uint64_t size, std::shared_ptr<Fence> fence) {
  if (!pagemap_ || size == 0 || size % kPageSize) return nullptr;
  const uint64_t n = size >> kPageShift;
  std::vector<mm::Pfn> pfns;
  {
    SpinLockGuard g(&lock_);
    const uint64_t total = used_.size();
    // Whole free aligned blocks for each full 2 MiB, lowest first...
    for (uint64_t b = 0; b < total && pfns.size() + kPagesPerPmd <= n && !fragmented; b += kPagesPerPmd) {
      bool free = true;
      for (uint64_t j = 0; j < kPagesPerPmd && free; j++) free = !used_[b + j];
      if (!free) continue;
      for (uint64_t j = 0; j < kPagesPerPmd; j++) {
        pfns.push_back(b + j);
        used_[b + j] = true;
      }
    }
    // ... then single pages, highest first, so that small allocations break few blocks.
    std::vector<mm::Pfn> small;
    for (uint64_t i = total; i-- > 0 && pfns.size() + small.size() < n;) {
      if (!used_[i]) small.push_back(i);
    }
    if (!fragmented) std::sort(small.begin(), small.end());  // fragmented: not even contiguous
    pfns.insert(pfns.end(), small.begin(), small.end());
    if (pfns.size() < n) {
      for (mm::Pfn p : pfns) used_[p] = false;
      return nullptr;
    }
    for (mm::Pfn& p : pfns) {
      used_[p] = true;
      p += dpm_->first_pfn();
    }
  }
  auto d = std::make_unique<TestDevmem>(this, as, size, std::move(pfns), std::move(fence));
  TestDevmem* raw = d.get();
  SpinLockGuard g(&lock_);
  devmems_.push_back(std::move(d));
  return raw;
}

PagemapAddr TestVram::device_map(Pagemap*, Device* dev, mm::Folio* page, unsigned order, DmaDirection dir) {
  if (fail_device_map.hit()) return PagemapAddr{};
  if (dev != &dev_ && !peers_.contains(dev)) return PagemapAddr{};  // no interconnect
  live_device_maps.fetch_add(1);
  return PagemapAddr{page->pfn() << kPageShift,
                     dev == &dev_ ? PagemapAddrProto::kDeviceLocal : PagemapAddrProto::kDeviceInterconnect,
                     static_cast<uint8_t>(order), dir};
}

void TestVram::device_unmap(Pagemap*, Device*, const PagemapAddr&) { live_device_maps.fetch_sub(1); }

int TestVram::populate_mm(Pagemap*, mm::Va start, mm::Va end, mm::AddressSpace* as, unsigned timeslice_ms) {
  TestDevmem* d = alloc_devmem(as, end - start);
  if (!d) return -ENOMEM;
  return migrate_to_devmem(d, as, start, end, MigrateDetails{.timeslice_ms = timeslice_ms});
}

void TestVram::destroy(Pagemap* p) {
  EXPECT_EQ(p, pagemap_seen_);
  EXPECT_EQ(lockdep::held_count(), 0) << "destroy runs with no lock held";
  destroy_tid.store(current_tid());
  destroyed.fetch_add(1);
}

void TestVram::devmem_release(Devmem* devmem) {
  auto* d = static_cast<TestDevmem*>(devmem);
  EXPECT_FALSE(d->released()) << "devmem released twice";
  std::unique_ptr<TestDevmem> freed;  // deleted after the spin lock
  {
    SpinLockGuard g(&lock_);
    for (mm::Pfn p : d->pfns()) used_[p - dpm_->first_pfn()] = false;
    d->released_.store(true, std::memory_order_release);
    released.fetch_add(1);
    if (free_on_release.load(std::memory_order_relaxed)) {
      for (auto& owned : devmems_) {
        if (owned.get() == d) freed = std::move(owned);
      }
      std::erase(devmems_, nullptr);
    }
  }
}

int TestVram::populate_devmem_pfn(Devmem* devmem, uint64_t npages, uint64_t* pfns) {
  if (fail_populate.hit()) return -ENOMEM;
  auto* d = static_cast<TestDevmem*>(devmem);
  if (npages > d->pfns().size()) return -EINVAL;
  for (uint64_t i = 0; i < npages; i++) pfns[i] = d->pfns()[i];
  return 0;
}

std::byte* TestVram::bytes(DmaAddr addr, uint64_t page) const {
  mm::Folio* f = mem_->pfn_to_page((addr >> kPageShift) + page);
  return f ? f->data() : nullptr;
}

int TestVram::wait_fence(Fence* fence) {
  if (!fence) return 0;
  if (fence->signaled()) {
    copies_after_fence.fetch_add(1);
    return 0;
  }
  copies_before_fence.fetch_add(1);  // had to wait: the copy is ordered after the signal
  return fence->wait(hang_timeout());
}

int TestVram::copy_to_devmem(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages, Fence* fence) {
  if (int rc = wait_fence(fence)) return rc;
  if (fail_copy_to_devmem.hit()) return -EIO;
  copies_to_devmem.fetch_add(1);
  for (uint64_t i = 0; i < npages;) {
    const uint64_t n = addrs[i].addr == kDmaMappingError ? 1 : (1ULL << addrs[i].order);
    for (uint64_t j = 0; j < n && i + j < npages; j++) {
      if (!pages[i + j]) continue;
      std::byte* dst = pages[i + j]->data();
      if (addrs[i].addr == kDmaMappingError) {
        std::memset(dst, 0, kPageSize);  // a hole: the new page reads zeroes
      } else {
        std::memcpy(dst, bytes(addrs[i].addr, j), kPageSize);
      }
    }
    i += n;
  }
  return 0;
}

int TestVram::copy_to_ram(mm::Folio* const* pages, const PagemapAddr* addrs, uint64_t npages, Fence* fence) {
  if (int rc = wait_fence(fence)) return rc;
  if (fail_copy_to_ram.hit()) return -EIO;
  copies_to_ram.fetch_add(1);
  for (uint64_t i = 0; i < npages;) {
    if (addrs[i].addr == kDmaMappingError) {
      i++;
      continue;
    }
    const uint64_t n = 1ULL << addrs[i].order;
    for (uint64_t j = 0; j < n && i + j < npages; j++) {
      if (pages[i + j]) std::memcpy(bytes(addrs[i].addr, j), pages[i + j]->data(), kPageSize);
    }
    i += n;
  }
  return 0;
}

}  // namespace gpusvm::svm::testing
