// Differential testing of gpusvm/mm against the Linux kernel this test runs on.
//
// A Scenario is a short program of memory system calls and CPU accesses (mmap, munmap,
// mprotect, madvise, mremap, fork, exit, read, write) on a few "slots" (2 MiB-aligned address
// windows). Two executors run it:
//  - RealExecutor performs the calls in this very process (and in real fork()ed children) and
//    reads the resulting page state back from /proc/self/pagemap, /proc/kpageflags,
//    /proc/kpagecount and the PAGEMAP_SCAN ioctl (root required);
//  - ModelExecutor performs them on a gpusvm::mm::AddressSpace and reads the state with
//    query_page().
// Both produce, at every Snapshot step, the state of every page of every slot of every live
// process: its PageKind, its precise per-page mapcount and labels that say which pages share
// a frame or a folio. The test compares the two results. docs/differential-testing.md
// documents how each category is recognised on the real kernel and what this kernel does in
// each scenario.
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {
class AddressSpace;
}

namespace gpusvm::mm::oracle {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * 1024;
inline constexpr int kRW = PROT_READ | PROT_WRITE;
inline constexpr int kMaxSlots = 8;
inline constexpr int kMaxProcs = 8;

// ---------------------------------------------------------------------------------------
// The scenario language.

enum class Op : uint8_t {
  kMmap,      // slot: len, prot, flags (MAP_ANONYMOUS|MAP_FIXED are implied, and MAP_PRIVATE
              // unless flags has MAP_SHARED: shared anonymous memory, i.e. shmem)
  kMunmap,    // slot, off, len
  kMprotect,  // slot, off, len, prot
  kMadvise,   // slot, off, len, advice
  kMremap,    // slot, off, len -> new_len, flags; MREMAP_FIXED target slot2 + dst_off
  kRead,      // slot, off: a one-byte load
  kWrite,     // slot, off, byte: a one-byte store
  kFill,      // slot, off, len, byte: stores to every byte of the range
  kFork,      // proc forks; the child becomes the next process id (1, 2, ...)
  kExit,      // proc exits (a forked child)
  kSnapshot,  // record the state of every slot of every live process under `label`
  kGupRef,    // slot, off, len: hold a reference on each page beyond its mappings (process 0)
              // until kPutRefs. Linux: vmsplice into a pipe (GUP references held by the
              // pipe); model: pin_user_pages (a reference mm::check accounts for)
  kPutRefs,   // drop every reference kGupRef took (Linux: close the pipes)
};

const char* op_name(Op op);

// One step of a scenario.
struct Step {
  Op op = Op::kSnapshot;
  uint8_t proc = 0;   // which process performs it: 0 = the original one, then forked children
  uint8_t slot = 0;
  uint8_t slot2 = 0;  // mremap target slot
  uint8_t byte = 0;
  int32_t prot = 0;
  int32_t flags = 0;  // mmap extra flags / mremap flags
  int32_t advice = 0;
  uint64_t off = 0;
  uint64_t len = 0;      // 0 = from off to the end of the slot
  uint64_t new_len = 0;  // mremap
  uint64_t dst_off = 0;  // mremap target offset in slot2
  uint64_t align_off = 0;  // mmap: distance of the slot start from a 2 MiB boundary
  std::string label;       // snapshot label

  std::string to_string() const;
};

// A named scenario, written with the builder methods below, e.g.
//   Scenario("thp_write", "...").mmap(0, 2 * kMiB).madvise(0, 0, 0, MADV_HUGEPAGE)
//       .write(0, 3 * kPageSize).snapshot("after write");
// Offsets and lengths are bytes relative to the slot start. Steps run in the process chosen
// by the last in(proc) (0 until then). A final snapshot is added when the last step is not one.
struct Scenario {
  std::string name;
  std::string linux_behaviour;  // one line: what this kernel was observed to do
  std::vector<Step> steps;
  bool needs_thp = false;       // skip when THP is disabled on the host
  int min_kernel = 0;           // e.g. 613 for 6.13: the behaviour checked appeared then
  std::string min_kernel_why;
  bool needs_collapse = false;  // MADV_COLLAPSE (6.1)

