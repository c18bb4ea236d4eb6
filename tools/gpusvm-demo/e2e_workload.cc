// gpusvm-demo (the end-to-end workload): the program. Everything below goes through the
// runtime (gpusvm/runtime.hpp) and so through the refgpu ioctls: no driver or mm header is
// included. The phases, in order (each ends with a CPU check of every byte it touched):
//
//   cpu-init      malloc'd buffers of several sizes (one THP-backed) written by the CPU
//   gpu-fault     one job per buffer checks the CPU's values and rewrites them: the GPU
//                 faults the pages in and migrates them to VRAM (the default placement)
//   prefetch      the THP buffer and the medium one prefetched to VRAM with a fence, then
//                 a job that finds them resident
//   oversubscribe a working set of 150 % of VRAM written, then checked, by the GPU: later
//                 faults evict earlier buffers (and the prefetched THP buffer) to system memory
//   madvise       preferred location system (the job's pages stay in system memory),
//                 preferred location device (they migrate), and the atomic policies: device
//                 and global atomics succeed with the CPU's interleaved increments counted,
//                 the CPU policy fails the device atomic with an atomic fault on its address
//
// Data patterns are arithmetic (value i = base + i * step, 32-bit) so a job can check them
// with LOAD_STRIDED CHECK and the CPU can check every dword without a host copy.
#include "tools/gpusvm-demo/e2e_workload.h"

#include <fmt/format.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "gpusvm/runtime.hpp"
#include "tools/gpusvm-demo/e2e_residency.h"
#include "uapi/refgpu.h"  // the ISA and advice constants of the uapi

namespace gpusvm::demo {
namespace {

constexpr uint64_t kKiB = 1ull << 10;
constexpr uint64_t kMiB = 1ull << 20;
// Every fence wait: a hang fails the demo instead of blocking it. The bound is against hangs,
// not a timing check: a 4 MiB buffer checked and rewritten is two million translated accesses,
// which in a sanitizer build on a loaded 2-core machine took more than 10 s (the bound this
// had: an asan ctest run at -j4 timed out the thp job); ctest's own limit is 300 s.
constexpr int64_t kWaitNs = 120'000'000'000;

// A malloc'd buffer and the pattern it should hold now.
struct Buf {
  std::string name;
  rt::Va addr = 0;
  uint64_t len = 0;
  uint32_t base = 0, step = 0;
};

// The pattern of generation `gen` of buffer number `id`: distinct in every dword across
// buffers and generations.
void set_gen(Buf& b, uint32_t id, uint32_t gen) {
  b.base = (id << 24) ^ (gen << 16) ^ 0x1234;
  b.step = 2 * gen + 1;
}

class Workload {
 public:
  Workload(devfs::Process& proc, Report* rep) : proc_(proc), rep_(rep) {}

  int run() {
    const auto t0 = std::chrono::steady_clock::now();
    struct Step {
      const char* name;
      const char* what;
      bool (Workload::*body)();
    };
    static constexpr Step kSteps[] = {
        {"cpu-init", "the CPU writes every buffer (THP buffer: 2 MiB folios)", &Workload::cpu_init},
        {"gpu-fault", "a job per buffer checks the CPU's data and rewrites it; the GPU faults", &Workload::gpu_fault},
        {"prefetch", "THP and medium buffers prefetched to VRAM, then a job finds them there", &Workload::prefetch},
        {"oversubscribe", "a 150 % of VRAM working set written and checked by the GPU", &Workload::oversubscribe},
        {"madvise", "preferred location system / device, device and global atomics", &Workload::madvise},
    };
    bool ok = open();
    for (const Step& st : kSteps) {
      ok = ok && phase(st.name, st.what, [&] { return (this->*st.body)(); });
    }
    release();
    rep_->total_ms = ms_since(t0);
    return ok ? 0 : 1;
  }

 private:
  static double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }

