// Micro-benchmarks of the reference GPU's building blocks (drivers/refgpu): the VRAM buddy
// allocator, GPU page-table commits and TLB lookups. Nothing here is on the uapi path; these
// are the single operations the fault service and the binds are made of.
#include <cstdint>
#include <optional>
#include <vector>

#include "drivers/refgpu/buddy.h"
#include "gpusvm/base/errno.h"
#include "drivers/refgpu/gpu_page_table.h"
#include "drivers/refgpu/tlb.h"
#include "tools/gpusvm-microbench/microbench.h"

namespace gpusvm::microbench {
namespace {

using refgpu::kSZ2M;
using refgpu::kSZ4K;
using refgpu::kSZ64K;

constexpr uint64_t kVa = 0x7f0000000000ull;

// Buddy::alloc + free of one block of range(0) bytes (min_block the same size) in a 64 MiB
// region that keeps 1 MiB of 4 KiB blocks allocated at its start, so small allocations split a
// partly used block rather than a pristine region.
void BM_BuddyAllocFree(benchmark::State& state) {
  const uint64_t size = static_cast<uint64_t>(state.range(0));
  refgpu::Buddy buddy(64ull << 20);
  std::vector<std::vector<refgpu::BuddyBlock>> pinned;
  for (int i = 0; i < 256; i++) {
    auto b = buddy.alloc(kSZ4K);
    if (!b) return fail(state, "Buddy::alloc(4 KiB) of the background allocations");
    pinned.push_back(std::move(*b));
  }
  for (auto _ : state) {
    auto blocks = buddy.alloc(size, size);
    if (!blocks) return fail(state, fmt::format("Buddy::alloc({}): {}", size, errno_describe(blocks.error())));
    if (blocks->size() != 1 || (*blocks)[0].size != size || (*blocks)[0].offset % size != 0) {
      return fail(state, fmt::format("Buddy::alloc({}) gave {} block(s), the first {} bytes at {:#x}", size,
                                     blocks->size(), (*blocks)[0].size, (*blocks)[0].offset));
    }
    if (!ok(state, buddy.free(*blocks), "Buddy::free")) return;
  }
  for (auto& b : pinned) {
    if (!ok(state, buddy.free(b), "Buddy::free of the background allocations")) return;
  }
  if (buddy.used_bytes() != 0) return fail(state, "Buddy: bytes still in use after freeing everything");
  const std::string problems = buddy.check();
  if (!problems.empty()) return fail(state, "Buddy::check: " + problems);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_BuddyAllocFree)->Arg(kSZ4K)->Arg(kSZ64K)->Arg(kSZ2M);

// GpuPageTable: reserve + map + unmap of one leaf of range(0) bytes (4 KiB, 64 KiB = 16 PS64
// entries, 2 MiB) next to a leaf that stays mapped, so the upper levels exist and the
// reservation takes no node: the commit cost a bind pays under the notifier lock.
void BM_GpuPtMapUnmap(benchmark::State& state) {
  const uint64_t leaf = static_cast<uint64_t>(state.range(0));
  refgpu::GpuPageTable pt;
  const uint64_t neighbour = kVa + 64 * kSZ2M;  // same 1 GiB, other 2 MiB
  const uint64_t va = leaf == kSZ2M ? kVa : kVa + kSZ64K;
  auto keep = pt.reserve(neighbour, neighbour + kSZ4K, kSZ4K);
  if (!keep || !pt.map(&*keep, neighbour, neighbour + kSZ4K, kSZ4K, refgpu::Target::kSystem, 0, 0)) {
    return fail(state, "map of the neighbour leaf");
  }
  if (leaf != kSZ2M) {  // keep an L0 table under va's 2 MiB
    auto r = pt.reserve(kVa, kVa + kSZ4K, kSZ4K);
    if (!r || !pt.map(&*r, kVa, kVa + kSZ4K, kSZ4K, refgpu::Target::kSystem, 0, 0)) {
      return fail(state, "map of the L0 neighbour leaf");
    }
  }
  uint64_t addr = 0;
  for (auto _ : state) {
    auto res = pt.reserve(va, va + leaf, leaf);
    if (!res) return fail(state, fmt::format("reserve: {}", errno_describe(res.error())));
    addr = (addr + leaf) % (1ull << 30);
    Result<bool> m = pt.map(&*res, va, va + leaf, leaf, refgpu::Target::kVram, addr, refgpu::kPermWrite);
    if (!m) return fail(state, fmt::format("map: {}", errno_describe(m.error())));
    const std::optional<refgpu::GpuLeaf> l = pt.lookup(va + leaf - 1);
    if (!l || l->size != leaf || l->addr != addr || l->target != refgpu::Target::kVram) {
      return fail(state, "lookup after map does not find the leaf just mapped");
    }
    Result<bool> u = pt.unmap(&*res, va, va + leaf);
    if (!u || !*u) return fail(state, "unmap did not unmap the leaf");
  }
  if (pt.lookup(va)) return fail(state, "the leaf is still mapped after the loop");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_GpuPtMapUnmap)->Arg(kSZ4K)->Arg(kSZ64K)->Arg(kSZ2M);

// Maps 4 KiB leaves at kVa, kVa + 4 KiB, ... (n of them).
bool map_leaves(benchmark::State& state, refgpu::GpuPageTable& pt, uint64_t n) {
  auto res = pt.reserve(kVa, kVa + n * kSZ4K, kSZ4K);
  if (!res) return fail(state, "reserve of the TLB's leaves"), false;
  if (!pt.map(&*res, kVa, kVa + n * kSZ4K, kSZ4K, refgpu::Target::kSystem, 1ull << 20, 0)) {
    return fail(state, "map of the TLB's leaves"), false;
  }
  return true;
}

// Fills the TLB with the leaf at va (as the GPU MMU does: under the table's shared lock).
bool tlb_fill(benchmark::State& state, refgpu::GpuPageTable& pt, refgpu::Tlb& tlb, uint64_t va) {
  ReadLock g(&pt.lock());
  const std::optional<refgpu::GpuLeaf> l = pt.lookup_locked(va);
  if (!l) return fail(state, fmt::format("no leaf at {:#x}", va)), false;
  tlb.fill(pt, *l);
  return true;
}

// Tlb::lookup that hits: 64 leaves cached, looked up round-robin.
void BM_TlbLookupHit(benchmark::State& state) {
  refgpu::GpuPageTable pt;
  refgpu::Tlb tlb;
  constexpr uint64_t kLeaves = 64;
  if (!map_leaves(state, pt, kLeaves)) return;
  for (uint64_t i = 0; i < kLeaves; i++) {
    if (!tlb_fill(state, pt, tlb, kVa + i * kSZ4K)) return;
  }
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t va = kVa + (i++ % kLeaves) * kSZ4K + 8;
    const std::optional<refgpu::GpuLeaf> l = tlb.lookup(va);
    if (!l || l->va != (va & ~(kSZ4K - 1))) return fail(state, fmt::format("TLB miss at {:#x}", va));
    benchmark::DoNotOptimize(l);
  }
  if (tlb.stats().misses.get() != 0) return fail(state, "TLB misses counted in the hit benchmark");
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TlbLookupHit);

// A TLB miss serviced: Tlb::lookup misses, the page-table walk finds the leaf, the fill
// caches it. The TLB holds one entry and two leaves alternate, so every lookup misses.
void BM_TlbMissWalkFill(benchmark::State& state) {
  refgpu::GpuPageTable pt;
  refgpu::Tlb tlb(1);
  if (!map_leaves(state, pt, 2)) return;
  uint64_t i = 0;
  for (auto _ : state) {
    const uint64_t va = kVa + (i++ % 2) * kSZ4K;
    if (tlb.lookup(va)) return fail(state, fmt::format("TLB hit at {:#x} with a one-entry TLB", va));
    if (!tlb_fill(state, pt, tlb, va)) return;
  }
  if (tlb.stats().hits.get() != 0 || tlb.stats().fills.get() != static_cast<uint64_t>(state.iterations())) {
    return fail(state, fmt::format("{} hits, {} fills for {} misses", tlb.stats().hits.get(),
                                   tlb.stats().fills.get(), state.iterations()));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_TlbMissWalkFill);

}  // namespace
}  // namespace gpusvm::microbench
