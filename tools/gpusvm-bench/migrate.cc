// Case families "walk-migrate" and "thp-migration": what migration costs.
//
// ---- walk-migrate: the collection (setup) walk of a migration, by path ----
//
// A driver that moves a 2 MiB range to its memory first collects it: fault what must be
// faulted, lock the pages, replace their entries by migration entries. gpusvm/mm offers three
// ways to get there (DESIGN.md §3.8, migrate.h's MigrateWalkMode), and this family times each
// on the same data, 2 MiB range after 2 MiB range:
//   unified     one walk that faults and collects (seed 002);
//   two-step    a fault walk (hmm_range_fault), then migrate_vma_setup's own collect walk;
//   three-step  collect, fault what could not be taken, collect again ("migrate, fault,
//               migrate").
// Only the collection is timed. Then migrate_vma_pages / _finalize run with no destination,
// so nothing is copied and every page is restored; every run starts from fresh data set up
// untimed, so repeats measure the same thing.
//
// Data states (one case each; 4 KiB pages, MADV_NOHUGEPAGE, so no THP split is measured):
//   present  every page written by the CPU;
//   none     nothing ever touched;
//   half     every other page written, the rest untouched;
// collected with migrate_vma_setup(SELECT_SYSTEM | MIGRATE_VMA_FAULT) and MigrateVma::walk_mode
// selecting the path; and, for a device that will write the pages (the migration must fault
// them writable first, which migrate_vma has no flag for):
//   zero-write  every page read by the CPU before (the zero page is mapped);
//   cow-write   every page written, then the process forked (pages COW-shared, read-only);
// collected by the "driver that writes" paths:
//   unified     hmm_range_fault(REQ_FAULT | REQ_WRITE | REQ_MIGRATE) + migrate_hmm_range_setup;
//   two-step    hmm_range_fault(REQ_FAULT | REQ_WRITE), then migrate_vma_setup(SELECT_SYSTEM);
//   three-step  migrate_vma_setup(SELECT_SYSTEM); if some collected page is a read-only
//               source (a write needs a fault first): give everything back (migrate_vma_pages /
//               _finalize without destinations), hmm_range_fault(REQ_FAULT | REQ_WRITE) on those
//               pages, migrate_vma_setup again. All of it is timed: it is that path's setup.
//
// ours = unified; baseline = the faster of two-step and three-step (named); ratio =
// baseline / ours (> 1: the unified walk is faster). The figure is ns per 2 MiB range.
// Walks are counted from AddressSpace::stats(): logical walks = hmm_walks - hmm_restarts
// (passes that started a walk), passes = hmm_walks, faults = hmm_faults (pages).
//
// ---- thp-migration: hmm-tests' benchmark_thp_migration ----
//
// sys->dev and dev->sys migration bandwidth of BenchDevice (migrate_vma with a memcpy per
// page, or per 2 MiB with compound migration) for 512 KiB .. 16 MiB (256 MiB when --size asks),
// THP-backed (MADV_HUGEPAGE, 2 MiB aligned) vs 4 KiB-backed (MADV_NOHUGEPAGE) source memory,
// next to a plain memcpy of the same number of bytes between two host buffers in the same run
// (the ceiling: a migration copies the bytes and does the page-table work besides). One result
// per (size, direction, backing): ours = migration GB/s, baseline = memcpy GB/s, ratio =
// ours / memcpy (< 1; how close the migration gets to the copy). A run migrates several buffers
// of the size (kRunBytes below), each with one migrate_vma sequence, timed from setup to
// finalize (the driver's allocation and copy included); populating and verifying are not
// timed. With MIGRATE_VMA_SELECT_COMPOUND in this mm, THP sources are collected whole (2 MiB
// destinations); the same THP source without the flag (split, then 4 KiB pages) is measured
// too and printed as a detail of the thp result, so the compound gain is visible in one run.
#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/page_state.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/bench_device.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPagesPerPmd;
using mm::kPmdSize;
using mm::Va;

// The 64-bit word stored at the start of page `page` in run `run`: never 0.
uint64_t page_tag(uint64_t page, int run) {
  return ((page * 0x9e3779b97f4a7c15ULL) ^ (static_cast<uint64_t>(run) << 48)) | 1;
}

// Writes zeroes over the simulated RAM of a fresh machine (untimed): PhysMem's arena is host
// memory mapped MAP_NORESERVE, and the first use of each frame costs a host page fault that a
// real kernel, owning its RAM, would not pay. Without this the timed runs pay them whenever
// an allocation (a COW copy, a destination page) lands on a frame not used before. Zeroes are
// safe: before the first allocation every frame is free, and the zero pages hold zeroes.
void prefault_ram(Machine& m) {
  std::memset(m.mem->ram_data(0), 0, m.mem->ram_pages() << mm::kPageShift);
}

// ======================= walk-migrate =======================

enum class State { kPresent, kNone, kHalf, kZeroWrite, kCowWrite };
enum class Path { kUnified, kTwoStep, kThreeStep };
constexpr std::array<Path, 3> kPaths = {Path::kUnified, Path::kTwoStep, Path::kThreeStep};

