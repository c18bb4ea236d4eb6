// Fixture for the VRAM tests: a machine (PhysMem + AddressSpace), one VRAM region with its
// copy engine registered as a VramPagemap, and a minimal svm driver (MiniSvm: a Gpusvm whose
// invalidate unmaps the ranges' pages, and a fault path shaped as Xe's: find_or_insert,
// migrate through the pagemap, get_pages with the LRU bump as devmem_fn). Teardown checks that
// VRAM, DMA mappings and system pages all came back and mm::check is clean.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vram_pagemap.h"
#include "drivers/refgpu/vram_region.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/svm/gpusvm.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::refgpu::testing {

using mm::testing::fill_pages;
using mm::testing::pattern;
using mm::testing::verify_pages;

inline constexpr mm::Va kBase = 1ULL << 30;
inline constexpr uint64_t k4K = 4ULL << 10;
inline constexpr uint64_t k64K = 64ULL << 10;
inline constexpr uint64_t k2M = 2ULL << 20;

// Every byte of [va, va + len) gets a value derived from (address, seed).
inline std::vector<uint8_t> bytes_for(mm::Va va, uint64_t len, uint64_t seed) {
  std::vector<uint8_t> b(len);
  for (uint64_t i = 0; i < len; i += 8) {
    const uint64_t w = pattern(va + i, seed);
    std::memcpy(&b[i], &w, std::min<uint64_t>(8, len - i));
  }
  return b;
}
inline void fill_bytes(mm::AddressSpace& as, mm::Va va, uint64_t len, uint64_t seed) {
  std::vector<uint8_t> b = bytes_for(va, len, seed);
  ASSERT_EQ(mm::cpu::copy_in(as, va, b.data(), len), 0);
}
// Number of bytes of [va, va + len) that differ from fill_bytes(seed), reading as the CPU does
// (device pages fault back). -1 when the read itself fails.
inline int64_t bad_bytes(mm::AddressSpace& as, mm::Va va, uint64_t len, uint64_t seed) {
  std::vector<uint8_t> want = bytes_for(va, len, seed), got(len);
  if (mm::cpu::copy_out(as, va, got.data(), len) != 0) return -1;
  int64_t bad = 0;
  for (uint64_t i = 0; i < len; i++) bad += got[i] != want[i];
  return bad;
}
// Bytes of VRAM at `offset` that differ from what fill_bytes(seed) wrote at va.
inline int64_t bad_vram_bytes(VramArena& arena, uint64_t offset, mm::Va va, uint64_t len, uint64_t seed) {
  std::vector<uint8_t> want = bytes_for(va, len, seed);
  int64_t bad = 0;
  for (uint64_t i = 0; i < len; i++) bad += static_cast<uint8_t>(*arena.data(offset + i)) != want[i];
  return bad;
}

// A driver over Gpusvm with no GPU page table of its own: what the VRAM tests need from a
// VM (ranges, get_pages into VRAM, invalidation).
class MiniSvm : public svm::GpusvmOps {
 public:
  MiniSvm(mm::AddressSpace* as, VramPagemap* vram) : vram_(vram) {
    svm::GpusvmConfig cfg{.name = "refgpu-vm", .as = as, .mm_start = 0, .mm_range = 1ULL << 47, .ops = this,
                          .driver_lock = &lock_, .migrate_owner = vram->pagemap()->owner()};
    cfg.devices = {vram->device()};
    Result<std::unique_ptr<svm::Gpusvm>> g = svm::Gpusvm::init(std::move(cfg));
    EXPECT_TRUE(g.ok()) << g.error();
    if (g) gpusvm_ = std::move(*g);
  }
  ~MiniSvm() override {
    if (!gpusvm_) return;
    MutexLock g(&lock_);
    for (;;) {
      svm::Notifier* n = gpusvm_->notifier_find(0, ~mm::Va{0});
      if (!n || n->ranges().empty()) break;
      gpusvm_->range_remove(n->ranges().begin()->second);
    }
  }

  svm::Gpusvm* gpusvm() { return gpusvm_.get(); }
  Mutex& lock() { return lock_; }

