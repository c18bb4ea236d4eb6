// Case family "cpu-fault": first-touch fault throughput.
//
// ours:     a fresh anonymous mapping of the simulated address space, one one-byte
//           cpu::store per 4 KiB page: every page (4k) or every 2 MiB (thp) takes a write
//           fault that allocates and zeroes memory and installs the entry.
// baseline: the same first touch on real memory of this process: a real mmap with the same
//           THP advice, one volatile one-byte store per 4 KiB page, handled by this machine's
//           Linux kernel.
// Only the touch loop is timed (mmap, madvise, munmap are not, on either side). The figure is
// GiB of address space populated per second; ratio = ours / linux (> 1: the model faults
// faster than the kernel).
//
// Both sides run one untimed pass first: the model's simulated RAM is host memory mapped
// MAP_NORESERVE, and its first use costs real host page faults that a real kernel, which
// owns its RAM, would not pay.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/page_state.h"
#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

uint8_t page_tag(uint64_t i, int pass) { return static_cast<uint8_t>((i * 37 + pass * 11) % 255 + 1); }

double gib_per_s(uint64_t bytes, double ns) {
  return static_cast<double>(bytes) / (1ULL << 30) / (ns / 1e9);
}

// Sum of AnonHugePages (bytes) of this process's mappings inside [start, end).
uint64_t real_anon_huge_bytes(uintptr_t start, uintptr_t end) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  uint64_t total_kb = 0;
  while (std::getline(smaps, line)) {
    uintptr_t s = 0, e = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " ", &s, &e) == 2 &&
        line.find(':') > line.find(' ')) {
      inside = s >= start && e <= end;
      continue;
    }
    uint64_t kb = 0;
    if (inside && std::sscanf(line.c_str(), "AnonHugePages: %" SCNu64 " kB", &kb) == 1) total_kb += kb;
  }
  return total_kb * 1024;
}

std::string thp_sysfs(const char* file) {
  std::ifstream f(std::string("/sys/kernel/mm/transparent_hugepage/") + file);
  std::string s;
  std::getline(f, s);
  return s.empty() ? "unknown" : s;
}

struct Pass {
  double ns = 0;
  uint64_t huge_bytes = 0;  // real side: AnonHugePages of the touched range
};

