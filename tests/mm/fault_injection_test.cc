// Failure injected at every allocation point, at every hit in turn: each operation either
// succeeds or fails cleanly, the invariants hold afterwards, and nothing leaks at exit.
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

// A scenario touching every allocation path: PGD..PTE tables, 4 KiB and THP faults, COW,
// fork, mremap, collapse and populate. Returns how many steps failed.
int run_scenario(AddressSpace& as) {
  int failed = 0;
  auto step = [&failed](int rc) {
    if (rc != 0) failed++;
  };
  Result<Va> small = as.mmap(0, 16 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  Result<Va> huge = as.mmap(0, 2 * kPmdSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!small || !huge) return failed + 1;
  step(as.madvise(*huge, 2 * kPmdSize, MADV_HUGEPAGE));
  for (int i = 0; i < 16; i++) step(cpu::store<uint64_t>(as, *small + i * kPageSize, i + 1));
  step(cpu::load<uint64_t>(as, *huge).error());
  step(cpu::store<uint64_t>(as, *huge + kPmdSize, 7));
  step(cpu::store<uint64_t>(as, *huge + 5 * kPageSize, 9));  // huge zero -> THP, or split + COW
  Result<std::unique_ptr<AddressSpace>> child = as.fork();
  if (child) {
    step(cpu::store<uint64_t>(**child, *small, 100));
    step(cpu::store<uint64_t>(**child, *huge + kPmdSize + kPageSize, 100));
  } else {
    failed++;
  }
  step(cpu::store<uint64_t>(as, *small + kPageSize, 200));
  step(as.mremap(*small, 16 * kPageSize, 16 * kPageSize, MREMAP_MAYMOVE | MREMAP_FIXED,
                 0x600000000 + 3 * kPageSize).error());
  step(as.madvise(*huge, kPmdSize, MADV_COLLAPSE));
  step(as.mmap(0, 8 * kPageSize, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE).error());
  return failed;
}

struct InjectionCase {
  const char* point;
  int max_nth;
};

class FaultInjectionTest : public ::testing::TestWithParam<InjectionCase> {};

TEST_P(FaultInjectionTest, EveryHitFailsCleanly) {
  const InjectionCase& c = GetParam();
  auto mem = make_mem();
  const uint64_t free0 = mem->free_pages();
  int injected_runs = 0;
  for (int nth = 1; nth <= c.max_nth; nth++) {
    SCOPED_TRACE(std::string(c.point) + " nth=" + std::to_string(nth));
    auto as = make_as(mem.get());
    ASSERT_NE(as, nullptr);
    {
      fault_inject::ScopedArm arm(c.point, {.nth = static_cast<uint64_t>(nth)});
      ASSERT_EQ(arm.status(), 0);
      (void)run_scenario(*as);
      if (fault_inject::failures(c.point) > 0) injected_runs++;
    }
    CheckReport r = check(*mem);
    ASSERT_TRUE(r.ok()) << r.to_string();
    // After the failure the address space keeps working.
    Result<Va> va = as->mmap(0, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(va.ok());
    ASSERT_EQ(cpu::store<uint64_t>(*as, *va, 0xfeed), 0);
    ASSERT_EQ(*cpu::load<uint64_t>(*as, *va), 0xfeedu);
    as.reset();
    ASSERT_EQ(mem->free_pages(), free0) << "leak after an injected failure";
  }
  EXPECT_GT(injected_runs, 0) << "the point was never hit: the test proves nothing";
}

INSTANTIATE_TEST_SUITE_P(Points, FaultInjectionTest,
                         ::testing::Values(InjectionCase{"mm.alloc_folio", 40},
                                           InjectionCase{"mm.alloc_folio_thp", 6},
                                           InjectionCase{"mm.alloc_pgtable", 30}),
                         [](const ::testing::TestParamInfo<InjectionCase>& p) {
                           std::string n = p.param.point;
                           for (char& ch : n) if (ch == '.') ch = '_';
                           return n;
                         });

}  // namespace
}  // namespace gpusvm::mm::testing