const char* state_name(State s) {
  switch (s) {
    case State::kPresent: return "present";
    case State::kNone: return "none";
    case State::kHalf: return "half";
    case State::kZeroWrite: return "zero-write";
    case State::kCowWrite: return "cow-write";
  }
  return "?";
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kUnified: return "unified";
    case Path::kTwoStep: return "two-step";
    case Path::kThreeStep: return "three-step";
  }
  return "?";
}

// The device will write what it migrates: the writing-driver paths (file comment).
bool device_writes(State s) { return s == State::kZeroWrite || s == State::kCowWrite; }

// Does the CPU write page i before the migration (it holds page_tag afterwards, else 0)?
bool written(State s, uint64_t i) {
  switch (s) {
    case State::kPresent:
    case State::kCowWrite: return true;
    case State::kHalf: return i % 2 == 0;
    case State::kNone:
    case State::kZeroWrite: return false;
  }
  return false;
}

// Walk statistics of an address space (a snapshot; subtract two).
struct WalkStats {
  uint64_t passes = 0, restarts = 0, faults = 0, migrate_walks = 0;
  static WalkStats of(mm::AddressSpace& as) {
    const mm::MmStats& st = as.stats();
    return {st.hmm_walks.get(), st.hmm_restarts.get(), st.hmm_faults.get(), st.migrate_walks.get()};
  }
  WalkStats operator-(const WalkStats& o) const {
    return {passes - o.passes, restarts - o.restarts, faults - o.faults, migrate_walks - o.migrate_walks};
  }
  WalkStats& operator+=(const WalkStats& o) {
    passes += o.passes;
    restarts += o.restarts;
    faults += o.faults;
    migrate_walks += o.migrate_walks;
    return *this;
  }
  uint64_t walks() const { return passes - restarts; }
};

// Everything one walk-migrate case keeps across its runs.
struct WalkMigrateBench {
  Machine m;
  std::unique_ptr<BenchDevice> dev;
  State state;
  uint64_t size;    // bytes, a multiple of 2 MiB
  uint64_t ranges;  // size / 2 MiB
  std::vector<uint64_t> src, dst, pfns, again;
};

// hmm_range_fault over [start, end) with per-page requests (pfns[i], masked by `mask`) or
// default_flags, retried while the notifier sequence moves. mmap lock held (read).
int hmm_fault(mm::MmuIntervalNotifier& notifier, Va start, Va end, uint64_t default_flags,
              uint64_t mask, uint64_t* pfns, mm::MigrateVma* migrate, const void* owner) {
  int rc = -EBUSY;
  for (int tries = 0; tries < 1000 && rc == -EBUSY; tries++) {
    mm::HmmRange r{.notifier = &notifier,
                   .notifier_seq = notifier.read_begin(),
                   .start = start,
                   .end = end,
                   .hmm_pfns = pfns,
                   .default_flags = default_flags,
                   .pfn_flags_mask = mask,
                   .dev_private_owner = owner,
                   .migrate = migrate};
    rc = mm::hmm_range_fault(&r);
    if (rc == 0 && migrate) rc = mm::migrate_hmm_range_setup(&r);
  }
  return rc;
}

// The collection of one 2 MiB range by `path` (file comment); returns the time it took (ns).
// On return mv describes a collected migration (src filled) for migrate_vma_pages.
// mmap lock held (read).
uint64_t collect_range(WalkMigrateBench& b, mm::MmuIntervalNotifier& notifier, Path path, Va start,
                       mm::MigrateVma& mv) {
  mm::AddressSpace& as = *b.m.as;
  const Va end = start + kPmdSize;
  uint64_t* src = b.src.data();
  uint64_t* dst = b.dst.data();
  const void* owner = b.dev->owner();
  auto where = [&] { return fmt::format("{} {} [{:#x}, {:#x})", state_name(b.state), path_name(path), start, end); };
  mv = mm::MigrateVma{.mm = &as, .start = start, .end = end, .src = src, .dst = dst, .pgmap_owner = owner,
                      .flags = mm::MIGRATE_VMA_SELECT_SYSTEM};
  if (!device_writes(b.state)) {
    mv.flags |= mm::MIGRATE_VMA_FAULT;
    mv.walk_mode = path == Path::kUnified   ? mm::MigrateWalkMode::kUnified
                   : path == Path::kTwoStep ? mm::MigrateWalkMode::kTwoStep
                                            : mm::MigrateWalkMode::kThreeStep;
    const uint64_t t0 = now_ns();
    const int rc = mm::migrate_vma_setup(&mv);
    const uint64_t t1 = now_ns();
    if (rc != 0) require_ok(rc, "migrate_vma_setup " + where());
    return t1 - t0;
  }
  constexpr uint64_t kWrite = mm::HMM_PFN_REQ_FAULT | mm::HMM_PFN_REQ_WRITE;
  uint64_t* pfns = b.pfns.data();
  const uint64_t t0 = now_ns();
  int rc = 0;
  switch (path) {
    case Path::kUnified:
      std::fill_n(pfns, kPagesPerPmd, 0);
      rc = hmm_fault(notifier, start, end, kWrite | mm::HMM_PFN_REQ_MIGRATE, 0, pfns, &mv, owner);
      break;
    case Path::kTwoStep:
      std::fill_n(pfns, kPagesPerPmd, 0);
      rc = hmm_fault(notifier, start, end, kWrite, 0, pfns, nullptr, owner);
      if (rc == 0) rc = mm::migrate_vma_setup(&mv);
      break;
    case Path::kThreeStep: {
      rc = mm::migrate_vma_setup(&mv);
      if (rc != 0) break;
      // A read-only source cannot take the device's writes: it needs a write fault, and a
      // collected page cannot be faulted, so the collection is given back first.
      uint64_t* again = b.again.data();
      uint64_t need = 0;
      for (uint64_t i = 0; i < kPagesPerPmd; i++) {
        const bool ro_source = (src[i] & mm::MIGRATE_PFN_VALID) && !(src[i] & mm::MIGRATE_PFN_WRITE);
        const bool not_taken = !(src[i] & mm::MIGRATE_PFN_MIGRATE);
        again[i] = (ro_source || not_taken) ? kWrite : 0;
        need += again[i] ? 1 : 0;
      }
      if (need == 0) break;
      mv.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
      mm::migrate_vma_pages(&mv);  // no destinations: everything stays
      mm::migrate_vma_finalize(&mv);
      rc = hmm_fault(notifier, start, end, 0, kWrite, again, nullptr, owner);
      if (rc == 0) rc = mm::migrate_vma_setup(&mv);
      break;
    }
  }
  const uint64_t t1 = now_ns();
  if (rc != 0) require_ok(rc, "collect " + where());
  return t1 - t0;
}