  svm::Ctx ctx() {
    svm::Ctx c;
    c.device_private_page_owner = vram_->pagemap()->owner();
    c.devmem_possible = true;
    c.check_pages_threshold = 0;  // ranges cover whole chunks, untouched pages included
    c.devmem_fn = [v = vram_](svm::Pagemap*, mm::Folio* page, uint64_t n) { v->touch_pages(page, n); };
    return c;
  }
  // Xe's fault shape: the range around va; migrated to VRAM when `to_vram` (best effort: a
  // failed migration leaves the pages in system memory); get_pages. Returns the range, or the
  // first hard error (find_or_insert's, get_pages').
  Result<svm::RangeRef> fault(mm::Va va, bool to_vram, int* migrate_rc = nullptr) {
    svm::RangeRef r;
    {
      MutexLock g(&lock_);
      Result<svm::RangeRef> rr = gpusvm_->range_find_or_insert(va, 0, ~mm::Va{0}, ctx());
      if (!rr) return Err{rr.error()};
      r = std::move(*rr);
    }
    if (to_vram) {
      const int rc = vram_->pagemap()->populate_mm(r->start(), r->end(), gpusvm_->as(), 0);
      if (migrate_rc) *migrate_rc = rc;
    }
    MutexLock g(&lock_);
    for (int i = 0; i < 16; i++) {
      const int rc = gpusvm_->range_get_pages(r.get(), ctx());
      if (rc == 0) return r;
      if (rc != -EAGAIN && rc != -EBUSY) return Err{rc};
    }
    return Err{-EAGAIN};
  }

  // GpusvmOps: unmap the pages of every range the event touches.
  void invalidate(svm::Gpusvm* g, svm::Notifier* notifier, const mm::MmuNotifierRange& range) override {
    svm::Ctx c;
    c.in_notifier = true;
    for (auto& [start, r] : notifier->ranges()) {
      if (r->end() <= range.start || r->start() >= range.end) continue;
      g->range_unmap_pages(r, c);
    }
  }

 private:
  VramPagemap* const vram_;
  Mutex lock_{&svm::kGpusvmDriverLockClass};
  std::unique_ptr<svm::Gpusvm> gpusvm_;
};

class VramTest : public ::testing::Test {
 protected:
  virtual uint64_t vram_bytes() const { return 16ULL << 20; }
  virtual VramPagemap::Config vram_config() const { return {}; }

  void SetUp() override {
    mem = mm::testing::make_mem(256ULL << 20);
    ASSERT_NE(mem, nullptr);
    as = mm::testing::make_as(mem.get());
    ASSERT_NE(as, nullptr);
    initial_free = mem->free_pages();
    Result<std::unique_ptr<VramRegion>> r = VramRegion::create(1, vram_bytes());
    ASSERT_TRUE(r.ok());
    region = std::move(*r);
    copy = std::make_unique<CopyEngine>(mem.get(), &region->arena(), std::make_unique<HostCopyBackend>(1));
    dev = std::make_unique<svm::Device>("refgpu0", mem.get());
    Result<std::unique_ptr<VramPagemap>> v = VramPagemap::create(mem.get(), dev.get(), region.get(), copy.get(),
                                                                 vram_config());
    ASSERT_TRUE(v.ok()) << v.error();
    vram = std::move(*v);
    svm = std::make_unique<MiniSvm>(as.get(), vram.get());
  }
  void TearDown() override {
    fault_inject::disarm_all();
    svm.reset();
    if (as) as->exit();  // frees the device pages: allocations release
    if (vram) {
      EXPECT_EQ(vram->live_device_maps(), 0);
      EXPECT_EQ(vram->lru().linked_count(), 0u);
      vram.reset();
    }
    if (region) {
      EXPECT_EQ(region->buddy().used_bytes(), 0u) << "VRAM leaked";
      EXPECT_EQ(region->buddy().check(), "");
    }
    EXPECT_EQ(dev ? dev->dma_mappings() : 0u, 0u);
    EXPECT_MM_CHECK_OK(*mem);
    as.reset();
    EXPECT_EQ(mem->free_pages(), initial_free);
  }
  mm::Va map_at(mm::Va va, uint64_t len, bool huge = false) {
    Result<mm::Va> r = as->mmap(va, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
    EXPECT_TRUE(r.ok()) << r.error();
    if (!r) return 0;
    EXPECT_EQ(as->madvise(va, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), 0);
    return *r;
  }
  // Pages of [va, va + len) that are device pages of our VRAM in the range's address array.
  static uint64_t vram_pages(svm::Range* r) {
    uint64_t n = 0;
    const svm::Pages& p = r->pages(0);
    for (uint32_t e = 0; e < p.nr_addrs(); e++) {
      if (p.addr(e).proto == svm::PagemapAddrProto::kDeviceLocal) n += 1ULL << p.addr(e).order;
    }
    return n;
  }

  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<mm::AddressSpace> as;
  std::unique_ptr<VramRegion> region;
  std::unique_ptr<CopyEngine> copy;
  std::unique_ptr<svm::Device> dev;
  std::unique_ptr<VramPagemap> vram;
  std::unique_ptr<MiniSvm> svm;
  uint64_t initial_free = 0;
};

}  // namespace gpusvm::refgpu::testing
