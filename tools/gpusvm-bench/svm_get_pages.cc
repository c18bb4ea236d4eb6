// Case "get-pages": Gpusvm::get_pages of a 2 MiB range backed by one THP against a 2 MiB
// range backed by 512 scattered 4 KiB pages: same bytes, same run, same driver
// (bench_svm_driver.h). The aim of the issue (Xe's 9 -> 1 us): THP >= 9x faster.
//
// Both buffers are mirrored by one BenchGpu (system memory only) in 2 MiB ranges. The 4 KiB
// buffer is written one page of every range at a time, so the frames of one range are not
// contiguous (no folded entry by chance: a driver sees what a long-running process has).
// Timed: range_get_pages of every range, one call at a time, each after an untimed
// range_unmap_pages (so every call faults, plans, allocates and maps a new array, as a fault
// after an invalidation does). The figure is the median of every call of every run.
//
// Verified: every page's device address (Pages::addr_of) is the CPU page's frame and reads
// the page's tag; the THP range has one address entry (per folio: one folio, folded), the
// 4 KiB range 512; mm::check at the end. Printed: the metadata bytes of one 2 MiB range
// (range object, pages object, address array, tree node), measured on the heap
// (heap_count.h), next to a per-page address array.
#include <sys/mman.h>

#include <cstring>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/page_state.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"
#include "tools/gpusvm-bench/heap_count.h"
#include "tools/gpusvm-bench/svm_util.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPagesPerPmd;
using mm::kPmdSize;
using mm::Va;

struct Mirror {
  Va base = 0;
  std::vector<svm::RangeRef> ranges;
  std::vector<double> ns;  // every timed call
  int64_t insert_bytes = -1, array_bytes = -1;  // heap deltas of the second range
  uint32_t nr_addrs = 0;
};

// Inserts and maps the 2 MiB ranges of [m.base, +size), measuring the heap cost of the second.
void build(BenchGpu& gpu, Mirror& m, uint64_t size) {
  MutexLock g(&gpu.vm_lock());
  svm::Ctx ctx;
  for (Va va = m.base; va < m.base + size; va += kPmdSize) {
    const int64_t h0 = live_heap_bytes();
    Result<svm::RangeRef> r = gpu.gpusvm()->range_find_or_insert(va, 0, ~Va{0}, ctx);
    if (!r) fail("range_find_or_insert({:#x}): {}", va, errno_describe(r.error()));
    const int64_t h1 = live_heap_bytes();
    if ((*r)->size() != kPmdSize) fail("range at {:#x} is {} bytes, expected 2 MiB", va, (*r)->size());
    require_ok(gpu.gpusvm()->range_get_pages(r->get(), ctx), "range_get_pages");
    const int64_t h2 = live_heap_bytes();
    if (m.ranges.size() == 1) {
      m.insert_bytes = h1 - h0;
      m.array_bytes = h2 - h1;
    }
    m.ranges.push_back(std::move(*r));
  }
}

void time_run(BenchGpu& gpu, Mirror& m) {
  MutexLock g(&gpu.vm_lock());
  svm::Ctx ctx;
  for (svm::RangeRef& r : m.ranges) {
    gpu.gpusvm()->range_unmap_pages(r.get(), ctx);  // untimed: the next call maps anew
    const uint64_t t0 = now_ns();
    const int rc = gpu.gpusvm()->range_get_pages(r.get(), ctx);
    const uint64_t t1 = now_ns();
    if (rc != 0) require_ok(rc, "range_get_pages (timed)");
    m.ns.push_back(static_cast<double>(t1 - t0));
  }
}

void verify(BenchGpu& gpu, mm::AddressSpace& as, Mirror& m, uint32_t want_addrs, const char* what) {
  MutexLock g(&gpu.vm_lock());
  for (svm::RangeRef& r : m.ranges) {
    // Copy the device addresses out under the notifier lock (the array is stable under it),
    // compare with the CPU page table after it (query_page takes the mmap lock, which ranks
    // above the notifier lock). vm_lock keeps get_pages away meanwhile.
    std::vector<svm::DmaAddr> addrs(r->npages());
    {
      ReadLock nl(&gpu.gpusvm()->notifier_lock());
      svm::Pages& p = r->pages(0);
      if (!gpu.gpusvm()->pages_valid(p)) fail("{} range {:#x}: pages not valid after get_pages", what, r->start());
      if (p.nr_addrs() != want_addrs) {
        fail("{} range {:#x}: {} address entries, expected {}", what, r->start(), p.nr_addrs(), want_addrs);
      }
      m.nr_addrs = p.nr_addrs();
      for (uint64_t i = 0; i < r->npages(); i++) addrs[i] = p.addr_of(i);
    }
    for (uint64_t i = 0; i < r->npages(); i++) {
      const Va va = r->start() + i * kPageSize;
      const svm::DmaAddr a = addrs[i];
      const mm::PageState st = mm::query_page(as, va);
      if (a != st.pfn << mm::kPageShift) {
        fail("{} page {:#x}: device address {:#x}, the CPU maps pfn {:#x}", what, va, a, st.pfn);
      }
      uint64_t v;
      std::memcpy(&v, as.mem()->ram_data(a >> mm::kPageShift), sizeof(v));
      if (v != page_tag(va)) fail("{} page {:#x}: device reads {:#x}, expected {:#x}", what, va, v, page_tag(va));
    }
  }
}

