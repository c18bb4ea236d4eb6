// Differential testing against the real kernel: scenario builder, executors, host probe.
// See linux_oracle.h and docs/differential-testing.md.
#include "tests/mm/linux_oracle.h"

#include <atomic>
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/gup.h"
#include "gpusvm/mm/page_state.h"

namespace gpusvm::mm::oracle {

// ---------------------------------------------------------------------------------------
// Kernel interfaces (defined here because Debian 12's linux-libc-dev 6.1 predates them).

namespace {

// /proc/pid/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPmPfnMask = (1ULL << 55) - 1;
constexpr int kPmGuardBit = 58;      // MADV_GUARD_INSTALL region (6.15)
constexpr int kPmSwapBit = 62;
constexpr int kPmPresentBit = 63;

// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
constexpr int kKpfCompoundHead = 15;
constexpr int kKpfCompoundTail = 16;
constexpr int kKpfThp = 22;
constexpr int kKpfZeroPage = 24;

// PAGEMAP_SCAN (6.7, include/uapi/linux/fs.h).
struct PageRegion {
  uint64_t start, end, categories;
};
struct PmScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted,
      category_mask, category_anyof_mask, return_mask;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PmScanArg);
constexpr uint64_t kPageIsPresent = 1 << 3;
constexpr uint64_t kPageIsPfnZero = 1 << 5;
constexpr uint64_t kPageIsHuge = 1 << 6;  // PMD-mapped THP (or hugetlb)

bool bit(uint64_t v, int b) { return (v >> b) & 1; }

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) return {};
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// "always [madvise] never" -> "madvise".
std::string selected(const std::string& knob) {
  auto a = knob.find('['), b = knob.find(']');
  if (a == std::string::npos || b == std::string::npos || b < a) return {};
  return knob.substr(a + 1, b - a - 1);
}

bool pread_all(int fd, void* buf, size_t len, off_t off) {
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, off);
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
    off += n;
  }
  return true;
}

bool write_all(int fd, const void* buf, size_t len) {
  auto* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

bool read_all(int fd, void* buf, size_t len) {
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::read(fd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
  }
  return true;
}

// CPU accesses that may fault: SIGSEGV/SIGBUS become -EFAULT, like the model's cpu API.
// volatile: the signal handler reads it, and the compiler must not sink the store below the
// faulting access (g++ -O2 did, and the handler then found no jump buffer).
thread_local sigjmp_buf* volatile t_fault_jmp = nullptr;

void on_fault(int sig) {
  if (t_fault_jmp) siglongjmp(*t_fault_jmp, 1);
  signal(sig, SIG_DFL);
  raise(sig);
}

int guarded_access(Va addr, uint64_t len, int kind, uint8_t byte) {
  struct sigaction sa {};
  struct sigaction old_segv {};
  struct sigaction old_bus {};
  sa.sa_handler = on_fault;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &old_segv);
  sigaction(SIGBUS, &sa, &old_bus);
  sigjmp_buf jb;
  volatile int rc = 0;
  if (sigsetjmp(jb, 1) == 0) {
    t_fault_jmp = &jb;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    auto* p = reinterpret_cast<volatile uint8_t*>(addr);
    if (kind == 0) {
      (void)*p;
    } else if (kind == 1) {
      *p = byte;
    } else {
      std::memset(reinterpret_cast<void*>(addr), byte, len);
    }
  } else {
    rc = -EFAULT;
  }
  t_fault_jmp = nullptr;
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  return rc;
}

const char* kind_short(PageKind k) {
  switch (k) {
    case PageKind::kNone: return "none";
    case PageKind::kZeroPage: return "zero";
    case PageKind::kHugeZero: return "huge_zero";
    case PageKind::kSmall: return "small";
    case PageKind::kThpPte: return "thp_pte";
    case PageKind::kThpPmd: return "thp_pmd";
    case PageKind::kSoftLeaf: return "soft_leaf";
  }
  return "?";
}

bool has_frame(PageKind k) { return k != PageKind::kNone && k != PageKind::kSoftLeaf; }
bool is_zero_kind(PageKind k) { return k == PageKind::kZeroPage || k == PageKind::kHugeZero; }

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "%#" PRIx64, v);
  return b;
}