  Scenario() = default;
  Scenario(std::string n, std::string what) : name(std::move(n)), linux_behaviour(std::move(what)) {}

  Scenario& in(int proc) { cur_proc_ = static_cast<uint8_t>(proc); return *this; }
  Scenario& mmap(int slot, uint64_t len, int prot = kRW, int flags = 0, uint64_t align_off = 0);
  // A PROT_NONE MAP_NORESERVE mapping: a landing zone for mremap.
  Scenario& reserve(int slot, uint64_t len) { return mmap(slot, len, PROT_NONE, MAP_NORESERVE); }
  // mmap + MADV_HUGEPAGE over the whole slot.
  Scenario& mmap_huge(int slot, uint64_t len, uint64_t align_off = 0);
  Scenario& munmap(int slot, uint64_t off, uint64_t len);
  Scenario& mprotect(int slot, uint64_t off, uint64_t len, int prot);
  Scenario& madvise(int slot, uint64_t off, uint64_t len, int advice);
  Scenario& mremap(int slot, uint64_t off, uint64_t len, uint64_t new_len, int flags,
                   int dst_slot = 0, uint64_t dst_off = 0);
  Scenario& read(int slot, uint64_t off);
  Scenario& write(int slot, uint64_t off, uint8_t byte = 0x5a);
  Scenario& fill(int slot, uint64_t off, uint64_t len, uint8_t byte = 0xa5);
  Scenario& fork();  // forks the current process (only process 0 may fork)
  Scenario& exit_proc(int proc);
  Scenario& snapshot(const char* label);
  // mmap(MAP_SHARED | MAP_ANONYMOUS): a shmem object of len bytes.
  Scenario& mmap_shared(int slot, uint64_t len, int prot = kRW) {
    return mmap(slot, len, prot, MAP_SHARED);
  }
  Scenario& gup_ref(int slot, uint64_t off, uint64_t len);
  Scenario& put_refs();
  Scenario& needs(int kernel_version, std::string why) {
    min_kernel = kernel_version;
    min_kernel_why = std::move(why);
    return *this;
  }
  Scenario& thp() { needs_thp = true; return *this; }

 private:
  Step& add(Op op);
  uint8_t cur_proc_ = 0;
};

// The scenarios of the differential test (tests/mm/differential_test.cc).
std::vector<Scenario> all_scenarios();

// ---------------------------------------------------------------------------------------
// Results.

// One page as an executor sees it, before labelling.
struct RawPage {
  PageKind kind = PageKind::kNone;
  int32_t mapcount = 0;  // precise mappings of this page (PTE maps + PMD maps of its folio)
  uint64_t pfn = 0;      // executor-specific frame number (meaningless across executors)
  uint64_t folio = 0;    // frame number of the folio head
};

// One page after labelling: frames and folios are numbered in order of first appearance in
// the snapshot (process, slot, page order), so equal labels mean "the same frame / folio".
struct PageRec {
  PageKind kind = PageKind::kNone;
  int32_t mapcount = 0;
  int32_t frame = -1;  // -1 for kNone / kSoftLeaf
  int32_t folio = -1;

  bool operator==(const PageRec&) const = default;
};

struct Region {
  int proc = 0;
  int slot = 0;
  std::vector<PageRec> pages;
};

struct Snapshot {
  std::string label;
  int after_step = 0;  // index of the step before it
  std::vector<Region> regions;
};

struct RunResult {
  std::vector<int> rc;  // per step: 0 or a negative errno
  std::vector<Snapshot> snapshots;
  std::string error;         // the executor itself failed (not a difference)
  std::string interference;  // real kernel: khugepaged / THP fallback hit the run (retry)
  std::vector<std::string> notes;  // e.g. model invariant-checker reports
};

// Run-length rendering of a region, one line per run, e.g.
//   [   0, 512) thp_pmd  map=1 folio=F0 frame=P0..
std::string render_region(const Region& r);

// Human-readable differences between the Linux and the model result; empty when equal.
// compare_mapcount=false ignores mapcounts (kernels without CONFIG_PAGE_MAPCOUNT).
std::string diff_results(const Scenario& s, const RunResult& linux_result,
                         const RunResult& model_result, bool compare_mapcount);

// ---------------------------------------------------------------------------------------
// Executors.

class Executor {
 public:
  virtual ~Executor() = default;
  RunResult run(const Scenario& s);

