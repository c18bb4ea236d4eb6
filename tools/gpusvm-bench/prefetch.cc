// Case family "prefetch": GB/s of gpusvm_rt_prefetch (vm_bind PREFETCH) moving a buffer to
// VRAM and back, by range granularity (2 MiB ranges of a THP-backed buffer, 64 KiB and 4 KiB
// ranges of MADV_NOHUGEPAGE buffers: rt_rig.h's layouts), on a device whose copy engine copies
// with the caller alone (t1) and on one with N - 1 copy workers (tN, N = hardware threads
// clamped to 2..4; DeviceConfig::copy_threads, from 1 MiB requests: a 2 MiB range's copy is
// split, smaller ones are not).
//
// Each run, for each granularity and device: map, CPU-fill (untimed), prefetch every span to
// VRAM (timed), check every page is in VRAM, prefetch back (timed), check every page is in
// system memory, the migration and copy counters, and every byte on the CPU (untimed).
// One prefetch call per read-write span (one VMA: 1 for 2m, size / 1 MiB for 64k, size /
// 32 KiB for 4k), each waited for on its fence, as a program would.
// Baseline: memcpy of the same bytes between two host buffers in the same run, in pieces of
// the granularity (both directions timed separately); ratio = ours / memcpy.
// --backend vulkan: one device (the copy threads are the host backend's), cases named
// prefetch-<granule>-<dir>-vulkan, and the baseline is the backend's raw ceiling: the same
// number of bytes in one vkCmdCopyBuffer region on the same queue (copy_ceiling.h), each way.
#include <algorithm>
#include <cstring>
#include <thread>

#include "tools/gpusvm-bench/copy_ceiling.h"
#include "tools/gpusvm-bench/migrate_rounds.h"

