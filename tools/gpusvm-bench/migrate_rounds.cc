// The prefetch and fault-driven migration rounds (migrate_rounds.h).
#include "tools/gpusvm-bench/migrate_rounds.h"

#include <algorithm>

namespace gpusvm::bench {

using mm::Va;

void collect_garbage(RtRig& rig, const Layout& l) {
  auto a = rig.ctx().attrs(l.base, mm::kPageSize);
  if (!a) require_ok(a.error(), "gpusvm_rt_query_attrs");
}

PrefetchTimes prefetch_round(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt) {
  Layout l = map_layout(rig, g, size);
  fill_layout(rig, l, salt);
  collect_garbage(rig, l);
  const std::vector<uint64_t> s0 = rig.stats();
  PrefetchTimes t;
  t.calls = l.spans.size();
  uint64_t t0 = now_ns();
  for (auto [s, e] : l.spans) rig.prefetch(s, e - s, 1);
  t.to_vram_ns = now_ns() - t0;
  const std::vector<uint64_t> s1 = rig.stats();
  check_residency(rig, l, true, "after the prefetch to VRAM");
  t0 = now_ns();
  for (auto [s, e] : l.spans) rig.prefetch(s, e - s, 0);
  t.to_sys_ns = now_ns() - t0;
  const std::vector<uint64_t> s2 = rig.stats();
  check_residency(rig, l, false, "after the prefetch to system memory");
  const uint64_t units = l.bytes() / g.unit;
  const uint64_t to_vram = s1[REFGPU_STAT_MIGRATIONS_TO_VRAM] - s0[REFGPU_STAT_MIGRATIONS_TO_VRAM];
  const uint64_t to_sys = s2[REFGPU_STAT_MIGRATIONS_TO_SMEM] - s1[REFGPU_STAT_MIGRATIONS_TO_SMEM];
  const uint64_t bytes_in = s1[REFGPU_STAT_COPY_BYTES_TO_VRAM] - s0[REFGPU_STAT_COPY_BYTES_TO_VRAM];
  const uint64_t bytes_out = s2[REFGPU_STAT_COPY_BYTES_TO_SMEM] - s1[REFGPU_STAT_COPY_BYTES_TO_SMEM];
  if (to_vram != units || to_sys != units || bytes_in != l.bytes() || bytes_out != l.bytes())
    fail("prefetch {}: {} ranges, migrations to VRAM / system {} / {}, bytes copied {} / {}; expected {} and {}", g.name,
         units, to_vram, to_sys, bytes_in, bytes_out, units, l.bytes());
  check_layout(rig, l, salt, {}, "after the prefetch round trip");
  unmap_layout(rig, l);
  return t;
}

FaultTimes fault_round(RtRig& rig, const Granule& g, uint64_t size, uint64_t salt) {
  Layout l = map_layout(rig, g, size);
  fill_layout(rig, l, salt);
  collect_garbage(rig, l);
  for (auto [s, e] : l.spans)
    require_ok(rig.ctx().advise_preferred(s, e - s, GPUSVM_RT_LOCATION_DEVICE, REFGPU_MIGRATE_ALL_PAGES),
               "advise preferred location VRAM");
  const std::vector<Va> units = l.units(g.unit);
  const size_t nq = rig.num_queues();
  std::vector<rt::CmdBuf> cbs(nq);
  for (size_t i = 0; i < units.size(); i++)
    require_ok(cbs[i % nq].store_qword(units[i], gpu_value_at(units[i], salt)), "cmd store_qword");
  const std::vector<uint64_t> s0 = rig.stats();
  const refgpu::VmStats& vs = rig.vm().stats();
  const uint64_t fns0 = vs.fault_ns.get(), mns0 = vs.migrate_ns.get();
  const uint64_t t0 = now_ns();
  std::vector<rt::Fence> fences;
  for (size_t q = 0; q < nq; q++) {
    auto f = rig.queue(q / rig.config().queues_per_engine, q % rig.config().queues_per_engine).submit(cbs[q]);
    if (!f) require_ok(f.error(), "gpusvm_rt_submit");
    fences.push_back(std::move(*f));
  }
  for (const rt::Fence& f : fences) RtRig::wait(f, "fault-migrate job");
  FaultTimes t;
  t.ns = now_ns() - t0;
  t.fault_ns = vs.fault_ns.get() - fns0;
  t.migrate_ns = vs.migrate_ns.get() - mns0;
  const std::vector<uint64_t> s1 = rig.stats();
  auto d = [&](int i) { return s1[static_cast<size_t>(i)] - s0[static_cast<size_t>(i)]; };
  const int by_size = g.unit == (2u << 20) ? REFGPU_STAT_FAULTS_2M : g.unit == (64u << 10) ? REFGPU_STAT_FAULTS_64K : REFGPU_STAT_FAULTS_4K;
  t.faults = d(by_size);
  if (t.faults != units.size() || d(REFGPU_STAT_MIGRATIONS_TO_VRAM) != units.size() || d(REFGPU_STAT_FAULT_ERRORS) != 0 ||
      d(REFGPU_STAT_COPY_BYTES_TO_VRAM) != l.bytes())
    fail("fault-migrate {}: {} units took {} {} faults, {} migrations to VRAM, {} errors, {} bytes copied", g.name,
         units.size(), t.faults, g.name, d(REFGPU_STAT_MIGRATIONS_TO_VRAM), d(REFGPU_STAT_FAULT_ERRORS),
         d(REFGPU_STAT_COPY_BYTES_TO_VRAM));
  check_residency(rig, l, true, "after the fault-driven migration");
  check_layout(rig, l, salt, units, "after the fault-driven migration");
  unmap_layout(rig, l);
  return t;
}

}  // namespace gpusvm::bench
