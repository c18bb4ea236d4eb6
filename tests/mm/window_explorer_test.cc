// The window explorer: for every schedule point a gpusvm/mm path reaches, stop that path there
// and run, from another thread, each operation that is legal at that moment; then check every
// byte, mm::check, device-page accounting and the select rules. Races like the ones of issue 9
// (a decision taken in one lock hold and acted on in another) come from such windows; this
// test tries every (point, operation) pair instead of waiting for luck.
//
// One run:
//   1. set up: a 4 MiB huge-enabled anonymous region, two THPs, every page written with
//      pattern(va, 1); the victim's precondition (e.g. the region moved to device A first);
//   2. the victim thread starts its operation (a migration, an eviction, a CPU fault on a
//      device page, make_device_exclusive, an hmm_range_fault ...) and stops at the point;
//   3. the op thread runs the operation in the window; if it cannot finish within kOpWindow
//      (it waits for a lock the stopped victim holds), it is "serialized" and finishes after
//      step 4;
//   4. the victim is released; both threads are joined (bounded);
//   5. checks: the select rule (pages device B moved are still on device B: nobody else's
//      migration may take them), mm::check, then every page's data against the model of what
//      the op did to it, then teardown: every device page and every RAM frame free again.
//
// The victims' points are discovered (a count-only pass), so points added later are explored
// with no change here. Each victim is one test; it prints the pairs it tried. Under TSan and
// ASan a bounded subset runs (GPUSVM_EXPLORE_ALL=1 runs everything).
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t kRegion = 2 * kPmdSize;  // two THPs
constexpr uint64_t kPages = kRegion / kPageSize;
constexpr uint64_t kDevPages = 2 * kPagesPerPmd;
// How long an op may take inside the window before it counts as blocked behind the victim
// (it then finishes after the release: still a legal interleaving, only a less useful one).
constexpr auto kOpWindow = 25ms;
constexpr auto kJoinBound = 20s;   // after release, everything must finish within this

// Pages the ops touch (inside the first THP, away from the victims' own pages).
constexpr uint64_t kOpPage = 11;
constexpr uint64_t kCpuOpPage = 13;

// What one run does to the region: the model the data is checked against.
struct Expect {
  uint64_t word0[kPages];
  uint64_t word1[kPages];
  bool unmapped[kPages] = {};
  bool zero_or_same[kPages] = {};  // MADV_FREE: either the old data or zeroes
  Va second_half = 0;              // where pages [kPagesPerPmd, kPages) live now
};

// Members in teardown order, last first: address spaces go before the devices whose pages
// they map, and the devices before the memory.
struct World {
  std::unique_ptr<PhysMem> mem;
  std::unique_ptr<TestDevice> dev;   // device A: the victims' device
  std::unique_ptr<TestDevice> dev2;  // device B: another owner
  std::unique_ptr<AddressSpace> as;
  std::unique_ptr<AddressSpace> child;
  std::unique_ptr<AddressSpace> sharer;  // a victim's own fork child (destroyed first)
  Va base = 0;
  Va spare = 0;  // a free 2 MiB-aligned hole for mremap
  std::atomic<uint64_t> b_moved{0};  // pages device B's migration (an op) moved
  bool child_exited = false;
  uint64_t free_at_start = 0;
  Expect want{};
  Va page(uint64_t i) const { return i < kPagesPerPmd ? base + i * kPageSize : want.second_half + (i - kPagesPerPmd) * kPageSize; }
};

