// Case family "refgpu-copy": the reference GPU's copy engine (drivers/refgpu/copy_engine.h),
// RAM -> VRAM and VRAM -> RAM, in requests of 4 KiB, 64 KiB and 2 MiB, with the host backend
// copying alone (1 thread: the caller) and with workers (N threads: the caller and N - 1
// workers, threshold 0 so that every request goes through the worker hand-off and the
// figure shows where the hand-off pays and where it costs). The device itself builds its copy
// engine with the caller alone (drivers/refgpu/device.cc).
//
// Data: `size` bytes of system memory in 2 MiB folios (order 9: a request's pages are
// contiguous, so the engine merges each request into one region, as it does for a THP or a
// VRAM block) and the same bytes of a VramArena. Each run refills the source (untimed), copies
// every request through the engine (timed: the request loop), then compares every byte of
// the destination with the source (untimed). VRAM -> RAM copies into a second set of folios.
// Baseline: memcpy of the same requests between the same buffers in the same run (the
// backend's ceiling: it is memcpy behind validation, merging and statistics).
// Figure: GB/s (10^9 bytes per second) of the median run; ratio = ours / memcpy.
// --backend vulkan: VRAM and the engine's copy backend on the Vulkan device, one engine (no
// copy threads: the queue copies), cases named refgpu-copy-<dir>-<size>-vulkan, and the
// baseline is the backend's ceiling: the same bytes in one vkCmdCopyBuffer region on the
// same queue (copy_ceiling.h).
#include <algorithm>
#include <array>
#include <cstring>
#include <thread>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vram.h"
#include "gpusvm/mm/physmem.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/copy_ceiling.h"
#include "tools/gpusvm-bench/rt_rig.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;

constexpr std::array<uint64_t, 3> kRequestSizes = {4096, 64 << 10, 2 << 20};

unsigned worker_threads() { return std::clamp(std::thread::hardware_concurrency(), 2u, 4u); }

// System pages in order-9 folios; pfns[i] is page i.
struct SysBuffer {
  mm::PhysMem* mem = nullptr;
  std::vector<mm::Folio*> folios;
  std::vector<mm::Pfn> pfns;
  SysBuffer(mm::PhysMem* m, uint64_t size) : mem(m) {
    for (uint64_t off = 0; off < size; off += kPmdSize) {
      mm::Folio* f = mem->folio_alloc(mm::kPmdOrder, true);
      if (!f) fail("refgpu-copy: no 2 MiB folio for the system buffer");
      folios.push_back(f);
      for (uint64_t i = 0; i < mm::kPagesPerPmd; i++) pfns.push_back(f->pfn() + i);
    }
  }
  ~SysBuffer() {
    for (mm::Folio* f : folios) f->put();
  }
  SysBuffer(const SysBuffer&) = delete;
  SysBuffer& operator=(const SysBuffer&) = delete;
  std::byte* page(uint64_t i) const { return mem->ram_data(pfns[i]); }
};

void fill(std::byte* p, uint64_t len, uint64_t salt) {
  for (uint64_t off = 0; off < len; off += 8) {
    const uint64_t v = (off * 0x9e3779b97f4a7c15ULL) ^ salt;
    std::memcpy(p + off, &v, 8);
  }
}

struct Point {
  std::vector<double> ns[2];  // [threads 1, N] engine runs
  std::vector<double> memcpy_ns;
};