std::string errstr(int rc) {
  if (rc == 0) return "0";
  return std::string(rc < 0 ? "-" : "") + errno_name(rc);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Scenario builder.

const char* op_name(Op op) {
  switch (op) {
    case Op::kMmap: return "mmap";
    case Op::kMunmap: return "munmap";
    case Op::kMprotect: return "mprotect";
    case Op::kMadvise: return "madvise";
    case Op::kMremap: return "mremap";
    case Op::kRead: return "read";
    case Op::kWrite: return "write";
    case Op::kFill: return "fill";
    case Op::kFork: return "fork";
    case Op::kExit: return "exit";
    case Op::kSnapshot: return "snapshot";
    case Op::kGupRef: return "gup_ref";
    case Op::kPutRefs: return "put_refs";
  }
  return "?";
}

namespace {
std::string prot_str(int prot) {
  if (prot == PROT_NONE) return "NONE";
  std::string s;
  if (prot & PROT_READ) s += "R";
  if (prot & PROT_WRITE) s += "W";
  if (prot & PROT_EXEC) s += "X";
  return s;
}
std::string advice_str(int a) {
  switch (a) {
    case MADV_DONTNEED: return "DONTNEED";
    case MADV_FREE: return "FREE";
    case MADV_HUGEPAGE: return "HUGEPAGE";
    case MADV_NOHUGEPAGE: return "NOHUGEPAGE";
    case MADV_COLLAPSE: return "COLLAPSE";
    case MADV_DONTFORK: return "DONTFORK";
    case MADV_WIPEONFORK: return "WIPEONFORK";
  }
  return std::to_string(a);
}
// Bytes as pages ("p4") or as MiB + pages.
std::string at(uint64_t off) {
  if (off % kPageSize) return hex(off);
  return "p" + std::to_string(off / kPageSize);
}
std::string sz(uint64_t len) {
  if (len == 0) return "rest";
  if (len % kMiB == 0) return std::to_string(len / kMiB) + "M";
  if (len % kPageSize == 0) return std::to_string(len / kPageSize) + "p";
  return hex(len);
}
}  // namespace

std::string Step::to_string() const {
  std::string s = "P" + std::to_string(proc) + " " + op_name(op);
  std::string sl = " s" + std::to_string(slot);
  switch (op) {
    case Op::kMmap:
      s += sl + " len=" + sz(len) + " prot=" + prot_str(prot);
      if (flags & MAP_POPULATE) s += " POPULATE";
      if (flags & MAP_NORESERVE) s += " NORESERVE";
      if (flags & MAP_SHARED) s += " SHARED";
      if (align_off) s += " at 2M+" + at(align_off);
      break;
    case Op::kMunmap:
      s += sl + " [" + at(off) + " +" + sz(len) + "]";
      break;
    case Op::kMprotect:
      s += sl + " [" + at(off) + " +" + sz(len) + "] " + prot_str(prot);
      break;
    case Op::kMadvise:
      s += sl + " [" + at(off) + " +" + sz(len) + "] " + advice_str(advice);
      break;
    case Op::kMremap:
      s += sl + " [" + at(off) + " +" + sz(len) + "] -> " + sz(new_len);
      if (flags & MREMAP_FIXED) s += " FIXED s" + std::to_string(slot2) + "+" + at(dst_off);
      if (flags & MREMAP_DONTUNMAP) s += " DONTUNMAP";
      break;
    case Op::kRead:
      s += sl + " " + at(off);
      break;
    case Op::kWrite:
      s += sl + " " + at(off) + " =" + hex(byte);
      break;
    case Op::kFill:
      s += sl + " [" + at(off) + " +" + sz(len) + "] =" + hex(byte);
      break;
    case Op::kGupRef:
      s += sl + " [" + at(off) + " +" + sz(len) + "]";
      break;
    case Op::kFork:
    case Op::kExit:
    case Op::kPutRefs:
      break;
    case Op::kSnapshot:
      s += " \"" + label + "\"";
      break;
  }
  return s;
}

Step& Scenario::add(Op op) {
  steps.emplace_back();
  steps.back().op = op;
  steps.back().proc = cur_proc_;
  return steps.back();
}

Scenario& Scenario::mmap(int slot, uint64_t len, int prot, int flags, uint64_t align_off) {
  Step& s = add(Op::kMmap);
  s.slot = static_cast<uint8_t>(slot);
  s.len = len;
  s.prot = prot;
  s.flags = flags;
  s.align_off = align_off;
  return *this;
}

Scenario& Scenario::mmap_huge(int slot, uint64_t len, uint64_t align_off) {
  mmap(slot, len, kRW, 0, align_off);
  needs_thp = true;
  return madvise(slot, 0, 0, MADV_HUGEPAGE);
}

Scenario& Scenario::munmap(int slot, uint64_t off, uint64_t len) {
  Step& s = add(Op::kMunmap);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  return *this;
}

Scenario& Scenario::mprotect(int slot, uint64_t off, uint64_t len, int prot) {
  Step& s = add(Op::kMprotect);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  s.prot = prot;
  return *this;
}

Scenario& Scenario::madvise(int slot, uint64_t off, uint64_t len, int advice) {
  Step& s = add(Op::kMadvise);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  s.advice = advice;
  if (advice == MADV_COLLAPSE) needs_collapse = true;
  return *this;
}

Scenario& Scenario::mremap(int slot, uint64_t off, uint64_t len, uint64_t new_len, int flags,
                           int dst_slot, uint64_t dst_off) {
  Step& s = add(Op::kMremap);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  s.new_len = new_len;
  s.flags = flags;
  s.slot2 = static_cast<uint8_t>(dst_slot);
  s.dst_off = dst_off;
  return *this;
}

Scenario& Scenario::read(int slot, uint64_t off) {
  Step& s = add(Op::kRead);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  return *this;
}

Scenario& Scenario::write(int slot, uint64_t off, uint8_t byte) {
  Step& s = add(Op::kWrite);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.byte = byte;
  return *this;
}

Scenario& Scenario::fill(int slot, uint64_t off, uint64_t len, uint8_t byte) {
  Step& s = add(Op::kFill);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  s.byte = byte;
  return *this;
}

Scenario& Scenario::gup_ref(int slot, uint64_t off, uint64_t len) {
  Step& s = add(Op::kGupRef);
  s.slot = static_cast<uint8_t>(slot);
  s.off = off;
  s.len = len;
  return *this;
}

Scenario& Scenario::put_refs() {
  add(Op::kPutRefs);
  return *this;
}

Scenario& Scenario::fork() {
  add(Op::kFork);
  return *this;
}

Scenario& Scenario::exit_proc(int proc) {
  add(Op::kExit).proc = static_cast<uint8_t>(proc);
  return *this;
}

Scenario& Scenario::snapshot(const char* label) {
  add(Op::kSnapshot).label = label;
  return *this;
}

// ---------------------------------------------------------------------------------------
// Rendering and comparison.

std::string render_region(const Region& r) {
  std::string out;
  const auto& p = r.pages;
  size_t i = 0;
  while (i < p.size()) {
    // A run: same kind and mapcount; frames and folios each either constant or ascending by
    // one, with the same pattern throughout (one folio, a row of small folios, one frame).
    size_t j = i + 1;
    int dframe = -2, dfolio = -2;  // unknown
    while (j < p.size() && p[j].kind == p[i].kind && p[j].mapcount == p[i].mapcount) {
      int df = p[j].frame - p[j - 1].frame, dl = p[j].folio - p[j - 1].folio;
      if ((df != 0 && df != 1) || (dl != 0 && dl != 1)) break;
      if (dframe == -2) {
        dframe = df;
        dfolio = dl;
      }
      if (df != dframe || dl != dfolio) break;
      ++j;
    }
    char head[64];
    std::snprintf(head, sizeof head, "    [%4zu,%4zu) %-9s", i, j, kind_short(p[i].kind));
    out += head;
    if (has_frame(p[i].kind)) {
      out += " map=" + std::to_string(p[i].mapcount) + " folio=F" + std::to_string(p[i].folio);
      if (j - i > 1 && dfolio == 1) out += "..F" + std::to_string(p[j - 1].folio);
      out += " frame=P" + std::to_string(p[i].frame);
      if (j - i > 1) out += dframe == 0 ? " (same frame)" : "..P" + std::to_string(p[j - 1].frame);
    }
    out += "\n";
    i = j;
  }
  return out;
}

std::string diff_results(const Scenario& s, const RunResult& lx, const RunResult& md,
                         bool compare_mapcount) {
  std::ostringstream o;
  size_t nsteps = std::max(lx.rc.size(), md.rc.size());
  for (size_t i = 0; i < nsteps; ++i) {
    int a = i < lx.rc.size() ? lx.rc[i] : 1, b = i < md.rc.size() ? md.rc[i] : 1;
    if (a != b) {
      std::string step = i < s.steps.size() ? s.steps[i].to_string() : "(final snapshot)";
      o << "  step " << i << " [" << step << "]: linux returned " << errstr(a)
        << ", model returned " << errstr(b) << "\n";
    }
  }
  if (lx.snapshots.size() != md.snapshots.size())
    o << "  linux took " << lx.snapshots.size() << " snapshots, model "
      << md.snapshots.size() << "\n";
  for (size_t k = 0; k < std::min(lx.snapshots.size(), md.snapshots.size()); ++k) {
    const Snapshot& ls = lx.snapshots[k];
    const Snapshot& ms = md.snapshots[k];
    std::map<std::pair<int, int>, const Region*> mregions;
    for (const Region& r : ms.regions) mregions[{r.proc, r.slot}] = &r;
    std::map<std::pair<int, int>, const Region*> lregions;
    for (const Region& r : ls.regions) lregions[{r.proc, r.slot}] = &r;
    for (const Region& lr : ls.regions) {
      auto it = mregions.find({lr.proc, lr.slot});
      std::string where = "  snapshot \"" + ls.label + "\" process " + std::to_string(lr.proc) +
                          " slot " + std::to_string(lr.slot);
      if (it == mregions.end()) {
        o << where << ": missing in the model result\n";
        continue;
      }
      const Region& mr = *it->second;
      bool same = lr.pages.size() == mr.pages.size();
      size_t first = 0;
      std::string field;
      for (size_t i = 0; same && i < lr.pages.size(); ++i) {
        const PageRec& a = lr.pages[i];
        const PageRec& b = mr.pages[i];
        if (a.kind != b.kind) field = "kind";
        else if (compare_mapcount && a.mapcount != b.mapcount) field = "mapcount";
        else if (a.folio != b.folio) field = "folio identity";
        else if (a.frame != b.frame) field = "frame identity";
        if (!field.empty()) {
          same = false;
          first = i;
        }
      }
      if (same) continue;
      o << where << " differs";
      if (!field.empty()) {
        const PageRec& a = lr.pages[first];
        const PageRec& b = mr.pages[first];
        o << " (first at page " << first << ", " << field << ": linux " << kind_short(a.kind)
          << " map=" << a.mapcount << " F" << a.folio << " P" << a.frame << " vs model "
          << kind_short(b.kind) << " map=" << b.mapcount << " F" << b.folio << " P" << b.frame
          << ")";
      }
      o << "\n   linux:\n" << render_region(lr) << "   model:\n" << render_region(mr);
    }
    for (const Region& mr : ms.regions)
      if (!lregions.count({mr.proc, mr.slot}))
        o << "  snapshot \"" << ms.label << "\" process " << mr.proc << " slot " << mr.slot
          << ": only in the model result\n";
  }
  return o.str();
}

// ---------------------------------------------------------------------------------------
// Executor: the scenario interpreter shared by both sides.

RunResult Executor::run(const Scenario& s) {
  RunResult res;
  std::vector<Step> steps = s.steps;
  if (steps.empty() || steps.back().op != Op::kSnapshot) {
    Step fin;
    fin.op = Op::kSnapshot;
    fin.label = "final";
    steps.push_back(fin);
  }
  for (size_t i = 0; i < steps.size(); ++i) {
    const Step& st = steps[i];
    auto fail = [&](const std::string& why) {
      res.error = "step " + std::to_string(i) + " [" + st.to_string() + "]: " + why;
    };
    if (st.slot >= kMaxSlots || st.slot2 >= kMaxSlots || st.proc >= kMaxProcs) {
      fail("slot or process out of range");
      return res;
    }
    SlotInfo& sl = slots_[st.slot];
    bool uses_slot = st.op != Op::kFork && st.op != Op::kExit && st.op != Op::kSnapshot &&
                     st.op != Op::kMmap && st.op != Op::kPutRefs;
    if (uses_slot && !sl.defined) {
      fail("slot not mapped yet");
      return res;
    }
    if (st.op != Op::kSnapshot && st.op != Op::kMmap && !proc_alive(st.proc)) {
      fail("process not alive");
      return res;
    }
    uint64_t len = st.len;
    if (uses_slot && len == 0 && st.op != Op::kRead && st.op != Op::kWrite) len = sl.len - st.off;
    Va addr = sl.base + st.off;
    int rc = 0;
    switch (st.op) {
      case Op::kMmap: {
        if (st.proc != 0 || sl.defined) {
          fail("only process 0 maps slots, each once");
          return res;
        }
        uint64_t wlen = kPmdSize + pmd_align_up(st.align_off + st.len) + kPmdSize;
        Va w = 0;
        rc = reserve_window(wlen, &w);
        if (rc) {
          fail("cannot reserve an address window: " + errstr(rc));
          return res;
        }
        sl = SlotInfo{true, w, wlen, w + kPmdSize + st.align_off, st.len};
        const int type = (st.flags & MAP_SHARED) ? 0 : MAP_PRIVATE;
        rc = do_mmap(0, sl.base, st.len, st.prot, type | MAP_ANONYMOUS | MAP_FIXED | st.flags);
        break;
      }
      case Op::kMunmap:
        rc = do_munmap(st.proc, addr, len);
        break;
      case Op::kMprotect:
        rc = do_mprotect(st.proc, addr, len, st.prot);
        break;
      case Op::kMadvise:
        rc = do_madvise(st.proc, addr, len, st.advice);
        break;
      case Op::kMremap: {
        Va dst = 0;
        if (st.flags & MREMAP_FIXED) {
          if (!slots_[st.slot2].defined) {
            fail("mremap target slot not mapped");
            return res;
          }
          dst = slots_[st.slot2].base + st.dst_off;
        }
        Va out = 0;
        rc = do_mremap(st.proc, addr, len, st.new_len, st.flags, dst, &out);
        if (rc == 0 && (st.flags & MREMAP_FIXED) && out != dst) {
          fail("mremap returned " + hex(out) + ", not the fixed target " + hex(dst));
          return res;
        }
        break;
      }
      case Op::kRead:
        rc = do_read(st.proc, addr);
        break;
      case Op::kWrite:
        rc = do_write(st.proc, addr, st.byte);
        break;
      case Op::kFill:
        rc = do_fill(st.proc, addr, len, st.byte);
        break;
      case Op::kFork: {
        int child = -1;
        rc = do_fork(st.proc, &child);
        break;
      }
      case Op::kExit:
        rc = do_exit(st.proc);
        break;
      case Op::kGupRef:
        if (st.proc != 0) {
          fail("only process 0 takes references");
          return res;
        }
        rc = do_gup_ref(addr, len);
        break;
      case Op::kPutRefs:
        rc = do_put_refs();
        break;
      case Op::kSnapshot: {
        Snapshot snap;
        snap.label = st.label;
        snap.after_step = static_cast<int>(i) - 1;
        std::map<uint64_t, int> frames, folios;
        for (int p = 0; p < kMaxProcs; ++p) {
          if (!proc_alive(p)) continue;
          for (int k = 0; k < kMaxSlots; ++k) {
            if (!slots_[k].defined) continue;
            std::vector<RawPage> raw;
            std::string err;
            int src = do_snapshot(p, slots_[k].base, slots_[k].len, &raw, &err);
            if (src) {
              fail("snapshot of process " + std::to_string(p) + " slot " + std::to_string(k) +
                   " failed: " + errstr(src) + " " + err);
              return res;
            }
            Region reg;
            reg.proc = p;
            reg.slot = k;
            for (const RawPage& rp : raw) {
              PageRec pr;
              pr.kind = rp.kind;
              if (has_frame(rp.kind)) {
                pr.mapcount = is_zero_kind(rp.kind) ? 0 : rp.mapcount;
                pr.frame = frames.emplace(rp.pfn, static_cast<int>(frames.size())).first->second;
                pr.folio =
                    folios.emplace(rp.folio, static_cast<int>(folios.size())).first->second;
              }
              reg.pages.push_back(pr);
            }
            snap.regions.push_back(std::move(reg));
          }
        }
        res.snapshots.push_back(std::move(snap));
        after_snapshot(&res);
        break;
      }
    }
    res.rc.push_back(rc);
  }
  return res;
}

// ---------------------------------------------------------------------------------------
// RealExecutor.

namespace {
enum CmdOp : uint32_t {
  kCmdMmap, kCmdMunmap, kCmdMprotect, kCmdMadvise, kCmdMremap, kCmdRead, kCmdWrite,
  kCmdFill, kCmdSnapshot, kCmdExit,
};

void owned_add(std::map<Va, Va>& m, Va s, Va e) {
  auto it = m.lower_bound(s);
  if (it != m.begin() && std::prev(it)->second >= s) --it;
  while (it != m.end() && it->first <= e) {
    s = std::min(s, it->first);
    e = std::max(e, it->second);
    it = m.erase(it);
  }
  m[s] = e;
}

void owned_remove(std::map<Va, Va>& m, Va s, Va e) {
  auto it = m.lower_bound(s);
  if (it != m.begin() && std::prev(it)->second > s) --it;
  std::vector<std::pair<Va, Va>> keep;
  while (it != m.end() && it->first < e) {
    if (it->first < s) keep.push_back({it->first, s});
    if (it->second > e) keep.push_back({e, it->second});
    it = m.erase(it);
  }
  for (auto& k : keep) m[k.first] = k.second;
}

bool owned_contains(const std::map<Va, Va>& m, Va va) {
  auto it = m.upper_bound(va);
  if (it == m.begin()) return false;
  --it;
  return va >= it->first && va < it->second;
}

// Classifies [addr, addr + len) of the calling process.
int real_snapshot(const std::map<Va, Va>& owned, Va addr, uint64_t len,
                  std::vector<RawPage>* out, std::string* error) {
  const uint64_t n = len / kPageSize;
  out->assign(n, RawPage{});
  if (n == 0) return 0;
  int pm = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  int kpf = ::open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  int kpc = ::open("/proc/kpagecount", O_RDONLY | O_CLOEXEC);
  auto close_all = [&] {
    if (pm >= 0) ::close(pm);
    if (kpf >= 0) ::close(kpf);
    if (kpc >= 0) ::close(kpc);
  };
  if (pm < 0 || kpf < 0 || kpc < 0) {
    *error = "cannot open pagemap/kpageflags/kpagecount: " + std::string(strerror(errno));
    close_all();
    return -EACCES;
  }
  std::vector<uint64_t> ents(n);
  if (!pread_all(pm, ents.data(), n * 8, static_cast<off_t>(addr / kPageSize * 8))) {
    *error = "pagemap read failed";
    close_all();
    return -EIO;
  }
  // PMD-mapped or not: PAGEMAP_SCAN reports PAGE_IS_HUGE only for pages under a PMD leaf.
  std::vector<uint64_t> cat(n, 0);
  std::vector<PageRegion> vec(n + 1);
  PmScanArg arg{};
  arg.size = sizeof arg;
  arg.start = addr;
  arg.end = addr + len;
  arg.vec = reinterpret_cast<uint64_t>(vec.data());
  arg.vec_len = vec.size();
  arg.return_mask = kPageIsPresent | kPageIsPfnZero | kPageIsHuge;
  long nr = ::ioctl(pm, kPagemapScan, &arg);
  if (nr < 0) {
    *error = "PAGEMAP_SCAN failed: " + std::string(strerror(errno));
    close_all();
    return -errno;
  }
  for (long r = 0; r < nr; ++r)
    for (uint64_t va = vec[r].start; va < vec[r].end; va += kPageSize)
      cat[(va - addr) / kPageSize] = vec[r].categories;

  auto kflags = [&](uint64_t pfn, uint64_t* v) {
    return pread_all(kpf, v, 8, static_cast<off_t>(pfn * 8));
  };
  uint64_t prev_pfn = ~0ULL, prev_head = 0;
  bool prev_compound = false;
  for (uint64_t i = 0; i < n; ++i) {
    Va va = addr + i * kPageSize;
    RawPage& rp = (*out)[i];
    uint64_t e = ents[i];
    if (!owned_contains(owned, va) || bit(e, kPmGuardBit)) continue;  // kNone
    if (!bit(e, kPmPresentBit)) {
      if (bit(e, kPmSwapBit)) rp.kind = PageKind::kSoftLeaf;  // swap/migration entry
      continue;
    }
    uint64_t pfn = e & kPmPfnMask;
    if (pfn == 0) {
      *error = "pagemap hides PFNs (CAP_SYS_ADMIN needed)";
      close_all();
      return -EPERM;
    }
    uint64_t f = 0;
    if (!kflags(pfn, &f)) {
      *error = "kpageflags read failed for pfn " + hex(pfn);
      close_all();
      return -EIO;
    }
    bool huge_mapped = cat[i] & kPageIsHuge;
    rp.pfn = pfn;
    rp.folio = pfn;
    bool compound = bit(f, kKpfCompoundHead) || bit(f, kKpfCompoundTail);
    if (compound) {
      if (bit(f, kKpfCompoundHead)) {
        rp.folio = pfn;
      } else if (prev_compound && pfn == prev_pfn + 1) {
        rp.folio = prev_head;
      } else {
        // Walk back to the head (at most a PMD-order folio).
        uint64_t lo = pfn >= kPagesPerPmd ? pfn - kPagesPerPmd + 1 : 0;
        std::vector<uint64_t> fl(pfn - lo + 1);
        if (!pread_all(kpf, fl.data(), fl.size() * 8, static_cast<off_t>(lo * 8))) {
          *error = "kpageflags read failed";
          close_all();
          return -EIO;
        }
        uint64_t head = ~0ULL;
        for (uint64_t k = fl.size(); k-- > 0;)
          if (bit(fl[k], kKpfCompoundHead)) {
            head = lo + k;
            break;
          }
        if (head == ~0ULL) {
          *error = "no compound head within 512 frames of tail pfn " + hex(pfn);
          close_all();
          return -EIO;
        }
        rp.folio = head;
      }
    }
    prev_pfn = pfn;
    prev_head = rp.folio;
    prev_compound = compound;
    if (bit(f, kKpfZeroPage)) {
      // The huge zero folio is reported as ZERO_PAGE + THP (and PAGE_IS_HUGE, PMD-mapped);
      // a split huge zero PMD becomes 512 ordinary zero-page PTEs.
      rp.kind = bit(f, kKpfThp) ? PageKind::kHugeZero : PageKind::kZeroPage;
      if (rp.kind == PageKind::kHugeZero && !huge_mapped) {
        *error = "huge zero folio mapped by a PTE at " + hex(va) + " (unexpected)";
        close_all();
        return -EIO;
      }
      continue;
    }
    if (compound && bit(f, kKpfThp))
      rp.kind = huge_mapped ? PageKind::kThpPmd : PageKind::kThpPte;
    else
      rp.kind = PageKind::kSmall;
    uint64_t cnt = 0;
    if (!pread_all(kpc, &cnt, 8, static_cast<off_t>(pfn * 8))) {
      *error = "kpagecount read failed";
      close_all();
      return -EIO;
    }
    rp.mapcount = static_cast<int32_t>(cnt);
  }
  close_all();
  return 0;
}
}  // namespace

RealExecutor::~RealExecutor() {
  (void)do_put_refs();
  for (int p = 1; p < nprocs_; ++p)
    if (children_[p].pid > 0) (void)do_exit(p);
  for (auto [s, e] : std::map<Va, Va>(owned_)) ::munmap(reinterpret_cast<void*>(s), e - s);
  for (auto [w, len] : windows_) ::munmap(reinterpret_cast<void*>(w), len);
}

int RealExecutor::reserve_window(uint64_t len, Va* out) {
  // Over-allocate by 2 MiB, keep the aligned part, give the rest back.
  uint64_t big = len + kPmdSize;
  void* p = ::mmap(nullptr, big, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return -errno;
  Va raw = reinterpret_cast<Va>(p);
  Va a = pmd_align_up(raw);
  if (a > raw) ::munmap(p, a - raw);
  if (raw + big > a + len) ::munmap(reinterpret_cast<void*>(a + len), raw + big - (a + len));
  windows_.push_back({a, len});
  *out = a;
  return 0;
}

int RealExecutor::local(const Cmd& c, Va* result, std::vector<RawPage>* pages,
                        std::string* error) {
  void* a = reinterpret_cast<void*>(c.addr);
  switch (c.op) {
    case kCmdMmap: {
      void* p = ::mmap(a, c.len, c.prot, c.flags, -1, 0);
      if (p == MAP_FAILED) return -errno;
      owned_add(owned_, reinterpret_cast<Va>(p), reinterpret_cast<Va>(p) + c.len);
      return 0;
    }
    case kCmdMunmap:
      if (::munmap(a, c.len)) return -errno;
      owned_remove(owned_, c.addr, c.addr + c.len);
      return 0;
    case kCmdMprotect:
      return ::mprotect(a, c.len, c.prot) ? -errno : 0;
    case kCmdMadvise:
      return ::madvise(a, c.len, c.advice) ? -errno : 0;
    case kCmdMremap: {
      void* p = ::mremap(a, c.len, c.new_len, c.flags, reinterpret_cast<void*>(c.new_addr));
      if (p == MAP_FAILED) return -errno;
      Va np = reinterpret_cast<Va>(p);
      if (!(c.flags & MREMAP_DONTUNMAP)) owned_remove(owned_, c.addr, c.addr + c.len);
      owned_add(owned_, np, np + c.new_len);
      if (result) *result = np;
      return 0;
    }
    case kCmdRead:
      return guarded_access(c.addr, 1, 0, 0);
    case kCmdWrite:
      return guarded_access(c.addr, 1, 1, c.byte);
    case kCmdFill:
      return guarded_access(c.addr, c.len, 2, c.byte);
    case kCmdSnapshot:
      return real_snapshot(owned_, c.addr, c.len, pages, error);
    default:
      return -EINVAL;
  }
}

void RealExecutor::serve(int in_fd, int out_fd) {
  for (;;) {
    Cmd c{};
    if (!read_all(in_fd, &c, sizeof c) || c.op == kCmdExit) _exit(0);
    Va result = 0;
    std::vector<RawPage> pages;
    std::string error;
    int32_t rc = local(c, &result, &pages, &error);
    uint64_t np = pages.size(), ne = error.size();
    if (!write_all(out_fd, &rc, sizeof rc) || !write_all(out_fd, &result, sizeof result) ||
        !write_all(out_fd, &np, sizeof np) ||
        !write_all(out_fd, pages.data(), np * sizeof(RawPage)) ||
        !write_all(out_fd, &ne, sizeof ne) || !write_all(out_fd, error.data(), ne))
      _exit(1);
  }
}

int RealExecutor::remote(int proc, const Cmd& c, Va* result, std::vector<RawPage>* pages,
                         std::string* error) {
  const Child& ch = children_[proc];
  int32_t rc = 0;
  Va res = 0;
  uint64_t np = 0, ne = 0;
  if (!write_all(ch.to_fd, &c, sizeof c) || !read_all(ch.from_fd, &rc, sizeof rc) ||
      !read_all(ch.from_fd, &res, sizeof res) || !read_all(ch.from_fd, &np, sizeof np))
    return -EPIPE;
  std::vector<RawPage> tmp(np);
  if (!read_all(ch.from_fd, tmp.data(), np * sizeof(RawPage)) ||
      !read_all(ch.from_fd, &ne, sizeof ne))
    return -EPIPE;
  std::string err(ne, '\0');
  if (!read_all(ch.from_fd, err.data(), ne)) return -EPIPE;
  if (result) *result = res;
  if (pages) *pages = std::move(tmp);
  if (error) *error = std::move(err);
  return rc;
}

int RealExecutor::dispatch(int proc, const Cmd& c, Va* result, std::vector<RawPage>* pages,
                           std::string* error) {
  if (proc == 0) return local(c, result, pages, error);
  if (!proc_alive(proc)) return -ESRCH;
  return remote(proc, c, result, pages, error);
}

int RealExecutor::do_mmap(int proc, Va addr, uint64_t len, int prot, int flags) {
  return dispatch(proc, Cmd{kCmdMmap, prot, flags, 0, 0, addr, len, 0, 0});
}
int RealExecutor::do_munmap(int proc, Va addr, uint64_t len) {
  return dispatch(proc, Cmd{kCmdMunmap, 0, 0, 0, 0, addr, len, 0, 0});
}
int RealExecutor::do_mprotect(int proc, Va addr, uint64_t len, int prot) {
  return dispatch(proc, Cmd{kCmdMprotect, prot, 0, 0, 0, addr, len, 0, 0});
}
int RealExecutor::do_madvise(int proc, Va addr, uint64_t len, int advice) {
  return dispatch(proc, Cmd{kCmdMadvise, 0, 0, advice, 0, addr, len, 0, 0});
}
int RealExecutor::do_mremap(int proc, Va old_addr, uint64_t old_len, uint64_t new_len,
                            int flags, Va new_addr, Va* result) {
  return dispatch(proc, Cmd{kCmdMremap, 0, flags, 0, 0, old_addr, old_len, new_len, new_addr},
                  result);
}
int RealExecutor::do_read(int proc, Va addr) {
  return dispatch(proc, Cmd{kCmdRead, 0, 0, 0, 0, addr, 1, 0, 0});
}
int RealExecutor::do_write(int proc, Va addr, uint8_t byte) {
  return dispatch(proc, Cmd{kCmdWrite, 0, 0, 0, byte, addr, 1, 0, 0});
}
int RealExecutor::do_fill(int proc, Va addr, uint64_t len, uint8_t byte) {
  return dispatch(proc, Cmd{kCmdFill, 0, 0, 0, byte, addr, len, 0, 0});
}
int RealExecutor::do_snapshot(int proc, Va addr, uint64_t len, std::vector<RawPage>* out,
                              std::string* error) {
  return dispatch(proc, Cmd{kCmdSnapshot, 0, 0, 0, 0, addr, len, 0, 0}, nullptr, out, error);
}

// vmsplice (without SPLICE_F_GIFT) takes GUP references on the pages and the pipe holds them
// until it is closed: a reference beyond the mappings, as a driver's get_user_pages holds.
int RealExecutor::do_gup_ref(Va addr, uint64_t len) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC)) return -errno;
  ref_pipes_.push_back(p[0]);
  ref_pipes_.push_back(p[1]);
  if (::fcntl(p[1], F_SETPIPE_SZ, static_cast<int>(std::max<uint64_t>(len, kPageSize))) < 0) return -errno;
  uint64_t done = 0;
  while (done < len) {
    iovec iov{reinterpret_cast<void*>(addr + done), len - done};
    ssize_t n = ::vmsplice(p[1], &iov, 1, SPLICE_F_NONBLOCK);
    if (n <= 0) return n < 0 ? -errno : -EIO;
    done += static_cast<uint64_t>(n);
  }
  return 0;
}