// Sets up the run's data (untimed): a fresh mapping in the state; a forked child for COW.
Va populate(WalkMigrateBench& b, int run, std::unique_ptr<mm::AddressSpace>* child) {
  mm::AddressSpace& as = *b.m.as;
  const Va base = map_anon(as, b.size, MADV_NOHUGEPAGE);
  const uint64_t npages = b.size / kPageSize;
  for (uint64_t i = 0; i < npages; i++) {
    const Va va = base + i * kPageSize;
    if (written(b.state, i)) {
      if (int rc = mm::cpu::store<uint64_t>(as, va, page_tag(i, run))) require_ok(rc, fmt::format("cpu::store at {:#x}", va));
    } else if (b.state == State::kZeroWrite) {
      Result<uint64_t> v = mm::cpu::load<uint64_t>(as, va);
      if (!v || *v != 0) fail("first read of {:#x}: {}", va, v ? fmt::format("{:#x}", *v) : errno_describe(v.error()));
    }
  }
  const mm::PageKind want = b.state == State::kNone      ? mm::PageKind::kNone
                            : b.state == State::kZeroWrite ? mm::PageKind::kZeroPage
                                                           : mm::PageKind::kSmall;
  if (mm::query_page(as, base).kind != want) {
    fail("{}: first page is {} after set-up, expected {}", state_name(b.state),
         mm::page_kind_name(mm::query_page(as, base).kind), mm::page_kind_name(want));
  }
  if (b.state == State::kCowWrite) {
    Result<std::unique_ptr<mm::AddressSpace>> c = as.fork();
    if (!c) fail("fork: {}", errno_describe(c.error()));
    *child = std::move(*c);
    if (mm::query_page(as, base).writable) fail("page {:#x} still writable after fork", base);
  }
  return base;
}

// CPU reads of every page (parent and child): the tag for a written page, else 0.
void verify_data(WalkMigrateBench& b, mm::AddressSpace& as, Va base, int run, const char* who) {
  const uint64_t npages = b.size / kPageSize;
  for (uint64_t i = 0; i < npages; i++) {
    const Va va = base + i * kPageSize;
    const uint64_t want = written(b.state, i) ? page_tag(i, run) : 0;
    Result<uint64_t> v = mm::cpu::load<uint64_t>(as, va);
    if (!v || *v != want) {
      fail("{}: {} page {:#x} reads {} after the migration was given back, expected {:#x}",
           state_name(b.state), who, va, v ? fmt::format("{:#x}", *v) : errno_describe(v.error()), want);
    }
  }
}

struct RunResult {
  double ns_per_range = 0;        // the run's mean
  std::vector<double> range_ns;   // every range's time
  WalkStats walks;                // summed over the run's ranges
};

// One run of one path over every range: fresh data, timed collection, restore, verify.
RunResult walk_migrate_run(WalkMigrateBench& b, Path path, int run, Report* check_in) {
  mm::AddressSpace& as = *b.m.as;
  std::unique_ptr<mm::AddressSpace> child;
  const Va base = populate(b, run, &child);
  TrivialMirror mirror;
  mm::MmuIntervalNotifier notifier;
  require_ok(notifier.insert(&as, base, b.size, &mirror), "MmuIntervalNotifier::insert");
  RunResult r;
  uint64_t total_ns = 0;
  for (uint64_t k = 0; k < b.ranges; k++) {
    const Va start = base + k * kPmdSize;
    ReadLock g(&as.mmap_lock());
    const WalkStats before = WalkStats::of(as);
    mm::MigrateVma mv;
    const uint64_t ns = collect_range(b, notifier, path, start, mv);
    total_ns += ns;
    r.range_ns.push_back(static_cast<double>(ns));
    r.walks += WalkStats::of(as) - before;
    // Everything must be collected, and for a writing device writable (or without source).
    if (mv.cpages != kPagesPerPmd) {
      fail("{} {}: range {:#x} collected {} of {} pages", state_name(b.state), path_name(path), start,
           mv.cpages, kPagesPerPmd);
    }
    for (uint64_t i = 0; i < kPagesPerPmd; i++) {
      const uint64_t s = b.src[i];
      if (!(s & mm::MIGRATE_PFN_MIGRATE) ||
          (device_writes(b.state) && (s & mm::MIGRATE_PFN_VALID) && !(s & mm::MIGRATE_PFN_WRITE))) {
        fail("{} {}: page {:#x} collected as src {:#x}", state_name(b.state), path_name(path),
             start + i * kPageSize, s);
      }
    }
    mv.mm->mmap_assert_locked();  // held by the caller's lock, named through the MigrateVma
    mm::migrate_vma_pages(&mv);  // no destination: every page stays, finalize restores it
    if (BenchDevice::moved_pages(b.src.data(), kPagesPerPmd) != 0) fail("a page moved without a destination");
    mm::migrate_vma_finalize(&mv);
  }
  r.ns_per_range = static_cast<double>(total_ns) / b.ranges;
  verify_data(b, as, base, run, "the process's");
  if (child) verify_data(b, *child, base, run, "the fork child's");
  if (check_in) check_machine(*b.m.mem, *check_in, "with the last run's data mapped");
  notifier.remove();
  if (child) child->exit();
  child.reset();
  require_ok(as.munmap(base, b.size), "munmap");
  return r;
}

