// Case family "fault-migrate": GB/s of engine faults serviced by migrations to VRAM, next to
// prefetching the same bytes to VRAM on the same device in the same run.
//
// The device has 4 engines (one exec queue each) and 2 fault-handler threads. Each run, for
// each granularity (rt_rig.h's layouts: 2 MiB ranges of a THP-backed buffer, 64 KiB and 4 KiB
// ranges of MADV_NOHUGEPAGE VMAs): (1) a prefetch round (migrate_rounds.h: the baseline, its
// system -> VRAM half); (2) a fault round: a fresh buffer of the same layout, CPU-filled,
// preferred location VRAM, one job per queue storing one qword into each of its units (unit i
// on queue i % 4, so four neighbouring faults are in flight at once), timed from the first
// submit to the last fence. Checked: one fault of the granule's size and one migration per
// unit, every page in VRAM, every byte (pattern and GPU stores) read back by the CPU.
// ours = fault-driven GB/s; baseline = prefetch GB/s (system -> VRAM); ratio = ours / prefetch.
#include <algorithm>

#include "tools/gpusvm-bench/migrate_rounds.h"

namespace gpusvm::bench {
namespace {

constexpr uint16_t kEngines = 4;

struct Series {
  std::vector<double> fault_ns, prefetch_ns, service_ns, migrate_ns;
  uint64_t faults = 0;
};

std::vector<Report> run_fault_migrate(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), mm::kPmdSize);
  RtRig rig({.ram = 2 * size + (64ull << 20), .vram = size + (8ull << 20), .engines = kEngines, .fault_threads = 2,
             .backend = backend_config(opt)});
  Series ser[kGranules.size()];
  for (int r = 0; r <= opt.repeat; r++) {
    const bool keep = r > 0;
    for (size_t k = 0; k < kGranules.size(); k++) {
      const uint64_t salt = static_cast<uint64_t>(r * 16 + static_cast<int>(k) * 2);
      // Alternate which side runs first.
      PrefetchTimes pt;
      FaultTimes ft;
      if (r % 2) {
        ft = fault_round(rig, kGranules[k], size, salt + 1);
        pt = prefetch_round(rig, kGranules[k], size, salt);
      } else {
        pt = prefetch_round(rig, kGranules[k], size, salt);
        ft = fault_round(rig, kGranules[k], size, salt + 1);
      }
      if (keep) {
        ser[k].fault_ns.push_back(static_cast<double>(ft.ns));
        ser[k].prefetch_ns.push_back(static_cast<double>(pt.to_vram_ns));
        ser[k].service_ns.push_back(static_cast<double>(ft.fault_ns));
        ser[k].migrate_ns.push_back(static_cast<double>(ft.migrate_ns));
        ser[k].faults = ft.faults;
      }
    }
  }
  auto gbs = [&](double ns) { return static_cast<double>(size) / ns; };
  std::vector<Report> out;
  for (size_t k = 0; k < kGranules.size(); k++) {
    const Granule& g = kGranules[k];
    const Series& s = ser[k];
    Report rep;
    rep.case_name = fmt::format("fault-migrate-{}", g.name);
    rep.ours = {gbs(median(s.fault_ns)), "GB/s"};
    rep.baseline_name = "prefetch";
    rep.baseline = {gbs(median(s.prefetch_ns)), "GB/s"};
    rep.ratio = rep.ours.value / rep.baseline.value;
    rep.size = size;
    rep.repeat = opt.repeat;
    std::vector<double> f_runs, p_runs;
    for (double ns : s.fault_ns) f_runs.push_back(gbs(ns));
    for (double ns : s.prefetch_ns) p_runs.push_back(gbs(ns));
    rep.detail("{} in {} {} faults ({}) on {} engines, preferred location VRAM: per-run GB/s {}; prefetch to VRAM {}",
               human_bytes(size), s.faults, human_bytes(g.unit),
               g.thp ? "THP-backed" : fmt::format("{} MADV_NOHUGEPAGE VMAs", human_bytes(g.piece)), kEngines,
               runs_string(f_runs), runs_string(p_runs));
    const double nf = static_cast<double>(s.faults);
    rep.detail("per fault (median): job wall {:.2f} us, driver service {:.2f} us of which migrate {:.2f} us; prefetch "
               "{:.2f} us per range",
               median(s.fault_ns) / 1000 / nf, median(s.service_ns) / 1000 / nf, median(s.migrate_ns) / 1000 / nf,
               median(s.prefetch_ns) / 1000 / nf);
    rep.metric("us_per_fault", median(s.fault_ns) / 1000 / nf);
    rep.metric("service_us_per_fault", median(s.service_ns) / 1000 / nf);
    rep.metric("migrate_us_per_fault", median(s.migrate_ns) / 1000 / nf);
    rep.metric("granule_bytes", static_cast<double>(g.unit));
    out.push_back(std::move(rep));
  }
  check_machine(rig.mem(), out.back(), "after the family (data unmapped)");
  out.back().detail("verified: fault sizes and counts, one migration per fault, residency, every byte read back by the CPU");
  return out;
}

const Registrar kFaultMigrate({
    .name = "fault-migrate",
    .family = "fault-migrate",
    .summary = "refgpu engine faults serviced by migration to VRAM (4 engines), 2 MiB / 64 KiB / 4 KiB, vs prefetch",
    .default_size = 32ULL << 20,
    .run_many = run_fault_migrate,
});

}  // namespace
}  // namespace gpusvm::bench