// Sets up the region and both devices. Returns false (with a failure) if the machine could
// not be built.
bool make_world(World& w) {
  // With a swap device, for the madv_pageout_page op.
  Result<std::unique_ptr<PhysMem>> mem = PhysMem::create({.ram_bytes = 64ULL << 20, .swap_slots = 64});
  if (!mem) return false;
  w.mem = std::move(*mem);
  w.free_at_start = w.mem->free_pages();
  w.as = make_as(w.mem.get());
  w.dev = std::make_unique<TestDevice>(w.mem.get(), kDevPages);
  w.dev2 = std::make_unique<TestDevice>(w.mem.get(), kDevPages);
  if (!w.as || !w.dev->ok() || !w.dev2->ok()) return false;
  const Va raw = map_anon(*w.as, kRegion + 3 * kPmdSize, PROT_READ | PROT_WRITE, true);
  if (!raw) return false;
  w.base = pmd_align_down(raw + kPmdSize - 1);
  w.spare = w.base + kRegion;
  // Keep the region its own VMA and the hole for mremap really free.
  if (w.as->munmap(w.spare, raw + kRegion + 3 * kPmdSize - w.spare) != 0) return false;
  if (w.base > raw && w.as->munmap(raw, w.base - raw) != 0) return false;
  w.want.second_half = w.base + kPmdSize;
  for (uint64_t i = 0; i < kPages; i++) {
    const Va va = w.base + i * kPageSize;
    if (cpu::store<uint64_t>(*w.as, va, pattern(va, 1)) != 0) return false;
    w.want.word0[i] = pattern(va, 1);
    w.want.word1[i] = 0;
  }
  return true;
}

// ---- victims: the operations stopped at a point ----

struct Victim {
  const char* name;
  std::function<void(World&)> prepare;  // before the victim starts (no point stops here)
  std::function<void(World&)> run;      // in the victim thread
  bool touches_device_b = false;  // faults pages in, so it may legally bring device B's back
};

void to_device_a(World& w) { (void)w.dev->migrate_to_device(*w.as, w.base, w.base + kRegion, MIGRATE_VMA_SELECT_COMPOUND); }

std::vector<Victim> victims() {
  return {
      {"migrate_to_dev_thp", nullptr, to_device_a},
      {"migrate_to_dev_4k", [](World& w) { w.dev->fail_thp_alloc = true; }, to_device_a},
      {"migrate_partial",
       nullptr,
       [](World& w) { (void)w.dev->migrate_to_device(*w.as, w.base + 3 * kPageSize, w.base + 20 * kPageSize); }},
      {"migrate_to_sys", to_device_a,
       [](World& w) { (void)w.dev->migrate_to_system(*w.as, w.base, w.base + kRegion, MIGRATE_VMA_SELECT_COMPOUND); }},
      {"cpu_fault_on_device", to_device_a,
       [](World& w) { (void)cpu::load<uint64_t>(*w.as, w.base + 5 * kPageSize); }, true},
      {"migrate_to_sys_4k",  // the device THPs split for 4 KiB system pages (seed 003)
       [](World& w) {
         to_device_a(w);
         w.dev->fail_thp_alloc = true;
       },
       [](World& w) { (void)w.dev->migrate_to_system(*w.as, w.base, w.base + kRegion, MIGRATE_VMA_SELECT_COMPOUND); }},
      {"fork_child_migrates_part_of_shared_thp",  // splits the parent's THP through the rmap
       [](World& w) {
         Result<std::unique_ptr<AddressSpace>> c = w.as->fork();
         if (c) w.sharer = std::move(*c);
       },
       [](World& w) {
         if (w.sharer) {
           const Va s = w.base + kPmdSize + 3 * kPageSize;
           (void)w.dev->migrate_to_device(*w.sharer, s, s + 17 * kPageSize);
         }
       }},
      {"evict_by_pfn", to_device_a, [](World& w) { (void)w.dev->evict_all(); }},
      {"evict_by_pfn_4k",
       [](World& w) {
         to_device_a(w);
         w.dev->fail_thp_alloc = true;
       },
       [](World& w) { (void)w.dev->evict_all(); }},
      {"make_device_exclusive",
       nullptr,
       [](World& w) {
         ReadLock g(&w.as->mmap_lock());
         Result<Folio*> page = make_device_exclusive(*w.as, w.base + 7 * kPageSize, w.dev.get());
         if (page) {
           folio_unlock((*page)->head());
           (*page)->head()->put();
         }
       },
       true},
      {"hmm_range_fault",
       nullptr,
       [](World& w) {
         TestMirror mirror;
         MmuIntervalNotifier n;
         if (n.insert(w.as.get(), w.base, kRegion, &mirror) != 0) return;
         std::vector<uint64_t> pfns;
         (void)mirror_range(*w.as, n, w.base, w.base + kRegion, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns);
         n.remove();
       },
       true},
  };
}

