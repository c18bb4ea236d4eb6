// Device-coherent dmirror semantics checked against the real kernel: the steps of
// tests/hmm/oracle/coherent_probe.c run on the model, asserting exactly what Linux 6.12.117
// with lib/test_hmm.c answered (tests/hmm/oracle/coherent_probe-6.12.log, "log:<line>"
// below; the probe's header says how to rerun it under ../shared/kernel-oracle).
//
// Every result is formatted like the probe's output line ("rc=0 cpages=8 faults=0
// snap=42,...", pagemap "Pcx-,...") and compared with the string from the log, so a failure
// prints the model's line next to the kernel's. Units as test_hmm's minors: fd0 = unit 0
// (device-private), fd2 = unit 2 and fd3 = unit 3 (device-coherent).
//
// pagemap characters (probe header): [0] P present / S soft leaf (swap bit) / - none;
// [1] c device-coherent frame / r other frame / - not present; [2] x mapped by exactly one
// process (PM_MMAP_EXCLUSIVE); [3] f file or shared-anon page (always '-' here: every buffer
// is private anonymous). The oracle tells a coherent frame by its pfn lying in the SPM range
// given to test_hmm; the model by the folio's kind.
#include <cstdio>
#include <string>
#include <thread>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/page_state.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

constexpr uint64_t kNpages = 8;
constexpr uint64_t kIntsPerPage = kPageSize / sizeof(int);
constexpr uint64_t kInts = kNpages * kIntsPerPage;

// Data pattern of the probe: int i holds i; the child writes page 4 with 0x40000000 + i; the
// parent writes page 5 with -i; pages 0-1 read 0 after MADV_DONTNEED.
int v_ident(uint64_t i) { return static_cast<int>(i); }
int v_child(uint64_t i) { return static_cast<int>(0x40000000 + i); }
int v_neg(uint64_t i) { return -static_cast<int>(i); }
int v_zero(uint64_t) { return 0; }
using ValFn = int (*)(uint64_t);

