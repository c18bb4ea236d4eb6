// errno_name / errno_describe: the names diagnostics print for negative-errno status codes.
#include "gpusvm/base/errno.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <string>

namespace gpusvm {
namespace {

TEST(ErrnoName, NegativeAndPositiveCodesGiveTheSameName) {
  EXPECT_STREQ(errno_name(-EFAULT), "EFAULT");
  EXPECT_STREQ(errno_name(EFAULT), "EFAULT");
  EXPECT_STREQ(errno_name(-EBUSY), "EBUSY");
  EXPECT_STREQ(errno_name(EBUSY), "EBUSY");
}

TEST(ErrnoName, ZeroIsOk) { EXPECT_STREQ(errno_name(0), "OK"); }

TEST(ErrnoName, EveryCodeTheStackReturnsHasItsName) {
  struct Case {
    int err;
    const char* name;
  };
  const Case cases[] = {
      {EPERM, "EPERM"},         {ENOENT, "ENOENT"},       {ESRCH, "ESRCH"},
      {EINTR, "EINTR"},         {EIO, "EIO"},             {ENXIO, "ENXIO"},
      {E2BIG, "E2BIG"},         {EBADF, "EBADF"},         {EAGAIN, "EAGAIN"},
      {ENOMEM, "ENOMEM"},       {EACCES, "EACCES"},       {EFAULT, "EFAULT"},
      {EBUSY, "EBUSY"},         {EEXIST, "EEXIST"},       {ENODEV, "ENODEV"},
      {EINVAL, "EINVAL"},       {ENOSPC, "ENOSPC"},       {ERANGE, "ERANGE"},
      {EDEADLK, "EDEADLK"},     {ENOSYS, "ENOSYS"},       {ENOTTY, "ENOTTY"},
      {EOVERFLOW, "EOVERFLOW"}, {EOPNOTSUPP, "EOPNOTSUPP"}, {ETIMEDOUT, "ETIMEDOUT"},
      {ECANCELED, "ECANCELED"}, {EHWPOISON, "EHWPOISON"},
  };
  for (const Case& c : cases) {
    EXPECT_STREQ(errno_name(-c.err), c.name) << "errno " << c.err;
  }
}

TEST(ErrnoName, UnknownCodeIsMarked) {
  EXPECT_STREQ(errno_name(-9999), "E?");
  EXPECT_STREQ(errno_name(9999), "E?");
}

TEST(ErrnoDescribe, NegativeCodeHasSignNameAndText) {
  EXPECT_EQ(errno_describe(-EFAULT), "-EFAULT (Bad address)");
  EXPECT_EQ(errno_describe(-ENOMEM), "-ENOMEM (Cannot allocate memory)");
  EXPECT_EQ(errno_describe(-EINVAL), "-EINVAL (Invalid argument)");
}

TEST(ErrnoDescribe, PositiveCodeHasNoSign) {
  EXPECT_EQ(errno_describe(EINVAL), "EINVAL (Invalid argument)");
}

TEST(ErrnoDescribe, ZeroIsOk) { EXPECT_EQ(errno_describe(0), "0 (OK)"); }

TEST(ErrnoDescribe, UnknownCodeStillHasTheNumberInItsText) {
  const std::string s = errno_describe(-9999);
  EXPECT_EQ(s.rfind("-E? (", 0), 0u) << s;
  EXPECT_NE(s.find("9999"), std::string::npos) << s;
}

}  // namespace
}  // namespace gpusvm
