// gpusvm-demo host-mm: a short tour of the host memory model (gpusvm/mm) and hmm_range_fault, with
// a summary a GPU-driver developer can read without knowing the code: what faults the CPU
// took, what backs each page, what a device mirror sees and how long the walk took.
//
// Scenario (one simulated machine, ~1 s):
//   1. mmap A (64 MiB, MADV_HUGEPAGE) and B (16 MiB, no advice)
//   2. CPU reads of untouched memory: huge zero PMDs in A, the zero page in B
//   3. CPU writes: THPs in A, 4 KiB pages in B; a write on a huge zero PMD
//   4. fork; the child writes (copy-on-write) and exits
//   5. mprotect of 64 KiB inside a THP: the PMD mapping is split into PTEs
//   6. a device mirror: hmm_range_fault snapshot of A and B, then REQ_FAULT walks
//   7. verification of every page's data, pages by kind, fault counters, mm::check
// Exit status 0 when every check passed, 1 otherwise.
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/physmem.h"
#include "tools/gpusvm-demo/host_mm_demo.h"

namespace gpusvm::demo {
namespace {

using namespace gpusvm::mm;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kKiB = 1ULL << 10;

int g_failures = 0;

// Prints "    <what> ... OK" or "... FAIL (<why>)" and counts failures.
bool expect(bool ok, const std::string& what, const std::string& why = "") {
  if (ok) {
    fmt::print("      ok    {}\n", what);
  } else {
    fmt::print("      FAIL  {}{}\n", what, why.empty() ? "" : " (" + why + ")");
    g_failures++;
  }
  return ok;
}

uint64_t ns_now() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// The first 8-byte word of a page: who wrote it (generation) and where.
uint64_t pattern(Va va, uint64_t gen) { return (va * 0x9E3779B97F4A7C15ULL) ^ (gen << 56) ^ gen; }

// ---- a region and what its pages should hold ----

struct Region {
  const char* name;
  Va start = 0;
  uint64_t len = 0;
  std::vector<uint64_t> expected;  // first word of every page (0: never written)

