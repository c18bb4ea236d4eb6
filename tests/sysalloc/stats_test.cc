// Device statistics through the runtime: every statistic the driver reports has a name, the
// names are distinct, and the counters that a prefetch round trip must move do move (the
// migration copy runs count migrations whatever started them).
#include <set>
#include <string>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

TEST(SysallocStats, EveryReportedStatisticHasADistinctName) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto s = r.dev.stats();
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->size(), static_cast<size_t>(REFGPU_STAT_COUNT));
  std::set<std::string> names;
  for (uint32_t i = 0; i < s->size(); ++i) {
    const char* n = rt::Device::stat_name(i);
    ASSERT_NE(n, nullptr) << i;
    EXPECT_TRUE(names.insert(n).second) << "duplicate name " << n;
  }
  EXPECT_STREQ(rt::Device::stat_name(REFGPU_STAT_FAULTS_2M), "faults_2m");
  EXPECT_STREQ(rt::Device::stat_name(REFGPU_STAT_MIGRATE_COPIES_TO_SMEM), "migrate_copies_to_smem");
  EXPECT_EQ(rt::Device::stat_name(REFGPU_STAT_COUNT), nullptr);
  EXPECT_EQ(rt::Device::stat_name(~0u), nullptr);
}

// A prefetch to VRAM and a CPU read back: one copy run each way at least, and the copy bytes
// cover the buffer each way.
TEST(SysallocStats, MigrationCopiesCountEachWay) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr size_t kLen = 1 << 20;
  auto a = r.ctx.aligned_alloc(2 << 20, kLen);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.memset(*a, 0x5a, kLen), 0);
  const uint64_t to_vram0 = r.stat(REFGPU_STAT_MIGRATE_COPIES_TO_VRAM);
  const uint64_t to_smem0 = r.stat(REFGPU_STAT_MIGRATE_COPIES_TO_SMEM);
  const uint64_t bytes_vram0 = r.stat(REFGPU_STAT_COPY_BYTES_TO_VRAM);
  const uint64_t bytes_smem0 = r.stat(REFGPU_STAT_COPY_BYTES_TO_SMEM);
  auto f = r.ctx.prefetch(*a, kLen, 1);
  ASSERT_TRUE(f.ok());
  ASSERT_EQ(f->wait(kWaitNs), 0);
  EXPECT_GE(r.stat(REFGPU_STAT_MIGRATE_COPIES_TO_VRAM), to_vram0 + 1);
  EXPECT_GE(r.stat(REFGPU_STAT_COPY_BYTES_TO_VRAM), bytes_vram0 + kLen);
  std::vector<uint8_t> v(kLen);
  ASSERT_EQ(r.ctx.read<uint8_t>(*a, v), 0);  // CPU faults bring every page home
  for (size_t i = 0; i < kLen; ++i) ASSERT_EQ(v[i], 0x5a) << i;
  EXPECT_GE(r.stat(REFGPU_STAT_MIGRATE_COPIES_TO_SMEM), to_smem0 + 1);
  EXPECT_GE(r.stat(REFGPU_STAT_COPY_BYTES_TO_SMEM), bytes_smem0 + kLen);
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