int RealExecutor::do_put_refs() {
  for (int fd : ref_pipes_) ::close(fd);
  ref_pipes_.clear();
  return 0;
}

bool RealExecutor::proc_alive(int proc) const {
  if (proc == 0) return true;
  return proc < nprocs_ && children_[proc].pid > 0;
}

int RealExecutor::do_fork(int proc, int* child) {
  if (proc != 0 || nprocs_ >= kMaxProcs) return -EINVAL;  // only process 0 forks
  int to[2], from[2];
  if (::pipe2(to, O_CLOEXEC)) return -errno;
  if (::pipe2(from, O_CLOEXEC)) {
    int e = errno;
    ::close(to[0]);
    ::close(to[1]);
    return -e;
  }
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = ::fork();
  if (pid < 0) {
    int e = errno;
    for (int fd : {to[0], to[1], from[0], from[1]}) ::close(fd);
    return -e;
  }
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (int p = 1; p < nprocs_; ++p) {
      if (children_[p].to_fd >= 0) ::close(children_[p].to_fd);
      if (children_[p].from_fd >= 0) ::close(children_[p].from_fd);
    }
    ::close(to[1]);
    ::close(from[0]);
    serve(to[0], from[1]);
  }
  ::close(to[0]);
  ::close(from[1]);
  children_[nprocs_] = Child{pid, to[1], from[0]};
  *child = nprocs_++;
  return 0;
}

