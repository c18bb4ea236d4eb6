// Micro-benchmarks of single host-mm and svm operations: a page-table walk of one PTE,
// hmm_range_fault of one present page (with the driver's notifier protocol around it), svm
// get_pages of a 4 KiB range, and an invalidation (MADV_DONTNEED of one page) delivered to an
// interval notifier, next to the same zap with no notifier. Each builds a small simulated
// machine with gpusvm-bench's helpers (tools/gpusvm-bench/bench.h) and checks what the
// operation returned against the CPU page table.
#include <sys/mman.h>

#include <cerrno>
#include <exception>
#include <optional>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/pagewalk.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"
#include "tools/gpusvm-microbench/microbench.h"

namespace gpusvm::microbench {
namespace {

using bench::Machine;
using mm::kPageSize;
using mm::Va;

// A machine with one 4 KiB-backed mapping of `pages` pages, every page written (so present).
struct OneMapping {
  Machine m;
  Va va = 0;
};

std::optional<OneMapping> make_mapping(benchmark::State& state, uint64_t pages) {
  try {
    OneMapping o{Machine::create(64ull << 20), 0};
    o.va = bench::map_anon(*o.m.as, pages * kPageSize, MADV_NOHUGEPAGE);
    for (uint64_t i = 0; i < pages; i++) {
      const int rc = mm::cpu::store<uint64_t>(*o.m.as, o.va + i * kPageSize, 0x5a5a0000 + i);
      if (!ok(state, rc, "cpu::store")) return std::nullopt;
    }
    return o;
  } catch (const std::exception& e) {
    fail(state, e.what());
    return std::nullopt;
  }
}

// ---- a walk of one PTE ----

struct OnePte {
  bool present = false;
  mm::Pfn pfn = 0;
};

int one_pte_pmd_entry(mm::PmdSlot slot, Va start, Va end, mm::MmWalk& walk) {
  (void)end;
  OnePte& o = *static_cast<OnePte*>(walk.priv);
  mm::PteTable* t = walk.mm->page_table().pte_offset_map_lock(slot);
  if (!t) return -EAGAIN;  // not a PTE table (the mapping is MADV_NOHUGEPAGE: never here)
  const mm::Pte pte = t->get(mm::pte_index(start));
  mm::PageTable::pte_unmap_unlock(t);
  o.present = pte.present();
  o.pfn = pte.pfn();
  return 0;
}
constexpr mm::MmWalkOps kOnePteOps{.pmd_entry = one_pte_pmd_entry};

// walk_page_range over one 4 KiB page: VMA lookup, PGD..PMD descent, the PTE lock, one read.
void BM_WalkOnePte(benchmark::State& state) {
  std::optional<OneMapping> o = make_mapping(state, 1);
  if (!o) return;
  mm::AddressSpace& as = *o->m.as;
  const mm::Pfn want = mm::query_page(as, o->va).pfn;
  for (auto _ : state) {
    OnePte pte;
    int rc;
    {
      ReadLock g(&as.mmap_lock());
      rc = mm::walk_page_range(as, o->va, o->va + kPageSize, kOnePteOps, &pte);
    }
    if (!ok(state, rc, "walk_page_range")) return;
    if (!pte.present || pte.pfn != want) {
      return fail(state, fmt::format("walk read pfn {:#x} (present {}), the page is at {:#x}", pte.pfn,
                                     pte.present, want));
    }
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_WalkOnePte);

// hmm_range_fault of one present 4 KiB page, REQ_FAULT|REQ_WRITE (nothing to fault), with the
// driver protocol: read_begin, mmap lock, hmm_range_fault, driver lock, read_retry.
void BM_HmmRangeFaultOnePage(benchmark::State& state) {
  std::optional<OneMapping> o = make_mapping(state, 1);
  if (!o) return;
  mm::AddressSpace& as = *o->m.as;
  bench::TrivialMirror mirror;
  mm::MmuIntervalNotifier notifier;
  if (!ok(state, notifier.insert(&as, o->va, kPageSize, &mirror), "MmuIntervalNotifier::insert")) return;
  const mm::Pfn want = mm::query_page(as, o->va).pfn;
  const uint64_t faults_before = as.stats().faults.get();
  for (auto _ : state) {
    uint64_t pfn = 0;
    const int rc = bench::mirror_range(as, notifier, mirror, o->va, o->va + kPageSize,
                                       mm::HMM_PFN_REQ_FAULT | mm::HMM_PFN_REQ_WRITE, &pfn);
    if (!ok(state, rc, "hmm_range_fault")) break;
    if (!(pfn & mm::HMM_PFN_VALID) || !(pfn & mm::HMM_PFN_WRITE) || mm::hmm_pfn_to_pfn(pfn) != want) {
      fail(state, fmt::format("hmm_range_fault output {:#x}, the page is pfn {:#x} (writable)", pfn, want));
      break;
    }
  }
  if (as.stats().faults.get() != faults_before) fail(state, "hmm_range_fault faulted a present page");
  notifier.remove();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HmmRangeFaultOnePage);

// svm get_pages of a 4 KiB range (the VMA is one page, so the range is one page): the
// mappings are dropped between calls (range_unmap_pages, not timed), so every call walks,
// plans, allocates the address array and DMA-maps, as a fault after an invalidation does.
void BM_SvmGetPages4K(benchmark::State& state) {
  std::optional<OneMapping> o = make_mapping(state, 1);
  if (!o) return;
  mm::AddressSpace& as = *o->m.as;
  int rc = 0;
  bench::BenchGpu gpu(&as, {.name = "microbench-gpu"}, &rc);
  if (!ok(state, rc, "Gpusvm::init")) return;
  const mm::Pfn want = mm::query_page(as, o->va).pfn;
  MutexLock g(&gpu.vm_lock());
  svm::Ctx ctx;
  Result<svm::RangeRef> r = gpu.gpusvm()->range_find_or_insert(o->va, 0, ~Va{0}, ctx);
  if (!r) return fail(state, fmt::format("range_find_or_insert: {}", errno_describe(r.error())));
  if ((*r)->size() != kPageSize) {
    fail(state, fmt::format("the range is {} bytes, expected one 4 KiB page", (*r)->size()));
  } else {
    for (auto _ : state) {
      state.PauseTiming();
      gpu.gpusvm()->range_unmap_pages(r->get(), ctx);
      state.ResumeTiming();
      if (!ok(state, gpu.gpusvm()->range_get_pages(r->get(), ctx), "range_get_pages")) break;
    }
    ReadLock nl(&gpu.gpusvm()->notifier_lock());
    svm::Pages& p = (*r)->pages(0);
    if (!gpu.gpusvm()->pages_valid(p) || p.addr_of(0) != want << mm::kPageShift) {
      fail(state, fmt::format("after get_pages: valid {}, device address {:#x}, the page is pfn {:#x}",
                              gpu.gpusvm()->pages_valid(p), p.addr_of(0), want));
    }
  }
  gpu.gpusvm()->range_remove(r->get());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SvmGetPages4K);

// MADV_DONTNEED of one present 4 KiB page: range(0) = 1 with an interval notifier over it
// (invalidate: driver lock, set_seq), 0 without (the zap alone). The page is written again
// between iterations (not timed). Checked: the notifier saw one invalidation per iteration
// and the page reads zero afterwards.
void BM_NotifierInvalidate(benchmark::State& state) {
  const bool with_notifier = state.range(0) != 0;
  std::optional<OneMapping> o = make_mapping(state, 1);
  if (!o) return;
  mm::AddressSpace& as = *o->m.as;
  bench::TrivialMirror mirror;
  mm::MmuIntervalNotifier notifier;
  if (with_notifier && !ok(state, notifier.insert(&as, o->va, kPageSize, &mirror), "insert")) return;
  const uint64_t before = mirror.invalidations();
  for (auto _ : state) {
    state.PauseTiming();
    const int rc = mm::cpu::store<uint64_t>(as, o->va, 0x1234);
    state.ResumeTiming();
    if (!ok(state, rc, "cpu::store") || !ok(state, as.madvise(o->va, kPageSize, MADV_DONTNEED), "madvise")) break;
  }
  Result<uint64_t> v = mm::cpu::load<uint64_t>(as, o->va);
  if (!v || *v != 0) fail(state, "the page does not read zero after MADV_DONTNEED");
  const uint64_t seen = mirror.invalidations() - before;
  if (seen != (with_notifier ? static_cast<uint64_t>(state.iterations()) : 0)) {
    fail(state, fmt::format("{} invalidations for {} MADV_DONTNEED calls", seen, state.iterations()));
  }
  if (with_notifier) notifier.remove();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_NotifierInvalidate)->ArgName("notifier")->Arg(1)->Arg(0);

}  // namespace
}  // namespace gpusvm::microbench