 protected:
  struct SlotInfo {
    bool defined = false;
    Va window = 0;  // start of the reservation (a 2 MiB guard precedes the slot)
    uint64_t window_len = 0;
    Va base = 0;
    uint64_t len = 0;
  };

  // Reserves an unused, 2 MiB-aligned PROT_NONE window of len bytes in process 0.
  virtual int reserve_window(uint64_t len, Va* out) = 0;
  // The primitives; all return 0 or a negative errno.
  virtual int do_mmap(int proc, Va addr, uint64_t len, int prot, int flags) = 0;
  virtual int do_munmap(int proc, Va addr, uint64_t len) = 0;
  virtual int do_mprotect(int proc, Va addr, uint64_t len, int prot) = 0;
  virtual int do_madvise(int proc, Va addr, uint64_t len, int advice) = 0;
  virtual int do_mremap(int proc, Va old_addr, uint64_t old_len, uint64_t new_len, int flags,
                        Va new_addr, Va* result) = 0;
  virtual int do_read(int proc, Va addr) = 0;
  virtual int do_write(int proc, Va addr, uint8_t byte) = 0;
  virtual int do_fill(int proc, Va addr, uint64_t len, uint8_t byte) = 0;
  virtual int do_fork(int proc, int* child) = 0;
  virtual int do_exit(int proc) = 0;
  virtual bool proc_alive(int proc) const = 0;
  virtual int do_snapshot(int proc, Va addr, uint64_t len, std::vector<RawPage>* out,
                          std::string* error) = 0;
  virtual int do_gup_ref(Va addr, uint64_t len) = 0;  // process 0
  virtual int do_put_refs() = 0;
  // Called after every snapshot (the model runs its invariant checker here).
  virtual void after_snapshot(RunResult* /*result*/) {}

  SlotInfo slots_[kMaxSlots];
};

// Runs scenarios on the kernel this process runs on. One instance per run.
class RealExecutor final : public Executor {
 public:
  RealExecutor() = default;
  ~RealExecutor() override;

 protected:
  int reserve_window(uint64_t len, Va* out) override;
  int do_mmap(int proc, Va addr, uint64_t len, int prot, int flags) override;
  int do_munmap(int proc, Va addr, uint64_t len) override;
  int do_mprotect(int proc, Va addr, uint64_t len, int prot) override;
  int do_madvise(int proc, Va addr, uint64_t len, int advice) override;
  int do_mremap(int proc, Va old_addr, uint64_t old_len, uint64_t new_len, int flags,
                Va new_addr, Va* result) override;
  int do_read(int proc, Va addr) override;
  int do_write(int proc, Va addr, uint8_t byte) override;
  int do_fill(int proc, Va addr, uint64_t len, uint8_t byte) override;
  int do_fork(int proc, int* child) override;
  int do_exit(int proc) override;
  bool proc_alive(int proc) const override;
  int do_snapshot(int proc, Va addr, uint64_t len, std::vector<RawPage>* out,
                  std::string* error) override;
  int do_gup_ref(Va addr, uint64_t len) override;
  int do_put_refs() override;

 public:
  // A primitive as sent to a child process.
  struct Cmd {
    uint32_t op;
    int32_t prot, flags, advice;
    uint8_t byte;
    uint64_t addr, len, new_len, new_addr;
  };