// One first-touch pass on real memory.
Pass real_pass(uint64_t size, bool thp, int pass) {
  const uint64_t npages = size / kPageSize;
  void* raw = ::mmap(nullptr, size + kPmdSize, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) fail("real mmap({}): errno {}", human_bytes(size), errno);
  // 2 MiB aligned so every 2 MiB of the range can be a THP.
  auto* p = reinterpret_cast<volatile uint8_t*>(mm::pmd_align_up(reinterpret_cast<uintptr_t>(raw)));
  if (::madvise(const_cast<uint8_t*>(p), size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
    fail("real madvise: errno {}", errno);
  }
  Pass r;
  const uint64_t t0 = now_ns();
  for (uint64_t i = 0; i < npages; i++) p[i * kPageSize] = page_tag(i, pass);
  r.ns = static_cast<double>(now_ns() - t0);
  for (uint64_t i = 0; i < npages; i++) {
    if (p[i * kPageSize] != page_tag(i, pass)) fail("real memory page {} lost its byte", i);
  }
  const auto s = reinterpret_cast<uintptr_t>(p);
  r.huge_bytes = real_anon_huge_bytes(s, s + size);
  ::munmap(raw, size + kPmdSize);
  return r;
}

// One first-touch pass on the model.
// With `rep`, runs mm::check while the range is still mapped.
Pass model_pass(Machine& m, uint64_t size, bool thp, int pass, Report* rep = nullptr) {
  mm::AddressSpace& as = *m.as;
  mm::MmStats& st = as.stats();
  const uint64_t npages = size / kPageSize;
  const Va base = map_anon(as, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  const uint64_t thp0 = st.faults_thp.get(), anon0 = st.faults_anon.get();
  const uint64_t fallback0 = st.faults_thp_fallback.get();
  Pass r;
  const uint64_t t0 = now_ns();
  for (uint64_t i = 0; i < npages; i++) {
    if (int rc = mm::cpu::store<uint8_t>(as, base + i * kPageSize, page_tag(i, pass))) {
      require_ok(rc, fmt::format("cpu::store at {:#x}", base + i * kPageSize));
    }
  }
  r.ns = static_cast<double>(now_ns() - t0);
  const uint64_t thps = st.faults_thp.get() - thp0, smalls = st.faults_anon.get() - anon0;
  if (thp ? (thps != size / kPmdSize || smalls != 0) : (thps != 0 || smalls != npages)) {
    fail("first touch of {} took {} THP faults, {} 4 KiB faults ({} THP fallbacks); expected {}",
         human_bytes(size), thps, smalls, st.faults_thp_fallback.get() - fallback0,
         thp ? fmt::format("{} THP faults", size / kPmdSize) : fmt::format("{} 4 KiB faults", npages));
  }
  const mm::PageKind want = thp ? mm::PageKind::kThpPmd : mm::PageKind::kSmall;
  for (uint64_t i = 0; i < npages; i++) {
    const Va va = base + i * kPageSize;
    Result<uint8_t> v = mm::cpu::load<uint8_t>(as, va);
    if (!v || *v != page_tag(i, pass)) {
      fail("page {:#x} reads {} after the first touch, expected {:#x}", va,
           v ? fmt::format("{:#x}", *v) : errno_describe(v.error()), page_tag(i, pass));
    }
    if (i % mm::kPagesPerPmd == 0 && mm::query_page(as, va).kind != want) {
      fail("page {:#x} is {}, expected {}", va, mm::page_kind_name(mm::query_page(as, va).kind),
           mm::page_kind_name(want));
    }
  }
  if (rep) check_machine(*m.mem, *rep, "with the last pass mapped");
  require_ok(as.munmap(base, size), "munmap");
  return r;
}

Report run_cpu_fault(const Options& opt, uint64_t size, bool thp) {
  Report rep;
  rep.case_name = thp ? "cpu-fault-thp" : "cpu-fault-4k";
  size = mm::pmd_align_up(size);
  const uint64_t npages = size / kPageSize;
  const uint64_t nfaults = thp ? size / kPmdSize : npages;
  Machine m = Machine::create(size + (64ULL << 20));
  rep.detail("{} {}, one-byte store per 4 KiB page: {} pages, {} {} faults per pass", human_bytes(size),
             thp ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE", npages, nfaults, thp ? "THP" : "4 KiB");

  // Warm-up pass of each (untimed, see the file comment), then alternate.
  (void)model_pass(m, size, thp, 0);
  (void)real_pass(size, thp, 0);
  std::vector<double> ours_ns, real_ns;
  uint64_t real_huge_min = size;
  for (int r = 1; r <= opt.repeat; r++) {
    Pass o, l;
    Report* check_in = r == opt.repeat ? &rep : nullptr;
    if (r % 2) {
      o = model_pass(m, size, thp, r, check_in);
      l = real_pass(size, thp, r);
    } else {
      l = real_pass(size, thp, r);
      o = model_pass(m, size, thp, r, check_in);
    }
    ours_ns.push_back(o.ns);
    real_ns.push_back(l.ns);
    real_huge_min = std::min(real_huge_min, l.huge_bytes);
  }
  check_machine(*m.mem, rep, "after munmap");

  const double ours_med = median(ours_ns), real_med = median(real_ns);
  rep.ours = {gib_per_s(size, ours_med), "GiB/s"};
  rep.baseline_name = "linux";
  rep.baseline = {gib_per_s(size, real_med), "GiB/s"};
  rep.ratio = rep.ours.value / rep.baseline.value;
  rep.detail("ours:  {:.0f} ns per fault, {:.0f} ns per page touched ({:.0f} ms per pass)",
             ours_med / nfaults, ours_med / npages, ours_med / 1e6);
  rep.detail("linux: {:.0f} ns per fault, {:.0f} ns per page touched ({:.0f} ms per pass)",
             real_med / nfaults, real_med / npages, real_med / 1e6);
  std::vector<double> ours_gib, real_gib;
  for (double ns : ours_ns) ours_gib.push_back(gib_per_s(size, ns));
  for (double ns : real_ns) real_gib.push_back(gib_per_s(size, ns));
  rep.detail("runs (GiB/s): ours {}; linux {}", runs_string(ours_gib), runs_string(real_gib));
  rep.detail("verified: every page holds its byte; model fault counts and page kinds as expected");
  if (thp) {
    const double frac = static_cast<double>(real_huge_min) / size;
    rep.detail("host THP: enabled {}, defrag {}; real range THP-backed: {:.0f}% (AnonHugePages, "
               "worst pass)",
               thp_sysfs("enabled"), thp_sysfs("defrag"), frac * 100);
    if (frac < 0.99) {
      rep.detail("WARNING: the kernel did not back the whole real range with THPs: the "
                 "baseline is partly 4 KiB faults");
    }
    rep.metric("linux_thp_fraction", frac);
  } else if (real_huge_min != 0) {
    fail("real MADV_NOHUGEPAGE range has {} of AnonHugePages", human_bytes(real_huge_min));
  }
  rep.metric("ours_ns_per_fault", ours_med / nfaults);
  rep.metric("linux_ns_per_fault", real_med / nfaults);
  for (size_t i = 0; i < ours_ns.size(); i++) {
    rep.metric(fmt::format("ours_run{}_gib_s", i), gib_per_s(size, ours_ns[i]));
    rep.metric(fmt::format("baseline_run{}_gib_s", i), gib_per_s(size, real_ns[i]));
  }
  return rep;
}

const Registrar kCpuFault4k({
    .name = "cpu-fault-4k",
    .family = "cpu-fault",
    .summary = "first-touch write faults, 4 KiB pages: model vs this machine's Linux",
    .default_size = 256ULL << 20,
    .run = [](const Options& o, uint64_t size) { return run_cpu_fault(o, size, false); },
});
const Registrar kCpuFaultThp({
    .name = "cpu-fault-thp",
    .family = "cpu-fault",
    .summary = "first-touch write faults, THP (2 MiB): model vs this machine's Linux",
    .default_size = 256ULL << 20,
    .run = [](const Options& o, uint64_t size) { return run_cpu_fault(o, size, true); },
});

}  // namespace
}  // namespace gpusvm::bench
