// The copy engine: system pages to VRAM and back with every byte checked, request merging,
// the threaded host backend, validation before any byte moves, injected copy failures, and
// the byte and time statistics.
#include "drivers/refgpu/copy_engine.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::refgpu {
namespace {

struct CopyRig {
  CopyRig(unsigned threads) {
    mem = std::move(mm::PhysMem::create({.ram_bytes = 64ull << 20}).value());
    vram = std::move(VramArena::create(32ull << 20).value());
    engine = std::make_unique<CopyEngine>(mem.get(), vram.get(), std::make_unique<HostCopyBackend>(threads, 64 * 1024));
  }
  ~CopyRig() {
    for (mm::Folio* f : folios) f->put();
  }
  // npages system pages, each filled with a pattern naming (page, generation).
  std::vector<mm::Pfn> pages(uint64_t npages, uint32_t gen) {
    std::vector<mm::Pfn> out;
    for (uint64_t i = 0; i < npages; i++) {
      mm::Folio* f = mem->folio_alloc(0, true);
      EXPECT_NE(f, nullptr);
      folios.push_back(f);
      out.push_back(f->pfn());
      fill(mem->ram_data(f->pfn()), i, gen);
    }
    return out;
  }
  static void fill(std::byte* p, uint64_t page, uint32_t gen) {
    auto* w = reinterpret_cast<uint64_t*>(p);
    for (uint64_t k = 0; k < mm::kPageSize / 8; k++) w[k] = (page << 40) | (uint64_t{gen} << 20) | k;
  }
  static bool matches(const std::byte* p, uint64_t page, uint32_t gen) {
    const auto* w = reinterpret_cast<const uint64_t*>(p);
    for (uint64_t k = 0; k < mm::kPageSize / 8; k++)
      if (w[k] != ((page << 40) | (uint64_t{gen} << 20) | k)) return false;
    return true;
  }
  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<VramArena> vram;
  std::unique_ptr<CopyEngine> engine;
  std::vector<mm::Folio*> folios;
};

class CopyEngineTest : public ::testing::TestWithParam<unsigned> {};

// To VRAM in a scattered order, then back into other system pages: every byte checked.
TEST_P(CopyEngineTest, RoundTripMovesEveryByte) {
  CopyRig r(GetParam());
  constexpr uint64_t kPages = 1024;  // 4 MiB: above the threshold, so the workers take part
  auto src = r.pages(kPages, 1);
  std::vector<uint64_t> offs(kPages);
  for (uint64_t i = 0; i < kPages; i++) offs[i] = ((i * 7) % kPages) * mm::kPageSize;  // a permutation
  ASSERT_EQ(r.engine->copy_to_vram(src.data(), offs.data(), kPages), 0);
  for (uint64_t i = 0; i < kPages; i++) ASSERT_TRUE(CopyRig::matches(r.vram->data(offs[i]), i, 1)) << "page " << i;
  auto dst = r.pages(kPages, 2);
  ASSERT_EQ(r.engine->copy_to_ram(offs.data(), dst.data(), kPages), 0);
  for (uint64_t i = 0; i < kPages; i++) ASSERT_TRUE(CopyRig::matches(r.mem->ram_data(dst[i]), i, 1)) << "page " << i;
  EXPECT_EQ(r.engine->stats().bytes_to_vram.get(), kPages * mm::kPageSize);
  EXPECT_EQ(r.engine->stats().bytes_to_ram.get(), kPages * mm::kPageSize);
  EXPECT_GT(r.engine->stats().ns_to_vram.get(), 0u);
  EXPECT_EQ(r.engine->stats().requests.get(), 2u);
}

INSTANTIATE_TEST_SUITE_P(Threads, CopyEngineTest, ::testing::Values(0u, 3u),
                         [](const ::testing::TestParamInfo<unsigned>& p) {
                           return "workers" + std::to_string(p.param);
                         });

TEST(CopyEngine, BadRequestCopiesNothing) {
  CopyRig r(0);
  auto src = r.pages(2, 1);
  const uint64_t offs[] = {0, 33ull << 20};  // the second is beyond the arena
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), offs, 2), -EINVAL);
  for (uint64_t k = 0; k < mm::kPageSize; k++) ASSERT_EQ(r.vram->data(0)[k], std::byte{0}) << "first page untouched";
  const uint64_t unaligned[] = {0, 100};
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), unaligned, 2), -EINVAL);
  const mm::Pfn bad_pfn[] = {src[0], r.mem->ram_pages()};
  const uint64_t ok_offs[] = {0, mm::kPageSize};
  EXPECT_EQ(r.engine->copy_to_ram(ok_offs, bad_pfn, 2), -EINVAL);
  EXPECT_EQ(r.engine->stats().requests.get(), 0u);
}

TEST(CopyEngine, InjectedFailureIsEioAndCounted) {
  CopyRig r(0);
  auto src = r.pages(1, 1);
  const uint64_t off = 0;
  fault_inject::ScopedArm arm("refgpu.copy", {});
  ASSERT_EQ(arm.status(), 0);
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), &off, 1), -EIO);
  EXPECT_EQ(r.engine->stats().failures.get(), 1u);
  EXPECT_EQ(r.engine->stats().bytes_to_vram.get(), 0u);
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), &off, 1), 0) << "one-shot";
  EXPECT_TRUE(CopyRig::matches(r.vram->data(0), 0, 1));
}

TEST(CopyEngine, ClearVramZeroes) {
  CopyRig r(0);
  std::memset(r.vram->data(mm::kPageSize), 0xff, mm::kPageSize);
  const uint64_t off = mm::kPageSize;
  ASSERT_EQ(r.engine->clear_vram(&off, 1), 0);
  for (uint64_t k = 0; k < mm::kPageSize; k++) ASSERT_EQ(r.vram->data(off)[k], std::byte{0});
}

}  // namespace
}  // namespace gpusvm::refgpu