int RealExecutor::do_exit(int proc) {
  if (proc == 0 || !proc_alive(proc)) return -EINVAL;
  Child& ch = children_[proc];
  Cmd c{};
  c.op = kCmdExit;
  (void)write_all(ch.to_fd, &c, sizeof c);
  ::close(ch.to_fd);
  ::close(ch.from_fd);
  int status = 0;
  ::waitpid(ch.pid, &status, 0);
  ch = Child{};
  return 0;
}

// ---------------------------------------------------------------------------------------
// ModelExecutor.

ModelExecutor::ModelExecutor(const PhysMem::Config& config) {
  auto mem = PhysMem::create(config);
  if (!mem) {
    setup_error_ = "PhysMem::create failed: " + errstr(mem.error());
    return;
  }
  mem_ = std::move(*mem);
  auto as = AddressSpace::create(mem_.get());
  if (!as) {
    setup_error_ = "AddressSpace::create failed: " + errstr(as.error());
    return;
  }
  procs_[0] = std::move(*as);
  nprocs_ = 1;
}

int ModelExecutor::do_gup_ref(Va addr, uint64_t len) {
  AddressSpace* m = as(0);
  if (!m) return -ESRCH;
  const uint64_t n = len / kPageSize;
  std::vector<Folio*> pages(n);
  const long got = pin_user_pages_fast(*m, addr, n, 0, pages.data());
  if (got < 0) return static_cast<int>(got);
  pinned_.insert(pinned_.end(), pages.begin(), pages.begin() + got);
  return static_cast<uint64_t>(got) == n ? 0 : -EFAULT;
}