Report run_walk_migrate(const Options& opt, uint64_t size, State state) {
  Report rep;
  rep.case_name = fmt::format("walk-migrate-{}", state_name(state));
  WalkMigrateBench b{.state = state};
  b.size = mm::pmd_align_up(std::max<uint64_t>(size, kPmdSize));
  b.ranges = b.size / kPmdSize;
  // Data, its COW copies (cow-write) and the pages faulted writable, plus slack.
  b.m = Machine::create(2 * b.size + (64ULL << 20));
  prefault_ram(b.m);
  b.dev = std::make_unique<BenchDevice>(b.m.mem.get(), kPagesPerPmd);  // the owner; no copies
  b.src.resize(kPagesPerPmd);
  b.dst.resize(kPagesPerPmd);
  b.pfns.resize(kPagesPerPmd);
  b.again.resize(kPagesPerPmd);

  const bool writes = device_writes(state);
  rep.detail("{} in {} ranges of 2 MiB, 4 KiB pages (MADV_NOHUGEPAGE), state {}: {}", human_bytes(b.size),
             b.ranges, state_name(state),
             state == State::kPresent   ? "every page written"
             : state == State::kNone    ? "never touched"
             : state == State::kHalf    ? "even pages written, odd pages untouched"
             : state == State::kZeroWrite ? "every page read (zero page mapped), the device will write"
                                          : "every page written, then fork (COW-shared), the device will write");
  if (writes) {
    rep.detail("paths: unified = hmm_range_fault(REQ_FAULT|REQ_WRITE|REQ_MIGRATE) + migrate_hmm_range_setup; "
               "two-step = hmm_range_fault(REQ_FAULT|REQ_WRITE) + migrate_vma_setup; three-step = "
               "migrate_vma_setup, give back + write-fault the read-only sources, migrate_vma_setup");
  } else {
    rep.detail("paths: migrate_vma_setup(SELECT_SYSTEM|MIGRATE_VMA_FAULT) with walk_mode kUnified / "
               "kTwoStep / kThreeStep");
  }

  // One untimed warm-up run of each path, then runs rotating which path goes first. The figure
  // is the median over every range of every run: a range takes tens of microseconds, and on a
  // shared machine a run is often preempted once, which the per-range median ignores (the
  // per-run means, printed too, show it).
  std::array<std::vector<double>, 3> ns, samples;
  std::array<WalkStats, 3> walks{};
  int run = 0;
  for (Path p : kPaths) (void)walk_migrate_run(b, p, run++, nullptr);
  for (int r = 0; r < opt.repeat; r++) {
    for (size_t j = 0; j < kPaths.size(); j++) {
      const size_t pi = (j + r) % kPaths.size();
      const bool last = r + 1 == opt.repeat && j + 1 == kPaths.size();
      const RunResult res = walk_migrate_run(b, kPaths[pi], run++, last ? &rep : nullptr);
      ns[pi].push_back(res.ns_per_range);
      samples[pi].insert(samples[pi].end(), res.range_ns.begin(), res.range_ns.end());
      walks[pi] += res.walks;
    }
  }
  check_machine(*b.m.mem, rep, "after munmap");
  if (b.dev->free_pages() != b.dev->total_pages()) fail("device pages in use after the runs");

  std::array<double, 3> med{};
  const double runs_ranges = static_cast<double>(opt.repeat) * b.ranges;
  for (size_t pi = 0; pi < kPaths.size(); pi++) {
    med[pi] = median(samples[pi]);
    const WalkStats& w = walks[pi];
    rep.detail("{:<10} {:>9.0f} ns/range; per range: {:.2f} walks, {:.2f} passes, {:.2f} migrate walks, "
               "{:.1f} pages faulted; run means (us/range) {}",
               path_name(kPaths[pi]), med[pi], w.walks() / runs_ranges, w.passes / runs_ranges,
               w.migrate_walks / runs_ranges, w.faults / runs_ranges,
               runs_string([&] {
                 std::vector<double> us;
                 for (double v : ns[pi]) us.push_back(v / 1000);
                 return us;
               }()));
    const std::string key = path_name(kPaths[pi]);
    rep.metric(key + "_ns_per_range", med[pi]);
    rep.metric(key + "_walks_per_range", w.walks() / runs_ranges);
    rep.metric(key + "_passes_per_range", w.passes / runs_ranges);
    rep.metric(key + "_migrate_walks_per_range", w.migrate_walks / runs_ranges);
    rep.metric(key + "_faults_per_range", w.faults / runs_ranges);
  }
  const size_t best = med[1] <= med[2] ? 1 : 2;
  const size_t other = 3 - best;
  rep.ours = {med[0], "ns/range"};
  rep.baseline_name = path_name(kPaths[best]);
  rep.baseline = {med[best], "ns/range"};
  rep.ratio = rep.baseline.value / rep.ours.value;
  rep.detail("the other path, {}: {:.0f} ns/range (ratio {:.2f} against unified)", path_name(kPaths[other]),
             med[other], med[other] / med[0]);
  rep.detail("verified per range: all 512 pages collected{}; nothing moved without a destination; every "
             "page reads back its data (and the fork child's) after the restore",
             writes ? ", each with a writable source or none" : "");
  return rep;
}

