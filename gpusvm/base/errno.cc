#include "gpusvm/base/errno.h"

#include <cstring>
#include <string>

namespace gpusvm {

const char* errno_name(int err) {
  if (err < 0) err = -err;
  switch (err) {
    case 0: return "OK";
#define GPUSVM_ERRNO(e) case e: return #e;
    GPUSVM_ERRNO(EPERM) GPUSVM_ERRNO(ENOENT) GPUSVM_ERRNO(ESRCH) GPUSVM_ERRNO(EINTR)
    GPUSVM_ERRNO(EIO) GPUSVM_ERRNO(ENXIO) GPUSVM_ERRNO(E2BIG) GPUSVM_ERRNO(EBADF)
    GPUSVM_ERRNO(EAGAIN) GPUSVM_ERRNO(ENOMEM) GPUSVM_ERRNO(EACCES) GPUSVM_ERRNO(EFAULT)
    GPUSVM_ERRNO(EBUSY) GPUSVM_ERRNO(EEXIST) GPUSVM_ERRNO(ENODEV) GPUSVM_ERRNO(EINVAL)
    GPUSVM_ERRNO(ENOSPC) GPUSVM_ERRNO(ERANGE) GPUSVM_ERRNO(EDEADLK) GPUSVM_ERRNO(ENOSYS)
    GPUSVM_ERRNO(ENOTTY) GPUSVM_ERRNO(EOVERFLOW) GPUSVM_ERRNO(EOPNOTSUPP) GPUSVM_ERRNO(ETIMEDOUT)
    GPUSVM_ERRNO(ECANCELED) GPUSVM_ERRNO(EHWPOISON)
#undef GPUSVM_ERRNO
    default: return "E?";
  }
}

std::string errno_describe(int err) {
  if (err == 0) return "0 (OK)";
  int e = err < 0 ? -err : err;
  std::string s = err < 0 ? "-" : "";
  s += errno_name(e);
  s += " (";
  s += std::strerror(e);
  s += ")";
  return s;
}

}  // namespace gpusvm