int ModelExecutor::do_put_refs() {
  unpin_user_pages(pinned_.data(), pinned_.size());
  pinned_.clear();
  return 0;
}

ModelExecutor::~ModelExecutor() {
  (void)do_put_refs();
  for (int p = kMaxProcs - 1; p >= 0; --p) procs_[p].reset();
  mem_.reset();
}

AddressSpace* ModelExecutor::as(int proc) const {
  return proc >= 0 && proc < kMaxProcs ? procs_[proc].get() : nullptr;
}

bool ModelExecutor::proc_alive(int proc) const { return as(proc) != nullptr; }

int ModelExecutor::reserve_window(uint64_t len, Va* out) {
  if (!as(0)) return -ESRCH;
  Va a = next_window_;
  auto r = as(0)->mmap(a, len, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE);
  if (!r) return r.error();
  if (*r != a) return -EIO;
  next_window_ += pmd_align_up(len) + 2 * kPmdSize;
  *out = a;
  return 0;
}

int ModelExecutor::do_mmap(int proc, Va addr, uint64_t len, int prot, int flags) {
  AddressSpace* m = as(proc);
  if (!m) return -ESRCH;
  auto r = m->mmap(addr, len, prot, flags);
  if (!r) return r.error();
  if ((flags & MAP_FIXED) && *r != addr) return -EIO;
  return 0;
}

