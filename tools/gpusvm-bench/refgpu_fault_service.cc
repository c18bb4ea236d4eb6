// Case family "refgpu-fault-service": GPU fault service time of the reference GPU
// (drivers/refgpu) by fault size, on system memory (get_pages + bind) and with migration to
// VRAM (migrate + get_pages + bind), next to the CPU's first touch of the same bytes.
//
// Everything goes through the ioctls, as a program does: a devfs Machine with one refgpu
// device (one engine, one fault-handler thread), a fault-mode VM with a CPU_ADDR_MIRROR bind
// over the whole CPU VA, madvise of the preferred location (system or the device's VRAM), and
// for each point one job (a batch in process memory) that stores a qword into every
// fault-sized unit of the data, waited for on a user fence. The figures come from the VM's
// statistics (VmStats, the driver's own timers: fault_ns, get_pages_ns, bind_ns, migrate_ns,
// read through the open file as the refgpu tests do): µs per serviced fault.
//
// Fault sizes: the range a fault creates is the largest chunk (2 MiB, 64 KiB, 4 KiB) that
// fits in the CPU VMA (range_chunk_size), so the data layout picks it:
//   2m:  one 2 MiB aligned span of a MADV_HUGEPAGE mapping (the CPU's writes make THPs);
//   64k: 1 MiB VMAs (a read-only 1 MiB VMA between each two: no 2 MiB chunk fits);
//   4k:  32 KiB VMAs likewise (no 64 KiB chunk fits).
// The case fails unless every fault of the job was of the intended size, none failed, and
// (VRAM) every fault migrated.
// Batch and fence pages are bound by a PREFETCH to system memory before the timed jobs: they
// add no fault.
//
// Each run: map the data, CPU-write a tag at both ends of every page (untimed), one untimed
// fault on a scratch page (collect_garbage_by_fault: the previous run's ranges are collected
// there, not in the timed job and not after the madvise, which their MADVISE_AUTORESET would
// undo: docs/benchmarks.md), madvise, run
// the job (its faults timed by the driver; the job's wall time is printed too), check that
// (VRAM) every unit is mapped to VRAM, then the CPU reads every tag and every GPU store back
// (VRAM pages come home), munmap. Run 0 is a warm-up, not kept.
// Baseline: the CPU's first touch of the same bytes through the mm model in the same run: a
// fresh mapping of the same layout and THP advice, one cpu::store per page (a write fault that
// allocates and zeroes, one 2 MiB fault per THP); its time per unit (the bytes of one GPU
// fault). ratio = cpu-first-touch / ours (> 1: the GPU fault is cheaper than the CPU's).
#include <sys/mman.h>

#include <array>
#include <cstring>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "drivers/refgpu/device.h"
#include "drivers/refgpu/file.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/page_state.h"
#include "tools/gpusvm-bench/bench.h"
#include "tools/gpusvm-bench/svm_util.h"
#include "uapi/refgpu.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Va;

constexpr uint64_t kMirrorStart = 16 * kPageSize;
constexpr uint64_t kFenceTimeoutNs = 60'000'000'000;