  // Records the first failure and prints it; returns false so callers can `return fail(...)`.
  bool fail(const std::string& why) {
    if (rep_->failure.empty()) rep_->failure = fmt::format("{}: {}", cur_phase_, why);
    fmt::print("      FAIL  {}\n", why);
    return false;
  }
  bool check_rc(int rc, const std::string& what) {
    return rc == 0 || fail(fmt::format("{}: {}", what, gpusvm_rt_strerror(rc)));
  }

  bool open() {
    cur_phase_ = "open";
    Result<rt::Device> d = rt::Device::open(proc_, 0);
    if (!d) return fail(fmt::format("open refgpu0: {}", gpusvm_rt_strerror(d.error())));
    dev_ = std::move(*d);
    Result<gpusvm_rt_device_info> info = dev_.info();
    if (!info) return fail(fmt::format("device info: {}", gpusvm_rt_strerror(info.error())));
    if (info->vram_size == 0) return fail("refgpu0 has no VRAM");
    rep_->vram_bytes = info->vram_size;
    rep_->engines = info->num_engines;
    Result<rt::Context> c = rt::Context::create(dev_);  // fault mode, one mirror bind over [0, TASK_SIZE)
    if (!c) return fail(fmt::format("context: {}", gpusvm_rt_strerror(c.error())));
    ctx_ = std::move(*c);
    Result<rt::Queue> q = rt::Queue::create(ctx_, 0);
    if (!q) return fail(fmt::format("queue: {}", gpusvm_rt_strerror(q.error())));
    queue_ = std::move(*q);
    Result<std::vector<uint64_t>> s = dev_.stats();
    if (!s) return fail(fmt::format("stats: {}", gpusvm_rt_strerror(s.error())));
    for (uint32_t i = 0; i < s->size(); ++i) {
      const char* n = rt::Device::stat_name(i);
      rep_->stat_names.push_back(n ? n : fmt::format("stat_{}", i));
    }
    fmt::print("refgpu0: {} MiB VRAM, {} engines, {} VA bits; context: VM {} in fault mode mirroring the whole "
               "address space\n\n",
               info->vram_size / kMiB, info->num_engines, info->va_bits, ctx_.vm_id());
    return true;
  }

  // Runs one phase between two statistics snapshots, timed.
  template <typename F>
  bool phase(const char* name, const char* what, F&& body) {
    cur_phase_ = name;
    fmt::print("[{}] {}: {}\n", rep_->phases.size() + 1, name, what);
    Result<std::vector<uint64_t>> s0 = dev_.stats();
    if (!s0) return fail(fmt::format("stats: {}", gpusvm_rt_strerror(s0.error())));
    const auto t0 = std::chrono::steady_clock::now();
    const bool ok = body();
    PhaseResult pr{.name = name, .what = what, .ms = ms_since(t0), .stats = {}};
    Result<std::vector<uint64_t>> s1 = dev_.stats();
    if (!s1) return fail(fmt::format("stats: {}", gpusvm_rt_strerror(s1.error())));
    for (size_t i = 0; i < s1->size() && i < s0->size(); ++i) pr.stats.push_back((*s1)[i] - (*s0)[i]);
    rep_->phases.push_back(std::move(pr));
    fmt::print("\n");
    return ok;
  }

  // A residency row of the watched buffer (the THP one), and the counts of `b` checked to be
  // `want_device` pages in VRAM when that is given (or printed otherwise).
  bool picture(const std::string& moment) {
    Result<std::string> row = residency_row(ctx_, watched().addr, watched().len, rep_->residency_chunk);
    if (!row) return fail(fmt::format("residency query: {}", gpusvm_rt_strerror(row.error())));
    fmt::print("      {:<30} {}\n", moment, *row);
    rep_->residency.push_back({.phase = cur_phase_, .moment = moment, .cells = *row});
    return true;
  }
  bool expect_device_pages(const Buf& b, uint64_t want, const char* why) {
    Result<gpusvm_rt_residency> r = ctx_.residency(b.addr, b.len);
    if (!r) return fail(fmt::format("residency of {}: {}", b.name, gpusvm_rt_strerror(r.error())));
    fmt::print("      ok    {}: {} of {} pages in VRAM ({})\n", b.name, r->device, r->pages, why);
    if (r->device != want) {
      return fail(fmt::format("{}: {} pages in VRAM, expected {} ({})", b.name, r->device, want, why));
    }
    return true;
  }