Case walk_migrate_case(State s, const char* summary) {
  return Case{.name = fmt::format("walk-migrate-{}", state_name(s)),
              .family = "walk-migrate",
              .summary = summary,
              .default_size = 64ULL << 20,
              .run = [s](const Options& o, uint64_t size) { return run_walk_migrate(o, size, s); }};
}

const Registrar kWalkMigratePresent(walk_migrate_case(
    State::kPresent, "migration collect walk, all pages present: unified vs two-/three-step"));
const Registrar kWalkMigrateNone(walk_migrate_case(
    State::kNone, "migration collect walk, no page present: unified vs two-/three-step"));
const Registrar kWalkMigrateZero(walk_migrate_case(
    State::kZeroWrite, "migration collect for a writing device, zero page mapped: unified vs two-/three-step"));
const Registrar kWalkMigrateCow(walk_migrate_case(
    State::kCowWrite, "migration collect for a writing device, COW-shared pages: unified vs two-/three-step"));
const Registrar kWalkMigrateHalf(walk_migrate_case(
    State::kHalf, "migration collect walk, every other page present: unified vs two-/three-step"));

// ======================= thp-migration =======================

constexpr std::array<uint64_t, 7> kThpSizes = {512ULL << 10, 1ULL << 20,  2ULL << 20,  4ULL << 20,
                                               8ULL << 20,   16ULL << 20, 256ULL << 20};
// Bytes migrated per timed run: max(largest size, min(kRunBytes, 4 x largest size)); small
// sizes migrate several buffers of their size, so that each run is long enough to time (and a
// smoke run at --size 1m stays small).
constexpr uint64_t kRunBytes = 64ULL << 20;

double gb_per_s(uint64_t bytes, double ns) { return static_cast<double>(bytes) / ns; }

std::string size_name(uint64_t s) {
  return s >= (1ULL << 20) ? fmt::format("{}m", s >> 20) : fmt::format("{}k", s >> 10);
}

struct ThpBench {
  Machine m;
  std::unique_ptr<BenchDevice> dev;
  std::vector<std::byte> copy_from, copy_to;  // the memcpy baseline's host buffers
};

// Source memory of a run. kThpSplit: THP-backed, collected without MIGRATE_VMA_SELECT_COMPOUND
// (the mm splits each THP and migrates 4 KiB pages); measured only when this mm has the flag
// (otherwise kThp is that already).
enum Backing { kThp, k4k, kThpSplit };

const char* backing_name(Backing b) {
  return b == kThp ? "thp" : b == k4k ? "4k" : "thp-split";
}

// One backing's measurements at one size.
struct Directions {
  std::vector<double> s2d_ns, d2s_ns;          // per run, for iters * size bytes
  std::vector<double> s2d_buf_ns, d2s_buf_ns;  // per buffer of `size`, every run
  BenchDevice::Moved s2d, d2s;         // the last run's
  mm::PageKind kind_before = mm::PageKind::kNone, kind_after = mm::PageKind::kNone;
  uint64_t thp_blocks = 0;             // 2 MiB blocks PMD-mapped after population
  uint64_t splits_pmd = 0, splits_folio = 0;  // the last run's
};

