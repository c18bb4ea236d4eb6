// The project's one lock-order table (gpusvm/base/lock_order.h): strictly ordered, names
// unique, and enforced by lockdep at each step: every class may be taken under the one before
// it, and taking the one before it while holding it panics naming both.
#include "gpusvm/base/lock_order.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace gpusvm {
namespace {

TEST(LockOrder, TableIsStrictlyOrderedWithUniqueNames) {
  std::set<std::string> names;
  for (size_t i = 0; i < kLockOrder.size(); i++) {
    const LockClass* c = kLockOrder[i];
    EXPECT_GT(c->rank, 0u) << c->name << ": an ordered class needs a rank";
    if (i > 0) {
      EXPECT_LT(kLockOrder[i - 1]->rank, c->rank) << kLockOrder[i - 1]->name << " -> " << c->name;
    }
    EXPECT_TRUE(names.insert(c->name).second) << "duplicate lock class name " << c->name;
  }
  EXPECT_FALSE(names.count(mm::kMmuNotifierListLockClass.name)) << "rank-0 classes are not ordered";
  EXPECT_EQ(mm::kMmuNotifierListLockClass.rank, 0u);
}

// Walks the table outermost first holding every class at once (fake lock addresses): the
// deepest legal nesting must be accepted.
TEST(LockOrder, EveryStepOfTheTableIsAccepted) {
  if (!lockdep::rank_checks_enabled()) GTEST_SKIP() << "built without GPUSVM_LOCK_RANK_CHECKS";
  static char locks[kLockOrder.size()];
  for (size_t i = 0; i < kLockOrder.size(); i++) {
    lockdep::check_order(&locks[i], kLockOrder[i]);
    lockdep::acquire(&locks[i], kLockOrder[i], LockMode::kExclusive);
  }
  EXPECT_EQ(lockdep::held_count(), static_cast<int>(kLockOrder.size()));
  for (size_t i = kLockOrder.size(); i-- > 0;) lockdep::release(&locks[i]);
  EXPECT_EQ(lockdep::held_count(), 0);
}

class LockOrderDeathTest : public testing::TestWithParam<size_t> {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

// Each adjacent pair taken backwards: holding class i, acquiring class i-1 panics.
TEST_P(LockOrderDeathTest, EachStepTakenBackwardsPanics) {
  if (!lockdep::rank_checks_enabled()) GTEST_SKIP() << "built without GPUSVM_LOCK_RANK_CHECKS";
  const size_t i = GetParam();
  const LockClass* inner = kLockOrder[i];
  const LockClass* outer = kLockOrder[i - 1];
  EXPECT_DEATH(
      {
        static char a;
        static char b;
        lockdep::acquire(&a, inner, LockMode::kExclusive);
        lockdep::check_order(&b, outer);
      },
      std::string("lock order violation: acquiring ") + outer->name + ".*while holding " + inner->name);
}

INSTANTIATE_TEST_SUITE_P(Table, LockOrderDeathTest, testing::Range<size_t>(1, kLockOrder.size()),
                         [](const testing::TestParamInfo<size_t>& p) {
                           return std::string(kLockOrder[p.param]->name);
                         });

}  // namespace
}  // namespace gpusvm