  Va at(uint64_t off) const { return start + off; }
  uint64_t npages() const { return len / kPageSize; }
  uint64_t& want(Va va) { return expected[(va - start) / kPageSize]; }
};

std::string rel(const Region& r, uint64_t from, uint64_t to) {
  return fmt::format("{}[{}, {} MiB)", r.name, from / kMiB, to / kMiB);
}

// ---- statistics deltas ----

using StatSnapshot = std::map<std::string, uint64_t>;

StatSnapshot snapshot(AddressSpace& as) {
  StatSnapshot s;
  as.stats().for_each([&](const char* name, const char*, uint64_t v) { s[name] = v; });
  return s;
}

uint64_t delta(const StatSnapshot& a, const StatSnapshot& b, const char* name) {
  return b.at(name) - a.at(name);
}

// "8 faults (huge_zero 8)" plus any other counter that moved.
std::string fault_summary(const StatSnapshot& a, const StatSnapshot& b) {
  std::string kinds, other;
  for (const auto& [name, v] : b) {
    const uint64_t d = v - a.at(name);
    if (!d || name == "faults") continue;
    std::string& out = name.rfind("faults_", 0) == 0 ? kinds : other;
    out += fmt::format("{}{} {}", out.empty() ? "" : ", ",
                       name.rfind("faults_", 0) == 0 ? name.substr(7) : name, d);
  }
  std::string s = fmt::format("{} fault(s)", delta(a, b, "faults"));
  if (!kinds.empty()) s += ": " + kinds;
  if (!other.empty()) s += "; also " + other;
  return s;
}

// ---- pages by kind ----

constexpr std::array<PageKind, 7> kKinds = {PageKind::kNone,   PageKind::kZeroPage,
                                            PageKind::kHugeZero, PageKind::kSmall,
                                            PageKind::kThpPte, PageKind::kThpPmd,
                                            PageKind::kSoftLeaf};

std::array<uint64_t, 7> count_kinds(AddressSpace& as, Va start, uint64_t len) {
  std::array<uint64_t, 7> n{};
  for (Va va = start; va < start + len; va += kPageSize) {
    n[static_cast<size_t>(query_page(as, va).kind)]++;
  }
  return n;
}

void print_kinds(AddressSpace& as, const std::vector<const Region*>& regions) {
  fmt::print("      {:<22}", "4 KiB pages by kind");
  for (PageKind k : kKinds) fmt::print("{:>10}", page_kind_name(k));
  fmt::print("\n");
  for (const Region* r : regions) {
    const std::array<uint64_t, 7> n = count_kinds(as, r->start, r->len);
    fmt::print("      {:<22}", fmt::format("{} ({} MiB)", r->name, r->len / kMiB));
    for (uint64_t v : n) fmt::print("{:>10}", v);
    fmt::print("\n");
  }
}

bool kinds_are(AddressSpace& as, Va start, uint64_t len, PageKind want, std::string* why) {
  for (Va va = start; va < start + len; va += kPageSize) {
    const PageKind k = query_page(as, va).kind;
    if (k != want) {
      *why = fmt::format("page {:#x} is {}", va, page_kind_name(k));
      return false;
    }
  }
  return true;
}

// ---- CPU access helpers ----

// Stores pattern(va, gen) in the first word of every page of [start, start + len).
bool write_pages(AddressSpace& as, Region& r, Va start, uint64_t len, uint64_t gen, std::string* why) {
  for (Va va = start; va < start + len; va += kPageSize) {
    if (int rc = cpu::store<uint64_t>(as, va, pattern(va, gen))) {
      *why = fmt::format("store at {:#x}: {}", va, errno_describe(rc));
      return false;
    }
    r.want(va) = pattern(va, gen);
  }
  return true;
}

// Loads the first word of every page of [start, start + len) and compares with `r`. Pages
// with no entry at all are only checked to be unwritten: a load would fault them in and
// change what the demo shows.
bool verify_pages(AddressSpace& as, Region& r, Va start, uint64_t len, std::string* why) {
  for (Va va = start; va < start + len; va += kPageSize) {
    if (query_page(as, va).kind == PageKind::kNone) {
      if (r.want(va) != 0) {
        *why = fmt::format("page {:#x} was written but has no entry", va);
        return false;
      }
      continue;
    }
    Result<uint64_t> v = cpu::load<uint64_t>(as, va);
    if (!v || *v != r.want(va)) {
      *why = v ? fmt::format("page {:#x} holds {:#x}, expected {:#x}", va, *v, r.want(va))
               : fmt::format("load at {:#x}: {}", va, errno_describe(v.error()));
      return false;
    }
  }
  return true;
}

// ---- the device mirror ----

// What a driver's interval-notifier callback must do at least: take the driver lock and
// advance the sequence so a walk that raced with this invalidation is retried.
class Mirror : public MmuIntervalNotifierOps {
 public:
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& range, uint64_t cur_seq) override {
    (void)range;
    MutexLock g(&lock_);
    n->set_seq(cur_seq);
    invalidations_++;
    return true;
  }
  Mutex& lock() GPUSVM_RETURN_CAPABILITY(lock_) { return lock_; }
  uint64_t invalidations() {
    MutexLock g(&lock_);
    return invalidations_;
  }