// ---- ops: what another thread does in the window ----

struct Op {
  const char* name;
  std::function<void(World&)> run;     // in the op thread
  std::function<void(World&)> expect;  // updates the model (called once, after the run)
  std::function<void(World&)> prepare = nullptr;  // before the victim's own preparation
};

std::vector<Op> ops() {
  return {
      {"none", [](World&) {}, [](World&) {}},
      {"munmap_page", [](World& w) { (void)w.as->munmap(w.page(kOpPage), kPageSize); },
       [](World& w) { w.want.unmapped[kOpPage] = true; }},
      {"madv_dontneed_page", [](World& w) { (void)w.as->madvise(w.page(kOpPage), kPageSize, MADV_DONTNEED); },
       [](World& w) { w.want.word0[kOpPage] = w.want.word1[kOpPage] = 0; }},
      {"madv_free_page", [](World& w) { (void)w.as->madvise(w.page(kOpPage), kPageSize, MADV_FREE); },
       [](World& w) { w.want.zero_or_same[kOpPage] = true; }},
      // Reclaim in the window: the page is swapped out (its THP split first) if only this
      // process maps it and it is present; its bytes must come back either way.
      {"madv_pageout_page", [](World& w) { (void)w.as->madvise(w.page(kOpPage), kPageSize, MADV_PAGEOUT); },
       [](World&) {}},
      {"mprotect_read", [](World& w) { (void)w.as->mprotect(w.page(kOpPage), 2 * kPageSize, PROT_READ); },
       [](World&) {}},
      {"mremap_second_thp",
       [](World& w) {
         (void)w.as->mremap(w.base + kPmdSize, kPmdSize, kPmdSize, MREMAP_MAYMOVE | MREMAP_FIXED, w.spare);
       },
       [](World& w) { w.want.second_half = w.spare; }},
      {"fork",
       [](World& w) {
         Result<std::unique_ptr<AddressSpace>> child = w.as->fork();
         if (child) w.child = std::move(*child);
       },
       [](World&) {}},
      {"exit_fork_child",  // the region is COW-shared with a child that exits in the window
       [](World& w) {
         if (w.child) w.child->exit();
       },
       [](World& w) { w.child_exited = true; },
       [](World& w) {
         Result<std::unique_ptr<AddressSpace>> child = w.as->fork();
         if (child) w.child = std::move(*child);
       }},
      {"cpu_read", [](World& w) { (void)cpu::load<uint64_t>(*w.as, w.page(kCpuOpPage)); }, [](World&) {}},
      {"cpu_write", [](World& w) { (void)cpu::store<uint64_t>(*w.as, w.page(kCpuOpPage), pattern(w.page(kCpuOpPage), 2)); },
       [](World& w) { w.want.word0[kCpuOpPage] = pattern(w.base + kCpuOpPage * kPageSize, 2); }},
      {"cpu_atomic", [](World& w) { (void)cpu::atomic_fetch_add(*w.as, w.page(kCpuOpPage) + 8, 1); },
       [](World& w) { w.want.word1[kCpuOpPage] += 1; }},
      {"device_b_migrates_first_thp",
       [](World& w) {
         Result<uint64_t> moved = w.dev2->migrate_to_device(*w.as, w.base, w.base + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND);
         if (moved) w.b_moved = *moved;
       },
       [](World&) {}},
      {"evict_device_a", [](World& w) { (void)w.dev->evict_all(); }, [](World&) {}},
  };
}

// ---- checks ----

