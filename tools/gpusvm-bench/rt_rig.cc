// The runtime rig and the granularity layouts of the runtime-driven refgpu cases (rt_rig.h).
#include "tools/gpusvm-bench/rt_rig.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>

#include "drivers/devfs/process.h"

namespace gpusvm::bench {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

refgpu::BackendConfig backend_config(const Options& opt) {
  auto kind = refgpu::parse_backend_kind(opt.backend);
  if (!kind || *kind == refgpu::BackendKind::kAuto) fail("unknown backend '{}' (host or vulkan)", opt.backend);
  return {.kind = *kind, .vulkan_device = opt.vulkan_device};
}

RtRig::RtRig(const RtRigConfig& cfg) : cfg_(cfg) {
  auto m = devfs::Machine::create({.ram_bytes = cfg.ram});
  if (!m) require_ok(m.error(), "Machine::create");
  machine_ = std::move(*m);
  refgpu::DeviceConfig dc;
  dc.vram_sizes = {mm::pmd_align_up(cfg.vram)};
  dc.num_engines = cfg.engines;
  dc.fault_threads = cfg.fault_threads;
  dc.copy_threads = cfg.copy_threads;
  dc.backend = cfg.backend;
  auto d = refgpu::RefgpuDevice::create(&machine_->mem(), dc);
  if (!d) require_ok(d.error(), fmt::format("RefgpuDevice::create on backend '{}'", refgpu::backend_kind_name(cfg.backend.kind)));
  device_ = *d;
  require_ok(machine_->add_device("refgpu0", device_), "add_device");
  auto p = machine_->create_process();
  if (!p) require_ok(p.error(), "create_process");
  proc_ = *p;
  auto dev = rt::Device::open(*proc_, 0);
  if (!dev) require_ok(dev.error(), "gpusvm_rt_device_open");
  dev_ = std::move(*dev);
  auto c = rt::Context::create(dev_);
  if (!c) require_ok(c.error(), "gpusvm_rt_context_create");
  ctx_ = std::move(*c);
  for (uint16_t e = 0; e < cfg.engines; e++) {
    for (uint16_t q = 0; q < cfg.queues_per_engine; q++) {
      auto qq = rt::Queue::create(ctx_, e);
      if (!qq) require_ok(qq.error(), "gpusvm_rt_queue_create");
      queues_.push_back(std::move(*qq));
    }
  }
  // Warm-up: one empty job per queue faults the runtime's internal heap (batches, fence
  // slots) in once (a read fault of the batch, a write fault of the fence), so that the timed
  // jobs take only the faults of their data.
  for (size_t q = 0; q < queues_.size(); q++) {
    rt::CmdBuf empty;
    run(empty, q);
  }
  auto info = dev_.info();
  if (!info) require_ok(info.error(), "gpusvm_rt_device_get_info");
  auto file = std::dynamic_pointer_cast<refgpu::RefgpuFile>(proc_->fd_get(info->fd));
  if (!file) fail("refgpu0: the runtime's device file is not a refgpu file");
  vm_ = file->find_vm(ctx_.vm_id());
  if (!vm_) fail("refgpu0: the context's VM {} is not in its file", ctx_.vm_id());
}

RtRig::~RtRig() {
  vm_.reset();
  queues_.clear();
  (void)ctx_.reset();
  (void)dev_.reset();
  machine_->shutdown();
}

std::vector<uint64_t> RtRig::stats() {
  auto s = dev_.stats();
  if (!s) require_ok(s.error(), "gpusvm_rt_device_stats");
  if (s->size() < REFGPU_STAT_COUNT) fail("device stats: {} values, expected {}", s->size(), int{REFGPU_STAT_COUNT});
  return *s;
}

void RtRig::wait(const rt::Fence& f, const char* what) {
  const int rc = f.wait(kRtWaitNs);
  if (rc == 0) return;
  auto e = f.error();
  if (e && e->has_fault)
    fail("{}: job failed: {} (fault at {:#x}, access {})", what, gpusvm_rt_strerror(rc), e->address, e->access);
  fail("{}: {}", what, gpusvm_rt_strerror(rc));
}

uint64_t RtRig::run(const rt::CmdBuf& cb, size_t qi) {
  const uint64_t t0 = now_ns();
  auto f = queues_.at(qi).submit(cb);
  if (!f) require_ok(f.error(), "gpusvm_rt_submit");
  wait(*f, "job");
  return now_ns() - t0;
}

std::string RtRig::recent_faults(size_t n) {
  const std::vector<refgpu::FaultRecord> rec = device_->fault_queue().records(0, false);
  std::string out;
  for (size_t i = rec.size() > n ? rec.size() - n : 0; i < rec.size(); i++)
    out += fmt::format(" [{:#x} access {} status {}]", rec[i].fault.address, static_cast<int>(rec[i].fault.access),
                       rec[i].status);
  return out;
}

void RtRig::prefetch(Va addr, uint64_t len, uint32_t region) {
  auto f = ctx_.prefetch(addr, len, region);
  if (!f) require_ok(f.error(), fmt::format("gpusvm_rt_prefetch to region {}", region));
  wait(*f, "prefetch");
}

// ---- layouts ----

uint64_t Layout::bytes() const {
  uint64_t b = 0;
  for (auto [s, e] : spans) b += e - s;
  return b;
}

std::vector<Va> Layout::units(uint64_t unit) const {
  std::vector<Va> u;
  for (auto [s, e] : spans)
    for (Va v = s; v < e; v += unit) u.push_back(v);
  return u;
}

Layout map_layout(RtRig& rig, const Granule& g, uint64_t size) {
  Layout l;
  // 2 MiB of slack: the spans start 2 MiB aligned, so every unit is aligned to its size.
  l.len = (g.piece ? 2 * size : size) + kPmdSize;
  auto va = rig.ctx().mmap(l.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!va) require_ok(va.error(), "gpusvm_rt_mmap data");
  l.base = *va;
  require_ok(rig.ctx().madvise_host(l.base, l.len, g.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), "madvise THP hint");
  const Va a = mm::pmd_align_up(l.base);
  if (g.piece) {
    for (Va p = a; p < a + 2 * size; p += 2 * g.piece) {
      l.spans.emplace_back(p, p + g.piece);
      require_ok(rig.ctx().mprotect(p + g.piece, g.piece, PROT_READ), "mprotect separator");
    }
  } else {
    l.spans.emplace_back(a, a + size);
  }
  return l;
}

void unmap_layout(RtRig& rig, const Layout& l) { require_ok(rig.ctx().munmap(l.base, l.len), "gpusvm_rt_munmap data"); }

void fill_layout(RtRig& rig, const Layout& l, uint64_t salt) {
  std::vector<uint64_t> buf;
  for (auto [s, e] : l.spans) {
    buf.resize((e - s) / 8);
    for (uint64_t i = 0; i < buf.size(); i++) buf[i] = pattern_at(s + 8 * i, salt);
    require_ok(rig.ctx().write(s, std::span<const uint64_t>(buf)), "gpusvm_rt_write pattern");
  }
}

void check_layout(RtRig& rig, const Layout& l, uint64_t salt, std::span<const Va> gpu_stored, const char* when) {
  std::vector<uint64_t> buf;
  auto next = gpu_stored.begin();
  for (auto [s, e] : l.spans) {
    buf.resize((e - s) / 8);
    require_ok(rig.ctx().read(s, std::span<uint64_t>(buf)), "gpusvm_rt_read data");
    for (uint64_t i = 0; i < buf.size(); i++) {
      const Va va = s + 8 * i;
      while (next != gpu_stored.end() && *next < va) next++;
      const bool gpu = next != gpu_stored.end() && *next == va;
      const uint64_t want = gpu ? gpu_value_at(va, salt) : pattern_at(va, salt);
      if (buf[i] != want)
        fail("{}: qword at {:#x} reads {:#x}, expected {:#x} ({})", when, va, buf[i], want,
             gpu ? "a GPU store" : "the CPU's pattern");
    }
  }
}

void check_residency(RtRig& rig, const Layout& l, bool device, const char* when) {
  for (auto [s, e] : l.spans) {
    auto r = rig.ctx().residency(s, e - s);
    if (!r) require_ok(r.error(), "gpusvm_rt_query_residency");
    const uint64_t want = (e - s) / kPageSize;
    if ((device ? r->device : r->system) != want)
      fail("{}: span {:#x}+{}: {} pages in VRAM, {} in system memory, {} not present; expected all {} in {}", when, s,
           human_bytes(e - s), r->device, r->system, r->none, want, device ? "VRAM" : "system memory");
  }
}

// ---- statistics ----

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = std::ceil(p / 100.0 * static_cast<double>(v.size()));
  const size_t i = rank < 1 ? 0 : std::min(v.size() - 1, static_cast<size_t>(rank) - 1);
  return v[i];
}

void latency_metrics(Report& rep, const std::string& prefix, const std::vector<double>& ns) {
  rep.metric(prefix + "lat_p50_ns", percentile(ns, 50));
  rep.metric(prefix + "lat_p90_ns", percentile(ns, 90));
  rep.metric(prefix + "lat_p99_ns", percentile(ns, 99));
  rep.metric(prefix + "samples", static_cast<double>(ns.size()));
  // log2 buckets in µs: [0, 1), [1, 2), [2, 4), ... up to the largest sample.
  std::vector<uint64_t> counts;
  for (double x : ns) {
    const double us = x / 1000;
    size_t b = us < 1 ? 0 : static_cast<size_t>(std::floor(std::log2(us))) + 1;
    if (counts.size() <= b) counts.resize(b + 1);
    counts[b]++;
  }
  for (size_t b = 0; b < counts.size(); b++) {
    const uint64_t lo = b == 0 ? 0 : 1ull << (b - 1), hi = 1ull << b;
    rep.metric(fmt::format("{}hist_{}_{}_us", prefix, lo, hi), static_cast<double>(counts[b]));
  }
}

}  // namespace gpusvm::bench