namespace gpusvm::bench {
namespace {

unsigned copy_workers() { return std::clamp(std::thread::hardware_concurrency(), 2u, 4u) - 1; }

struct Series {
  std::vector<double> ns[2][2];  // [device t1, tN][to VRAM, to system]
  std::vector<double> memcpy_ns[2];  // the baseline (memcpy, or the Vulkan ceiling)
  uint64_t calls = 0;
};

// memcpy of `size` bytes in pieces of `unit` from a to b; returns ns. b is checked after.
uint64_t memcpy_pieces(std::vector<std::byte>& a, std::vector<std::byte>& b, uint64_t unit) {
  const uint64_t t0 = now_ns();
  for (uint64_t off = 0; off < a.size(); off += unit) std::memcpy(b.data() + off, a.data() + off, unit);
  const uint64_t t = now_ns() - t0;
  if (std::memcmp(a.data(), b.data(), a.size()) != 0) fail("memcpy baseline: destination differs");
  return t;
}

std::vector<Report> run_prefetch(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), mm::kPmdSize);
  const unsigned workers = copy_workers();
  RtRigConfig c{.ram = 2 * size + (64ull << 20), .vram = size + (8ull << 20), .backend = backend_config(opt)};
  const bool vk = c.backend.kind == refgpu::BackendKind::kVulkan;
  if (vk) c.ram += size;  // the ceiling's own buffer
  std::vector<std::unique_ptr<RtRig>> rigs;
  rigs.push_back(std::make_unique<RtRig>(c));
  if (!vk) {  // copy threads are the host backend's (the Vulkan queue does the copying)
    c.copy_threads = workers;
    rigs.push_back(std::make_unique<RtRig>(c));
  }
  std::unique_ptr<CopyCeiling> ceiling;
  if (vk) ceiling = std::make_unique<CopyCeiling>(rigs[0]->mem(), rigs[0]->device().backend(), size);
  const int ndev = static_cast<int>(rigs.size());
  std::vector<std::byte> a, b;
  if (!vk) a.resize(size), b.resize(size);
  Series ser[kGranules.size()];
  for (int r = 0; r <= opt.repeat; r++) {
    const bool keep = r > 0;
    for (size_t k = 0; k < kGranules.size(); k++) {
      for (int i = 0; i < ndev; i++) {
        const int d = (r % 2) ? ndev - 1 - i : i;  // alternate which device runs first
        const uint64_t salt = static_cast<uint64_t>(r * 16 + static_cast<int>(k) * 2 + d);
        const PrefetchTimes pt = prefetch_round(*rigs[static_cast<size_t>(d)], kGranules[k], size, salt);
        ser[k].calls = pt.calls;
        if (keep) {
          ser[k].ns[d][0].push_back(static_cast<double>(pt.to_vram_ns));
          ser[k].ns[d][1].push_back(static_cast<double>(pt.to_sys_ns));
        }
      }
      uint64_t m0, m1;
      if (vk) {
        m0 = ceiling->to_vram_ns(static_cast<uint64_t>(r * 16 + static_cast<int>(k)));
        m1 = ceiling->to_sys_ns(static_cast<uint64_t>(r * 16 + static_cast<int>(k) + 8));
      } else {
        std::fill(a.begin(), a.end(), std::byte(static_cast<unsigned char>(r + k + 1)));
        m0 = memcpy_pieces(a, b, kGranules[k].unit);
        std::fill(b.begin(), b.end(), std::byte(static_cast<unsigned char>(r + k + 7)));
        m1 = memcpy_pieces(b, a, kGranules[k].unit);
      }
      if (keep) {
        ser[k].memcpy_ns[0].push_back(static_cast<double>(m0));
        ser[k].memcpy_ns[1].push_back(static_cast<double>(m1));
      }
    }
  }
  auto gbs = [&](double ns) { return static_cast<double>(size) / ns; };
  const std::string base_name = vk ? "vkCmdCopyBuffer" : "memcpy";
  std::vector<Report> out;
  for (size_t k = 0; k < kGranules.size(); k++) {
    const Granule& g = kGranules[k];
    for (int dir = 0; dir < 2; dir++) {
      for (int d = 0; d < ndev; d++) {
        const unsigned threads = d ? workers + 1 : 1;
        Report rep;
        rep.case_name = vk ? fmt::format("prefetch-{}-{}-vulkan", g.name, dir ? "to-sys" : "to-vram")
                           : fmt::format("prefetch-{}-{}-t{}", g.name, dir ? "to-sys" : "to-vram", threads);
        rep.ours = {gbs(median(ser[k].ns[d][dir])), "GB/s"};
        rep.baseline_name = base_name;
        rep.baseline = {gbs(median(ser[k].memcpy_ns[dir])), "GB/s"};
        rep.ratio = rep.ours.value / rep.baseline.value;
        rep.size = size;
        rep.repeat = opt.repeat;
        std::vector<double> g_runs, m_runs;
        for (double ns : ser[k].ns[d][dir]) g_runs.push_back(gbs(ns));
        for (double ns : ser[k].memcpy_ns[dir]) m_runs.push_back(gbs(ns));
        const std::string engine =
            vk ? fmt::format("copy engine on {}", rigs[0]->device().backend().description())
               : fmt::format("copy engine {} thread(s){}", threads,
                             d ? " (workers from 1 MiB requests)" : " (the caller alone)");
        const std::string base =
            vk ? fmt::format("the same bytes in one request of {} region(s) on the same queue (copy_ceiling.h)",
                             ceiling->regions())
               : fmt::format("memcpy in {} pieces", human_bytes(g.unit));
        rep.detail("{} in {} {} ranges ({}), {}, {} prefetch calls, {}: per-run GB/s {}; {} {}", human_bytes(size),
                   size / g.unit, human_bytes(g.unit),
                   g.thp ? "THP-backed" : fmt::format("{} MADV_NOHUGEPAGE VMAs", human_bytes(g.piece)),
                   dir ? "VRAM -> system" : "system -> VRAM", ser[k].calls, engine, runs_string(g_runs), base,
                   runs_string(m_runs));
        const double per = median(ser[k].ns[d][dir]) / 1000 / static_cast<double>(size / g.unit);
        rep.detail("us per range: {:.2f} ({} per range's bytes {:.2f})", per, base_name,
                   median(ser[k].memcpy_ns[dir]) / 1000 / static_cast<double>(size / g.unit));
        rep.metric("us_per_range", per);
        if (!vk) rep.metric("copy_threads", threads);
        rep.metric("granule_bytes", static_cast<double>(g.unit));
        out.push_back(std::move(rep));
      }
    }
  }
  ceiling.reset();  // its frames are not the process's: gone before the machine is checked
  for (auto& rig : rigs) check_machine(rig->mem(), out.back(), "after the family (data unmapped)");
  out.back().detail("verified: residency after each prefetch, migration and copy counts, every byte read back by the CPU");
  return out;
}

const Registrar kPrefetch({
    .name = "prefetch",
    .family = "prefetch",
    .summary = "refgpu prefetch to VRAM and back through the runtime, 2 MiB / 64 KiB / 4 KiB ranges, 1 and N copy "
               "threads, vs memcpy",
    .default_size = 32ULL << 20,
    .run_many = run_prefetch,
});

}  // namespace
}  // namespace gpusvm::bench