Report run_get_pages(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), 2 * kPmdSize);
  const uint64_t nranges = size / kPmdSize;
  Machine mc = Machine::create(2 * size + (64ULL << 20));
  mm::AddressSpace& as = *mc.as;
  int rc = 0;
  BenchGpu gpu(&as, {.name = "bench-gpu"}, &rc);
  require_ok(rc, "Gpusvm::init");

  Mirror thp, small;
  thp.base = map_anon(as, size, MADV_HUGEPAGE);
  small.base = map_anon(as, size, MADV_NOHUGEPAGE);
  write_tags(as, thp.base, size);
  // One page of every range at a time: the frames of one range are scattered.
  for (uint64_t i = 0; i < kPagesPerPmd; i++) {
    for (uint64_t r = 0; r < nranges; r++) write_tags(as, small.base + r * kPmdSize + i * kPageSize, kPageSize);
  }
  for (Va va = thp.base; va < thp.base + size; va += kPmdSize) {
    if (mm::query_page(as, va).kind != mm::PageKind::kThpPmd) fail("THP buffer: {:#x} is not a PMD-mapped THP", va);
  }
  build(gpu, thp, size);
  build(gpu, small, size);
  verify(gpu, as, thp, 1, "THP");
  verify(gpu, as, small, kPagesPerPmd, "4K");

  std::vector<double> thp_runs, small_runs;
  for (int r = 0; r <= opt.repeat; r++) {  // r == 0: warm-up, not kept
    Mirror* order[2] = {r % 2 ? &small : &thp, r % 2 ? &thp : &small};
    for (Mirror* m : order) {
      const size_t before = m->ns.size();
      time_run(gpu, *m);
      if (r == 0) {
        m->ns.resize(before);
      } else {
        std::vector<double> run(m->ns.begin() + static_cast<long>(before), m->ns.end());
        (m == &thp ? thp_runs : small_runs).push_back(median(run));
      }
    }
  }
  verify(gpu, as, thp, 1, "THP");
  verify(gpu, as, small, kPagesPerPmd, "4K");

  Report rep;
  const double t_thp = median(thp.ns), t_small = median(small.ns);
  rep.ours = {t_thp / 1000, "us"};
  rep.baseline_name = "4k-backed";
  rep.baseline = {t_small / 1000, "us"};
  rep.ratio = t_small / t_thp;
  rep.detail("{} ranges of 2 MiB per buffer ({}); get_pages per 2 MiB range, median of {} calls each", nranges,
             human_bytes(size), thp.ns.size());
  rep.detail("THP-backed:   {:.2f} us per range (per-run medians {} us); {} address entry (per folio, folded)",
             t_thp / 1000, runs_string([&] { for (double& v : thp_runs) v /= 1000; return thp_runs; }()), thp.nr_addrs);
  rep.detail("4K-backed:    {:.2f} us per range (per-run medians {} us); {} address entries (one per 4 KiB folio)",
             t_small / 1000, runs_string([&] { for (double& v : small_runs) v /= 1000; return small_runs; }()),
             small.nr_addrs);
  rep.detail("THP/4K speed ratio {:.2f} (aim from the issue: >= 9)", rep.ratio);
  const uint64_t entry = sizeof(svm::PagemapAddr);
  rep.detail("address array per 2 MiB: THP {} B, 4K {} B; a per-page array (one entry per 4 KiB) would be {} B "
             "for both",
             thp.nr_addrs * entry, small.nr_addrs * entry, kPagesPerPmd * entry);
  {
    MutexLock g(&gpu.vm_lock());
    const uint64_t range_bytes = thp.ranges[1]->metadata_bytes() - thp.ranges[1]->pages(0).metadata_bytes();
    const uint64_t pages_thp = sizeof(svm::Pages), pages_small = sizeof(svm::Pages);
    rep.detail("metadata per 2 MiB range (sizeof): range {} B, pages object {} B, address array THP {} B / 4K {} B",
               range_bytes, pages_thp, thp.nr_addrs * entry, small.nr_addrs * entry);
    (void)pages_small;
  }
  if (heap_counting()) {
    rep.detail("metadata per 2 MiB range (heap, malloc_usable_size): insert (range + pages object + tree node) "
               "THP {} B / 4K {} B; address array THP {} B / 4K {} B; total THP {} B / 4K {} B",
               thp.insert_bytes, small.insert_bytes, thp.array_bytes, small.array_bytes,
               thp.insert_bytes + thp.array_bytes, small.insert_bytes + small.array_bytes);
    rep.detail("  (the get_pages delta is the address array and its allocator rounding: the per-device DMA "
               "mapping record is a flat per-pfn array reserved when the Device is created, where the kernel "
               "has the IOMMU's page tables)");
    rep.metric("meta_thp_bytes", static_cast<double>(thp.insert_bytes + thp.array_bytes));
    rep.metric("meta_4k_bytes", static_cast<double>(small.insert_bytes + small.array_bytes));
  } else {
    rep.detail("heap counting off in this build (sanitizer): heap figures not measured");
  }
  rep.metric("thp_us", t_thp / 1000);
  rep.metric("4k_us", t_small / 1000);
  {
    MutexLock g(&gpu.vm_lock());
    for (svm::RangeRef& r : thp.ranges) gpu.gpusvm()->range_remove(r.get());
    for (svm::RangeRef& r : small.ranges) gpu.gpusvm()->range_remove(r.get());
  }
  thp.ranges.clear();
  small.ranges.clear();
  require_ok(as.munmap(thp.base, size), "munmap");
  require_ok(as.munmap(small.base, size), "munmap");
  check_machine(*mc.mem, rep, "after the case");
  return rep;
}

const Registrar kGetPages({
    .name = "get-pages",
    .family = "get-pages",
    .summary = "Gpusvm get_pages of a 2 MiB THP range vs 4 KiB-backed (address array per folio)",
    .default_size = 64ULL << 20,
    .run = run_get_pages,
});

}  // namespace
}  // namespace gpusvm::bench
