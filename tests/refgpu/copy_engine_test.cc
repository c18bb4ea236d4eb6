// The copy engine on each backend (host: memcpy with and without workers; vulkan:
// vkCmdCopyBuffer on lavapipe or whatever device GPUSVM_VULKAN_DEVICE names): system pages to
// VRAM and back, VRAM to VRAM within a region and between two regions (a peer copy), large
// batches of scattered pages, every byte checked; validation before any byte moves, injected
// copy failures, and the byte and time statistics.
#include "drivers/refgpu/copy_engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"
#include "drivers/refgpu/backend.h"

namespace gpusvm::refgpu {
namespace {

// A backend and, for the host one, its worker threads.
struct BackendParam {
  BackendKind kind;
  unsigned threads;
};

std::string param_name(const ::testing::TestParamInfo<BackendParam>& p) {
  return std::string(backend_kind_name(p.param.kind)) + "_workers" + std::to_string(p.param.threads);
}

std::vector<BackendParam> all_backends() {
  std::vector<BackendParam> v = {{BackendKind::kHost, 0}, {BackendKind::kHost, 3}};
#ifdef GPUSVM_HAVE_VULKAN
  v.push_back({BackendKind::kVulkan, 0});
#endif
  return v;
}

struct CopyRig {
  explicit CopyRig(unsigned threads) : CopyRig(BackendParam{BackendKind::kHost, threads}) {}
  explicit CopyRig(BackendParam p) {
    mem = std::move(mm::PhysMem::create({.ram_bytes = 64ull << 20}).value());
    auto b = open_backend({.kind = p.kind});
    EXPECT_TRUE(b.ok()) << "backend " << backend_kind_name(p.kind) << ": " << b.error();
    backend = *b;
    vram = std::move(VramArena::create(*backend, 32ull << 20).value());
    if (p.kind == BackendKind::kHost) {
      engine = std::make_unique<CopyEngine>(mem.get(), vram.get(), std::make_unique<HostCopyBackend>(p.threads, 64 * 1024));
    } else {
      auto c = backend->make_copy(mem.get(), p.threads, 1 << 20);
      EXPECT_TRUE(c.ok()) << c.error();
      engine = std::make_unique<CopyEngine>(mem.get(), vram.get(), std::move(*c));
    }
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
  std::shared_ptr<Backend> backend;
  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<VramArena> vram;
  std::unique_ptr<CopyEngine> engine;
  std::vector<mm::Folio*> folios;
};

class CopyEngineTest : public ::testing::TestWithParam<BackendParam> {};

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

// VRAM to VRAM through the backend: pages within the region (scattered), then into a second
// region of the same backend (a peer copy: the source device writes), bytes checked.
TEST_P(CopyEngineTest, VramToVramWithinAndAcrossRegions) {
  CopyRig r(GetParam());
  constexpr uint64_t kPages = 256;
  auto src = r.pages(kPages, 3);
  std::vector<uint64_t> offs(kPages);
  for (uint64_t i = 0; i < kPages; i++) offs[i] = i * mm::kPageSize;
  ASSERT_EQ(r.engine->copy_to_vram(src.data(), offs.data(), kPages), 0);
  std::vector<CopyRegion> within;
  const uint64_t base = 8ull << 20;  // to [8 MiB, 9 MiB) in reverse page order
  for (uint64_t i = 0; i < kPages; i++)
    within.push_back({r.vram->data(base + (kPages - 1 - i) * mm::kPageSize), r.vram->data(offs[i]), mm::kPageSize});
  ASSERT_EQ(r.engine->backend().copy(within), 0);
  for (uint64_t i = 0; i < kPages; i++)
    ASSERT_TRUE(CopyRig::matches(r.vram->data(base + (kPages - 1 - i) * mm::kPageSize), i, 3)) << "page " << i;
  auto peer = VramArena::create(*r.backend, 4ull << 20);
  ASSERT_TRUE(peer.ok()) << peer.error();
  const CopyRegion across{(*peer)->data(kSZ2M), r.vram->data(0), kPages * mm::kPageSize};  // one 1 MiB region
  ASSERT_EQ(r.engine->backend().copy({&across, 1}), 0);
  for (uint64_t i = 0; i < kPages; i++)
    ASSERT_TRUE(CopyRig::matches((*peer)->data(kSZ2M + i * mm::kPageSize), i, 3)) << "page " << i;
  for (uint64_t k = 0; k < kSZ2M; k++) ASSERT_EQ((*peer)->data(0)[k], std::byte{0}) << "peer byte " << k;
}

// Large batches: two requests of 4096 scattered pages each (together every page of the 32 MiB
// arena), issued at once from two threads, then one back; every byte checked.
TEST_P(CopyEngineTest, LargeScatteredBatchesFromTwoThreads) {
  CopyRig r(GetParam());
  constexpr uint64_t kPages = 4096;
  auto a = r.pages(kPages, 4);
  auto b = r.pages(kPages, 5);
  std::vector<uint64_t> oa(kPages), ob(kPages);
  for (uint64_t i = 0; i < kPages; i++) {
    oa[i] = ((i * 13) % kPages) * 2 * mm::kPageSize;                   // even pages, scattered
    ob[i] = ((i * 29) % kPages) * 2 * mm::kPageSize + mm::kPageSize;  // odd pages
  }
  int ra = 1;
  std::thread t([&] { ra = r.engine->copy_to_vram(a.data(), oa.data(), kPages); });
  ASSERT_EQ(r.engine->copy_to_vram(b.data(), ob.data(), kPages), 0);
  t.join();
  ASSERT_EQ(ra, 0);
  for (uint64_t i = 0; i < kPages; i++) {
    ASSERT_TRUE(CopyRig::matches(r.vram->data(oa[i]), i, 4)) << "page a" << i;
    ASSERT_TRUE(CopyRig::matches(r.vram->data(ob[i]), i, 5)) << "page b" << i;
  }
  // Back: VRAM pages in the b order into the a frames (every frame overwritten).
  ASSERT_EQ(r.engine->copy_to_ram(ob.data(), a.data(), kPages), 0);
  for (uint64_t i = 0; i < kPages; i++) ASSERT_TRUE(CopyRig::matches(r.mem->ram_data(a[i]), i, 5)) << "page " << i;
  EXPECT_EQ(r.engine->stats().bytes_to_vram.get(), 2 * kPages * mm::kPageSize);
}

// Injected copy failure on every backend: -EIO, nothing copied, counted; one-shot.
TEST_P(CopyEngineTest, InjectedFailureIsEioOnEveryBackend) {
  CopyRig r(GetParam());
  auto src = r.pages(1, 1);
  const uint64_t off = 0;
  fault_inject::ScopedArm arm("refgpu.copy", {});
  ASSERT_EQ(arm.status(), 0);
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), &off, 1), -EIO);
  for (uint64_t k = 0; k < mm::kPageSize; k++) ASSERT_EQ(r.vram->data(0)[k], std::byte{0}) << "byte " << k;
  EXPECT_EQ(r.engine->stats().failures.get(), 1u);
  EXPECT_EQ(r.engine->copy_to_vram(src.data(), &off, 1), 0) << "one-shot";
  EXPECT_TRUE(CopyRig::matches(r.vram->data(0), 0, 1));
}


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