std::vector<Report> run_copy(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), kPmdSize);
  const uint64_t npages = size / kPageSize;
  const refgpu::BackendConfig bc = backend_config(opt);
  const bool vk = bc.kind == refgpu::BackendKind::kVulkan;
  auto mem_or = mm::PhysMem::create({.ram_bytes = (vk ? 3 : 2) * size + (16ULL << 20)});
  if (!mem_or) require_ok(mem_or.error(), "PhysMem::create");
  std::unique_ptr<mm::PhysMem> mem = std::move(*mem_or);
  auto backend = refgpu::open_backend(bc);
  if (!backend) require_ok(backend.error(), fmt::format("open_backend '{}'", opt.backend));
  auto vram_or = refgpu::VramArena::create(**backend, size);
  if (!vram_or) require_ok(vram_or.error(), "VramArena::create");
  std::unique_ptr<refgpu::VramArena> vram = std::move(*vram_or);
  const unsigned n = worker_threads();
  // Host: the caller alone and N threads. Vulkan: one engine (the queue copies).
  std::vector<std::unique_ptr<refgpu::CopyEngine>> engines;
  auto add_engine = [&](unsigned workers) {
    auto cb = (*backend)->make_copy(mem.get(), workers, 0);
    if (!cb) require_ok(cb.error(), "Backend::make_copy");
    engines.push_back(std::make_unique<refgpu::CopyEngine>(mem.get(), vram.get(), std::move(*cb)));
  };
  add_engine(0);
  if (!vk) add_engine(n - 1);
  const int nengines = static_cast<int>(engines.size());
  std::unique_ptr<CopyCeiling> ceiling;
  if (vk) ceiling = std::make_unique<CopyCeiling>(*mem, **backend, size);
  SysBuffer src(mem.get(), size), back(mem.get(), size);
  std::vector<uint64_t> offs(npages);
  for (uint64_t i = 0; i < npages; i++) offs[i] = i * kPageSize;
  // The memcpy baseline copies each request as one block: the arena is contiguous, and a
  // request (at most 2 MiB, 2 MiB aligned in the page list) never leaves its folio.
  std::byte* const vram0 = vram->data(0);
  auto same = [&](const SysBuffer& b, const std::byte* v) {
    for (uint64_t f = 0; f < b.folios.size(); f++) {
      if (std::memcmp(b.page(f * mm::kPagesPerPmd), v + f * kPmdSize, kPmdSize) != 0) return false;
    }
    return true;
  };

  // [direction 0 to VRAM, 1 to RAM][request size]
  Point pts[2][kRequestSizes.size()];
  for (int r = 0; r <= opt.repeat; r++) {
    const bool keep = r > 0;
    for (size_t k = 0; k < kRequestSizes.size(); k++) {
      const uint64_t req = kRequestSizes[k];
      const uint64_t rp = req / kPageSize;
      for (int t = 0; t < nengines; t++) {
        refgpu::CopyEngine& ce = *engines[static_cast<size_t>(t)];
        const uint64_t salt = static_cast<uint64_t>(r * 100 + static_cast<int>(k) * 10 + t);
        for (uint64_t f = 0; f < src.folios.size(); f++) fill(src.page(f * mm::kPagesPerPmd), kPmdSize, salt);
        uint64_t t0 = now_ns();
        for (uint64_t p = 0; p < npages; p += rp) {
          require_ok(ce.copy_to_vram(&src.pfns[p], &offs[p], rp), "copy_to_vram");
        }
        uint64_t t1 = now_ns();
        if (keep) pts[0][k].ns[t].push_back(static_cast<double>(t1 - t0));
        for (uint64_t p = 0; p < npages; p++) {
          if (std::memcmp(vram->data(offs[p]), src.page(p), kPageSize) != 0)
            fail("refgpu-copy: VRAM page {} differs after copy_to_vram ({} requests, {} threads)", p,
                 human_bytes(req), t ? n : 1);
        }
        t0 = now_ns();
        for (uint64_t p = 0; p < npages; p += rp) {
          require_ok(ce.copy_to_ram(&offs[p], &back.pfns[p], rp), "copy_to_ram");
        }
        t1 = now_ns();
        if (keep) pts[1][k].ns[t].push_back(static_cast<double>(t1 - t0));
        for (uint64_t p = 0; p < npages; p++) {
          if (std::memcmp(back.page(p), src.page(p), kPageSize) != 0)
            fail("refgpu-copy: system page {} differs after copy_to_ram ({} requests, {} threads)", p,
                 human_bytes(req), t ? n : 1);
        }
      }
      if (vk) {  // the backend's ceiling: the same bytes in one region each way
        const uint64_t salt = static_cast<uint64_t>(r * 100 + static_cast<int>(k) * 10 + 9);
        const uint64_t m0 = ceiling->to_vram_ns(salt), m1 = ceiling->to_sys_ns(salt + 1);
        if (keep) {
          pts[0][k].memcpy_ns.push_back(static_cast<double>(m0));
          pts[1][k].memcpy_ns.push_back(static_cast<double>(m1));
        }
        continue;
      }
      // memcpy of the same requests, both directions (a request never crosses a folio).
      const uint64_t salt = static_cast<uint64_t>(r * 100 + static_cast<int>(k) * 10 + 9);
      for (uint64_t f = 0; f < src.folios.size(); f++) fill(src.page(f * mm::kPagesPerPmd), kPmdSize, salt);
      uint64_t t0 = now_ns();
      for (uint64_t p = 0; p < npages; p += rp) std::memcpy(vram0 + p * kPageSize, src.page(p), req);
      uint64_t t1 = now_ns();
      if (keep) pts[0][k].memcpy_ns.push_back(static_cast<double>(t1 - t0));
      if (!same(src, vram0)) fail("refgpu-copy: memcpy baseline to VRAM differs");
      t0 = now_ns();
      for (uint64_t p = 0; p < npages; p += rp) std::memcpy(back.page(p), vram0 + p * kPageSize, req);
      t1 = now_ns();
      if (keep) pts[1][k].memcpy_ns.push_back(static_cast<double>(t1 - t0));
      if (!same(back, vram0)) fail("refgpu-copy: memcpy baseline to RAM differs");
    }
  }

  auto gbs = [&](const std::vector<double>& v) { return static_cast<double>(size) / median(v); };
  std::vector<Report> out;
  for (int d = 0; d < 2; d++) {
    for (size_t k = 0; k < kRequestSizes.size(); k++) {
      const Point& pt = pts[d][k];
      for (int t = 0; t < nengines; t++) {
        Report rep;
        const unsigned threads = t ? n : 1;
        const std::string engine = vk ? std::string("vulkan") : fmt::format("t{}", threads);
        rep.case_name = fmt::format("refgpu-copy-{}-{}-{}", d ? "to-ram" : "to-vram",
                                    kRequestSizes[k] == 4096 ? "4k" : kRequestSizes[k] == (64 << 10) ? "64k" : "2m",
                                    engine);
        rep.sweep_point(fmt::format("{} {}", d ? "to-ram" : "to-vram", engine), "request size",
                        static_cast<double>(kRequestSizes[k]));
        rep.ours = {gbs(pt.ns[t]), "GB/s"};
        rep.baseline_name = vk ? "vkCmdCopyBuffer" : "memcpy";
        rep.baseline = {gbs(pt.memcpy_ns), "GB/s"};
        rep.ratio = rep.ours.value / rep.baseline.value;
        rep.size = size;
        rep.repeat = opt.repeat;
        std::vector<double> g, m;
        for (double ns : pt.ns[t]) g.push_back(static_cast<double>(size) / ns);
        for (double ns : pt.memcpy_ns) m.push_back(static_cast<double>(size) / ns);
        if (vk) {
          rep.detail("{} {} in {} requests on {}: per-run GB/s {}; one request of {} region(s) {}", human_bytes(size),
                     d ? "VRAM -> RAM" : "RAM -> VRAM", human_bytes(kRequestSizes[k]), (*backend)->description(),
                     runs_string(g), ceiling->regions(), runs_string(m));
        } else {
          rep.detail("{} {} in {} requests, host backend with {} thread(s){}: per-run GB/s {}; memcpy {}",
                     human_bytes(size), d ? "VRAM -> RAM" : "RAM -> VRAM", human_bytes(kRequestSizes[k]), threads,
                     t ? " (threshold 0: every request handed to the workers)" : " (the caller alone)",
                     runs_string(g), runs_string(m));
        }
        rep.detail("us per request: ours {:.2f}, {} of the request's bytes {:.2f}",
                   median(pt.ns[t]) / 1000 / static_cast<double>(size / kRequestSizes[k]), rep.baseline_name,
                   median(pt.memcpy_ns) / 1000 / static_cast<double>(size / kRequestSizes[k]));
        rep.metric("us_per_request", median(pt.ns[t]) / 1000 / static_cast<double>(size / kRequestSizes[k]));
        out.push_back(std::move(rep));
      }
    }
  }
  for (int t = 0; t < nengines; t++) {
    const refgpu::CopyStats& s = engines[static_cast<size_t>(t)]->stats();
    out.back().detail("engine t{}: {} requests, {} failures, {} to VRAM, {} to RAM (every run, warm-up included)",
                      t ? n : 1, s.requests.get(), s.failures.get(), human_bytes(s.bytes_to_vram.get()),
                      human_bytes(s.bytes_to_ram.get()));
    if (s.failures.get() != 0) fail("refgpu-copy: the engine reported failures");
  }
  out.back().detail("verified: every byte of every destination after every run");
  return out;
}

const Registrar kRefgpuCopy({
    .name = "refgpu-copy",
    .family = "refgpu-copy",
    .summary = "refgpu copy engine RAM<->VRAM in 4 KiB / 64 KiB / 2 MiB requests, 1 and N threads, vs memcpy",
    .default_size = 64ULL << 20,
    .run_many = run_copy,
});

}  // namespace
}  // namespace gpusvm::bench
