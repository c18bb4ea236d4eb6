// Case "commit-contention": the commit contract under contention. Two GPU fault threads
// fault random 2 MiB ranges of a 4 KiB-backed window (BenchGpu::fault: get_pages, then
// pages_valid under the notifier lock, commit or -EAGAIN and retry) while an invalidator
// thread MADV_DONTNEEDs random ranges of it. Printed: retries (-EAGAIN commits) per commit,
// notifier callbacks, and the fault rate next to the same faults with no invalidator (the
// baseline; ratio = rate with invalidations / rate without).
//
// Verified at the quiescent end of each run: every valid GPU PTE maps the frame the CPU maps
// at that address (BenchGpu::check_ptes): a commit that skipped pages_valid after an
// invalidation raced it would leave a PTE to a freed frame; then every range is faulted
// again and the GPU reads the CPU's bytes everywhere; mm::check.
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include "gpusvm/base/errno.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"
#include "tools/gpusvm-bench/svm_util.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

constexpr int kFaultThreads = 2;

struct RunResult {
  double faults_per_s = 0;
  uint64_t commits = 0, eagain = 0, invalidations = 0, events = 0, hmm_retries = 0, replays = 0;
};

RunResult run_once(mm::AddressSpace& as, uint64_t size, uint64_t faults_per_thread, bool invalidate, int salt) {
  int rc = 0;
  BenchGpu gpu(&as, {.name = "bench-gpu"}, &rc);
  require_ok(rc, "Gpusvm::init");
  const Va base = map_anon(as, size, MADV_NOHUGEPAGE);
  write_tags(as, base, size, static_cast<uint64_t>(salt));
  const uint64_t nranges = size / kPmdSize;
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0}, last_error{0};
  std::atomic<uint64_t> replays{0};
  std::atomic<uint64_t> events{0};
  std::vector<std::thread> threads;
  const uint64_t t0 = now_ns();
  for (int t = 0; t < kFaultThreads; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(static_cast<uint64_t>(salt * 31 + t));
      for (uint64_t i = 0; i < faults_per_thread; i++) {
        const Va va = base + (rng() % nranges) * kPmdSize + (rng() % 512) * kPageSize;
        // -EBUSY (hmm collisions for the whole budget) and -EAGAIN (64 lost commits) tell the
        // GPU to replay the fault, as a real one does; anything else is a failure.
        int frc;
        while ((frc = gpu.fault(va, /*write=*/true)) == -EBUSY || frc == -EAGAIN) replays.fetch_add(1);
        if (frc != 0) {
          errors.fetch_add(1);
          last_error.store(frc);
        }
      }
    });
  }
  std::thread inv;
  if (invalidate) {
    inv = std::thread([&] {
      std::mt19937_64 rng(static_cast<uint64_t>(salt * 77 + 5));
      uint64_t seen = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        // Paced by the faults: one event per commit since the last one. An unpaced loop
        // invalidates every range faster than a slow (sanitizer) build can fault it, and the
        // faults spend their whole 1 s budget in -EBUSY.
        const uint64_t c = gpu.commits.load(std::memory_order_relaxed);
        if (c == seen) {
          std::this_thread::sleep_for(std::chrono::microseconds(5));
          continue;
        }
        seen = c;
        const Va va = base + (rng() % nranges) * kPmdSize;
        if (int mrc = as.madvise(va, kPmdSize, MADV_DONTNEED)) {
          errors.fetch_add(1);
          last_error.store(mrc);
        }
        events.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const uint64_t t1 = now_ns();
  stop.store(true);
  if (inv.joinable()) inv.join();
  if (errors.load()) fail("{} GPU faults or madvise calls failed, the last with {}", errors.load(), errno_describe(last_error.load()));

  RunResult r;
  r.faults_per_s = static_cast<double>(kFaultThreads * faults_per_thread) / (static_cast<double>(t1 - t0) / 1e9);
  r.commits = gpu.commits.load();
  r.eagain = gpu.eagain.load();
  r.invalidations = gpu.invalidations.load();
  r.events = events.load();
  r.replays = replays.load();
  {
    MutexLock g(&gpu.vm_lock());
    gpu.gpusvm()->for_each_range(base, base + size,
                                 [&](svm::Range* rg) { r.hmm_retries += rg->stats().get_pages_retries.get(); });
  }
  std::string first;
  if (uint64_t bad = gpu.check_ptes(&first)) fail("{} GPU PTEs disagree with the CPU page table; first: {}", bad, first);
  // The pages MADV_DONTNEED dropped read zero now: rewrite everything, fault it all, and
  // check that the GPU reads what the CPU wrote.
  write_tags(as, base, size, static_cast<uint64_t>(salt) + 1000);
  for (Va va = base; va < base + size; va += kPmdSize) require_ok(gpu.fault(va, true), "final GPU fault");
  for (Va va = base; va < base + size; va += kPageSize) {
    Result<uint64_t> v = gpu.gpu_load(va);
    if (!v || *v != page_tag(va, static_cast<uint64_t>(salt) + 1000)) fail("GPU read at {:#x} after the run", va);
  }
  gpu.unbind_all();
  require_ok(as.munmap(base, size), "munmap");
  return r;
}

Report run_contention(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), 4 * kPmdSize);
  const uint64_t faults = std::max<uint64_t>(200, size / kPmdSize * 64);
  Machine mc = Machine::create(size + (64ULL << 20));
  mm::AddressSpace& as = *mc.as;
  std::vector<double> with, without;
  RunResult sum;
  for (int r = 0; r <= opt.repeat; r++) {
    const RunResult a = run_once(as, size, faults, true, r);
    const RunResult b = run_once(as, size, faults, false, r);
    if (r == 0) continue;
    with.push_back(a.faults_per_s);
    without.push_back(b.faults_per_s);
    sum.commits += a.commits;
    sum.eagain += a.eagain;
    sum.invalidations += a.invalidations;
    sum.events += a.events;
    sum.hmm_retries += a.hmm_retries;
    sum.replays += a.replays;
    if (b.eagain != 0) fail("{} commit retries without any invalidation", b.eagain);
  }
  Report rep;
  rep.ours = {median(with) / 1000, "kfaults/s"};
  rep.baseline_name = "no-invalidations";
  rep.baseline = {median(without) / 1000, "kfaults/s"};
  rep.ratio = rep.ours.value / rep.baseline.value;
  rep.detail("{} fault threads x {} faults per run over {} ({} ranges of 2 MiB), one MADV_DONTNEED thread (one event per commit)",
             kFaultThreads, faults, human_bytes(size), size / kPmdSize);
  rep.detail("with invalidations: {} commits, {} retries (-EAGAIN) = {:.4f} retries per commit; {} MADV_DONTNEED "
             "events, {} notifier callbacks",
             sum.commits, sum.eagain, sum.commits ? static_cast<double>(sum.eagain) / sum.commits : 0.0, sum.events,
             sum.invalidations);
  rep.detail("get_pages' own restarts (hmm -EBUSY / read_retry collisions, before the commit): {} = {:.4f} per "
             "commit",
             sum.hmm_retries, sum.commits ? static_cast<double>(sum.hmm_retries) / sum.commits : 0.0);
  rep.detail("faults the GPU replayed (fault returned -EBUSY or -EAGAIN): {}", sum.replays);
  rep.detail("per-run kfaults/s: with {}; without {}", runs_string([&] {
               std::vector<double> v;
               for (double x : with) v.push_back(x / 1000);
               return v;
             }()),
             runs_string([&] {
               std::vector<double> v;
               for (double x : without) v.push_back(x / 1000);
               return v;
             }()));
  rep.detail("verified after each run: every valid GPU PTE maps the CPU's frame; GPU reads match after re-fault");
  rep.metric("get_pages_restarts", static_cast<double>(sum.hmm_retries));
  rep.metric("retries_per_commit", sum.commits ? static_cast<double>(sum.eagain) / sum.commits : 0.0);
  check_machine(*mc.mem, rep, "after the case");
  return rep;
}

const Registrar kContention({
    .name = "commit-contention",
    .family = "commit-contention",
    .summary = "GPU fault threads vs MADV_DONTNEED: retries per commit, checked PTEs",
    .default_size = 32ULL << 20,
    .run = run_contention,
});

}  // namespace
}  // namespace gpusvm::bench