uint64_t uptr(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

struct Layout {
  const char* name;
  uint64_t fault;  // bytes one fault covers
  uint64_t piece;  // read-write VMA size (0: one mapping)
  bool thp;
};

constexpr std::array<Layout, 3> kLayouts = {{{"4k", 4096, 32 << 10, false},
                                             {"64k", 64 << 10, 1 << 20, false},
                                             {"2m", 2 << 20, 0, true}}};

// The data of one point: the mapping and its read-write spans.
struct Data {
  Va base = 0;
  uint64_t len = 0;
  std::vector<std::pair<Va, Va>> spans;  // read-write, GPU- and CPU-touched
};

Data map_layout(mm::AddressSpace& as, const Layout& l, uint64_t size) {
  Data d;
  // 2 MiB of slack: the spans start 2 MiB aligned, so every unit is aligned to its size.
  d.len = (l.piece ? 2 * size : size) + kPmdSize;
  auto va = as.mmap(0, d.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!va) require_ok(va.error(), "mmap data");
  d.base = *va;
  require_ok(as.madvise(d.base, d.len, l.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE), "madvise THP hint");
  const Va a = mm::pmd_align_up(d.base);
  if (l.piece) {
    for (Va p = a; p < a + 2 * size; p += 2 * l.piece) {
      d.spans.emplace_back(p, p + l.piece);
      require_ok(as.mprotect(p + l.piece, l.piece, PROT_READ), "mprotect separator");
    }
  } else {
    d.spans.emplace_back(a, a + size);
  }
  return d;
}

struct Snap {
  uint64_t f4k, f64k, f2m, errors, fault_ns, get_pages_ns, bind_ns, migrate_ns, to_vram;
  static Snap of(const refgpu::VmStats& s) {
    return {s.faults_4k.get(),    s.faults_64k.get(),   s.faults_2m.get(), s.fault_errors.get(),
            s.fault_ns.get(),     s.get_pages_ns.get(), s.bind_ns.get(),   s.migrate_ns.get(),
            s.migrations_to_vram.get()};
  }
  Snap operator-(const Snap& o) const {
    return {f4k - o.f4k,         f64k - o.f64k,   f2m - o.f2m,     errors - o.errors, fault_ns - o.fault_ns,
            get_pages_ns - o.get_pages_ns, bind_ns - o.bind_ns, migrate_ns - o.migrate_ns, to_vram - o.to_vram};
  }
};

class DeviceRig {
 public:
  explicit DeviceRig(uint64_t size) {
    auto m = devfs::Machine::create({.ram_bytes = 4 * size + (64ULL << 20)});
    if (!m) require_ok(m.error(), "Machine::create");
    machine_ = std::move(*m);
    refgpu::DeviceConfig cfg;
    cfg.vram_sizes = {mm::pmd_align_up(size) + (8ULL << 20)};
    cfg.num_engines = 1;
    cfg.fault_threads = 1;
    auto d = refgpu::RefgpuDevice::create(&machine_->mem(), cfg);
    if (!d) require_ok(d.error(), "RefgpuDevice::create");
    require_ok(machine_->add_device("refgpu0", *d), "add_device");
    auto p = machine_->create_process();
    if (!p) require_ok(p.error(), "create_process");
    proc_ = *p;
    auto fd = devfs::open("refgpu0", *proc_);
    if (!fd) require_ok(fd.error(), "open refgpu0");
    fd_ = *fd;
    file_ = std::dynamic_pointer_cast<refgpu::RefgpuFile>(proc_->fd_get(fd_));
    if (!file_) fail("refgpu0: not a refgpu file");

    drm_refgpu_vm_create vc{};
    vc.flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE;
    require_ok(io(DRM_IOCTL_REFGPU_VM_CREATE, &vc), "VM_CREATE");
    vm_ = vc.vm_id;
    drm_refgpu_engine_class_instance inst{REFGPU_ENGINE_CLASS_COMPUTE, 0, 0, 0};
    drm_refgpu_exec_queue_create qc{};
    qc.width = 1;
    qc.num_placements = 1;
    qc.vm_id = vm_;
    qc.instances = uptr(&inst);
    require_ok(io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &qc), "EXEC_QUEUE_CREATE");
    queue_ = qc.exec_queue_id;
    drm_refgpu_vm_bind b{};
    b.vm_id = vm_;
    b.num_binds = 1;
    b.bind.op = REFGPU_VM_BIND_OP_MAP;
    b.bind.flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR | REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET;
    b.bind.addr = kMirrorStart;
    b.bind.range = (1ULL << 47) - kMirrorStart;
    require_ok(io(DRM_IOCTL_REFGPU_VM_BIND, &b), "VM_BIND mirror");

    // Batch buffer and fences: system memory, bound before any timed job.
    batch_len_ = mm::pmd_align_up((size / kPageSize) * sizeof(refgpu_cmd_store_qword) + 4 * kPageSize);
    auto bva = as().mmap(0, batch_len_ + kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    if (!bva) require_ok(bva.error(), "mmap batch");
    batch_ = *bva;
    fence_ = batch_ + batch_len_;
    require_ok(as().madvise(batch_, batch_len_ + kPageSize, MADV_NOHUGEPAGE), "madvise batch");
    std::vector<std::byte> zero(batch_len_ + kPageSize);
    require_ok(mm::cpu::copy_in(as(), batch_, zero.data(), zero.size()), "write batch");
    preferred(batch_, batch_len_ + kPageSize, false);
    drm_refgpu_vm_bind pf{};
    pf.vm_id = vm_;
    pf.num_binds = 1;
    pf.bind.op = REFGPU_VM_BIND_OP_PREFETCH;
    pf.bind.addr = batch_;
    pf.bind.range = batch_len_ + kPageSize;
    pf.bind.prefetch_mem_region_instance = 0;  // system memory
    require_ok(io(DRM_IOCTL_REFGPU_VM_BIND, &pf), "VM_BIND prefetch batch");
  }
  ~DeviceRig() {
    file_.reset();
    machine_->shutdown();
  }
  DeviceRig(const DeviceRig&) = delete;
  DeviceRig& operator=(const DeviceRig&) = delete;

  int io(unsigned long req, void* arg) { return devfs::ioctl(*proc_, fd_, req, arg); }
  mm::AddressSpace& as() { return proc_->mm(); }
  mm::PhysMem& mem() { return machine_->mem(); }
  refgpu::Vm& vm() { return *file_->find_vm(vm_)->vm; }
  uint64_t batch_len() const { return batch_len_; }

  // madvise PREFERRED_LOC: the device's first VRAM region, or system memory.
  void preferred(Va start, uint64_t len, bool vram) {
    drm_refgpu_madvise m{};
    m.vm_id = vm_;
    m.start = start;
    m.range = len;
    m.type = REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC;
    m.preferred_mem_loc.devmem_fd = vram ? REFGPU_PREFERRED_LOC_DEFAULT_DEVICE : REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM;
    m.preferred_mem_loc.migration_policy = REFGPU_MIGRATE_ALL_PAGES;
    require_ok(io(DRM_IOCTL_REFGPU_MADVISE, &m), "MADVISE preferred location");
  }

  // Writes `bytes` as the batch and runs it; returns the wall time from EXEC to the user
  // fence (ns). Throws when the job fails or the fence does not come.
  uint64_t run_batch(const std::vector<std::byte>& bytes) {
    if (bytes.size() > batch_len_) fail("batch of {} bytes does not fit {}", bytes.size(), batch_len_);
    require_ok(mm::cpu::copy_in(as(), batch_, bytes.data(), bytes.size()), "write batch");
    seq_++;
    drm_refgpu_sync s{};
    s.type = REFGPU_SYNC_TYPE_USER_FENCE;
    s.flags = REFGPU_SYNC_FLAG_SIGNAL;
    s.addr = fence_ + 8;
    s.timeline_value = seq_;
    drm_refgpu_exec e{};
    e.exec_queue_id = queue_;
    e.num_syncs = 1;
    e.syncs = uptr(&s);
    e.address = batch_;
    e.num_batch_buffer = 1;
    const uint64_t t0 = now_ns();
    require_ok(io(DRM_IOCTL_REFGPU_EXEC, &e), "EXEC");
    drm_refgpu_wait_user_fence w{};
    w.addr = fence_ + 8;
    w.op = REFGPU_UFENCE_WAIT_OP_EQ;
    w.value = seq_;
    w.mask = ~0ULL;
    w.timeout = kFenceTimeoutNs;
    w.exec_queue_id = queue_;
    require_ok(io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &w), "WAIT_USER_FENCE");
    const uint64_t t1 = now_ns();
    auto v = mm::cpu::load<uint64_t>(as(), fence_);
    if (!v || *v != seq_) fail("job {}: its FENCE_WRITE did not land (the job failed)", seq_);
    return t1 - t0;
  }
  // Untimed: one fault on a fresh scratch page, so that the service's garbage collection of
  // the ranges a previous munmap left (and their MADVISE_AUTORESET, which the driver applies
  // then) happens here and not inside the next timed job, nor after its madvise.
  void collect_garbage_by_fault() {
    auto va = as().mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    if (!va) require_ok(va.error(), "mmap scratch");
    std::vector<std::byte> bb;
    append(bb, refgpu_cmd_store_qword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_QWORD, 6), 0, *va, 1});
    append(bb, refgpu_cmd_fence_write{REFGPU_CMD_HEADER(REFGPU_OP_FENCE_WRITE, 6), 0, fence_, seq_ + 1});
    append(bb, refgpu_cmd_batch_end{REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2), 0});
    run_batch(bb);
    auto v = mm::cpu::load<uint64_t>(as(), *va);
    if (!v || *v != 1) fail("scratch job: the GPU store did not land");
    require_ok(as().munmap(*va, kPageSize), "munmap scratch");
  }
  template <typename Cmd>
  static void append(std::vector<std::byte>& b, const Cmd& c) {
    const auto* p = reinterpret_cast<const std::byte*>(&c);
    b.insert(b.end(), p, p + sizeof(c));
  }
  Va fence() const { return fence_; }
  uint64_t seq() const { return seq_; }

 private:
  std::unique_ptr<devfs::Machine> machine_;
  devfs::Process* proc_ = nullptr;
  int fd_ = -1;
  std::shared_ptr<refgpu::RefgpuFile> file_;
  uint32_t vm_ = 0, queue_ = 0;
  Va batch_ = 0, fence_ = 0;
  uint64_t batch_len_ = 0;
  uint64_t seq_ = 0;
};

