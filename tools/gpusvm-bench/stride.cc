// Case family "stride": IGT xe_exec_system_allocator's many-stride: a job that stores one
// qword every 40 KiB over a malloc'd buffer (STORE_STRIDED) and then loads them back checking
// each (LOAD_STRIDED with CHECK and SUM), timed three ways on fresh buffers of the same size in
// the same run:
//   fault-driven: the job faults the buffer in (preferred location: the device, the default),
//                 one 2 MiB range migrated to VRAM per fault;
//   prefetched:   gpusvm_rt_prefetch to VRAM, then the job (both timed);
//   pre-migrated: the same prefetch untimed, then the job alone (no fault).
// ours = fault-driven job time; baseline = pre-migrated job time (the job without any
// migration); ratio = pre-migrated / fault-driven (< 1: what faulting costs). The prefetched
// time is printed next to them.
// Each buffer: gpusvm_rt_aligned_alloc(2 MiB, size) (a mapping of its own, 4 KiB pages),
// CPU-filled with a pattern (untimed); after the job the CPU reads every byte: the records
// hold the strided values, everything else the pattern, and the GPU's sum is right. Checked
// too: the fault counts (one 2 MiB fault per 2 MiB of buffer when fault-driven, none
// otherwise) and that every page is in VRAM after the job.
#include <algorithm>

#include "tools/gpusvm-bench/migrate_rounds.h"

