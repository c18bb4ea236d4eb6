// Case "invalidate": what a CPU page-table change costs when a GPU mirrors the memory, with
// the window mirrored in 2 MiB ranges (default chunks) against 4 KiB ranges (chunk sizes
// {4 KiB}: 512x more ranges for the same bytes).
//
// One run for each granularity: a 4 KiB-backed buffer (MADV_NOHUGEPAGE, so the mm side of
// every event is the same for both granularities and no THP split is measured) is written by
// the CPU, then every page faulted by the GPU (BenchGpu::fault: ranges, get_pages, committed
// GPU PTEs). Timed, in this order:
//   window     MADV_DONTNEED of the whole buffer: the notifier callbacks zap, flush and
//              unmap every range;
//   one range  after the GPU faulted everything in again, MADV_DONTNEED of one range in the
//              middle (2 MiB or 4 KiB): the callback finds it in the range tree;
//   munmap     of the whole buffer (UNMAP: every range queued to the garbage collector),
//   gc         then the driver's garbage collector removing them.
// The same events with no GPU mirroring the buffer are timed too ("mm alone").
// Verified after each event: no GPU PTE of an invalidated range is valid and its pages are
// unmapped; after the one-range event every other range is still valid; the data the GPU
// reads after the re-fault is the CPU's; mm::check at the end.
#include <sys/mman.h>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/page_state.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"
#include "tools/gpusvm-bench/svm_util.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

struct Times {
  std::vector<double> window, one, unmap, gc;
  uint64_t ranges = 0, invalidations = 0;
};

// Valid-mapped ranges of gpu in [start, end) (driver lock taken; notifier lock read).
uint64_t valid_ranges(BenchGpu& gpu, Va start, Va end) {
  MutexLock g(&gpu.vm_lock());
  ReadLock nl(&gpu.gpusvm()->notifier_lock());
  uint64_t n = 0;
  svm::Gpusvm* gs = gpu.gpusvm();
  // The lambda runs inside this scope with the notifier lock held (the analysis does not
  // follow it into the callback).
  gs->for_each_range(start, end, [&](svm::Range* r) GPUSVM_NO_THREAD_SAFETY_ANALYSIS { n += gs->pages_valid(r->pages(0)); });
  return n;
}

void fault_all(BenchGpu& gpu, Va base, uint64_t size, uint64_t step) {
  for (Va va = base; va < base + size; va += step) {
    if (int rc = gpu.fault(va, /*write=*/true)) require_ok(rc, fmt::format("GPU fault at {:#x}", va));
  }
}

void check_gpu_reads(BenchGpu& gpu, Va base, uint64_t size, uint64_t salt, const char* when) {
  for (Va va = base; va < base + size; va += kPageSize) {
    Result<uint64_t> v = gpu.gpu_load(va);
    if (!v || *v != page_tag(va, salt)) {
      fail("{}: GPU read at {:#x}: {}, expected {:#x}", when, va, v ? fmt::format("{:#x}", *v) : errno_describe(v.error()),
           page_tag(va, salt));
    }
  }
}

// One run; chunk == 0: no GPU (mm alone).
void run_once(mm::AddressSpace& as, uint64_t size, uint64_t chunk, int salt, Times& t) {
  std::unique_ptr<BenchGpu> gpu;
  if (chunk) {
    int rc = 0;
    BenchGpu::Options o{.name = "bench-gpu"};
    if (chunk == kPageSize) o.chunk_sizes = {kPageSize};
    gpu = std::make_unique<BenchGpu>(&as, o, &rc);
    require_ok(rc, "Gpusvm::init");
  }
  const Va base = map_anon(as, size, MADV_NOHUGEPAGE);
  write_tags(as, base, size, salt);
  if (gpu) {
    fault_all(*gpu, base, size, chunk);
    t.ranges = gpu->gpusvm()->nr_ranges();
    if (t.ranges != size / chunk) fail("{} ranges of {} B for {} B", t.ranges, chunk, size);
    if (valid_ranges(*gpu, base, base + size) != t.ranges) fail("not every range is mapped after the faults");
  }
  const uint64_t inv0 = gpu ? gpu->invalidations.load() : 0;
  uint64_t t0 = now_ns();
  require_ok(as.madvise(base, size, MADV_DONTNEED), "MADV_DONTNEED (window)");
  t.window.push_back(static_cast<double>(now_ns() - t0));
  if (gpu) {
    t.invalidations = gpu->invalidations.load() - inv0;
    if (uint64_t v = valid_ranges(*gpu, base, base + size)) fail("{} ranges still valid after MADV_DONTNEED", v);
    if (gpu->gpu_load(base + size / 2)) fail("the GPU still reaches a page after MADV_DONTNEED");
  }
  // Rewrite (the pages are zero now) and fault everything in again.
  write_tags(as, base, size, salt + 1);
  if (gpu) {
    fault_all(*gpu, base, size, chunk);
    check_gpu_reads(*gpu, base, size, salt + 1, "after the re-fault");
  }
  const uint64_t step = chunk ? chunk : kPmdSize;
  const Va one = base + (size / 2 / step) * step;
  t0 = now_ns();
  require_ok(as.madvise(one, step, MADV_DONTNEED), "MADV_DONTNEED (one range)");
  t.one.push_back(static_cast<double>(now_ns() - t0));
  if (gpu) {
    if (valid_ranges(*gpu, one, one + step) != 0) fail("the range at {:#x} is still valid", one);
    if (valid_ranges(*gpu, base, base + size) != t.ranges - 1) fail("MADV_DONTNEED of one range invalidated others");
  }
  t0 = now_ns();
  require_ok(as.munmap(base, size), "munmap");
  t.unmap.push_back(static_cast<double>(now_ns() - t0));
  if (gpu) {
    t0 = now_ns();
    const size_t removed = gpu->collect_garbage();
    t.gc.push_back(static_cast<double>(now_ns() - t0));
    if (removed != t.ranges || gpu->gpusvm()->nr_ranges() != 0) {
      fail("garbage collector removed {} of {} ranges ({} left)", removed, t.ranges, gpu->gpusvm()->nr_ranges());
    }
    if (gpu->gpusvm()->nr_notifiers() != 0) fail("notifiers left after the last range went");
  }
}