 private:
  int local(const Cmd& c, Va* result, std::vector<RawPage>* pages, std::string* error);
  int remote(int proc, const Cmd& c, Va* result, std::vector<RawPage>* pages,
             std::string* error);
  int dispatch(int proc, const Cmd& c, Va* result = nullptr,
               std::vector<RawPage>* pages = nullptr, std::string* error = nullptr);
  [[noreturn]] void serve(int in_fd, int out_fd);

  struct Child {
    int pid = -1;
    int to_fd = -1;
    int from_fd = -1;
  };
  Child children_[kMaxProcs];  // index = proc id; [0] unused
  int nprocs_ = 1;
  // Ranges this process mapped itself; pages outside them are reported as kNone (another
  // part of the test process, e.g. malloc, may map into a hole a scenario unmapped).
  std::map<Va, Va> owned_;  // start -> end
  std::vector<std::pair<Va, uint64_t>> windows_;  // to unmap at the end (process 0)
  std::vector<int> ref_pipes_;  // kGupRef: pipes holding vmsplice'd pages (both ends)
};

// Runs scenarios on the model. One instance per run.
class ModelExecutor final : public Executor {
 public:
  explicit ModelExecutor(const PhysMem::Config& config);
  ~ModelExecutor() override;
  PhysMem* mem() { return mem_.get(); }
  const std::string& setup_error() const { return setup_error_; }

 protected:
  int reserve_window(uint64_t len, Va* out) override;
  int do_mmap(int proc, Va addr, uint64_t len, int prot, int flags) override;
  int do_munmap(int proc, Va addr, uint64_t len) override;
  int do_mprotect(int proc, Va addr, uint64_t len, int prot) override;
  int do_madvise(int proc, Va addr, uint64_t len, int advice) override;
  int do_mremap(int proc, Va old_addr, uint64_t old_len, uint64_t new_len, int flags,
                Va new_addr, Va* result) override;
  int do_read(int proc, Va addr) override;
  int do_write(int proc, Va addr, uint8_t byte) override;
  int do_fill(int proc, Va addr, uint64_t len, uint8_t byte) override;
  int do_fork(int proc, int* child) override;
  int do_exit(int proc) override;
  bool proc_alive(int proc) const override;
  int do_snapshot(int proc, Va addr, uint64_t len, std::vector<RawPage>* out,
                  std::string* error) override;
  void after_snapshot(RunResult* result) override;
  int do_gup_ref(Va addr, uint64_t len) override;
  int do_put_refs() override;

 private:
  AddressSpace* as(int proc) const;
  std::vector<Folio*> pinned_;  // kGupRef
  std::unique_ptr<PhysMem> mem_;
  std::unique_ptr<AddressSpace> procs_[kMaxProcs];
  int nprocs_ = 0;
  Va next_window_ = 0x7e0000000000ULL;
  std::string setup_error_;
};

// ---------------------------------------------------------------------------------------
// The host.

struct HostInfo {
  bool usable = false;
  std::string why_not;  // reason to skip when !usable
  int kernel = 0;       // major * 100 + minor, e.g. 618
  std::string kernel_release;
  ThpMode thp = ThpMode::kNever;
  bool use_zero_page = false;
  bool precise_mapcount = true;  // CONFIG_PAGE_MAPCOUNT: kpagecount is per page
  std::string notes;             // what was found, for the test log
};

// Probes once (cached): root, pagemap PFNs, kpageflags, PAGEMAP_SCAN, THP sysfs knobs,
// multi-size THP (must be off: the model has only PMD-order folios), kernel config.
const HostInfo& host_info();

// Counters of kernel activity that would make a real run unrepresentative if they moved
// while it ran: khugepaged collapses and THP allocation fallbacks.
struct InterferenceCounters {
  uint64_t khugepaged_collapsed = 0;
  uint64_t thp_fault_fallback = 0;
  uint64_t thp_collapse_alloc_failed = 0;
  static InterferenceCounters read();
  std::string changed_since(const InterferenceCounters& before) const;  // "" if none
};

}  // namespace gpusvm::mm::oracle
