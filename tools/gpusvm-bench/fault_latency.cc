// Case family "fault-latency": the distribution of GPU fault service times by fault size
// (4 KiB, 64 KiB, 2 MiB ranges: rt_rig.h's layouts), with migration to VRAM (preferred
// location: the device, the default), next to the CPU's first touch of the same bytes.
//
// Each run, per size: map the layout, CPU-fill it (untimed), then one job per unit (one
// engine, one fault-handler thread), each storing one qword into a unit the GPU has not
// touched, so each job takes exactly one fault (checked from VmStats). Per fault, two
// samples: the driver's service time (VmStats::fault_ns around Vm::handle_fault: migrate,
// get_pages, bind) and the job's wall time (submit to fence, through the runtime: adds the
// engine's stall, the fault queue hand-off, the replay and the fence). Then the CPU reads
// every byte back (the pattern and each GPU store) and every page is checked to be in VRAM.
// Baseline: the CPU's first touch of a fresh mapping of the same layout (one one-byte store
// per 4 KiB page through the runtime: a write fault that allocates and zeroes, one THP fault
// per 2 MiB), one sample per unit of the same size, bytes read back after.
// ours = p50 service time; baseline = p50 first touch; ratio = first touch / service.
// Metrics: lat_p50/p90/p99_ns and log2 buckets hist_<lo>_<hi>_us (µs) of the service time;
// the same with the prefixes job_ (job wall time) and cpu_ (first touch). Samples of every
// timed run are pooled (a 2 MiB point has size / 2 MiB samples per run).
#include <algorithm>

#include "tools/gpusvm-bench/migrate_rounds.h"

namespace gpusvm::bench {
namespace {

using mm::Va;

struct Samples {
  std::vector<double> service, job, cpu;
};

void gpu_run(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt, Samples* keep) {
  Layout l = map_layout(rig, g, size);
  fill_layout(rig, l, salt);
  collect_garbage(rig, l);
  const std::vector<Va> units = l.units(g.unit);
  const refgpu::VmStats& vs = rig.vm().stats();
  const StatCounter& by_size = g.unit == (2u << 20) ? vs.faults_2m : g.unit == (64u << 10) ? vs.faults_64k : vs.faults_4k;
  for (Va u : units) {
    rt::CmdBuf cb;
    require_ok(cb.store_qword(u, gpu_value_at(u, salt)), "cmd store_qword");
    const uint64_t f0 = vs.fault_ns.get(), n0 = by_size.get(), v0 = vs.migrations_to_vram.get();
    const uint64_t job = rig.run(cb);
    const uint64_t service = vs.fault_ns.get() - f0;
    if (by_size.get() - n0 != 1 || vs.migrations_to_vram.get() - v0 != 1)
      fail("fault-latency {}: the job at {:#x} took {} faults of the size, {} migrations; expected one each; last faults:{}", g.name,
           u, by_size.get() - n0, vs.migrations_to_vram.get() - v0, rig.recent_faults());
    if (keep) {
      keep->service.push_back(static_cast<double>(service));
      keep->job.push_back(static_cast<double>(job));
    }
  }
  check_residency(rig, l, true, "after the faults");
  check_layout(rig, l, salt, units, "after the faults");
  unmap_layout(rig, l);
}

void cpu_run(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt, Samples* keep) {
  Layout l = map_layout(rig, g, size);
  const auto byte = static_cast<uint8_t>(salt + 1);
  for (Va u : l.units(g.unit)) {
    const uint64_t t0 = now_ns();
    for (Va va = u; va < u + g.unit; va += mm::kPageSize) require_ok(rig.ctx().store<uint8_t>(va, byte), "CPU store");
    if (keep) keep->cpu.push_back(static_cast<double>(now_ns() - t0));
  }
  for (auto [s, e] : l.spans) {
    for (Va va = s; va < e; va += mm::kPageSize) {
      auto v = rig.ctx().load<uint8_t>(va);
      if (!v || *v != byte) fail("fault-latency: first-touch byte at {:#x} lost", va);
      auto z = rig.ctx().load<uint64_t>(va + 8);
      if (!z || *z != 0) fail("fault-latency: first-touched page {:#x} is not zero-filled", va);
    }
  }
  unmap_layout(rig, l);
}

std::vector<Report> run_fault_latency(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), mm::kPmdSize);
  RtRig rig({.ram = 4 * size + (64ull << 20), .vram = size + (8ull << 20), .backend = backend_config(opt)});
  Samples s[kGranules.size()];
  for (int r = 0; r <= opt.repeat; r++) {
    for (size_t k = 0; k < kGranules.size(); k++) {
      Samples* keep = r > 0 ? &s[k] : nullptr;
      const uint64_t salt = static_cast<uint64_t>(r * 8 + static_cast<int>(k));
      if (r % 2) {
        cpu_run(rig, kGranules[k], size, salt, keep);
        gpu_run(rig, kGranules[k], size, salt, keep);
      } else {
        gpu_run(rig, kGranules[k], size, salt, keep);
        cpu_run(rig, kGranules[k], size, salt, keep);
      }
    }
  }
  std::vector<Report> out;
  for (size_t k = 0; k < kGranules.size(); k++) {
    const Granule& g = kGranules[k];
    Report rep;
    rep.case_name = fmt::format("fault-latency-{}", g.name);
    rep.ours = {percentile(s[k].service, 50) / 1000, "us"};
    rep.baseline_name = "cpu-first-touch";
    rep.baseline = {percentile(s[k].cpu, 50) / 1000, "us"};
    rep.ratio = rep.baseline.value / rep.ours.value;
    rep.size = size;
    rep.repeat = opt.repeat;
    rep.detail("{} faults of {} ({}), migrated to VRAM, one job per fault; {} runs pooled", s[k].service.size(),
               human_bytes(g.unit), g.thp ? "THP-backed" : fmt::format("{} MADV_NOHUGEPAGE VMAs", human_bytes(g.piece)),
               opt.repeat);
    auto line = [&](const char* what, const std::vector<double>& v) {
      rep.detail("{}: p50 {:.2f} us, p90 {:.2f} us, p99 {:.2f} us, max {:.2f} us", what, percentile(v, 50) / 1000,
                 percentile(v, 90) / 1000, percentile(v, 99) / 1000, percentile(v, 100) / 1000);
    };
    line("driver service time", s[k].service);
    line("job wall time (submit to fence)", s[k].job);
    line(g.thp ? "CPU first touch (one THP fault)" : "CPU first touch (4 KiB faults)", s[k].cpu);
    latency_metrics(rep, "", s[k].service);
    latency_metrics(rep, "job_", s[k].job);
    latency_metrics(rep, "cpu_", s[k].cpu);
    out.push_back(std::move(rep));
  }
  check_machine(rig.mem(), out.back(), "after the family (data unmapped)");
  out.back().detail("verified: one fault and one migration per job, residency, every byte read back by the CPU");
  return out;
}

const Registrar kFaultLatency({
    .name = "fault-latency",
    .family = "fault-latency",
    .summary = "refgpu GPU fault service-time histogram by size (4 KiB / 64 KiB / 2 MiB, to VRAM), vs CPU first touch",
    .default_size = 16ULL << 20,
    .run_many = run_fault_latency,
});

}  // namespace
}  // namespace gpusvm::bench