template <typename Cmd>
void emit(std::vector<std::byte>& b, const Cmd& c) {
  DeviceRig::append(b, c);
}

uint64_t gpu_value(Va unit, uint64_t salt) { return (unit * 0x9e3779b97f4a7c15ULL) ^ (salt << 56) ^ 0x6770u; }

struct Point {
  std::vector<double> us_per_fault, get_pages_us, bind_us, migrate_us, job_us, cpu_us;
  uint64_t units = 0;
};

// One GPU run of layout l: returns per-fault figures into pt (when keep).
void gpu_run(DeviceRig& rig, const Layout& l, bool vram, uint64_t size, uint64_t salt, bool keep, Point& pt) {
  mm::AddressSpace& as = rig.as();
  Data d = map_layout(as, l, size);
  for (auto [s, e] : d.spans) write_tags(as, s, e - s, salt);
  rig.collect_garbage_by_fault();
  for (auto [s, e] : d.spans) rig.preferred(s, e - s, vram);
  std::vector<Va> units;
  for (auto [s, e] : d.spans)
    for (Va u = s; u < e; u += l.fault) units.push_back(u);
  std::vector<std::byte> bb;
  for (Va u : units) emit(bb, refgpu_cmd_store_qword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_QWORD, 6), 0, u + 8, gpu_value(u, salt)});
  emit(bb, refgpu_cmd_fence_write{REFGPU_CMD_HEADER(REFGPU_OP_FENCE_WRITE, 6), 0, rig.fence(), rig.seq() + 1});
  emit(bb, refgpu_cmd_batch_end{REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2), 0});

  const Snap before = Snap::of(rig.vm().stats());
  const uint64_t job_ns = rig.run_batch(bb);
  const Snap st = Snap::of(rig.vm().stats()) - before;
  const uint64_t n = units.size();
  const uint64_t want[3] = {l.fault == 4096 ? n : 0, l.fault == (64 << 10) ? n : 0, l.fault == kPmdSize ? n : 0};
  if (st.f4k != want[0] || st.f64k != want[1] || st.f2m != want[2] || st.errors != 0) {
    fail("{} {}: {} units took 4K/64K/2M faults {}/{}/{}, {} errors; expected {}/{}/{}", l.name, vram ? "vram" : "smem",
         n, st.f4k, st.f64k, st.f2m, st.errors, want[0], want[1], want[2]);
  }
  if (vram != (st.to_vram != 0) || (vram && st.to_vram != n)) {
    fail("{} {}: {} migrations to VRAM for {} faults", l.name, vram ? "vram" : "smem", st.to_vram, n);
  }
  for (Va u : units) {
    auto leaf = rig.vm().page_table().lookup(u);
    if (!leaf) fail("{}: unit {:#x} is not mapped on the GPU after the job", l.name, u);
    if ((leaf->target == refgpu::Target::kVram) != vram)
      fail("{}: unit {:#x} is mapped to {} after the job", l.name, u, vram ? "system memory" : "VRAM");
  }
  // The CPU reads everything back (device pages come home): the tags of every page, the GPU's
  // store of every unit, the untouched rest of the unit's first qwords.
  for (auto [s, e] : d.spans) check_tags(as, s, e - s, salt, "after the GPU job");
  for (Va u : units) {
    auto v = mm::cpu::load<uint64_t>(as, u + 8);
    if (!v || *v != gpu_value(u, salt)) fail("{}: GPU store at {:#x} reads back {:#x}", l.name, u + 8, v ? *v : 0);
    auto z = mm::cpu::load<uint64_t>(as, u + 16);
    if (!z || *z != 0) fail("{}: byte after the GPU store at {:#x} is not zero", l.name, u + 16);
  }
  require_ok(as.munmap(d.base, d.len), "munmap data");
  if (keep) {
    const double nn = static_cast<double>(n);
    pt.units = n;
    pt.us_per_fault.push_back(static_cast<double>(st.fault_ns) / 1000 / nn);
    pt.get_pages_us.push_back(static_cast<double>(st.get_pages_ns) / 1000 / nn);
    pt.bind_us.push_back(static_cast<double>(st.bind_ns) / 1000 / nn);
    pt.migrate_us.push_back(static_cast<double>(st.migrate_ns) / 1000 / nn);
    pt.job_us.push_back(static_cast<double>(job_ns) / 1000 / nn);
  }
}