  Buf& watched() { return bufs_[2]; }

  // CPU stores of the buffer's current pattern, in 64 KiB pieces.
  bool cpu_write(const Buf& b) {
    std::vector<uint32_t> v(64 * kKiB / 4);
    for (uint64_t off = 0; off < b.len; off += 64 * kKiB) {
      const uint64_t n = std::min<uint64_t>(64 * kKiB, b.len - off) / 4;
      for (uint64_t i = 0; i < n; ++i) v[i] = b.base + static_cast<uint32_t>(off / 4 + i) * b.step;
      if (!check_rc(ctx_.write<uint32_t>(b.addr + off, std::span(v.data(), n)), "CPU write " + b.name)) return false;
    }
    return true;
  }
  // CPU loads of every dword of `b`, compared with its pattern (these fault device pages home).
  // The qwords at the byte offsets in `skip` hold something else (the atomics' counters).
  bool cpu_verify(const Buf& b, const std::vector<uint64_t>& skip = {}) {
    std::vector<uint32_t> v(64 * kKiB / 4);
    for (uint64_t off = 0; off < b.len; off += 64 * kKiB) {
      const uint64_t n = std::min<uint64_t>(64 * kKiB, b.len - off) / 4;
      if (!check_rc(ctx_.read<uint32_t>(b.addr + off, std::span(v.data(), n)), "CPU read " + b.name)) return false;
      for (uint64_t i = 0; i < n; ++i) {
        const uint32_t want = b.base + static_cast<uint32_t>(off / 4 + i) * b.step;
        if (std::find(skip.begin(), skip.end(), (off + 4 * i) & ~7ull) != skip.end()) continue;
        if (v[i] != want) {
          return fail(fmt::format("{} + {:#x} holds {:#010x}, expected {:#010x}", b.name, off + 4 * i, v[i], want));
        }
      }
    }
    return true;
  }
  bool cpu_verify_all(const std::vector<Buf>& bs) {
    uint64_t bytes = 0;
    for (const Buf& b : bs) {
      if (!cpu_verify(b)) return false;
      bytes += b.len;
    }
    fmt::print("      ok    the CPU read back every byte ({} KiB in {} buffers)\n", bytes / kKiB, bs.size());
    return true;
  }

  // A job: LOAD_STRIDED CHECK of b's current pattern, then STORE_STRIDED of generation `gen`.
  bool gpu_rewrite(Buf& b, uint32_t id, uint32_t gen) {
    rt::CmdBuf cb;
    if (!check_rc(cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, b.addr, 4, b.len / 4, b.base, b.step), "cmd"))
      return false;
    Buf next = b;
    set_gen(next, id, gen);
    if (!check_rc(cb.store_strided(0, b.addr, 4, b.len / 4, next.base, next.step), "cmd")) return false;
    if (!run_job(cb, "job on " + b.name)) return false;
    b = next;
    return true;
  }
  bool run_job(const rt::CmdBuf& cb, const std::string& what) {
    Result<rt::Fence> f = queue_.submit(cb);
    if (!f) return fail(fmt::format("submit {}: {}", what, gpusvm_rt_strerror(f.error())));
    const int rc = f->wait(kWaitNs);
    if (rc == 0) return true;
    Result<gpusvm_rt_job_error> e = f->error();
    if (e && e->has_fault) {
      return fail(fmt::format("{}: {} (GPU fault at {:#x}, access {})", what, gpusvm_rt_strerror(rc), e->address,
                              e->access));
    }
    return fail(fmt::format("{}: {}", what, gpusvm_rt_strerror(rc)));
  }

