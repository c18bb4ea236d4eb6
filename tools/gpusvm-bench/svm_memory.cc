// Case "svm-memory": a Gpusvm mirroring the whole 47-bit user address space allocates
// nothing per byte mirrored: its init costs the same as a 2 MiB window's, and metadata
// appears only when a GPU fault creates a notifier and a range. Heap bytes are measured
// (heap_count.h) around Gpusvm::init (47-bit and 2 MiB windows), the first GPU fault (a
// notifier, a range, its pages object and address array, the GPU's PTEs) and a second fault
// in the same notifier. The baseline is what a flat per-page table of the window (8 bytes per
// 4 KiB page) would take up front. Verified: no notifier or range before the fault, one of each
// after, the GPU reads the CPU's bytes, mm::check.
#include <sys/mman.h>

#include "gpusvm/base/errno.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"
#include "tools/gpusvm-bench/heap_count.h"
#include "tools/gpusvm-bench/svm_util.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

Report run_memory(const Options&, uint64_t) {
  Machine mc = Machine::create(64ULL << 20);
  mm::AddressSpace& as = *mc.as;
  const uint64_t window = 1ULL << 47;
  const Va buf = map_anon(as, 4 * kPmdSize, MADV_HUGEPAGE);
  write_tags(as, buf, 4 * kPmdSize);

  int rc = 0;
  // A throwaway Gpusvm first: what the first one in a process allocates once (lock-class
  // and thread bookkeeping) is not the window's cost.
  std::make_unique<BenchGpu>(&as, BenchGpu::Options{.name = "warm-up"}, &rc).reset();
  require_ok(rc, "Gpusvm::init (warm-up)");
  int64_t h0 = live_heap_bytes();
  auto small = std::make_unique<BenchGpu>(&as, BenchGpu::Options{.name = "bench-gpu-2m", .mm_start = buf,
                                                                   .mm_range = kPmdSize},
                                          &rc);
  require_ok(rc, "Gpusvm::init (2 MiB window)");
  const int64_t init_small = live_heap_bytes() - h0;
  small.reset();

  h0 = live_heap_bytes();
  auto gpu_owner = std::make_unique<BenchGpu>(
      &as, BenchGpu::Options{.name = "bench-gpu-47", .mm_start = 0, .mm_range = window}, &rc);
  BenchGpu& gpu = *gpu_owner;
  require_ok(rc, "Gpusvm::init (47-bit window)");
  const int64_t h_init = live_heap_bytes();
  if (gpu.gpusvm()->nr_notifiers() != 0 || gpu.gpusvm()->nr_ranges() != 0) fail("notifiers or ranges before any fault");
  require_ok(gpu.fault(buf, /*write=*/true), "first GPU fault");
  const int64_t h_first = live_heap_bytes();
  if (gpu.gpusvm()->nr_notifiers() != 1 || gpu.gpusvm()->nr_ranges() != 1) {
    fail("after the first fault: {} notifiers, {} ranges (expected 1 and 1)", gpu.gpusvm()->nr_notifiers(),
         gpu.gpusvm()->nr_ranges());
  }
  require_ok(gpu.fault(buf + kPmdSize, /*write=*/true), "second GPU fault");
  const int64_t h_second = live_heap_bytes();
  if (gpu.gpusvm()->nr_notifiers() != 1 || gpu.gpusvm()->nr_ranges() != 2) fail("second fault: not one more range");
  for (Va va = buf; va < buf + 2 * kPmdSize; va += kPageSize) {
    Result<uint64_t> v = gpu.gpu_load(va);
    if (!v || *v != page_tag(va)) fail("GPU read at {:#x} after the fault does not match the CPU's tag", va);
  }

  Report rep;
  const int64_t init_big = h_init - h0;
  const double flat = static_cast<double>(window / kPageSize * 8);
  rep.ours = {static_cast<double>(heap_counting() ? init_big : static_cast<int64_t>(sizeof(svm::Gpusvm))), "B"};
  rep.baseline_name = "flat-per-page-table";
  rep.baseline = {flat, "B"};
  rep.ratio = flat / rep.ours.value;
  if (heap_counting()) {
    rep.detail("heap bytes of a BenchGpu (its Gpusvm::init, Device, driver object): 47-bit window {} B, 2 MiB window {} B", init_big,
               init_small);
    rep.detail("first GPU fault (notifier + its interval notifier, range, pages object, address array, GPU PTEs): "
               "+{} B; second fault in the same notifier (range, pages, array, tree node, PTEs): +{} B",
               h_first - h_init, h_second - h_first);
    if (init_big != init_small) fail("init of a 47-bit window allocated {} B, of a 2 MiB window {} B", init_big, init_small);
    rep.metric("first_fault_bytes", static_cast<double>(h_first - h_init));
    rep.metric("second_fault_bytes", static_cast<double>(h_second - h_first));
  } else {
    rep.detail("heap counting off in this build (sanitizer): ours is sizeof(Gpusvm)");
  }
  rep.detail("a flat per-page table of the 128 TiB window: {} up front", human_bytes(window / kPageSize * 8));
  gpu.unbind_all();
  require_ok(as.munmap(buf, 4 * kPmdSize), "munmap");
  check_machine(*mc.mem, rep, "after the case");
  return rep;
}

const Registrar kMemory({
    .name = "svm-memory",
    .family = "svm-memory",
    .summary = "Gpusvm over the 47-bit address space: heap bytes before and after the first fault",
    .default_size = 8ULL << 20,
    .run = run_memory,
});

}  // namespace
}  // namespace gpusvm::bench