Report run_invalidate(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), 2 * kPmdSize);
  Machine mc = Machine::create(size + (64ULL << 20));
  mm::AddressSpace& as = *mc.as;
  Times big, small, none;
  for (int r = 0; r <= opt.repeat; r++) {
    Times scratch[3];
    const bool keep = r > 0;  // r == 0: warm-up
    run_once(as, size, kPmdSize, 2 * r, keep ? big : scratch[0]);
    run_once(as, size, kPageSize, 2 * r, keep ? small : scratch[1]);
    run_once(as, size, 0, 2 * r, keep ? none : scratch[2]);
    if (!keep) {
      big.ranges = scratch[0].ranges;
      small.ranges = scratch[1].ranges;
      big.invalidations = scratch[0].invalidations;
      small.invalidations = scratch[1].invalidations;
    }
  }
  auto us = [](const std::vector<double>& v) { return median(v) / 1000; };
  Report rep;
  rep.ours = {us(big.window), "us"};
  rep.baseline_name = "4k-ranges";
  rep.baseline = {us(small.window), "us"};
  rep.ratio = median(small.window) / median(big.window);
  rep.detail("{} mirrored by one GPU, 4 KiB-backed: {} ranges of 2 MiB vs {} ranges of 4 KiB", human_bytes(size),
             big.ranges, small.ranges);
  rep.detail("MADV_DONTNEED of the window: 2 MiB ranges {:.1f} us, 4 KiB ranges {:.1f} us, mm alone {:.1f} us "
             "({} / {} notifier callbacks)",
             us(big.window), us(small.window), us(none.window), big.invalidations, small.invalidations);
  rep.detail("  gpusvm share (minus mm alone): 2 MiB ranges {:.1f} us ({:.0f} ns per range), 4 KiB ranges {:.1f} us "
             "({:.0f} ns per range)",
             us(big.window) - us(none.window), (median(big.window) - median(none.window)) / big.ranges,
             us(small.window) - us(none.window), (median(small.window) - median(none.window)) / small.ranges);
  rep.detail("MADV_DONTNEED of one range (2 MiB / 4 KiB): {:.2f} us / {:.2f} us; mm alone (2 MiB) {:.2f} us",
             us(big.one), us(small.one), us(none.one));
  rep.detail("munmap of the window: 2 MiB ranges {:.1f} us, 4 KiB ranges {:.1f} us, mm alone {:.1f} us; then the "
             "garbage collector: {:.1f} us / {:.1f} us",
             us(big.unmap), us(small.unmap), us(none.unmap), us(big.gc), us(small.gc));
  rep.detail("per-run window figures (us): 2 MiB {}; 4 KiB {}; mm alone {}", runs_string([&] {
               std::vector<double> v;
               for (double x : big.window) v.push_back(x / 1000);
               return v;
             }()),
             runs_string([&] {
               std::vector<double> v;
               for (double x : small.window) v.push_back(x / 1000);
               return v;
             }()),
             runs_string([&] {
               std::vector<double> v;
               for (double x : none.window) v.push_back(x / 1000);
               return v;
             }()));
  rep.metric("one_2m_us", us(big.one));
  rep.metric("one_4k_us", us(small.one));
  rep.metric("mm_alone_us", us(none.window));
  rep.metric("munmap_gc_2m_us", us(big.unmap) + us(big.gc));
  rep.metric("munmap_gc_4k_us", us(small.unmap) + us(small.gc));
  check_machine(*mc.mem, rep, "after the case");
  return rep;
}

const Registrar kInvalidate({
    .name = "invalidate",
    .family = "invalidate",
    .summary = "invalidation (MADV_DONTNEED, munmap + GC) of a window mirrored in 2 MiB vs 4 KiB ranges",
    .default_size = 512ULL << 20,
    .run = run_invalidate,
});

}  // namespace
}  // namespace gpusvm::bench