  bool alloc(const std::string& name, uint64_t len, uint64_t align, const std::string& how) {
    Result<rt::Va> a = align ? ctx_.aligned_alloc(align, len) : ctx_.malloc(len);
    if (!a) return fail(fmt::format("malloc {}: {}", name, gpusvm_rt_strerror(a.error())));
    Buf b{.name = name, .addr = *a, .len = len};
    set_gen(b, static_cast<uint32_t>(bufs_.size() + big_.size()), 1);
    rep_->buffers.push_back({.name = name, .addr = *a, .bytes = len, .how = how});
    fmt::print("      {:<10} {:>6} KiB at {:#x}  {}\n", name, len / kKiB, *a, how);
    if (name.rfind("big", 0) == 0) {
      big_.push_back(b);
    } else {
      bufs_.push_back(b);
    }
    return true;
  }

  bool cpu_init() {
    if (!alloc("small", 48 * kKiB, 0, "malloc (a block of a 2 MiB arena)") ||
        !alloc("medium", 1 * kMiB, 0, "malloc (a mapping of its own, 4 KiB pages)") ||
        !alloc("thp", 4 * kMiB, 2 * kMiB, "aligned_alloc(2 MiB) + madvise(MADV_HUGEPAGE)") ||
        !alloc("counters", 64 * kKiB, 4 * kKiB, "aligned_alloc(4 KiB): one qword counter per page")) {
      return false;
    }
    if (!check_rc(ctx_.madvise_host(watched().addr, watched().len, MADV_HUGEPAGE), "madvise(MADV_HUGEPAGE)")) return false;
    rep_->residency_buffer = watched().name;
    for (const Buf& b : bufs_) {
      if (!cpu_write(b)) return false;
    }
    fmt::print("      the CPU wrote {} buffers\n", bufs_.size());
    return picture("after the CPU writes") && cpu_verify_all(bufs_);
  }

  bool gpu_fault() {
    for (uint32_t i = 0; i < bufs_.size(); ++i) {
      if (!gpu_rewrite(bufs_[i], i, 2)) return false;
    }
    fmt::print("      ok    {} jobs checked the CPU's data and rewrote it\n", bufs_.size());
    return picture("after the jobs") && expect_device_pages(watched(), watched().len / 4096, "faults migrate to VRAM") &&
           cpu_verify_all(bufs_) && picture("after the CPU check");
  }

  bool prefetch() {
    for (Buf* b : {&bufs_[1], &watched()}) {
      Result<rt::Fence> f = ctx_.prefetch(b->addr, b->len, 1);
      if (!f) return fail(fmt::format("prefetch {}: {}", b->name, gpusvm_rt_strerror(f.error())));
      if (!check_rc(f->wait(kWaitNs), "prefetch fence of " + b->name)) return false;
    }
    fmt::print("      ok    prefetch of medium and thp to VRAM signalled its fences\n");
    if (!picture("after the prefetch") || !expect_device_pages(watched(), watched().len / 4096, "prefetched")) return false;
    if (!gpu_rewrite(bufs_[1], 1, 3) || !gpu_rewrite(watched(), 2, 3)) return false;
    fmt::print("      ok    jobs on the prefetched buffers\n");
    return picture("after the jobs") && cpu_verify_all(bufs_) && picture("after the CPU check");
  }