// One run for one backing at one size: `iters` buffers of `size` populated (untimed),
// migrated to the device (timed) and back (timed), then verified and unmapped.
void thp_run(ThpBench& t, uint64_t size, uint64_t iters, Backing backing, int run, Directions& d) {
  mm::AddressSpace& as = *t.m.as;
  const bool thp = backing != k4k;
  const uint64_t npages = size / kPageSize;
  std::vector<Va> bufs;
  d.thp_blocks = 0;
  for (uint64_t k = 0; k < iters; k++) {
    const Va base = map_anon(as, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    bufs.push_back(base);
    for (uint64_t i = 0; i < npages; i++) {
      const Va va = base + i * kPageSize;
      const uint64_t tag = page_tag(k * npages + i, run);
      int rc = mm::cpu::store<uint64_t>(as, va, tag);
      if (rc == 0) rc = mm::cpu::store<uint64_t>(as, va + kPageSize - 8, ~tag);
      if (rc != 0) require_ok(rc, fmt::format("cpu::store at {:#x}", va));
    }
    for (Va va = base; va < base + size; va += kPmdSize) {
      if (mm::query_page(as, va).kind == mm::PageKind::kThpPmd) d.thp_blocks++;
    }
  }
  d.kind_before = mm::query_page(as, bufs[0]).kind;
  const mm::PageKind want = thp && size >= kPmdSize ? mm::PageKind::kThpPmd : mm::PageKind::kSmall;
  if (d.kind_before != want) {
    fail("{} buffer of {}: first page is {}, expected {}", thp ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE",
         human_bytes(size), mm::page_kind_name(d.kind_before), mm::page_kind_name(want));
  }
  const uint64_t pmd0 = as.stats().thp_split_pmd.get(), folio0 = as.stats().thp_split_folio.get();

  auto migrate_all = [&](bool to_device, BenchDevice::Moved& moved, std::vector<double>& samples) {
    uint64_t ns = 0;
    moved = {};
    for (Va base : bufs) {
      const uint64_t t0 = now_ns();
      const BenchDevice::Moved r = t.dev->migrate(as, base, base + size, to_device, backing == kThp);
      const uint64_t t1 = now_ns();
      ns += t1 - t0;
      samples.push_back(static_cast<double>(t1 - t0));
      if (r.pages != npages) {
        fail("migration of {} at {:#x} {}: {} of {} pages moved ({} without destination)", human_bytes(size),
             base, to_device ? "to the device" : "to system memory", r.pages, npages, r.no_dst);
      }
      moved.pages += r.pages;
      moved.compound_src += r.compound_src;
      moved.compound_dst += r.compound_dst;
      moved.small_dst += r.small_dst;
    }
    return static_cast<double>(ns);
  };
  d.s2d_ns.push_back(migrate_all(true, d.s2d, d.s2d_buf_ns));
  for (Va base : bufs) {
    for (Va va = base; va < base + size; va += kPageSize) {
      const mm::PageState st = mm::query_page(as, va);
      if (st.kind != mm::PageKind::kSoftLeaf || !t.dev->pgmap().contains(st.pfn)) {
        fail("page {:#x} is {} (pfn {:#x}) after migrating to the device", va, mm::page_kind_name(st.kind), st.pfn);
      }
    }
  }
  d.d2s_ns.push_back(migrate_all(false, d.d2s, d.d2s_buf_ns));
  d.splits_pmd = as.stats().thp_split_pmd.get() - pmd0;
  d.splits_folio = as.stats().thp_split_folio.get() - folio0;
  d.kind_after = mm::query_page(as, bufs[0]).kind;
  for (uint64_t k = 0; k < iters; k++) {
    for (uint64_t i = 0; i < npages; i++) {
      const Va va = bufs[k] + i * kPageSize;
      const uint64_t tag = page_tag(k * npages + i, run);
      Result<uint64_t> a = mm::cpu::load<uint64_t>(as, va);
      Result<uint64_t> z = mm::cpu::load<uint64_t>(as, va + kPageSize - 8);
      if (!a || !z || *a != tag || *z != ~tag) {
        fail("page {:#x} lost its data in the round trip: reads {} / {}, expected {:#x} / {:#x}", va,
             a ? fmt::format("{:#x}", *a) : errno_describe(a.error()),
             z ? fmt::format("{:#x}", *z) : errno_describe(z.error()), tag, ~tag);
      }
    }
  }
  if (t.dev->cpu_faults() != 0) fail("the CPU faulted on device memory during the benchmark");
  for (Va base : bufs) require_ok(as.munmap(base, size), "munmap");
}

// The baseline: memcpy of the run's `iters` chunks of `size` (a host buffer, rewritten first,
// untimed, as the migration's source was just populated) each into the same `size` bytes of a
// second host buffer, each chunk timed (into *chunk_ns); returns the run's total. One
// destination reused, because the migration's destinations are recycled frames too (the
// device's free list and PhysMem hand back the folio freed last): a cold destination would
// make the baseline slower than the migration it is the ceiling of.
double memcpy_run(ThpBench& t, uint64_t size, uint64_t iters, int run, std::vector<double>* chunk_ns) {
  std::memset(t.copy_from.data(), run + 1, iters * size);
  double ns = 0;
  for (uint64_t k = 0; k < iters; k++) {
    const uint64_t t0 = now_ns();
    std::memcpy(t.copy_to.data(), t.copy_from.data() + k * size, size);
    const uint64_t t1 = now_ns();
    ns += static_cast<double>(t1 - t0);
    if (chunk_ns) chunk_ns->push_back(static_cast<double>(t1 - t0));
  }
  if (std::memcmp(t.copy_to.data(), t.copy_from.data() + (iters - 1) * size, size) != 0) {
    fail("memcpy baseline: copy differs");
  }
  return ns;
}

// Untimed: CPU accesses to pages on the device come back through BenchDevice::migrate_to_ram
// (a 2 MiB device folio whole, a 4 KiB page alone). Returns the device's CPU-fault count.
uint64_t check_cpu_faults_back(ThpBench& t, bool thp) {
  mm::AddressSpace& as = *t.m.as;
  const uint64_t npages = kPmdSize / kPageSize;
  const Va base = map_anon(as, kPmdSize, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  for (uint64_t i = 0; i < npages; i++) {
    if (int rc = mm::cpu::store<uint64_t>(as, base + i * kPageSize, page_tag(i, 99))) {
      require_ok(rc, fmt::format("cpu::store at {:#x}", base + i * kPageSize));
    }
  }
  const uint64_t faults0 = t.dev->cpu_faults();
  if (t.dev->migrate(as, base, base + kPmdSize, /*to_device=*/true).pages != npages) {
    fail("CPU-fault check: 2 MiB did not move to the device");
  }
  for (uint64_t i = 0; i < npages; i++) {
    const Va va = base + i * kPageSize;
    Result<uint64_t> v = mm::cpu::load<uint64_t>(as, va);
    if (!v || *v != page_tag(i, 99)) {
      fail("CPU read of device page {:#x} (migrate_to_ram) gave {}, expected {:#x}", va,
           v ? fmt::format("{:#x}", *v) : errno_describe(v.error()), page_tag(i, 99));
    }
    if (t.dev->pgmap().contains(mm::query_page(as, va).pfn)) fail("page {:#x} still on the device after a CPU read", va);
  }
  require_ok(as.munmap(base, kPmdSize), "munmap");
  return t.dev->cpu_faults() - faults0;
}

std::vector<Report> run_thp_migration(const Options& opt, uint64_t size_limit) {
  std::vector<uint64_t> sizes;
  for (uint64_t s : kThpSizes) {
    if (s <= std::max(size_limit, kThpSizes[0])) sizes.push_back(s);
  }
  const uint64_t run_bytes = std::max(sizes.back(), std::min(kRunBytes, 4 * sizes.back()));
  ThpBench t;
  // The source buffers and their copies back, plus slack for the zero pages and tables.
  t.m = Machine::create(2 * run_bytes + (64ULL << 20));
  prefault_ram(t.m);
  t.dev = std::make_unique<BenchDevice>(t.m.mem.get(), run_bytes / kPageSize);
  t.copy_from.resize(run_bytes);
  t.copy_to.resize(run_bytes);
  for (size_t i = 0; i < t.copy_from.size(); i += 8) {
    const uint64_t v = page_tag(i, 0);
    std::memcpy(&t.copy_from[i], &v, 8);
  }

  std::vector<Report> reports;
  std::vector<std::string> summary;
  for (uint64_t size : sizes) {
    const uint64_t iters = std::max<uint64_t>(1, run_bytes / size);
    const uint64_t bytes = iters * size;
    std::array<Directions, 3> dirs;  // by Backing
    std::vector<Backing> backings = {kThp, k4k};
    if (kSelectCompound != 0) backings.push_back(kThpSplit);
    std::vector<double> copy_ns, copy_chunk_ns;
    // Warm-up run of everything (r = 0, not kept), then runs rotating the order; the memcpy
    // baseline runs after the first backing.
    for (int r = 0; r <= opt.repeat; r++) {
      std::array<Directions, 3> scratch;
      std::array<Directions, 3>& into = r == 0 ? scratch : dirs;
      for (size_t j = 0; j < backings.size(); j++) {
        const Backing bk = backings[(j + r) % backings.size()];
        thp_run(t, size, iters, bk, r, into[bk]);
        if (j == 0) {
          const double c = memcpy_run(t, size, iters, r, r > 0 ? &copy_chunk_ns : nullptr);
          if (r > 0) copy_ns.push_back(c);
        }
      }
    }
    // Figures: the median over every buffer (chunk) of every run, robust against a run that
    // was preempted on a shared machine; the per-run figures are printed as well.
    const double copy_gbs = gb_per_s(size, median(copy_chunk_ns));
    std::array<std::array<double, 2>, 3> gbs{};  // [backing][direction]
    for (Backing bi : backings) {
      for (int di = 0; di < 2; di++) {
        const Directions& d = dirs[bi];
        gbs[bi][di] = gb_per_s(size, median(di == 0 ? d.s2d_buf_ns : d.d2s_buf_ns));
      }
    }
    for (int di = 0; di < 2; di++) {
      for (int bi : {kThp, k4k}) {
        const Directions& d = dirs[bi];
        const BenchDevice::Moved& mv = di == 0 ? d.s2d : d.d2s;
        const std::vector<double>& ns = di == 0 ? d.s2d_ns : d.d2s_ns;
        const double buf_ns = median(di == 0 ? d.s2d_buf_ns : d.d2s_buf_ns);
        const double per_2mib = static_cast<double>(size) / kPmdSize;
        Report rep;
        rep.case_name = fmt::format("thp-migration-{}-{}-{}", size_name(size), di == 0 ? "sys2dev" : "dev2sys",
                                    backing_name(static_cast<Backing>(bi)));
        rep.size = size;
        rep.sweep_point(fmt::format("{} {}", di == 0 ? "sys2dev" : "dev2sys", backing_name(static_cast<Backing>(bi))),
                        "buffer size", static_cast<double>(size));
        rep.ours = {gbs[bi][di], "GB/s"};
        rep.baseline_name = "memcpy";
        rep.baseline = {copy_gbs, "GB/s"};
        rep.ratio = rep.ours.value / rep.baseline.value;
        rep.detail("{} buffer(s) of {} per run ({}), {} source memory: {} of {} 2 MiB blocks PMD-mapped THPs",
                   iters, human_bytes(size), human_bytes(bytes), bi == kThp ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE",
                   d.thp_blocks, size / kPmdSize * iters);
        std::vector<double> g;
        for (double v : ns) g.push_back(gb_per_s(bytes, v));
        std::vector<double> cg;
        for (double v : copy_ns) cg.push_back(gb_per_s(bytes, v));
        rep.detail("per-run figures (GB/s): migration {}; memcpy {}", runs_string(g), runs_string(cg));
        rep.detail("{:.1f} us per 2 MiB migrated ({:.0f} ns per 4 KiB page); memcpy {:.1f} us per 2 MiB",
                   buf_ns / per_2mib / 1000, buf_ns / (size / kPageSize),
                   median(copy_chunk_ns) / per_2mib / 1000);
        rep.detail("device's destinations per run: {} of 2 MiB, {} of 4 KiB; compound src entries {}; mm splits in "
                   "the round trip: {} PMD, {} folio; page kind before {}, after the round trip {}",
                   mv.compound_dst, mv.small_dst, mv.compound_src, d.splits_pmd, d.splits_folio,
                   mm::page_kind_name(d.kind_before), mm::page_kind_name(d.kind_after));
        if (bi == kThp) {
          rep.detail("THP/4K speed ratio at {}: {:.2f}", human_bytes(size), gbs[kThp][di] / gbs[k4k][di]);
          rep.metric("thp_over_4k", gbs[kThp][di] / gbs[k4k][di]);
          if (kSelectCompound == 0) {
            rep.detail("this mm has no MIGRATE_VMA_SELECT_COMPOUND: THPs are split and migrated as 512 4 KiB "
                       "pages (the figure is split-and-migrate-4K)");
          } else {
            const Directions& sp = dirs[kThpSplit];
            const std::vector<double>& sns = di == 0 ? sp.s2d_ns : sp.d2s_ns;
            rep.detail("the same THP source without MIGRATE_VMA_SELECT_COMPOUND (split, then 4 KiB pages): {:.2f} "
                       "GB/s (per run {}; {} PMD / {} folio splits per run); compound/split {:.2f}",
                       gbs[kThpSplit][di], runs_string([&] {
                         std::vector<double> v;
                         for (double x : sns) v.push_back(gb_per_s(bytes, x));
                         return v;
                       }()),
                       sp.splits_pmd, sp.splits_folio, gbs[kThp][di] / gbs[kThpSplit][di]);
            rep.metric("thp_split_gb_s", gbs[kThpSplit][di]);
          }
        }
        rep.metric("memcpy_gb_s", copy_gbs);
        rep.metric("ns_per_2mib", buf_ns / per_2mib);
        rep.metric("compound_dst", static_cast<double>(mv.compound_dst));
        rep.metric("split_folio", static_cast<double>(d.splits_folio));
        for (size_t i = 0; i < g.size(); i++) rep.metric(fmt::format("ours_run{}_gb_s", i), g[i]);
        reports.push_back(std::move(rep));
      }
    }
    std::string line = fmt::format("{:>8}: sys->dev thp {:.2f} / 4k {:.2f} GB/s (THP/4K {:.2f}); dev->sys thp {:.2f} "
                                   "/ 4k {:.2f} GB/s (THP/4K {:.2f}); memcpy {:.2f} GB/s",
                                   human_bytes(size), gbs[kThp][0], gbs[k4k][0], gbs[kThp][0] / gbs[k4k][0],
                                   gbs[kThp][1], gbs[k4k][1], gbs[kThp][1] / gbs[k4k][1], copy_gbs);
    if (kSelectCompound != 0) {
      line += fmt::format("; thp-split sys->dev {:.2f} dev->sys {:.2f} GB/s", gbs[kThpSplit][0], gbs[kThpSplit][1]);
    }
    summary.push_back(std::move(line));
  }
  Report& last = reports.back();
  const uint64_t thp_faults = check_cpu_faults_back(t, true), small_faults = check_cpu_faults_back(t, false);
  if (small_faults != kPagesPerPmd || thp_faults == 0 || (kSelectCompound && thp_faults != 1)) {
    fail("CPU reads of 2 MiB on the device took {} (THP) and {} (4 KiB) migrate_to_ram calls; expected {} and 512",
         thp_faults, small_faults, kSelectCompound ? "1" : "some");
  }
  last.detail("verified: CPU reads bring device pages back through migrate_to_ram: {} call(s) for a 2 MiB THP, {} "
              "for 2 MiB of 4 KiB pages",
              thp_faults, small_faults);
  check_machine(*t.m.mem, last, "after the family (everything unmapped)");
  if (t.dev->free_pages() != t.dev->total_pages()) fail("device pages in use after the family");
  last.detail("summary (compound migration {}):", kSelectCompound ? "selected" : "not in this mm: THPs split");
  for (std::string& s : summary) last.details.push_back(std::move(s));
  return reports;
}

const Registrar kThpMigration({
    .name = "thp-migration",
    .family = "thp-migration",
    .summary = "migration GB/s sys<->dev, THP vs 4 KiB source, vs memcpy (hmm-tests benchmark_thp_migration)",
    .default_size = 16ULL << 20,
    .run_many = run_thp_migration,
});

}  // namespace
}  // namespace gpusvm::bench