int ModelExecutor::do_munmap(int proc, Va addr, uint64_t len) {
  AddressSpace* m = as(proc);
  return m ? m->munmap(addr, len) : -ESRCH;
}

int ModelExecutor::do_mprotect(int proc, Va addr, uint64_t len, int prot) {
  AddressSpace* m = as(proc);
  return m ? m->mprotect(addr, len, prot) : -ESRCH;
}

int ModelExecutor::do_madvise(int proc, Va addr, uint64_t len, int advice) {
  AddressSpace* m = as(proc);
  return m ? m->madvise(addr, len, advice) : -ESRCH;
}

int ModelExecutor::do_mremap(int proc, Va old_addr, uint64_t old_len, uint64_t new_len,
                             int flags, Va new_addr, Va* result) {
  AddressSpace* m = as(proc);
  if (!m) return -ESRCH;
  auto r = m->mremap(old_addr, old_len, new_len, flags, new_addr);
  if (!r) return r.error();
  *result = *r;
  return 0;
}

int ModelExecutor::do_read(int proc, Va addr) {
  AddressSpace* m = as(proc);
  if (!m) return -ESRCH;
  auto r = cpu::load<uint8_t>(*m, addr);
  return r ? 0 : r.error();
}

int ModelExecutor::do_write(int proc, Va addr, uint8_t byte) {
  AddressSpace* m = as(proc);
  return m ? cpu::store<uint8_t>(*m, addr, byte) : -ESRCH;
}

