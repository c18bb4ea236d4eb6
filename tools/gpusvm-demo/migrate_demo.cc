// gpusvm-demo, part 2: a device migration round trip through the dmirror test device, driven
// like a user program drives lib/test_hmm.c: open the device file, ioctl. Shows what moved,
// how (2 MiB folios whole, 4 KiB pages one by one), what the CPU faults cost, and the
// statistics of the unified fault-and-migrate walk; then the same buffer on a device-coherent
// unit, which the CPU uses in place.
#include "tools/gpusvm-demo/migrate_demo.h"

#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "drivers/dmirror/dmirror_device.h"
#include "drivers/dmirror/dmirror_machine.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/physmem.h"
#include "uapi/dmirror.h"

namespace gpusvm::demo {
namespace {

using namespace gpusvm::mm;

constexpr uint64_t kMiB = 1ULL << 20;

uint64_t word_at(Va va) { return va * 0x9E3779B97F4A7C15ULL ^ 0x5a5a; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Snapshot {
  uint64_t dev_private_pmd = 0, dev_private = 0, other = 0;
};

void check_report_ok(PhysMem& mem, const char* when, const ExpectFn& expect) {
  const CheckReport rep = check(mem);
  expect(rep.ok(), fmt::format("mm::check {}: {} problem(s)", when, rep.problems.size()),
         rep.ok() ? "" : "\n" + rep.to_string());
}

}  // namespace

int run_migration_demo(const ExpectFn& expect) {
  fmt::print("[8] device migration round trip: the dmirror device, through open/ioctl\n");
  Result<std::unique_ptr<devfs::Machine>> machine = devfs::Machine::create({.ram_bytes = 512 * kMiB});
  if (!machine) return expect(false, "PhysMem::create", errno_describe(machine.error())) ? 0 : 1;
  PhysMem& mem = (*machine)->mem();
  Result<std::shared_ptr<dmirror::DmirrorDevice>> dev = dmirror::add_unit(**machine, 0);
  if (!dev) return expect(false, "DmirrorDevice::create", errno_describe(dev.error())) ? 0 : 1;
  const std::string name = dmirror::unit_name(0);
  Result<devfs::Process*> proc_r = (*machine)->create_process();
  if (!proc_r) return expect(false, "Process::create", errno_describe(proc_r.error())) ? 0 : 1;
  devfs::Process& proc = **proc_r;
  AddressSpace& as = proc.mm();
  Result<int> fd = devfs::open(name, proc);
  if (!fd) return expect(false, "open " + name, errno_describe(fd.error())) ? 0 : 1;

  // 8 MiB backed by THPs, 4 MiB by 4 KiB pages; the CPU writes a pattern into all of it.
  constexpr uint64_t kThpLen = 8 * kMiB, kSmallLen = 4 * kMiB;
  Result<Va> thp = as.mmap(0, kThpLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Result<Va> small = as.mmap(0, kSmallLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!thp || !small || as.madvise(*thp, kThpLen, MADV_HUGEPAGE) != 0 ||
      as.madvise(*small, kSmallLen, MADV_NOHUGEPAGE) != 0) {
    return expect(false, "mmap the buffers", "") ? 0 : 1;
  }
  auto fill = [&](Va start, uint64_t len) {
    for (Va va = start; va < start + len; va += kPageSize) {
      if (cpu::store<uint64_t>(as, va, word_at(va)) != 0) return false;
    }
    return true;
  };
  auto verify = [&](Va start, uint64_t len, std::string* why) {
    for (Va va = start; va < start + len; va += kPageSize) {
      Result<uint64_t> v = cpu::load<uint64_t>(as, va);
      if (!v || *v != word_at(va)) {
        *why = fmt::format("page {:#x}", va);
        return false;
      }
    }
    return true;
  };
  expect(fill(*thp, kThpLen) && fill(*small, kSmallLen), "CPU wrote 12 MiB (8 MiB in THPs, 4 MiB in 4 KiB pages)", "");

  int active_fd = *fd;  // the file command() talks to
  auto command = [&](unsigned long request, Va addr, uint64_t len, void* buf) {
    hmm_dmirror_cmd cmd{};
    cmd.addr = addr;
    cmd.ptr = reinterpret_cast<uint64_t>(buf);
    cmd.npages = len / kPageSize;
    const int rc = devfs::ioctl(proc, active_fd, request, &cmd);
    return std::pair<int, uint64_t>{rc, cmd.cpages};
  };
  auto snapshot = [&](Va addr, uint64_t len) {
    std::vector<uint8_t> bytes(len / kPageSize);
    Snapshot s;
    if (command(HMM_DMIRROR_SNAPSHOT, addr, len, bytes.data()).first != 0) return s;
    for (uint8_t b : bytes) {
      if ((b & 0x70) == HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL) {
        (b & HMM_DMIRROR_PROT_PMD) ? s.dev_private_pmd++ : s.dev_private++;
      } else {
        s.other++;
      }
    }
    return s;
  };

  // To the device: MIGRATE_TO_DEV reads the range back through the device page table.
  std::vector<std::byte> sink(kThpLen);
  const MmStats& st = as.stats();
  const uint64_t walks0 = st.migrate_walks.get(), collected0 = st.migrate_collected.get();
  auto t0 = std::chrono::steady_clock::now();
  auto [rc1, cp1] = command(HMM_DMIRROR_MIGRATE_TO_DEV, *thp, kThpLen, sink.data());
  const double s1 = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  auto [rc2, cp2] = command(HMM_DMIRROR_MIGRATE_TO_DEV, *small, kSmallLen, sink.data());
  const double s2 = seconds_since(t0);
  fmt::print("    MIGRATE_TO_DEV 8 MiB THP: {} pages in {:.2f} ms ({:.2f} GB/s); 4 MiB 4 KiB: {} pages in {:.2f} ms ({:.2f} GB/s)\n",
             cp1, s1 * 1e3, kThpLen / s1 / 1e9, cp2, s2 * 1e3, kSmallLen / s2 / 1e9);
  fmt::print("    walks that migrated: {}, mappings collected: {} (a 2 MiB folio counts once)\n",
             st.migrate_walks.get() - walks0, st.migrate_collected.get() - collected0);
  expect(rc1 == 0 && rc2 == 0 && cp1 == kThpLen / kPageSize && cp2 == kSmallLen / kPageSize,
         "every page is on the device", fmt::format("rc {} / {}", rc1, rc2));
  const Snapshot a = snapshot(*thp, kThpLen), b = snapshot(*small, kSmallLen);
  fmt::print("    SNAPSHOT: THP buffer {} pages device-private via PMD, {} via PTE; 4 KiB buffer {} via PTE\n",
             a.dev_private_pmd, a.dev_private, b.dev_private);
  expect(a.dev_private_pmd == kThpLen / kPageSize && b.dev_private == kSmallLen / kPageSize,
         "THPs moved as 2 MiB device folios, small pages one by one", "");
  check_report_ok(mem, "with everything on the device", expect);

  // Back: the CPU touches the first half of each buffer (device page faults, migrate_to_ram),
  // MIGRATE_TO_SYS takes the rest.
  const uint64_t faults0 = st.faults.get();
  std::string why;
  t0 = std::chrono::steady_clock::now();
  const bool cpu_ok = verify(*thp, kThpLen / 2, &why) && verify(*small, kSmallLen / 2, &why);
  const double s3 = seconds_since(t0);
  fmt::print("    CPU reads of the first halves: {} CPU faults in {:.2f} ms (one per 2 MiB folio, one per 4 KiB page)\n",
             st.faults.get() - faults0, s3 * 1e3);
  expect(cpu_ok, "the CPU reads every byte back through migrate_to_ram", why);
  auto [rc3, cp3] = command(HMM_DMIRROR_MIGRATE_TO_SYS, *thp, kThpLen, nullptr);
  auto [rc4, cp4] = command(HMM_DMIRROR_MIGRATE_TO_SYS, *small, kSmallLen, nullptr);
  fmt::print("    MIGRATE_TO_SYS of both buffers: {} + {} pages moved back\n", cp3, cp4);
  expect(rc3 == 0 && rc4 == 0 && cp3 == kThpLen / kPageSize / 2 && cp4 == kSmallLen / kPageSize / 2,
         "the device held exactly the second halves", fmt::format("rc {} / {}", rc3, rc4));
  expect(verify(*thp, kThpLen, &why) && verify(*small, kSmallLen, &why), "data: all 12 MiB intact", why);
  const Snapshot c = snapshot(*thp, kThpLen), d = snapshot(*small, kSmallLen);
  expect(c.dev_private_pmd + c.dev_private + d.dev_private == 0, "nothing left on the device", "");
  check_report_ok(mem, "after the round trip", expect);

  // Device-coherent memory (test_hmm's unit 2): the CPU maps the device pages and uses them
  // in place; nothing faults, and only MIGRATE_TO_SYS brings them back.
  dmirror::DmirrorDevice::Config coherent_cfg;
  coherent_cfg.memory_type = DevMemoryType::kDeviceCoherent;
  Result<std::shared_ptr<dmirror::DmirrorDevice>> cdev = dmirror::add_unit(**machine, 2, coherent_cfg);
  const std::string cname = dmirror::unit_name(2);
  if (!cdev) return expect(false, "register the coherent device", "") ? 0 : 1;
  Result<int> cfd = devfs::open(cname, proc);
  if (!cfd) return expect(false, "open " + cname, errno_describe(cfd.error())) ? 0 : 1;
  active_fd = *cfd;
  auto [rc5, cp5] = command(HMM_DMIRROR_MIGRATE_TO_DEV, *thp, kThpLen, sink.data());
  std::vector<uint8_t> bytes(kThpLen / kPageSize);
  const int rc6 = command(HMM_DMIRROR_SNAPSHOT, *thp, kThpLen, bytes.data()).first;
  uint64_t coherent_pmd = 0;
  for (uint8_t m : bytes) coherent_pmd += m == (HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL | HMM_DMIRROR_PROT_WRITE | HMM_DMIRROR_PROT_PMD);
  const uint64_t faults1 = st.faults.get();
  const bool in_place = verify(*thp, kThpLen, &why);
  fmt::print("    coherent device: {} pages migrated, {} mapped as present 2 MiB device folios; CPU read all of it with {} faults\n",
             cp5, coherent_pmd, st.faults.get() - faults1);
  expect(rc5 == 0 && rc6 == 0 && coherent_pmd == kThpLen / kPageSize && in_place && st.faults.get() == faults1,
         "coherent device memory is read by the CPU in place", why);
  auto [rc7, cp7] = command(HMM_DMIRROR_MIGRATE_TO_SYS, *thp, kThpLen, nullptr);
  expect(rc7 == 0 && cp7 == kThpLen / kPageSize && verify(*thp, kThpLen, &why),
         "MIGRATE_TO_SYS brings every coherent page back, data intact", why);
  (void)devfs::close(proc, *cfd);
  check_report_ok(mem, "after the coherent round trip", expect);
  (void)devfs::close(proc, *fd);
  proc.exit();
  check_report_ok(mem, "after exit", expect);
  fmt::print("\n");
  return 0;
}

}  // namespace gpusvm::demo