// Device B's pages may only leave device B through device B (or a CPU fault): another
// owner's walk that takes them breaks the select rules (issue 9 item 1 (a)).
void check_device_b(World& w, const Victim& v, uint64_t b_moved_pages, const std::string& what) {
  uint64_t on_b = 0;
  for (uint64_t i = 0; i < kPagesPerPmd; i++) {
    if (w.want.unmapped[i]) continue;
    PageState s = query_page(*w.as, w.page(i));
    const bool device_private =
        s.leaf == SoftLeafType::kDevicePrivateWrite || s.leaf == SoftLeafType::kDevicePrivateRead;
    const DevPagemap* b = w.dev2->pgmap();
    if (device_private && s.pfn >= b->first_pfn() && s.pfn < b->first_pfn() + b->nr_pages()) on_b++;
  }
  const uint64_t in_use = kDevPages - w.dev2->free_pages();
  EXPECT_EQ(on_b, in_use) << what << ": device B pages in use but not mapped (or the reverse)";
  if (v.touches_device_b) {
    EXPECT_LE(in_use, b_moved_pages) << what;
  } else {
    EXPECT_EQ(in_use, b_moved_pages) << what << ": another walk took device B's pages";
  }
}

// Every page of `as` (the region, or a fork child's copy of it) against the model.
void check_data(World& w, AddressSpace& as, const std::string& what) {
  int bad = 0;
  for (uint64_t i = 0; i < kPages && bad < 5; i++) {
    const Va va = w.page(i);
    Result<uint64_t> v0 = cpu::load<uint64_t>(as, va);
    if (w.want.unmapped[i]) {
      if (v0.ok()) bad++, ADD_FAILURE() << what << ": page " << i << " readable after munmap";
      continue;
    }
    Result<uint64_t> v1 = cpu::load<uint64_t>(as, va + 8);
    if (!v0.ok() || !v1.ok()) {
      bad++, ADD_FAILURE() << what << ": page " << i << " unreadable (" << v0.error() << ")";
      continue;
    }
    const bool same = *v0 == w.want.word0[i] && *v1 == w.want.word1[i];
    const bool zero = *v0 == 0 && *v1 == 0;
    if (!same && !(w.want.zero_or_same[i] && zero)) {
      bad++, ADD_FAILURE() << what << ": page " << i << " word0 " << std::hex << *v0 << " want "
                           << w.want.word0[i] << ", word1 " << *v1 << " want " << w.want.word1[i];
    }
  }
}