  bool oversubscribe() {
    const uint64_t total = rep_->vram_bytes / 2 * 3;
    for (uint64_t off = 0; off < total; off += 2 * kMiB) {
      if (!alloc(fmt::format("big{}", off / (2 * kMiB)), 2 * kMiB, 2 * kMiB, "aligned_alloc(2 MiB), working set")) {
        return false;
      }
    }
    // The THP buffer starts in VRAM: the working set's faults push it out.
    Result<rt::Fence> f = ctx_.prefetch(watched().addr, watched().len, 1);
    if (!f) return fail(fmt::format("prefetch: {}", gpusvm_rt_strerror(f.error())));
    if (!check_rc(f->wait(kWaitNs), "prefetch fence") || !picture("thp prefetched to VRAM")) return false;
    // Round 1: the GPU writes each buffer of the working set (fresh memory: no check).
    for (uint32_t i = 0; i < big_.size(); ++i) {
      rt::CmdBuf cb;
      set_gen(big_[i], 16 + i, 2);
      if (!check_rc(cb.store_strided(0, big_[i].addr, 4, big_[i].len / 4, big_[i].base, big_[i].step), "cmd") ||
          !run_job(cb, "job on " + big_[i].name)) {
        return false;
      }
    }
    fmt::print("      ok    the GPU wrote {} MiB ({} % of VRAM)\n", total / kMiB, 100 * total / rep_->vram_bytes);
    if (!picture("after the GPU writes")) return false;
    // Round 2: the GPU checks each buffer and rewrites it (evicted ones fault back in).
    for (uint32_t i = 0; i < big_.size(); ++i) {
      if (!gpu_rewrite(big_[i], 16 + i, 3)) return false;
    }
    fmt::print("      ok    the GPU checked and rewrote the working set\n");
    Result<gpusvm_rt_device_info> info = dev_.info();
    if (!info) return fail(fmt::format("device info: {}", gpusvm_rt_strerror(info.error())));
    if (info->vram_used > info->vram_size) {
      return fail(fmt::format("VRAM use {} over its size {}", info->vram_used, info->vram_size));
    }
    std::vector<Buf> all = bufs_;
    all.insert(all.end(), big_.begin(), big_.end());
    if (!cpu_verify_all(all) || !picture("after the CPU check")) return false;
    for (const Buf& b : big_) {
      if (!check_rc(ctx_.free(b.addr), "free " + b.name)) return false;
    }
    big_.clear();
    return true;
  }

