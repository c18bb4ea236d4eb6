// Fixture of the provider tests: a machine, an address space, one TestVram, and helpers that
// fill and check every byte of a range, through the CPU or straight in device memory.
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "gpusvm/mm/page_state.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap.h"
#include "tests/mm/mm_test_util.h"
#include "tests/svm/test_vram.h"

namespace gpusvm::svm::testing {

using mm::kPageShift;
using mm::kPageSize;
using mm::kPagesPerPmd;
using mm::kPmdSize;
using mm::Va;
using mm::testing::map_anon;

// Every 8-byte word of the range gets a value that names its address and generation.
inline uint64_t word_at(Va va, uint64_t gen) { return mm::testing::pattern(va, gen); }

inline void fill_bytes(mm::AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  std::vector<uint64_t> buf(len / sizeof(uint64_t));
  for (uint64_t i = 0; i < buf.size(); i++) buf[i] = word_at(start + i * 8, gen);
  ASSERT_EQ(mm::cpu::copy_in(as, start, buf.data(), len), 0);
}

// Checks every word through the CPU (faulting device pages back). gen 0: zeroes expected.
inline uint64_t cpu_bad_words(mm::AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  std::vector<uint64_t> buf(len / sizeof(uint64_t));
  if (mm::cpu::copy_out(as, start, buf.data(), len) != 0) return buf.size();
  uint64_t bad = 0;
  for (uint64_t i = 0; i < buf.size(); i++) bad += buf[i] != (gen ? word_at(start + i * 8, gen) : 0);
  return bad;
}

// The frame behind va without faulting (0 when none): device-private PMDs report the head.
inline mm::Pfn pfn_at(mm::AddressSpace& as, Va va) {
  const mm::PageState st = mm::query_page(as, va);
  if (st.kind == mm::PageKind::kNone || st.kind == mm::PageKind::kZeroPage) return 0;
  if (st.kind == mm::PageKind::kSoftLeaf && st.large) {
    return as.mem()->folio_of(st.pfn)->pfn() + ((va >> kPageShift) & (kPagesPerPmd - 1));
  }
  return st.pfn;
}

// Whether every page of the range is a device-private entry into `vram`'s memory, and every
// word there is right (read in device memory, no fault).
inline uint64_t device_bad_words(mm::AddressSpace& as, TestVram& vram, Va start, uint64_t len, uint64_t gen) {
  uint64_t bad = 0;
  for (Va va = start; va < start + len; va += kPageSize) {
    const mm::PageState st = mm::query_page(as, va);
    const mm::Pfn pfn = pfn_at(as, va);
    if (st.kind != mm::PageKind::kSoftLeaf || !vram.dev_pagemap()->contains(pfn)) {
      bad += kPageSize / 8;
      continue;
    }
    const auto* w = reinterpret_cast<const uint64_t*>(vram.dev_pagemap()->page_data(pfn));
    for (uint64_t i = 0; i < kPageSize / 8; i++) bad += w[i] != (gen ? word_at(va + i * 8, gen) : 0);
  }
  return bad;
}

// Pages of the range in system memory (present entries).
inline uint64_t system_pages(mm::AddressSpace& as, Va start, uint64_t len) {
  uint64_t n = 0;
  for (Va va = start; va < start + len; va += kPageSize) {
    const mm::PageState st = mm::query_page(as, va);
    n += st.kind == mm::PageKind::kSmall || st.kind == mm::PageKind::kThpPte || st.kind == mm::PageKind::kThpPmd;
  }
  return n;
}

class PagemapTest : public mm::testing::MmTest {
 protected:
  static constexpr uint64_t kVramPages = 8 * kPagesPerPmd;  // 16 MiB

  void SetUp() override {
    MmTest::SetUp();
    vram = std::make_unique<TestVram>(mem.get(), kVramPages, "vram0");
    ASSERT_TRUE(vram->ok());
  }
  void TearDown() override {
    if (as) as->exit();  // frees every page: the device pages' zdds go, allocations release
    vram.reset();
    MmTest::TearDown();
  }
  // Allocates `len` of vram and migrates [va, va + len) into it.
  int migrate(Va va, uint64_t len, MigrateDetails d = {}, TestVram* to = nullptr,
              std::shared_ptr<Fence> fence = nullptr) {
    TestVram* v = to ? to : vram.get();
    TestDevmem* dm = v->alloc_devmem(as.get(), len, std::move(fence));
    if (!dm) return -ENOMEM;
    last = dm;
    return migrate_to_devmem(dm, as.get(), va, va + len, d);
  }

  std::unique_ptr<TestVram> vram;
  TestDevmem* last = nullptr;
};

}  // namespace gpusvm::svm::testing