class DmirrorCoherentOracle : public ::testing::Test, protected HmmMachine {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(start());
    fd0 = hmm_open(*proc, 0);
    fd2 = hmm_open(*proc, 2);
    fd3 = hmm_open(*proc, 3);
    ASSERT_GE(fd0, 0);
    ASSERT_GE(fd2, 0);
    ASSERT_GE(fd3, 0);
  }
  void TearDown() override {
    for (int fd : {fd0, fd2, fd3}) {
      if (proc && fd >= 0) {
        EXPECT_EQ(devfs::close(*proc, fd), 0);
      }
    }
    stop();
  }

  // The probe's cmd(): returns "rc=R cpages=C faults=F" (cpages/faults 0 on failure, as the
  // struct is not copied back then).
  std::string op(int fd, unsigned long req, Va addr, uint64_t npages, void* ptr = nullptr) {
    struct hmm_dmirror_cmd cmd{};
    cmd.addr = addr;
    cmd.ptr = reinterpret_cast<uintptr_t>(ptr ? ptr : mirror.data());
    cmd.npages = npages;
    int rc = -EINTR;
    for (int tries = 0; tries < 1000 && rc == -EINTR; tries++) rc = devfs::ioctl(*proc, fd, req, &cmd);
    EXPECT_NE(rc, -EINTR) << "ioctl " << req << " still -EINTR after 1000 tries";
    if (rc) cmd.cpages = cmd.faults = 0;
    char line[96];
    std::snprintf(line, sizeof(line), "rc=%d cpages=%llu faults=%llu", rc,
                  static_cast<unsigned long long>(cmd.cpages), static_cast<unsigned long long>(cmd.faults));
    return line;
  }

  // SNAPSHOT: "rc=.. cpages=.. faults=.. snap=42,42,..." (all pages) or, with idx,
  // "snap=[0]42,[1]42,...".
  std::string snap(int fd, Va addr, uint64_t npages, std::initializer_list<uint64_t> idx = {}) {
    std::vector<uint8_t> m(npages, 0xAA);
    std::string s = op(fd, HMM_DMIRROR_SNAPSHOT, addr, npages, m.data());
    if (s.rfind("rc=0 ", 0) != 0) return s;
    s += " snap=";
    char b[32];
    bool first = true;
    auto add = [&](uint64_t i, bool with_index) {
      if (with_index) {
        std::snprintf(b, sizeof(b), "%s[%llu]%02x", first ? "" : ",", static_cast<unsigned long long>(i), m[i]);
      } else {
        std::snprintf(b, sizeof(b), "%s%02x", first ? "" : ",", m[i]);
      }
      s += b;
      first = false;
    };
    if (idx.size()) {
      for (uint64_t i : idx) add(i, true);
    } else {
      for (uint64_t i = 0; i < npages; i++) add(i, false);
    }
    return s;
  }

  // /proc/self/pagemap of process p, four characters per page (see the file comment).
  std::string pagemap_entry(devfs::Process& p, Va va) {
    const mm::PageState st = mm::query_page(p.mm(), va);
    std::string s = "----";
    if (st.kind == mm::PageKind::kNone) return s;
    if (st.kind == mm::PageKind::kSoftLeaf) {
      s[0] = 'S';
      return s;
    }
    s[0] = 'P';
    if (st.kind == mm::PageKind::kZeroPage || st.kind == mm::PageKind::kHugeZero) {
      s[1] = 'r';  // no struct page to count: never PM_MMAP_EXCLUSIVE
      return s;
    }
    s[1] = mm::folio_is_device_coherent(mem->pfn_to_page(st.pfn)->head()) ? 'c' : 'r';
    // Linux: folio_precise_page_mapcount() == 1; a PMD-mapped page counts its PMD mapping.
    const int mapcount = st.kind == mm::PageKind::kThpPmd ? st.mapcount : st.page_mapcount;
    if (mapcount == 1) s[2] = 'x';
    return s;
  }
  std::string pagemap(devfs::Process& p, Va addr, uint64_t npages) {
    std::string s;
    for (uint64_t i = 0; i < npages; i++) s += (i ? "," : "") + pagemap_entry(p, addr + i * kPageSize);
    return s;
  }
  std::string pagemap(devfs::Process& p, Va addr, std::initializer_list<uint64_t> idx) {
    std::string s;
    for (uint64_t i : idx) {
      s += (s.empty() ? "[" : " [") + std::to_string(i) + "]" + pagemap_entry(p, addr + i * kPageSize);
    }
    return s;
  }

  // The probe's check(): "data=ok" or the first wrong int.
  static std::string check(const int* p, uint64_t first, uint64_t n, const ValFn* per_page) {
    for (uint64_t i = first; i < first + n; i++) {
      const int want = per_page[i / kIntsPerPage](i);
      if (p[i] != want) {
        return "data=BAD int " + std::to_string(i) + " is " + std::to_string(p[i]) + ", expected " +
               std::to_string(want);
      }
    }
    return "data=ok";
  }
  std::string check_cpu(devfs::Process& p, Va addr, uint64_t first, uint64_t n, const ValFn* per_page) {
    int rc;
    std::vector<int> v = cpu_read_ints(p, addr, first + n, &rc);
    if (rc) return "cpu read rc=" + std::to_string(rc);
    return check(v.data(), first, n, per_page);
  }
  std::string check_mirror(uint64_t n, const ValFn* per_page) { return check(mirror.data(), 0, n, per_page); }

  int fd0 = -1, fd2 = -1, fd3 = -1;
  std::vector<int> mirror = std::vector<int>(512 * kIntsPerPage);  // the probe's static mirror
};