 private:
  Mutex lock_;
  uint64_t invalidations_ GPUSVM_GUARDED_BY(lock_) = 0;
};

struct WalkResult {
  int rc = 0;
  double ns_per_page = 0;
  int retries = 0;
};

// The driver side of hmm_range_fault: read_begin, mmap read lock, walk, driver lock,
// read_retry; retried while an invalidation collides.
WalkResult mirror_range(AddressSpace& as, MmuIntervalNotifier& n, Mirror& mirror, Va start,
                        Va end, uint64_t flags, std::vector<uint64_t>& pfns) {
  pfns.assign((end - start) / kPageSize, 0);
  WalkResult w;
  const uint64_t t0 = ns_now();
  for (w.retries = 0; w.retries < 100; w.retries++) {
    HmmRange r{.notifier = &n, .notifier_seq = n.read_begin(), .start = start, .end = end,
               .hmm_pfns = pfns.data(), .default_flags = flags};
    {
      ReadLock g(&as.mmap_lock());
      w.rc = hmm_range_fault(&r);
    }
    if (w.rc == -EBUSY) continue;
    if (w.rc) break;
    MutexLock g(&mirror.lock());
    if (n.read_retry(r.notifier_seq)) {
      w.rc = -EBUSY;
      continue;
    }
    break;  // here a driver would program its page table
  }
  w.ns_per_page = static_cast<double>(ns_now() - t0) / pfns.size();
  return w;
}

struct PfnSummary {
  uint64_t valid_write = 0, valid_ro = 0, order9 = 0, empty = 0, error = 0;
};

PfnSummary summarize(const std::vector<uint64_t>& pfns) {
  PfnSummary s;
  for (uint64_t p : pfns) {
    if (p & HMM_PFN_ERROR) {
      s.error++;
    } else if (!(p & HMM_PFN_VALID)) {
      s.empty++;
    } else {
      ((p & HMM_PFN_WRITE) ? s.valid_write : s.valid_ro)++;
      if (hmm_pfn_to_map_order(p) == kPmdOrder) s.order9++;
    }
  }
  return s;
}

std::string describe(const PfnSummary& s) {
  return fmt::format("{} VALID|WRITE, {} VALID read-only, {} empty (0), {} ERROR; {} with map "
                     "order 9 (PMD)",
                     s.valid_write, s.valid_ro, s.empty, s.error, s.order9);
}

// Every output word must agree with the CPU page table (query_page), and a page the CPU
// wrote must show the same bytes through the reported pfn as through a CPU load.
bool pfns_match_cpu(AddressSpace& as, Region& r, const std::vector<uint64_t>& pfns, std::string* why) {
  PhysMem* mem = as.mem();
  for (uint64_t i = 0; i < pfns.size(); i++) {
    const Va va = r.start + i * kPageSize;
    const uint64_t p = pfns[i];
    const PageState st = query_page(as, va);
    const bool present = st.kind != PageKind::kNone && st.kind != PageKind::kSoftLeaf;
    const bool huge = st.kind == PageKind::kThpPmd || st.kind == PageKind::kHugeZero;
    if (bool(p & HMM_PFN_VALID) != present || (present && hmm_pfn_to_pfn(p) != st.pfn) ||
        bool(p & HMM_PFN_WRITE) != (present && st.writable) ||
        (present && hmm_pfn_to_map_order(p) != (huge ? kPmdOrder : 0))) {
      *why = fmt::format("page {:#x}: hmm word {:#x}, CPU page table: {} pfn {:#x}{}", va, p,
                         page_kind_name(st.kind), st.pfn, st.writable ? " writable" : "");
      return false;
    }
    if (present) {
      uint64_t word = 0;
      std::memcpy(&word, mem->ram_data(hmm_pfn_to_pfn(p)), sizeof(word));
      if (word != r.expected[i]) {
        *why = fmt::format("page {:#x}: frame {:#x} holds {:#x}, the CPU wrote {:#x}", va,
                           hmm_pfn_to_pfn(p), word, r.expected[i]);
        return false;
      }
    }
  }
  return true;
}

bool check_ok(PhysMem& mem, const char* when) {
  const CheckReport rep = check(mem);
  return expect(rep.ok(),
                fmt::format("mm::check {}: {} entries, {} folios, {} problem(s)", when,
                            rep.entries_checked, rep.folios_checked, rep.problems.size()),
                rep.ok() ? "" : "\n" + rep.to_string());
}

// ---- the scenario ----
//
// One step per function, in the order run() calls them. Each prints its "[n]" block and
// counts failed checks in g_failures; a step returns false only when the tour cannot go on.

// What the steps share: the machine, the process whose address space the tour walks through
// and the two regions with the data they should hold.
struct Tour {
  devfs::Machine& machine;
  PhysMem& mem;
  devfs::Process& proc;
  AddressSpace& as;
  uint64_t free_at_start;
  Region A{"A"}, B{"B"};
  std::string why;  // the reason of the last failed data check
};

void print_intro() {
  fmt::print("gpusvm demo: the host memory model (gpusvm/mm) and hmm_range_fault, step by step\n");
  fmt::print("Everything below runs on simulated memory: a CPU access that finds no usable entry\n"
             "takes a page fault exactly as on Linux, and every byte written is really stored.\n\n");
}

// [1] Two anonymous private regions; A may use THPs.
bool step_mmap(Tour& t) {
  fmt::print("[1] mmap two anonymous private read-write regions\n");
  t.A.len = 64 * kMiB;
  t.B.len = 16 * kMiB;
  for (Region* r : {&t.A, &t.B}) {
    Result<Va> va = t.as.mmap(0, r->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    if (!expect(va.ok(), fmt::format("mmap {} MiB", r->len / kMiB),
                va.ok() ? "" : errno_describe(va.error()))) {
      return false;
    }
    r->start = *va;
    r->expected.assign(r->npages(), 0);
  }
  expect(t.as.madvise(t.A.start, t.A.len, MADV_HUGEPAGE) == 0, "madvise(A, MADV_HUGEPAGE)");
  fmt::print("    A = [{:#x}, {:#x})  64 MiB  MADV_HUGEPAGE: 2 MiB-aligned pieces may use THPs\n",
             t.A.start, t.A.start + t.A.len);
  fmt::print("    B = [{:#x}, {:#x})  16 MiB  no advice: 4 KiB pages only\n\n", t.B.start,
             t.B.start + t.B.len);
  return true;
}

// Loads the first word of every page of [start, start + len); returns how many were not 0.
uint64_t read_nonzero_pages(AddressSpace& as, Va start, uint64_t len) {
  uint64_t nonzero = 0;
  for (Va va = start; va < start + len; va += kPageSize) {
    Result<uint64_t> v = cpu::load<uint64_t>(as, va);
    if (!v || *v) nonzero++;
  }
  return nonzero;
}

// [2] Reads of untouched memory: the huge zero folio in A, the zero page in B.
void step_read_faults(Tour& t) {
  fmt::print("[2] CPU reads of never-written memory map zero pages: nothing is allocated\n");
  const StatSnapshot s0 = snapshot(t.as);
  uint64_t nonzero = read_nonzero_pages(t.as, t.A.start, 16 * kMiB);
  const StatSnapshot s1 = snapshot(t.as);
  fmt::print("    read every page of {}: {}\n", rel(t.A, 0, 16 * kMiB), fault_summary(s0, s1));
  nonzero += read_nonzero_pages(t.as, t.B.start, 4 * kMiB);
  const StatSnapshot s2 = snapshot(t.as);
  fmt::print("    read every page of {}:  {}\n", rel(t.B, 0, 4 * kMiB), fault_summary(s1, s2));
  expect(nonzero == 0, "every read returned 0", fmt::format("{} pages did not", nonzero));
  expect(delta(s0, s1, "faults_huge_zero") == 8, "A: one fault per 2 MiB maps the huge zero folio (8 PMDs)");
  expect(delta(s1, s2, "faults_read_zero") == 1024, "B: one fault per 4 KiB page maps the zero page");
  expect(t.mem.free_pages() == t.free_at_start, "no memory was allocated for the data");
  fmt::print("\n");
}

// [3] Writes: THPs in A, 4 KiB pages in B, and a write on a huge zero PMD.
void step_write_faults(Tour& t) {
  fmt::print("[3] CPU writes allocate memory (one 8-byte store per 4 KiB page)\n");
  const StatSnapshot s0 = snapshot(t.as);
  const bool wa = write_pages(t.as, t.A, t.A.at(16 * kMiB), 32 * kMiB, 1, &t.why);
  const StatSnapshot s1 = snapshot(t.as);
  fmt::print("    write {}: {}\n", rel(t.A, 16 * kMiB, 48 * kMiB), fault_summary(s0, s1));
  const bool wb = write_pages(t.as, t.B, t.B.at(4 * kMiB), 8 * kMiB, 1, &t.why);
  const StatSnapshot s2 = snapshot(t.as);
  fmt::print("    write {}:  {}\n", rel(t.B, 4 * kMiB, 12 * kMiB), fault_summary(s1, s2));
  const bool wz = write_pages(t.as, t.A, t.A.start, kPageSize, 1, &t.why);
  const StatSnapshot s3 = snapshot(t.as);
  fmt::print("    write A+0 (a huge zero PMD):  {}\n", fault_summary(s2, s3));
  expect(wa && wb && wz, "all stores succeeded", t.why);
  expect(delta(s0, s1, "faults_thp") == 16, "A: one fault per 2 MiB allocates a THP (16 THPs)");
  expect(delta(s1, s2, "faults_anon") == 2048, "B: one fault per page allocates a 4 KiB page");
  expect(query_page(t.as, t.A.start).kind == PageKind::kThpPmd,
         "A+0: the write replaced the huge zero folio by a zeroed THP (Linux >= 6.13)");
  fmt::print("\n");
}

// [4] fork: the child's writes copy single pages (splitting a shared THP's PMD first); both
// sides keep reading their own data. The demo drives the child, then the child exits.
bool step_fork(Tour& t) {
  fmt::print("[4] fork(): the child shares every page copy-on-write\n");
  Result<devfs::Process*> child_r = t.machine.fork(t.proc);
  if (!expect(child_r.ok(), "fork", child_r.ok() ? "" : errno_describe(child_r.error()))) return false;
  devfs::Process& child = **child_r;
  AddressSpace& cas = child.mm();
  Region cA = t.A, cB = t.B;  // the child's view starts as a copy of the parent's
  const Va thp_page = t.A.at(16 * kMiB), small_page = t.B.at(4 * kMiB);
  const uint64_t free_before = t.mem.free_pages();
  const StatSnapshot c0 = snapshot(cas);
  const bool w1 = write_pages(cas, cA, thp_page, kPageSize, 2, &t.why);
  const StatSnapshot c1 = snapshot(cas);
  fmt::print("    child writes A+16 MiB (inside a THP): {}\n", fault_summary(c0, c1));
  fmt::print("      (one fault splits the shared THP's PMD into PTEs and copies one 4 KiB page,\n"
             "       as Linux does with VM_FAULT_FALLBACK)\n");
  fmt::print("      the child's A+16 MiB is now {}, A+16 MiB+4 KiB is {}\n",
             page_kind_name(query_page(cas, thp_page).kind),
             page_kind_name(query_page(cas, thp_page + kPageSize).kind));
  const bool w2 = write_pages(cas, cB, small_page, kPageSize, 2, &t.why);
  const StatSnapshot c2 = snapshot(cas);
  fmt::print("    child writes B+4 MiB (a 4 KiB page):  {}\n", fault_summary(c1, c2));
  fmt::print("    frames allocated by the child's writes: {}\n", free_before - t.mem.free_pages());
  expect(w1 && w2, "the child's stores succeeded", t.why);
  expect(delta(c0, c2, "cow_copies") >= 2, "each child write copied its page");
  expect(verify_pages(cas, cA, cA.start, cA.len, &t.why) && verify_pages(cas, cB, cB.start, cB.len, &t.why),
         "the child reads its new data there and the parent's data everywhere else", t.why);
  expect(verify_pages(t.as, t.A, t.A.start, t.A.len, &t.why) &&
             verify_pages(t.as, t.B, t.B.start, t.B.len, &t.why),
         "the parent still reads its own data", t.why);
  check_ok(t.mem, "with parent and child");
  child.exit(0);
  Result<devfs::ExitStatus> st = child.wait(std::chrono::seconds(30));
  fmt::print("    child exits\n\n");
  if (!st || *st != devfs::ExitStatus::exited_with(0)) {
    expect(false, "the child's exit status", st ? st->to_string() : errno_describe(st.error()));
  }
  return true;
}

// [5] mprotect of 64 KiB inside a THP splits its PMD mapping; the data stays.
void step_mprotect(Tour& t) {
  const Va ro = t.A.at(20 * kMiB + 64 * kKiB);
  fmt::print("[5] mprotect(A+20 MiB+64 KiB, 64 KiB, PROT_READ): part of a THP changes protection\n");
  const StatSnapshot s0 = snapshot(t.as);
  expect(t.as.mprotect(ro, 64 * kKiB, PROT_READ) == 0, "mprotect");
  const StatSnapshot s1 = snapshot(t.as);
  fmt::print("    {}\n", fault_summary(s0, s1));
  expect(delta(s0, s1, "thp_split_pmd") == 1 &&
             kinds_are(t.as, t.A.at(20 * kMiB), 2 * kMiB, PageKind::kThpPte, &t.why),
         "the PMD mapping was split into 512 PTEs of the same THP (thp-pte)", t.why);
  const int rc = cpu::store<uint64_t>(t.as, ro, 1);
  expect(rc == -EFAULT, "a store to the read-only part fails with -EFAULT (SIGSEGV)",
         errno_describe(rc));
  expect(verify_pages(t.as, t.A, t.A.at(20 * kMiB), 2 * kMiB, &t.why), "the THP's data is intact", t.why);
  fmt::print("\n    before the device looks at it, the address space holds:\n");
  print_kinds(t.as, {&t.A, &t.B});
  fmt::print("\n");
}

// The device side of step [6]: one interval notifier per region and the driver lock.
struct DeviceMirror {
  Mirror mirror;
  MmuIntervalNotifier nA, nB;
  std::vector<uint64_t> pa, pb;  // the last walk's output over A and over B
};

// [6a] Snapshots (no request flags) fault nothing and agree with the CPU page table.
void mirror_snapshot(Tour& t, DeviceMirror& d) {
  const StatSnapshot s0 = snapshot(t.as);
  WalkResult ra = mirror_range(t.as, d.nA, d.mirror, t.A.start, t.A.start + t.A.len, 0, d.pa);
  WalkResult rb = mirror_range(t.as, d.nB, d.mirror, t.B.start, t.B.start + t.B.len, 0, d.pb);
  const StatSnapshot s1 = snapshot(t.as);
  fmt::print("    snapshot (no request flags) of A: {:.1f} ns/page, {}\n", ra.ns_per_page,
             describe(summarize(d.pa)));
  fmt::print("    snapshot (no request flags) of B: {:.1f} ns/page, {}\n", rb.ns_per_page,
             describe(summarize(d.pb)));
  fmt::print("      (read-only: zero pages, and pages still write-protected since the fork: the\n"
             "       next CPU write reuses them in place)\n");
  expect(ra.rc == 0 && rb.rc == 0, "hmm_range_fault returned 0", errno_describe(ra.rc ? ra.rc : rb.rc));
  expect(delta(s0, s1, "faults") == 0, "a snapshot faults nothing");
  expect(pfns_match_cpu(t.as, t.A, d.pa, &t.why) && pfns_match_cpu(t.as, t.B, d.pb, &t.why),
         "every word matches the CPU page table (pfn, WRITE, order); written frames hold the data",
         t.why);
}

// [6b] REQ_FAULT walks: a device read of B, a device write of A's last 16 MiB.
void mirror_fault(Tour& t, DeviceMirror& d) {
  const StatSnapshot s0 = snapshot(t.as);
  WalkResult fb = mirror_range(t.as, d.nB, d.mirror, t.B.start, t.B.start + t.B.len, HMM_PFN_REQ_FAULT, d.pb);
  const StatSnapshot s1 = snapshot(t.as);
  fmt::print("    REQ_FAULT over B (a device read): {:.1f} ns/page, {}\n", fb.ns_per_page,
             fault_summary(s0, s1));
  fmt::print("      -> {}\n", describe(summarize(d.pb)));
  WalkResult fa = mirror_range(t.as, d.nA, d.mirror, t.A.at(48 * kMiB), t.A.start + t.A.len,
                               HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, d.pa);
  const StatSnapshot s2 = snapshot(t.as);
  fmt::print("    REQ_FAULT|REQ_WRITE over {} (a device write): {:.1f} ns/page, {}\n",
             rel(t.A, 48 * kMiB, 64 * kMiB), fa.ns_per_page, fault_summary(s1, s2));
  fmt::print("      -> {}\n", describe(summarize(d.pa)));
  fmt::print("      (as in Linux, hmm_vma_fault calls handle_mm_fault for every page it needs: the\n"
             "       first one of each 2 MiB allocates a THP, the other 511 find it mapped)\n");
  const PfnSummary sb = summarize(d.pb), sa = summarize(d.pa);
  expect(fb.rc == 0 && fa.rc == 0, "hmm_range_fault returned 0", errno_describe(fb.rc ? fb.rc : fa.rc));
  expect(sb.empty == 0 && sb.error == 0 && sb.valid_write + sb.valid_ro == t.B.npages(),
         "B: every page is VALID now (unwritten pages read-fault to the zero page)");
  expect(sa.valid_write == 16 * kMiB / kPageSize && sa.order9 == sa.valid_write,
         "A[48, 64 MiB): every page VALID|WRITE, backed by PMD-mapped THPs");
  fmt::print("    interval-notifier invalidations so far: {} (filling an empty entry invalidates\n"
             "    nothing: the device had no translation for it)\n",
             d.mirror.invalidations());
}

// [6c] A CPU write replaces a zero page the device mirrors: the mirror is invalidated and a
// walk that started before must not be committed.
void mirror_invalidation(Tour& t, DeviceMirror& d) {
  const Va shared = t.B.at(14 * kMiB);
  const uint64_t seq = d.nB.read_begin();
  const uint64_t inv0 = d.mirror.invalidations();
  const Pfn before = query_page(t.as, shared).pfn;
  std::string werr;
  const bool wrote = write_pages(t.as, t.B, shared, kPageSize, 3, &werr);
  fmt::print("    CPU writes B+14 MiB (mirrored as the zero page): pfn {:#x} -> {:#x}, the mirror's\n"
             "    invalidate() ran {} time(s); read_retry(seq taken before) = {}\n",
             before, query_page(t.as, shared).pfn, d.mirror.invalidations() - inv0,
             d.nB.read_retry(seq) ? "true" : "false");
  expect(wrote && d.mirror.invalidations() > inv0 && d.nB.read_retry(seq),
         "the write invalidated the mirror and a walk begun before it would be retried", werr);
}

// [6] A device mirrors A and B with hmm_range_fault.
void step_mirror(Tour& t) {
  fmt::print("[6] a device mirrors A and B with hmm_range_fault (one interval notifier each)\n");
  DeviceMirror d;
  expect(d.nA.insert(&t.as, t.A.start, t.A.len, &d.mirror) == 0 &&
             d.nB.insert(&t.as, t.B.start, t.B.len, &d.mirror) == 0,
         "mmu_interval_notifier_insert over A and B");
  mirror_snapshot(t, d);
  mirror_fault(t, d);
  mirror_invalidation(t, d);
  fmt::print("\n");
  d.nA.remove();
  d.nB.remove();
}

// [7] Pages by kind, the counters, every page's data and mm::check; then the process exits
// and every frame must be free again.
void step_summary(Tour& t) {
  fmt::print("[7] summary\n");
  print_kinds(t.as, {&t.A, &t.B});
  fmt::print("\n      fault and page-table counters of the parent (MmStats):\n");
  t.as.stats().for_each([](const char* name, const char* desc, uint64_t v) {
    if (v) fmt::print("      {:>8}  {:<22} {}\n", v, name, desc);
  });
  fmt::print("\n");
  expect(verify_pages(t.as, t.A, t.A.start, t.A.len, &t.why) &&
             verify_pages(t.as, t.B, t.B.start, t.B.len, &t.why),
         fmt::format("data: all {} pages of A and B hold what was written (or 0)",
                     t.A.npages() + t.B.npages()),
         t.why);
  check_ok(t.mem, "of the machine");
  t.proc.exit();
  expect(t.mem.free_pages() == t.free_at_start, "after exit every frame is free again",
         fmt::format("{} free, {} at start", t.mem.free_pages(), t.free_at_start));
  check_ok(t.mem, "after exit");
  fmt::print("\n");
}

// The machine: 512 MiB of RAM with THP policy "madvise", one process.
int run() {
  const uint64_t t_start = ns_now();
  print_intro();
  Result<std::unique_ptr<devfs::Machine>> machine =
      devfs::Machine::create({.ram_bytes = 512 * kMiB, .thp = ThpMode::kMadvise});
  if (!machine) {
    fmt::print("PhysMem::create failed: {}\n", errno_describe(machine.error()));
    return 1;
  }
  Result<devfs::Process*> proc = (*machine)->create_process();
  if (!proc) {
    fmt::print("AddressSpace::create failed: {}\n", errno_describe(proc.error()));
    return 1;
  }
  PhysMem& mem = (*machine)->mem();
  Tour t{.machine = **machine, .mem = mem, .proc = **proc, .as = (*proc)->mm(), .free_at_start = mem.free_pages()};
  fmt::print("machine: {} MiB of simulated RAM ({} free 4 KiB frames), THP policy \"madvise\"\n"
             "         (as /sys/kernel/mm/transparent_hugepage/enabled = madvise)\n\n",
             mem.config().ram_bytes / kMiB, t.free_at_start);

  if (!step_mmap(t)) return 1;
  step_read_faults(t);
  step_write_faults(t);
  if (!step_fork(t)) return 1;
  step_mprotect(t);
  step_mirror(t);
  step_summary(t);

  fmt::print("{} in {:.2f} s\n", g_failures ? fmt::format("FAILED: {} check(s)", g_failures) : "all checks passed",
             static_cast<double>(ns_now() - t_start) / 1e9);
  return g_failures ? 1 : 0;
}

}  // namespace

int run_host_mm_demo() { return run(); }

}  // namespace gpusvm::demo