int ModelExecutor::do_fill(int proc, Va addr, uint64_t len, uint8_t byte) {
  AddressSpace* m = as(proc);
  return m ? cpu::memset(*m, addr, byte, len) : -ESRCH;
}

int ModelExecutor::do_fork(int proc, int* child) {
  AddressSpace* m = as(proc);
  if (!m || proc != 0 || nprocs_ >= kMaxProcs) return -EINVAL;
  auto r = m->fork();
  if (!r) return r.error();
  procs_[nprocs_] = std::move(*r);
  *child = nprocs_++;
  return 0;
}

int ModelExecutor::do_exit(int proc) {
  AddressSpace* m = as(proc);
  if (!m || proc == 0) return -EINVAL;
  m->exit();
  procs_[proc].reset();
  return 0;
}

int ModelExecutor::do_snapshot(int proc, Va addr, uint64_t len, std::vector<RawPage>* out,
                               std::string* error) {
  AddressSpace* m = as(proc);
  if (!m) return -ESRCH;
  out->assign(len / kPageSize, RawPage{});
  for (uint64_t i = 0; i < len / kPageSize; ++i) {
    PageState st = query_page(*m, addr + i * kPageSize);
    RawPage& rp = (*out)[i];
    rp.kind = st.kind;
    if (!has_frame(st.kind)) continue;
    rp.pfn = st.pfn;
    Folio* folio = mem_->folio_of(st.pfn);
    Folio* page = mem_->pfn_to_page(st.pfn);
    if (!folio || !page) {
      *error = "query_page returned pfn " + hex(st.pfn) + " without a descriptor";
      return -EIO;
    }
    rp.folio = folio->pfn();
    if (!is_zero_kind(st.kind)) rp.mapcount = page->page_mapcount() + folio->entire_mapcount();
  }
  return 0;
}