Va map8(devfs::Process& p) {
  Result<Va> va = p.mm().mmap(0, kNpages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_TRUE(va.ok());
  return va.ok() ? *va : 0;
}

// Steps a-g of the probe on one 8-page private anonymous buffer (log lines 21-68).
TEST_F(DmirrorCoherentOracle, steps_a_to_g) {
  ValFn expect[kNpages];
  for (ValFn& f : expect) f = v_ident;
  const ValFn ident_all[kNpages] = {v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident};
  const Va buf = map8(*proc);
  ASSERT_NE(buf, 0u);

  // a. CPU writes i; MIGRATE_TO_DEV via fd2; SNAPSHOT via fd2, fd3, fd0 (log:21-27).
  ASSERT_EQ(cpu_write_ints(*proc, buf, kInts, v_ident), 0);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=02,02,02,02,02,02,02,02");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(check_mirror(kInts, ident_all), "data=ok");
  // Coherent pages are present PTEs to device frames: LOCAL to unit 2, REMOTE to unit 3 and
  // to the device-private unit 0 alike (hmm reports a present page to every caller).
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(snap(fd3, buf, kNpages), "rc=0 cpages=8 faults=0 snap=52,52,52,52,52,52,52,52");
  EXPECT_EQ(snap(fd0, buf, kNpages), "rc=0 cpages=8 faults=0 snap=52,52,52,52,52,52,52,52");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");

  // b. A CPU read of page 3 is served in place: nothing faults back (log:28-30).
  EXPECT_EQ(check_cpu(*proc, buf, 3 * kIntsPerPage, kIntsPerPage, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");

  // c. fork: the coherent pages are shared read-only like RAM pages; the child's write to
  // page 4 copies it into a RAM page of its own (log:31-40).
  {
    Result<std::unique_ptr<devfs::Process>> child = proc->fork();
    ASSERT_TRUE(child.ok()) << child.error();
    std::thread t([&] {
      devfs::Process& c = **child;
      EXPECT_EQ(check_cpu(c, buf, 0, kInts, ident_all), "data=ok");
      ASSERT_EQ(cpu_write_ints(c, buf + 4 * kPageSize, kIntsPerPage,
                               [](uint64_t i) { return v_child(4 * kIntsPerPage + i); }),
                0);
      const ValFn child_view[kNpages] = {v_ident, v_ident, v_ident, v_ident, v_child, v_ident, v_ident, v_ident};
      EXPECT_EQ(check_cpu(c, buf, 0, kInts, child_view), "data=ok");
      EXPECT_EQ(pagemap(c, buf, kNpages), "Pc--,Pc--,Pc--,Pc--,Prx-,Pc--,Pc--,Pc--");  // log:32
    });
    t.join();
    ASSERT_FALSE(HasFatalFailure());
    // The child is alive (not exited yet).
    EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,41,41,41");
    EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pc--,Pc--,Pc--,Pc--,Pcx-,Pc--,Pc--,Pc--");
    (*child)->exit();  // _exit(0)
    child->reset();    // waitpid
  }
  // The parent's PTEs stay write-protected after the child is gone.
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,41,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");
  // The parent's write to page 5 reuses the coherent page (only mapping left): it stays on
  // the device, now writable.
  ASSERT_EQ(cpu_write_ints(*proc, buf + 5 * kPageSize, kIntsPerPage,
                           [](uint64_t i) { return v_neg(5 * kIntsPerPage + i); }),
            0);
  expect[5] = v_neg;
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,42,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");

  // d. READ via the device-private fd0: coherent pages are read in place (log:41-43).
  std::fill(mirror.begin(), mirror.end(), 0);
  EXPECT_EQ(op(fd0, HMM_DMIRROR_READ, buf, kNpages), "rc=0 cpages=8 faults=1");
  EXPECT_EQ(check_mirror(kInts, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,42,41,41");

  // e. MIGRATE_TO_DEV via fd0: SELECT_SYSTEM does not collect another device's coherent
  // pages, nothing moves; cpages counts what fd0 can read (its entries from d) (log:44-48).
  std::fill(mirror.begin(), mirror.end(), 0);
  EXPECT_EQ(op(fd0, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(check_mirror(kInts, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,42,41,41");
  EXPECT_EQ(snap(fd0, buf, kNpages), "rc=0 cpages=8 faults=0 snap=51,51,51,51,51,52,51,51");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");

  // f. MIGRATE_TO_SYS via fd2: every page moves; each keeps its PTE's write bit (the
  // read-only ones were shared by fork: readable, non-exclusive migration entries)
  // (log:49-52).
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=01,01,01,01,01,02,01,01");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Prx-,Prx-,Prx-,Prx-,Prx-,Prx-,Prx-,Prx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");

  // g. Back to fd2; mprotect; MADV_DONTNEED; RELEASE (log:53-68).
  std::fill(mirror.begin(), mirror.end(), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(check_mirror(kInts, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,42,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(proc->mm().mprotect(buf, kNpages * kPageSize, PROT_READ), 0);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,41,41,41");
  // Back to RW: only the anon-exclusive page (5) gets its write bit back at once.
  EXPECT_EQ(proc->mm().mprotect(buf, kNpages * kPageSize, PROT_READ | PROT_WRITE), 0);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,42,41,41");
  EXPECT_EQ(proc->mm().madvise(buf, 2 * kPageSize, MADV_DONTNEED), 0);
  expect[0] = expect[1] = v_zero;
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=00,00,41,41,41,42,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "----,----,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  // RELEASE evicts the device's pages into RAM, write bits kept; cpages stays 0.
  EXPECT_EQ(op(fd2, HMM_DMIRROR_RELEASE, buf, kNpages), "rc=0 cpages=0 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=00,00,01,01,01,02,01,01");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "----,----,Prx-,Prx-,Prx-,Prx-,Prx-,Prx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");
  // The CPU read of the zapped pages mapped the zero page.
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=11,11,01,01,01,02,01,01");
  EXPECT_EQ(proc->mm().munmap(buf, kNpages * kPageSize), 0);
}

// h. A THP migrated to fd2 and back (log:69-82).
//
// Known, documented difference (docs/migration.md "Device-coherent memory"): 6.12 has no
// device THP - migrate_vma_collect_pmd splits the THP and migrates 512 small pages, so the
// kernel reports every page COHERENT_LOCAL|WRITE without PMD (42), and brings them back as
// small RAM pages (02). Our model follows the newest kernels (MIGRATE_VMA_SELECT_COMPOUND,
// migrate_vma_insert_huge_pmd_page): the 2 MiB folio moves whole into a 2 MiB coherent
// folio mapped by a present PMD (46) and comes back as a THP (06). The asserted values are
// the model's; the kernel's are quoted next to each.
TEST_F(DmirrorCoherentOracle, thp_h) {
  const uint64_t hn = TWOMEG / kPageSize;
  const uint64_t hints = TWOMEG / sizeof(int);
  Result<Va> raw = proc->mm().mmap(0, 2 * TWOMEG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(raw.ok());
  const Va h = align_up(*raw, TWOMEG);
  ASSERT_EQ(proc->mm().madvise(h, TWOMEG, MADV_HUGEPAGE), 0);
  ASSERT_EQ(cpu_write_ints(*proc, h, hints, v_ident), 0);
  std::vector<ValFn> ident_all(hn, v_ident);

  // Same as the kernel: a PMD-mapped THP in RAM.
  EXPECT_EQ(snap(fd2, h, hn, {0, 1, 255, 511}), "rc=0 cpages=512 faults=0 snap=[0]06,[1]06,[255]06,[511]06");
  EXPECT_EQ(pagemap(*proc, h, {0, 1, 255, 511}), "[0]Prx- [1]Prx- [255]Prx- [511]Prx-");
  // Same as the kernel.
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, h, hn), "rc=0 cpages=512 faults=0");
  EXPECT_EQ(check(mirror.data(), 0, hints, ident_all.data()), "data=ok");
  // 6.12: snap=[0]42,[1]42,[255]42,[511]42 (split, 4 KiB coherent pages).
  EXPECT_EQ(snap(fd2, h, hn, {0, 1, 255, 511}), "rc=0 cpages=512 faults=0 snap=[0]46,[1]46,[255]46,[511]46");
  // 6.12: snap=[0]52,[1]52,[255]52,[511]52.
  EXPECT_EQ(snap(fd3, h, hn, {0, 1, 255, 511}), "rc=0 cpages=512 faults=0 snap=[0]56,[1]56,[255]56,[511]56");
  // Same as the kernel (there: 4 KiB coherent pages; here: one PMD-mapped coherent folio).
  EXPECT_EQ(pagemap(*proc, h, {0, 1, 255, 511}), "[0]Pcx- [1]Pcx- [255]Pcx- [511]Pcx-");
  EXPECT_EQ(check_cpu(*proc, h, 0, hints, ident_all.data()), "data=ok");
  // Same as the kernel.
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_SYS, h, hn), "rc=0 cpages=512 faults=0");
  // 6.12: snap=[0]02,[1]02,[255]02,[511]02 (small RAM pages).
  EXPECT_EQ(snap(fd2, h, hn, {0, 1, 255, 511}), "rc=0 cpages=512 faults=0 snap=[0]06,[1]06,[255]06,[511]06");
  EXPECT_EQ(pagemap(*proc, h, {0, 1, 255, 511}), "[0]Prx- [1]Prx- [255]Prx- [511]Prx-");
  EXPECT_EQ(check_cpu(*proc, h, 0, hints, ident_all.data()), "data=ok");
  EXPECT_EQ(proc->mm().munmap(*raw, 2 * TWOMEG), 0);
}

// i. Closing any file of a device evicts all of that device's pages to RAM (6.12.117 has
// the stable backport of "evict device pages on file close") (log:83-88).
TEST_F(DmirrorCoherentOracle, close_evicts_i) {
  const ValFn ident_all[kNpages] = {v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident};
  const Va buf = map8(*proc);
  ASSERT_NE(buf, 0u);
  ASSERT_EQ(cpu_write_ints(*proc, buf, kInts, v_ident), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  const int fdx = hmm_open(*proc, 2);
  ASSERT_GE(fdx, 0);
  EXPECT_EQ(devfs::close(*proc, fdx), 0);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=02,02,02,02,02,02,02,02");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Prx-,Prx-,Prx-,Prx-,Prx-,Prx-,Prx-,Prx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, ident_all), "data=ok");
  EXPECT_EQ(proc->mm().munmap(buf, kNpages * kPageSize), 0);
}

// j. Two coherent devices, a device WRITE in place, EXCLUSIVE on coherent pages
// (log:89-117).
TEST_F(DmirrorCoherentOracle, two_devices_write_exclusive_j) {
  ValFn expect[kNpages];
  for (ValFn& f : expect) f = v_ident;
  const Va buf = map8(*proc);
  ASSERT_NE(buf, 0u);
  ASSERT_EQ(cpu_write_ints(*proc, buf, kInts, v_ident), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  // Unit 3 collects none of unit 2's pages (they are not system memory), and its read-back
  // finds no entry: -ENOENT.
  EXPECT_EQ(op(fd3, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=-2 cpages=0 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(snap(fd3, buf, kNpages), "rc=0 cpages=8 faults=0 snap=52,52,52,52,52,52,52,52");
  // SELECT_DEVICE_COHERENT for unit 3's owner does not take unit 2's pages.
  EXPECT_EQ(op(fd3, HMM_DMIRROR_MIGRATE_TO_SYS, buf, kNpages), "rc=0 cpages=0 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  // Unit 3 writes unit 2's memory in place (one fault pass, nothing migrates).
  for (uint64_t i = 0; i < kInts; i++) mirror[i] = v_child(i);
  EXPECT_EQ(op(fd3, HMM_DMIRROR_WRITE, buf, kNpages), "rc=0 cpages=8 faults=1");
  for (ValFn& f : expect) f = v_child;
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");
  // EXCLUSIVE on coherent pages: device-exclusive entries (not VALID to anyone: 00).
  std::fill(mirror.begin(), mirror.end(), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_EXCLUSIVE, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(check_mirror(kInts, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=00,00,00,00,00,00,00,00");
  EXPECT_EQ(snap(fd3, buf, kNpages), "rc=0 cpages=8 faults=0 snap=00,00,00,00,00,00,00,00");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "S---,S---,S---,S---,S---,S---,S---,S---");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, kNpages), "rc=-1 cpages=0 faults=0");
  // A CPU read restores page 0's PTE (writable, still the coherent page) and takes the
  // device's atomic entry of that page only.
  EXPECT_EQ(check_cpu(*proc, buf, 0, kIntsPerPage, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,00,00,00,00,00,00,00");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, 1), "rc=0 cpages=0 faults=0");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, kNpages), "rc=-1 cpages=0 faults=0");
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), buf + kPageSize, 77), 0);  // CPU write to page 1
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,00,00,00,00,00,00");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,S---,S---,S---,S---,S---,S---");
  ASSERT_EQ(mm::cpu::store<int>(proc->mm(), buf + kPageSize, v_child(kIntsPerPage)), 0);
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_CHECK_EXCLUSIVE, buf, kNpages), "rc=0 cpages=0 faults=0");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=02,02,02,02,02,02,02,02");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, expect), "data=ok");
  EXPECT_EQ(proc->mm().munmap(buf, kNpages * kPageSize), 0);
}

// k. MADV_FREE leaves coherent pages alone; mremap moves them as they are (log:118-129).
TEST_F(DmirrorCoherentOracle, madv_free_mremap_k) {
  const ValFn ident_all[kNpages] = {v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident};
  const Va buf = map8(*proc);
  ASSERT_NE(buf, 0u);
  ASSERT_EQ(cpu_write_ints(*proc, buf, kInts, v_ident), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(proc->mm().madvise(buf, kNpages * kPageSize, MADV_FREE), 0);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, ident_all), "data=ok");
  // A destination 8 pages away from anything: map 24, keep the middle 8.
  const uint64_t size = kNpages * kPageSize;
  Result<Va> area = proc->mm().mmap(0, 3 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(area.ok());
  const Va dst = *area + size;
  ASSERT_EQ(proc->mm().munmap(*area, size), 0);
  ASSERT_EQ(proc->mm().munmap(*area + 2 * size, size), 0);
  Result<Va> r = proc->mm().mremap(buf, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(*r, dst);
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=ff,ff,ff,ff,ff,ff,ff,ff");
  EXPECT_EQ(snap(fd2, dst, kNpages), "rc=0 cpages=8 faults=0 snap=42,42,42,42,42,42,42,42");
  EXPECT_EQ(pagemap(*proc, dst, kNpages), "Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-,Pcx-");
  EXPECT_EQ(check_cpu(*proc, dst, 0, kInts, ident_all), "data=ok");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_SYS, dst, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(snap(fd2, dst, kNpages), "rc=0 cpages=8 faults=0 snap=02,02,02,02,02,02,02,02");
  EXPECT_EQ(proc->mm().munmap(dst, size), 0);
}

// l. Migrations of pages a live child maps too (shared read-only by fork): MIGRATE_TO_SYS,
// MIGRATE_TO_DEV and RELEASE each move the page for both processes (through the rmap); the
// child sees the same frame and data after each (log:130-152).
TEST_F(DmirrorCoherentOracle, shared_with_child_l) {
  const ValFn ident_all[kNpages] = {v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident, v_ident};
  const Va buf = map8(*proc);
  ASSERT_NE(buf, 0u);
  ASSERT_EQ(cpu_write_ints(*proc, buf, kInts, v_ident), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  Result<std::unique_ptr<devfs::Process>> child = proc->fork();
  ASSERT_TRUE(child.ok()) << child.error();
  devfs::Process& c = **child;
  // The child's report (its pagemap, then its data), from a thread of its own as in the
  // other fork tests; the parent waits for it, as the probe does on its pipe.
  auto child_report = [&](const char* want_pagemap) {
    std::thread t([&] {
      EXPECT_EQ(pagemap(c, buf, kNpages), want_pagemap);
      EXPECT_EQ(check_cpu(c, buf, 0, kInts, ident_all), "data=ok");
    });
    t.join();
  };
  child_report("Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,41,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_SYS, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=01,01,01,01,01,01,01,01");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--");
  child_report("Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--");
  std::fill(mirror.begin(), mirror.end(), 0);
  EXPECT_EQ(op(fd2, HMM_DMIRROR_MIGRATE_TO_DEV, buf, kNpages), "rc=0 cpages=8 faults=0");
  EXPECT_EQ(check_mirror(kInts, ident_all), "data=ok");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=41,41,41,41,41,41,41,41");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--");
  child_report("Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--,Pc--");
  EXPECT_EQ(op(fd2, HMM_DMIRROR_RELEASE, buf, kNpages), "rc=0 cpages=0 faults=0");
  EXPECT_EQ(snap(fd2, buf, kNpages), "rc=0 cpages=8 faults=0 snap=01,01,01,01,01,01,01,01");
  EXPECT_EQ(pagemap(*proc, buf, kNpages), "Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--");
  child_report("Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--,Pr--");
  c.exit();       // _exit(0)
  child->reset();  // waitpid
  EXPECT_EQ(check_cpu(*proc, buf, 0, kInts, ident_all), "data=ok");
  EXPECT_EQ(proc->mm().munmap(buf, kNpages * kPageSize), 0);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
