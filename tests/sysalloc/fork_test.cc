// xe_exec_system_allocator's fork sections: a forked child reads (and writes) the parent's
// malloc'd buffer, before and after the GPU migrated it to VRAM; the child sees the data the
// GPU wrote, the child's writes stay in the child (copy-on-write), and the parent's GPU job
// afterwards still sees the parent's data.
#include <vector>

#include "gpusvm/mm/cpu_access.h"
#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

void fork_case(bool migrate_first, bool child_writes) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kLen = 128 << 10;
  auto a = r.ctx.malloc(kLen);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_strided(0, *a, 4, kLen / 4, 500, 1), 0);
  ASSERT_EQ(r.run(cb), 0);  // GPU-written data; with default advice the pages are in VRAM now
  if (!migrate_first) ASSERT_EQ(r.ctx.prefetch(*a, kLen, GPUSVM_RT_REGION_SYSTEM, false).error(), 0);
  EXPECT_EQ(r.ctx.residency(*a, kLen)->device, migrate_first ? kLen / 4096 : 0u);
  const rt::Va base = *a;
  auto child = r.machine->fork(*r.proc, [=](devfs::Process& c) -> int {
    std::vector<uint32_t> v(kLen / 4);
    if (int rc = mm::cpu::copy_out(c.mm(), base, v.data(), kLen)) return rc;
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] != 500 + i) return 10;
    if (child_writes) {
      for (size_t i = 0; i < v.size(); ++i) v[i] = 9;
      if (int rc = mm::cpu::copy_in(c.mm(), base, v.data(), kLen)) return rc;
      if (*mm::cpu::load<uint32_t>(c.mm(), base + 4) != 9) return 11;
    }
    return 0;
  });
  ASSERT_TRUE(child.ok()) << child.error();
  auto st = (*child)->wait(std::chrono::seconds(30));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(*st, devfs::ExitStatus::exited_with(0)) << st->to_string();
  // The parent's GPU job and CPU still see the parent's data.
  rt::CmdBuf chk;
  ASSERT_EQ(chk.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, kLen / 4, 500, 1), 0);
  ASSERT_EQ(chk.store_dword(*a, 1), 0);
  EXPECT_EQ(r.run(chk), 0);
  std::vector<uint32_t> v(kLen / 4);
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, v), 0);
  EXPECT_EQ(v[0], 1u);
  for (size_t i = 1; i < v.size(); ++i) ASSERT_EQ(v[i], 500 + i) << i;
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// IGT "fork-read" (the child reads pages still in system memory) and "fork-read-after" (in VRAM).
TEST(SysallocFork, ForkRead) { fork_case(false, false); }
TEST(SysallocFork, ForkReadAfterMigration) { fork_case(true, false); }
// The child writes its copy: copy-on-write keeps the parent's pages (and the GPU's view).
TEST(SysallocFork, ForkWrite) { fork_case(false, true); }
TEST(SysallocFork, ForkWriteAfterMigration) { fork_case(true, true); }

}  // namespace
}  // namespace gpusvm::sysalloc