// The CPU's first touch of the same layout: µs per unit of l.fault bytes.
void cpu_run(DeviceRig& rig, const Layout& l, uint64_t size, uint64_t salt, bool keep, Point& pt) {
  mm::AddressSpace& as = rig.as();
  Data d = map_layout(as, l, size);
  uint64_t units = 0;
  const uint64_t t0 = now_ns();
  for (auto [s, e] : d.spans) {
    for (Va va = s; va < e; va += kPageSize) {
      if (int rc = mm::cpu::store<uint8_t>(as, va, static_cast<uint8_t>(salt + 1)))
        require_ok(rc, fmt::format("cpu::store at {:#x}", va));
    }
    units += (e - s) / l.fault;
  }
  const uint64_t t1 = now_ns();
  for (auto [s, e] : d.spans) {
    if (l.thp && mm::query_page(as, s).kind != mm::PageKind::kThpPmd) fail("2m first touch did not make a THP");
    for (Va va = s; va < e; va += kPageSize) {
      auto v = mm::cpu::load<uint8_t>(as, va);
      if (!v || *v != static_cast<uint8_t>(salt + 1)) fail("first touch: byte at {:#x} lost", va);
    }
  }
  require_ok(as.munmap(d.base, d.len), "munmap first-touch data");
  if (keep) pt.cpu_us.push_back(static_cast<double>(t1 - t0) / 1000 / static_cast<double>(units));
}

