// Helpers shared by the case families (bench.h).
#include <algorithm>
#include <cerrno>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/hmm.h"
#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {

using mm::Va;

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

Series& Report::series_named(const std::string& name, std::string x_unit, std::string y_unit) {
  for (auto& [n, s] : series) {
    if (n == name) return s;
  }
  series.emplace_back(name, Series{std::move(x_unit), std::move(y_unit), {}});
  return series.back().second;
}

void require_ok(int rc, const std::string& what) {
  if (rc != 0) fail("{}: {}", what, errno_describe(rc));
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

std::string runs_string(const std::vector<double>& v) {
  std::string s;
  for (double x : v) s += fmt::format("{}{:.3g}", s.empty() ? "" : " ", x);
  return s;
}

std::string human_bytes(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  unsigned u = 0;
  while (u + 1 < std::size(kUnits) && bytes >= 1024 && bytes % 1024 == 0) {
    bytes /= 1024;
    u++;
  }
  return fmt::format("{} {}", bytes, kUnits[u]);
}

Machine Machine::create(uint64_t ram_bytes, mm::ThpMode thp) {
  Machine m;
  ram_bytes = mm::pmd_align_up(ram_bytes);
  Result<std::unique_ptr<mm::PhysMem>> mem = mm::PhysMem::create({.ram_bytes = ram_bytes, .thp = thp});
  if (!mem) fail("PhysMem::create({}): {}", human_bytes(ram_bytes), errno_describe(mem.error()));
  m.mem = std::move(*mem);
  Result<std::unique_ptr<mm::AddressSpace>> as = mm::AddressSpace::create(m.mem.get());
  if (!as) fail("AddressSpace::create: {}", errno_describe(as.error()));
  m.as = std::move(*as);
  return m;
}

Va map_anon(mm::AddressSpace& as, uint64_t len, int thp_advice) {
  Result<Va> va = as.mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!va) fail("mmap({}): {}", human_bytes(len), errno_describe(va.error()));
  require_ok(as.madvise(*va, len, thp_advice), "madvise");
  return *va;
}

void check_machine(mm::PhysMem& mem, Report& report, const char* when) {
  const mm::CheckReport r = mm::check(mem);
  if (!r.ok()) {
    fail("mm::check {} found {} problem(s):\n{}", when, r.problems.size(), r.to_string());
  }
  report.detail("mm::check {}: ok ({} entries, {} folios checked)", when, r.entries_checked,
                r.folios_checked);
}

bool TrivialMirror::invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                               uint64_t cur_seq) {
  (void)range;
  MutexLock g(&lock_);
  n->set_seq(cur_seq);
  invalidations_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

int mirror_range(mm::AddressSpace& as, mm::MmuIntervalNotifier& notifier, TrivialMirror& mirror,
                 Va start, Va end, uint64_t default_flags, uint64_t* pfns, int* retries) {
  constexpr int kMaxTries = 1000;
  int rc = -EBUSY;
  for (int tries = 0; tries < kMaxTries; tries++) {
    if (retries) *retries = tries;
    mm::HmmRange range{.notifier = &notifier,
                       .notifier_seq = notifier.read_begin(),
                       .start = start,
                       .end = end,
                       .hmm_pfns = pfns,
                       .default_flags = default_flags};
    {
      ReadLock g(&as.mmap_lock());
      rc = mm::hmm_range_fault(&range);
    }
    if (rc == -EBUSY) continue;
    if (rc != 0) return rc;
    // A driver would program its page table here, under the same lock.
    MutexLock g(&mirror.lock());
    if (notifier.read_retry(range.notifier_seq)) {
      rc = -EBUSY;  // invalidated meanwhile: the snapshot may be stale
      continue;
    }
    return 0;
  }
  return rc;
}

}  // namespace gpusvm::bench