// Clears go through the backend (memset, vkCmdFillBuffer): adjacent pages as one region,
// scattered ones apart; the pages between them keep their bytes.
TEST_P(CopyEngineTest, ClearVramZeroesOnlyThosePages) {
  CopyRig r(GetParam());
  constexpr uint64_t kPages = 16;
  std::memset(r.vram->data(0), 0xa5, kPages * mm::kPageSize);
  const std::vector<uint64_t> offs = {1 * mm::kPageSize, 2 * mm::kPageSize, 3 * mm::kPageSize, 7 * mm::kPageSize,
                                      12 * mm::kPageSize};
  ASSERT_EQ(r.engine->clear_vram(offs.data(), offs.size()), 0);
  for (uint64_t p = 0; p < kPages; p++) {
    const bool cleared = std::find(offs.begin(), offs.end(), p * mm::kPageSize) != offs.end();
    const std::byte want = cleared ? std::byte{0} : std::byte{0xa5};
    for (uint64_t k = 0; k < mm::kPageSize; k++) ASSERT_EQ(r.vram->data(p * mm::kPageSize)[k], want) << "page " << p;
  }
  const uint64_t bad = r.vram->size();
  EXPECT_EQ(r.engine->clear_vram(&bad, 1), -EINVAL);
}

INSTANTIATE_TEST_SUITE_P(Backends, CopyEngineTest, ::testing::ValuesIn(all_backends()), param_name);

}  // namespace
}  // namespace gpusvm::refgpu