void ModelExecutor::after_snapshot(RunResult* result) {
  CheckReport rep = check(*mem_);
  if (!rep.ok())
    result->notes.push_back("mm::check after snapshot \"" + result->snapshots.back().label +
                            "\": " + rep.to_string());
}

// ---------------------------------------------------------------------------------------
// Host probe.

InterferenceCounters InterferenceCounters::read() {
  InterferenceCounters c;
  std::istringstream vm(read_text("/proc/vmstat"));
  std::string key;
  uint64_t v = 0;
  while (vm >> key >> v) {
    if (key == "thp_fault_fallback") c.thp_fault_fallback = v;
    if (key == "thp_collapse_alloc_failed") c.thp_collapse_alloc_failed = v;
  }
  std::string pc = read_text("/sys/kernel/mm/transparent_hugepage/khugepaged/pages_collapsed");
  if (!pc.empty()) c.khugepaged_collapsed = std::strtoull(pc.c_str(), nullptr, 10);
  return c;
}

std::string InterferenceCounters::changed_since(const InterferenceCounters& b) const {
  std::string s;
  if (khugepaged_collapsed != b.khugepaged_collapsed)
    s += "khugepaged collapsed " + std::to_string(khugepaged_collapsed - b.khugepaged_collapsed) +
         " pages during the run; ";
  if (thp_fault_fallback != b.thp_fault_fallback)
    s += "a THP fault fell back to small pages (thp_fault_fallback); ";
  if (thp_collapse_alloc_failed != b.thp_collapse_alloc_failed)
    s += "a collapse could not allocate a THP (thp_collapse_alloc_failed); ";
  return s;
}

namespace {

HostInfo probe_host() {
  HostInfo h;
  struct utsname u {};
  ::uname(&u);
  h.kernel_release = u.release;
  int major = 0, minor = 0;
  std::sscanf(u.release, "%d.%d", &major, &minor);
  h.kernel = major * 100 + minor;
  std::ostringstream notes;
  notes << "kernel " << u.release;

  if (::geteuid() != 0) {
    h.why_not = "not root: /proc/self/pagemap hides PFNs and /proc/kpageflags is unreadable";
    return h;
  }
  for (const char* f : {"/proc/kpageflags", "/proc/kpagecount", "/proc/self/pagemap"}) {
    int fd = ::open(f, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      h.why_not = std::string("cannot open ") + f + ": " + strerror(errno);
      return h;
    }
    ::close(fd);
  }

  const std::string thp_dir = "/sys/kernel/mm/transparent_hugepage/";
  std::string mode = selected(read_text(thp_dir + "enabled"));
  if (mode.empty()) {
    h.thp = ThpMode::kNever;
    notes << ", no THP support (transparent_hugepage/enabled missing)";
  } else {
    h.thp = mode == "always" ? ThpMode::kAlways : mode == "madvise" ? ThpMode::kMadvise
                                                                    : ThpMode::kNever;
    notes << ", THP enabled=" << mode;
  }
  std::string zp = read_text(thp_dir + "use_zero_page");
  h.use_zero_page = !zp.empty() && zp[0] == '1';
  notes << ", use_zero_page=" << (h.use_zero_page ? 1 : 0);
  std::string pmd_size = read_text(thp_dir + "hpage_pmd_size");
  if (!pmd_size.empty() && std::strtoull(pmd_size.c_str(), nullptr, 10) != kPmdSize) {
    h.why_not = "PMD size is " + pmd_size + ", the model has 2 MiB PMDs";
    return h;
  }
  // Multi-size THP (6.8): any enabled order below PMD size would give large folios the model
  // cannot have (it has order 0 and PMD order only).
  if (DIR* d = ::opendir(thp_dir.c_str())) {
    while (dirent* de = ::readdir(d)) {
      std::string name = de->d_name;
      if (name.rfind("hugepages-", 0) != 0) continue;
      uint64_t kb = std::strtoull(name.c_str() + 10, nullptr, 10);
      if (kb * kKiB == kPmdSize) continue;
      std::string m = selected(read_text(thp_dir + name + "/enabled"));
      bool on = m == "always" || m == "madvise" || (m == "inherit" && h.thp != ThpMode::kNever);
      if (on) {
        h.why_not = "multi-size THP " + name + " is enabled (" + m +
                    "): Linux would create large folios of orders the model does not have";
        ::closedir(d);
        return h;
      }
    }
    ::closedir(d);
  }

  // Kernel config: with CONFIG_NO_PAGE_MAPCOUNT (6.15+), /proc/kpagecount reports an average
  // per folio, not the per-page count the model reports.
  if (FILE* p = ::popen("zcat /proc/config.gz 2>/dev/null | grep -E '^CONFIG_NO_PAGE_MAPCOUNT=y'",
                        "r")) {
    char line[128];
    if (std::fgets(line, sizeof line, p)) h.precise_mapcount = false;
    ::pclose(p);
  }
  notes << (h.precise_mapcount ? ", per-page mapcounts" : ", CONFIG_NO_PAGE_MAPCOUNT (mapcounts not compared)");

  // Self-test: a written page must show up present with a PFN, and PAGEMAP_SCAN must work.
  void* p = ::mmap(nullptr, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    h.why_not = "mmap failed";
    return h;
  }
  *static_cast<volatile char*>(p) = 1;
  std::map<Va, Va> owned{{reinterpret_cast<Va>(p), reinterpret_cast<Va>(p) + kPageSize}};
  std::vector<RawPage> pages;
  std::string err;
  int rc = real_snapshot(owned, reinterpret_cast<Va>(p), kPageSize, &pages, &err);
  ::munmap(p, kPageSize);
  if (rc) {
    h.why_not = "self-test snapshot failed: " + err +
                (err.find("PAGEMAP_SCAN") != std::string::npos
                     ? " (PAGEMAP_SCAN needs Linux 6.7+; it is how PMD mappings are told apart)"
                     : "");
    return h;
  }
  if (pages.size() != 1 || pages[0].kind != PageKind::kSmall || pages[0].mapcount != 1) {
    h.why_not = "self-test: a written private page is not reported as a small page mapped once";
    return h;
  }
  h.notes = notes.str();
  h.usable = true;
  return h;
}

}  // namespace

const HostInfo& host_info() {
  static const HostInfo h = probe_host();
  return h;
}

}  // namespace gpusvm::mm::oracle