  // Device atomics under the three policies on three counter pages (the first qword of
  // pages 0..2 of the counters buffer, which is page aligned).
  bool atomics() {
    const Buf& c = bufs_[3];
    if (!cpu_verify(c)) return false;
    struct Case {
      uint32_t policy;
      const char* name;
    };
    const Case cases[] = {{REFGPU_ATOMIC_DEVICE, "device"}, {REFGPU_ATOMIC_GLOBAL, "global"}, {REFGPU_ATOMIC_CPU, "cpu"}};
    for (uint32_t k = 0; k < 3; ++k) {
      const rt::Va counter = c.addr + k * 4096;
      if (!check_rc(ctx_.store<uint64_t>(counter, 1000), "CPU store") ||
          !check_rc(ctx_.advise_atomic(counter, 4096, cases[k].policy), "advise atomic")) {
        return false;
      }
      rt::CmdBuf cb;
      for (int i = 0; i < 64; ++i) {
        if (!check_rc(cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_CMD_FLAG_QWORD, counter), "cmd")) return false;
      }
      uint64_t want = 1000;
      for (int round = 0; round < 4; ++round) {  // device jobs and CPU atomics take turns
        Result<rt::Fence> f = queue_.submit(cb);
        if (!f) return fail(fmt::format("submit: {}", gpusvm_rt_strerror(f.error())));
        const int rc = f->wait(kWaitNs);
        if (cases[k].policy == REFGPU_ATOMIC_CPU) {
          Result<gpusvm_rt_job_error> e = f->error();
          if (rc != -EFAULT || !e || !e->has_fault || e->address != counter || e->access != REFGPU_ACCESS_ATOMIC) {
            return fail(fmt::format("atomics 'cpu': the device atomic should fail with an atomic fault on {:#x}, "
                                    "got {}",
                                    counter, gpusvm_rt_strerror(rc)));
          }
        } else {
          if (!check_rc(rc, fmt::format("atomic job ({})", cases[k].name))) return false;
          want += 64;
        }
        Result<uint64_t> old = ctx_.atomic_fetch_add(counter, 1);
        if (!old) return fail(fmt::format("CPU atomic: {}", gpusvm_rt_strerror(old.error())));
        if (*old != want) return fail(fmt::format("counter '{}' is {}, expected {}", cases[k].name, *old, want));
        want += 1;
      }
      fmt::print("      ok    atomics '{}': {}\n", cases[k].name,
                 cases[k].policy == REFGPU_ATOMIC_CPU
                     ? "each device atomic failed its job with an atomic fault on the counter, value untouched"
                     : fmt::format("4 jobs x 64 device increments and 4 CPU increments, counter = {}", want));
      counter_final_[k] = want;
      if (!check_rc(ctx_.advise_reset(counter, 4096), "advise reset")) return false;
    }
    return true;
  }

  bool madvise() {
    Buf& m = bufs_[1];
    if (!check_rc(ctx_.advise_preferred(m.addr, m.len, GPUSVM_RT_LOCATION_SYSTEM), "advise medium system")) return false;
    if (!gpu_rewrite(m, 1, 4) || !expect_device_pages(m, 0, "preferred location system")) return false;
    if (!check_rc(ctx_.advise_preferred(watched().addr, watched().len, GPUSVM_RT_LOCATION_SYSTEM), "advise thp system") ||
        !gpu_rewrite(watched(), 2, 4) || !picture("preferred system, after a job") ||
        !expect_device_pages(watched(), 0, "preferred location system")) {
      return false;
    }
    if (!check_rc(ctx_.advise_preferred(watched().addr, watched().len, GPUSVM_RT_LOCATION_DEVICE, REFGPU_MIGRATE_ALL_PAGES),
                  "advise thp device") ||
        !gpu_rewrite(watched(), 2, 5) || !picture("preferred device, after a job") ||
        !expect_device_pages(watched(), watched().len / 4096, "preferred location device")) {
      return false;
    }
    // Back to the defaults; the counters' page-sized advice splits the buffer's attributes.
    if (!check_rc(ctx_.advise_reset(m.addr, m.len), "advise reset") ||
        !check_rc(ctx_.advise_reset(watched().addr, watched().len), "advise reset") || !atomics()) {
      return false;
    }
    // Every byte: the three counters hold what the atomics left, the rest its pattern.
    std::vector<uint64_t> skip;
    for (uint64_t k = 0; k < 3; ++k) {
      const rt::Va counter = bufs_[3].addr + k * 4096;
      skip.push_back(k * 4096);
      Result<uint64_t> v = ctx_.load<uint64_t>(counter);
      if (!v) return fail(fmt::format("CPU read: {}", gpusvm_rt_strerror(v.error())));
      if (*v != counter_final_[k]) return fail(fmt::format("counter {} is {}, expected {}", k, *v, counter_final_[k]));
    }
    std::vector<Buf> plain(bufs_.begin(), bufs_.begin() + 3);
    return cpu_verify_all(plain) && cpu_verify(bufs_[3], skip) && picture("after the CPU check");
  }

  void release() {
    for (const Buf& b : big_) (void)ctx_.free(b.addr);
    for (const Buf& b : bufs_) (void)ctx_.free(b.addr);
    queue_.reset();
    ctx_.reset();
    dev_.reset();
  }

  devfs::Process& proc_;
  Report* rep_;
  std::string cur_phase_;
  rt::Device dev_;
  rt::Context ctx_;
  rt::Queue queue_;
  std::vector<Buf> bufs_;  // small, medium, thp (watched), counters
  std::vector<Buf> big_;   // the oversubscribed working set
  uint64_t counter_final_[3] = {};
};

}  // namespace

int run_workload(devfs::Process& proc, Report* report) {
  if (report->residency_chunk == 0) report->residency_chunk = 64 * kKiB;
  return Workload(proc, report).run();
}

}  // namespace gpusvm::demo
