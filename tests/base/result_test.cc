// Result<T>: a value or a negative errno.
#include "gpusvm/base/result.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>
#include <utility>

namespace gpusvm {
namespace {

Result<int> half(int v) {
  if (v % 2) return Err{-EINVAL};
  return v / 2;
}

TEST(Result, HoldsAValue) {
  Result<int> r = half(42);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(static_cast<bool>(r));
  EXPECT_EQ(r.error(), 0);
  EXPECT_EQ(r.value(), 21);
  EXPECT_EQ(*r, 21);
}

TEST(Result, HoldsAnError) {
  Result<int> r = half(7);
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(static_cast<bool>(r));
  EXPECT_EQ(r.error(), -EINVAL);
}

TEST(Result, ValueIsMutableAndReachableThroughArrow) {
  Result<std::string> r = std::string("page");
  ASSERT_TRUE(r.ok());
  r->append("s");
  EXPECT_EQ(r->size(), 5u);
  *r += "!";
  EXPECT_EQ(r.value(), "pages!");
  const Result<std::string>& cr = r;
  EXPECT_EQ(cr->size(), 6u);
  EXPECT_EQ(*cr, "pages!");
}

TEST(Result, MoveOnlyValueCanBeMovedOut) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(7);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 7);
}

TEST(Result, CopiesKeepValueAndError) {
  Result<int> a = 5;
  Result<int> b = a;
  EXPECT_EQ(b.value(), 5);
  Result<int> e = Err{-ENOSPC};
  Result<int> f = e;
  EXPECT_EQ(f.error(), -ENOSPC);
}

class ResultDeathTest : public testing::Test {
 protected:
  void SetUp() override { GTEST_FLAG_SET(death_test_style, "threadsafe"); }
};

TEST_F(ResultDeathTest, ReadingTheValueOfAFailedResultAborts) {
  EXPECT_DEATH(
      {
        Result<int> r = Err{-ENOMEM};
        int v = r.value();
        (void)v;
      },
      "");
}

TEST_F(ResultDeathTest, ErrWithoutANegativeErrnoAborts) {
  EXPECT_DEATH({ Result<int> r = Err{0}; (void)r; }, "");
  EXPECT_DEATH({ Result<int> r = Err{EINVAL}; (void)r; }, "");
}

}  // namespace
}  // namespace gpusvm