namespace gpusvm::bench {
namespace {

using mm::Va;

constexpr uint64_t kStride = 40 << 10;
constexpr uint64_t kValue0 = 1000, kIncrement = 7;

enum Mode { kFault, kPrefetched, kPremigrated, kModes };
constexpr const char* kModeNames[kModes] = {"fault-driven", "prefetched", "pre-migrated"};

struct RunOut {
  uint64_t ns = 0;
  uint64_t faults = 0;
};

RunOut stride_run(RtRig& rig, Mode mode, uint64_t size, uint64_t salt, Va sum) {
  auto a = rig.ctx().aligned_alloc(mm::kPmdSize, size);
  if (!a) require_ok(a.error(), "gpusvm_rt_aligned_alloc");
  Layout l{.base = *a, .len = size, .spans = {{*a, *a + size}}};
  fill_layout(rig, l, salt);
  collect_garbage(rig, l);
  const uint64_t records = size / kStride;
  rt::CmdBuf cb;
  require_ok(cb.store_strided(REFGPU_CMD_FLAG_QWORD, *a, kStride, records, kValue0 + salt, kIncrement), "cmd store_strided");
  require_ok(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM, *a,
                             kStride, records, kValue0 + salt, kIncrement, sum),
             "cmd load_strided");
  if (mode == kPremigrated) rig.prefetch(*a, size, 1);
  // Engine-raised faults (the driver's REFGPU_STAT_FAULTS_* count prefetch services too).
  const StatCounter& raised = rig.device().fault_queue().stats().raised;
  const uint64_t r0 = raised.get();
  const std::vector<uint64_t> s0 = rig.stats();
  const uint64_t t0 = now_ns();
  if (mode == kPrefetched) rig.prefetch(*a, size, 1);
  rig.run(cb);
  RunOut out;
  out.ns = now_ns() - t0;
  const std::vector<uint64_t> s1 = rig.stats();
  out.faults = s1[REFGPU_STAT_FAULTS_2M] - s0[REFGPU_STAT_FAULTS_2M] + s1[REFGPU_STAT_FAULTS_64K] -
               s0[REFGPU_STAT_FAULTS_64K] + s1[REFGPU_STAT_FAULTS_4K] - s0[REFGPU_STAT_FAULTS_4K];
  // Fault-driven: one 2 MiB fault per 2 MiB; prefetched: the prefetch's one 2 MiB service per
  // 2 MiB and no engine fault; pre-migrated: nothing.
  const uint64_t n2m = size / mm::kPmdSize;
  const uint64_t want_raised = mode == kFault ? n2m : 0, want_services = mode == kPremigrated ? 0 : n2m;
  if (raised.get() - r0 != want_raised || out.faults != want_services ||
      s1[REFGPU_STAT_FAULTS_2M] - s0[REFGPU_STAT_FAULTS_2M] != want_services)
    fail("stride {}: {} engine faults, {} services ({} of 2 MiB), expected {} and {} of 2 MiB", kModeNames[mode],
         raised.get() - r0, out.faults, s1[REFGPU_STAT_FAULTS_2M] - s0[REFGPU_STAT_FAULTS_2M], want_raised, want_services);
  out.faults = raised.get() - r0;
  check_residency(rig, l, true, kModeNames[mode]);
  // Every byte: the records, the pattern around them, the sum.
  std::vector<uint64_t> buf(size / 8);
  require_ok(rig.ctx().read(*a, std::span<uint64_t>(buf)), "gpusvm_rt_read buffer");
  uint64_t want_sum = 0;
  for (uint64_t i = 0; i < buf.size(); i++) {
    const uint64_t off = i * 8;
    const bool rec = off % kStride == 0 && off / kStride < records;
    const uint64_t want = rec ? kValue0 + salt + kIncrement * (off / kStride) : pattern_at(*a + off, salt);
    if (rec) want_sum += want;
    if (buf[i] != want)
      fail("stride {}: qword at +{:#x} reads {:#x}, expected {:#x}", kModeNames[mode], off, buf[i], want);
  }
  auto got = rig.ctx().load<uint64_t>(sum);
  if (!got || *got != want_sum) fail("stride {}: the GPU's sum is {}, expected {}", kModeNames[mode], got ? *got : 0, want_sum);
  require_ok(rig.ctx().free(*a), "gpusvm_rt_free");
  return out;
}

Report run_stride(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), mm::kPmdSize);
  RtRig rig({.ram = size + (96ull << 20), .vram = size + (8ull << 20), .backend = backend_config(opt)});
  // The sum's qword: system memory, bound before the timed jobs so it adds no fault.
  auto sum = rig.ctx().malloc(8);
  if (!sum) require_ok(sum.error(), "gpusvm_rt_malloc sum");
  require_ok(rig.ctx().advise_preferred(*sum, 8, GPUSVM_RT_LOCATION_SYSTEM), "advise sum to system");
  require_ok(rig.ctx().store<uint64_t>(*sum, 0), "write sum");
  rig.prefetch(*sum, 8, 0);
  std::vector<double> ns[kModes];
  uint64_t faults = 0;
  for (int r = 0; r <= opt.repeat; r++) {
    for (int i = 0; i < kModes; i++) {
      const Mode m = static_cast<Mode>((i + r) % kModes);  // rotate the order
      const RunOut o = stride_run(rig, m, size, static_cast<uint64_t>(r * 4 + m), *sum);
      if (r > 0) ns[m].push_back(static_cast<double>(o.ns));
      if (m == kFault) faults = o.faults;
    }
  }
  Report rep;
  rep.case_name = "stride";
  rep.ours = {median(ns[kFault]) / 1e6, "ms"};
  rep.baseline_name = "pre-migrated";
  rep.baseline = {median(ns[kPremigrated]) / 1e6, "ms"};
  rep.ratio = rep.baseline.value / rep.ours.value;
  rep.size = size;
  rep.repeat = opt.repeat;
  auto ms = [](const std::vector<double>& v) {
    std::vector<double> o;
    for (double x : v) o.push_back(x / 1e6);
    return o;
  };
  rep.detail("{} malloc'd (aligned_alloc 2 MiB), {} records 40 KiB apart, STORE_STRIDED then LOAD_STRIDED CHECK|SUM",
             human_bytes(size), size / kStride);
  for (int m = 0; m < kModes; m++)
    rep.detail("{}: median {:.3f} ms, per-run ms {}", kModeNames[m], median(ns[m]) / 1e6, runs_string(ms(ns[m])));
  rep.detail("fault-driven: {} faults of 2 MiB ({:.1f} us each, job wall / faults)", faults,
             median(ns[kFault]) / 1000 / static_cast<double>(faults));
  rep.metric("fault_driven_ms", median(ns[kFault]) / 1e6);
  rep.metric("prefetched_ms", median(ns[kPrefetched]) / 1e6);
  rep.metric("premigrated_ms", median(ns[kPremigrated]) / 1e6);
  rep.metric("faults", static_cast<double>(faults));
  require_ok(rig.ctx().free(*sum), "gpusvm_rt_free sum");
  check_machine(rig.mem(), rep, "after the family (buffers freed)");
  rep.detail("verified: fault counts, residency, every record and every other byte, the GPU's sum");
  return rep;
}

const Registrar kStrideCase({
    .name = "stride",
    .family = "stride",
    .summary = "IGT many-stride (40 KiB records): fault-driven vs prefetched vs pre-migrated job time",
    .default_size = 64ULL << 20,
    .run = run_stride,
});

}  // namespace
}  // namespace gpusvm::bench
