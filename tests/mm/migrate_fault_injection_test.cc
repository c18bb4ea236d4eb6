// Failure injected at every hit of every point a migration passes (allocations, folio
// trylocks, folio splits, the split-during-migration freeze): each migration either moves a
// page or leaves it where it was, the data survives, the invariants hold, nothing leaks.
#include "gpusvm/base/fault_inject.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

struct MigrateInjectionCase {
  const char* point;
  int max_nth;
  bool small_destinations;  // the device hands out only 4 KiB pages (split during migration)
};

void PrintTo(const MigrateInjectionCase& c, std::ostream* os) { *os << c.point; }

class MigrateFaultInjectionTest : public ::testing::TestWithParam<MigrateInjectionCase> {};

// A THP, 4 KiB pages, a hole and a zero page, migrated to the device (compound, faulting) and
// back by CPU faults and by migration, with every byte checked after each step.
TEST_P(MigrateFaultInjectionTest, EveryHitRollsBack) {
  const MigrateInjectionCase& c = GetParam();
  auto mem = make_mem(128ULL << 20);
  const uint64_t free0 = mem->free_pages();
  int injected_runs = 0;
  for (int nth = 1; nth <= c.max_nth; nth++) {
    SCOPED_TRACE(std::string(c.point) + " nth=" + std::to_string(nth));
    auto as = make_as(mem.get());
    auto dev = std::make_unique<TestDevice>(mem.get(), 4 * kPagesPerPmd);
    ASSERT_TRUE(as && dev->ok());
    dev->fail_thp_alloc = c.small_destinations;
    const Va thp = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    const Va thp2 = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    const Va hole = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    const Va small = map_anon(*as, 32 * kPageSize);
    ASSERT_TRUE(thp && thp2 && hole && small);
    fill_pages(*as, thp, kPmdSize, 1);
    fill_pages(*as, thp2, kPmdSize, 1);
    fill_pages(*as, small, 16 * kPageSize, 1);  // 16..31: holes
    ASSERT_TRUE(cpu::load<uint64_t>(*as, small + 20 * kPageSize).ok());  // a zero page
    {
      fault_inject::ScopedArm arm(c.point, {.nth = static_cast<uint64_t>(nth)});
      ASSERT_EQ(arm.status(), 0);
      const unsigned flags = MIGRATE_VMA_SELECT_COMPOUND | MIGRATE_VMA_FAULT;
      (void)dev->migrate_to_device(*as, thp, thp + kPmdSize, flags);          // whole THP
      (void)dev->migrate_to_device(*as, hole, hole + kPmdSize, flags);        // compound hole
      (void)dev->migrate_to_device(*as, thp2 + 8 * kPageSize, thp2 + 16 * kPageSize,
                                   MIGRATE_VMA_FAULT);                        // split first
      (void)dev->migrate_to_device(*as, small, small + 32 * kPageSize, flags);
      EXPECT_MM_CHECK_OK(*mem);
      (void)dev->migrate_to_system(*as, small, small + 8 * kPageSize, MIGRATE_VMA_SELECT_COMPOUND);
      (void)dev->migrate_to_system(*as, thp, thp + kPmdSize, MIGRATE_VMA_SELECT_COMPOUND);
      if (fault_inject::failures(c.point) > 0) injected_runs++;
    }
    // Whatever moved or not, every byte reads back (CPU faults bring device pages home).
    EXPECT_EQ(verify_pages(*as, thp, kPmdSize, 1), 0);
    EXPECT_EQ(verify_pages(*as, thp2, kPmdSize, 1), 0);
    EXPECT_EQ(verify_pages(*as, small, 16 * kPageSize, 1), 0);
    for (uint64_t p = 16; p < 32; p++) EXPECT_EQ(*cpu::load<uint64_t>(*as, small + p * kPageSize), 0u);
    for (uint64_t p = 0; p < kPagesPerPmd; p += 64) EXPECT_EQ(*cpu::load<uint64_t>(*as, hole + p * kPageSize), 0u);
    EXPECT_MM_CHECK_OK(*mem);
    as.reset();
    EXPECT_EQ(dev->free_pages(), 4 * kPagesPerPmd);
    dev.reset();
    EXPECT_EQ(mem->free_pages(), free0) << "pages leaked";
  }
  EXPECT_GT(injected_runs, 0) << "the point was never reached";
}

INSTANTIATE_TEST_SUITE_P(
    Points, MigrateFaultInjectionTest,
    ::testing::Values(MigrateInjectionCase{"mm.alloc_folio", 40, false},
                      MigrateInjectionCase{"mm.alloc_folio_thp", 4, false},
                      MigrateInjectionCase{"mm.alloc_pgtable", 12, false},
                      MigrateInjectionCase{"mm.migrate_trylock", 40, false},
                      MigrateInjectionCase{"mm.migrate_split", 4, false},
                      MigrateInjectionCase{"mm.migrate_split_freeze", 3, true},
                      MigrateInjectionCase{"mm.alloc_folio", 40, true}),
    [](const ::testing::TestParamInfo<MigrateInjectionCase>& p) {
      std::string name = std::string(p.param.point) + (p.param.small_destinations ? "_small" : "");
      for (char& ch : name) {
        if (ch == '.') ch = '_';
      }
      return name;
    });

}  // namespace
}  // namespace gpusvm::mm::testing