// Joins `t` once `done` is set; a thread still running after kJoinBound is a hang (a lost
// wake-up, a livelock): panic naming the run, rather than let CI wait.
void join_bounded(std::thread& t, const std::atomic<bool>& done, const std::string& what) {
  const auto until = std::chrono::steady_clock::now() + kJoinBound;
  while (!done && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
  if (!done) panic("window explorer: " + what + " did not finish within 20 s after the release");
  t.join();
}

struct Tally {
  int runs = 0;
  int serialized = 0;
  std::string line;  // the ops tried at one (point, hit): "op" ran in the window, "op~" after it
};

// One (victim, point, hit, op) run; returns whether the op finished inside the window.
void explore_one(const Victim& v, const std::string& point, uint64_t nth, const Op& op, Tally& tally) {
  const std::string what = std::string(v.name) + " @" + point + "#" + std::to_string(nth) + " + " + op.name;
  SCOPED_TRACE(what);
  if (std::getenv("GPUSVM_EXPLORE_VERBOSE")) std::fprintf(stderr, "explore: %s\n", what.c_str());
  World w;
  ASSERT_TRUE(make_world(w));
  if (op.prepare) op.prepare(w);
  if (v.prepare) v.prepare(w);
  std::atomic<bool> op_done{false};
  std::atomic<bool> victim_done{false};
  {
    sched_point::Pause pause(point, {.nth = nth, .thread = "victim"});
    ASSERT_EQ(pause.status(), 0);
    std::thread victim([&] {
      sched_point::set_thread_name("victim");
      v.run(w);
      sched_point::set_thread_name("");
      victim_done = true;
    });
    const bool reached = pause.wait_reached(5s);
    std::thread op_thread;
    if (reached) {
      op_thread = std::thread([&] {
        op.run(w);
        op_done = true;
      });
      const auto until = std::chrono::steady_clock::now() + kOpWindow;
      while (!op_done && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(1ms);
    }
    const bool in_window = op_done.load();
    pause.release();
    join_bounded(victim, victim_done, what + " (victim)");
    if (op_thread.joinable()) join_bounded(op_thread, op_done, what + " (op)");
    if (!reached) {
      tally.line += std::string(" ") + op.name + "?";  // this run's path did not pass the point
      return;
    }
    tally.runs++;
    if (!in_window) tally.serialized++;
    tally.line += std::string(" ") + op.name + (in_window ? "" : "~");
  }
  op.expect(w);
  check_device_b(w, v, w.b_moved, what);
  EXPECT_EQ(w.dev->select_violations, 0) << what << ": device A's migration collected a page it did not select";
  EXPECT_EQ(w.dev2->select_violations, 0) << what << ": device B's migration collected a page it did not select";
  {
    CheckReport r = check(*w.mem);
    EXPECT_TRUE(r.ok()) << what << "\n" << r.to_string();
  }
  check_data(w, *w.as, what);
  if (w.child && !w.child_exited) check_data(w, *w.child, what + " (fork child)");
  w.sharer.reset();
  w.child.reset();
  w.as.reset();
  EXPECT_EQ(w.dev->free_pages(), kDevPages) << what << ": device A pages leaked";
  EXPECT_EQ(w.dev2->free_pages(), kDevPages) << what << ": device B pages leaked";
  w.dev.reset();
  w.dev2.reset();
  EXPECT_EQ(w.mem->free_pages(), w.free_at_start) << what << ": RAM frames leaked";
}

// How many times the victim passes each point (count-only Pause on every point).
std::map<std::string, uint64_t> discover(const Victim& v) {
  World w;
  std::map<std::string, uint64_t> reached;
  if (!make_world(w)) return reached;
  if (v.prepare) v.prepare(w);
  std::vector<std::unique_ptr<sched_point::Pause>> counters;
  std::vector<std::string> names = sched_point::points();
  for (const std::string& p : names) {
    counters.push_back(std::make_unique<sched_point::Pause>(p, sched_point::Spec{.thread = "victim", .stop = false}));
  }
  std::thread t([&] {
    sched_point::set_thread_name("victim");
    v.run(w);
  });
  t.join();
  for (size_t i = 0; i < names.size(); i++) {
    if (counters[i]->hits()) reached[names[i]] = counters[i]->hits();
  }
  return reached;
}

bool explore_all() {
#if defined(GPUSVM_SANITIZER)
  const char* env = std::getenv("GPUSVM_EXPLORE_ALL");
  return env && std::string(env) == "1";
#else
  return true;
#endif
}

class WindowExplorer : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { set_hang_timeout(10s); }
  void TearDown() override { set_hang_timeout(60s); }
};

TEST_P(WindowExplorer, EveryPointEveryOp) {
  const Victim v = victims()[GetParam()];
  const std::map<std::string, uint64_t> reached = discover(v);
  Tally tally;
  int pairs = 0;
  int k = 0;
  std::string report;
  for (const auto& [point, hits] : reached) {
    // The first and the last pass of each point (a walk passes some once per PMD or page).
    std::vector<uint64_t> nths{1};
    if (hits > 1) nths.push_back(hits);
    for (uint64_t nth : nths) {
      tally.line.clear();
      for (const Op& op : ops()) {
        // Sanitizer builds: every third pair, rotating with the victim so all pairs are
        // covered across victims.
        if (!explore_all() && (k++ + GetParam()) % 3 != 0) continue;
        explore_one(v, point, nth, op, tally);
        pairs++;
        if (HasFatalFailure()) return;
      }
      report += "  " + point + "#" + std::to_string(nth) + ":" + tally.line + "\n";
    }
  }
  std::printf("window explorer: victim %s: %zu points reached, %d (point, hit, op) pairs tried, %d ran in the "
              "window, %d after it (op~: blocked behind the stopped victim; op?: point not reached)\n%s",
              v.name, reached.size(), pairs, tally.runs - tally.serialized, tally.serialized, report.c_str());
}

INSTANTIATE_TEST_SUITE_P(Victims, WindowExplorer, ::testing::Range(0, static_cast<int>(victims().size())),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return std::string(victims()[p.param].name);
                         });

}  // namespace
}  // namespace gpusvm::mm::testing