std::vector<Report> run_fault_service(const Options& opt, uint64_t size) {
  size = std::max(mm::pmd_align_up(size), kPmdSize);
  DeviceRig rig(size);
  Point pts[2][kLayouts.size()];  // [smem, vram][layout]
  for (int r = 0; r <= opt.repeat; r++) {
    const bool keep = r > 0;
    for (size_t k = 0; k < kLayouts.size(); k++) {
      for (int v = 0; v < 2; v++) {
        gpu_run(rig, kLayouts[k], v == 1, size, static_cast<uint64_t>(r * 8 + static_cast<int>(k) * 2 + v), keep,
                pts[v][k]);
      }
      cpu_run(rig, kLayouts[k], size, static_cast<uint64_t>(r), keep, pts[0][k]);
    }
  }
  std::vector<Report> out;
  for (int v = 0; v < 2; v++) {
    for (size_t k = 0; k < kLayouts.size(); k++) {
      const Point& pt = pts[v][k];
      const Point& cpu = pts[0][k];
      Report rep;
      rep.case_name = fmt::format("refgpu-fault-service-{}-{}", kLayouts[k].name, v ? "vram" : "smem");
      rep.ours = {median(pt.us_per_fault), "us/fault"};
      rep.baseline_name = "cpu-first-touch";
      rep.baseline = {median(cpu.cpu_us), "us/fault"};
      rep.ratio = rep.baseline.value / rep.ours.value;
      rep.size = size;
      rep.repeat = opt.repeat;
      rep.detail("{} faults of {} per run ({}), placement {}; per-run us/fault {}", pt.units,
                 human_bytes(kLayouts[k].fault), kLayouts[k].piece ? fmt::format("{} VMAs", human_bytes(kLayouts[k].piece)) : "THP mapping",
                 v ? "VRAM (madvise default device: migrate, get_pages, bind)" : "system (madvise system: get_pages, bind)",
                 runs_string(pt.us_per_fault));
      rep.detail("per fault (median): get_pages {:.1f} us, bind {:.1f} us, migrate {:.1f} us; job wall time {:.1f} us per fault",
                 median(pt.get_pages_us), median(pt.bind_us), median(pt.migrate_us), median(pt.job_us));
      rep.detail("CPU first touch of the same {} (mm model, {}): per-run us {}", human_bytes(kLayouts[k].fault),
                 kLayouts[k].thp ? "one THP fault" : fmt::format("{} 4 KiB faults", kLayouts[k].fault / kPageSize),
                 runs_string(cpu.cpu_us));
      rep.metric("get_pages_us", median(pt.get_pages_us));
      rep.metric("bind_us", median(pt.bind_us));
      rep.metric("migrate_us", median(pt.migrate_us));
      rep.metric("job_us_per_fault", median(pt.job_us));
      out.push_back(std::move(rep));
    }
  }
  check_machine(rig.mem(), out.back(), "after the family (data unmapped)");
  out.back().detail("verified: fault sizes and counts, GPU placement, every tag and every GPU store read back by the CPU");
  return out;
}

const Registrar kRefgpuFaultService({
    .name = "refgpu-fault-service",
    .family = "refgpu-fault-service",
    .summary = "refgpu GPU fault service by size (4 KiB / 64 KiB / 2 MiB), system and VRAM, vs CPU first touch",
    .default_size = 16ULL << 20,
    .run_many = run_fault_service,
});

}  // namespace
}  // namespace gpusvm::bench
