// The runtime's drmIoctl wrapper: a call interrupted with -EINTR or -EAGAIN is restarted, any
// other result is returned as it is. A test device stands in for a driver whose ioctl is
// interrupted by signals (refgpu's calls do not return -EINTR today).
#include <atomic>
#include <memory>

#include "runtime/runtime_internal.h"
#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

class InterruptedFile final : public devfs::File {
 public:
  explicit InterruptedFile(std::atomic<int>* calls) : calls_(calls) {}
  // Fails the first four calls with -EINTR, -EAGAIN, -EINTR, -EAGAIN; then request 0 succeeds
  // and request 1 fails with -ENOTTY.
  int ioctl(devfs::Process&, unsigned long request, void*) override {
    const int n = calls_->fetch_add(1);
    if (n < 4) return n % 2 ? -EAGAIN : -EINTR;
    return request == 1 ? -ENOTTY : 0;
  }

 private:
  std::atomic<int>* calls_;
};

class InterruptedDevice final : public devfs::Device {
 public:
  Result<std::shared_ptr<devfs::File>> open(devfs::Process&) override {
    return std::shared_ptr<devfs::File>(std::make_shared<InterruptedFile>(&calls));
  }
  std::atomic<int> calls{0};
};

TEST(SysallocDrmIoctl, RestartsOnEintrAndEagain) {
  Rig r({.devices = 0});
  auto dev = std::make_shared<InterruptedDevice>();
  ASSERT_EQ(r.machine->add_device("interrupted", dev), 0);
  auto fd = devfs::open("interrupted", *r.proc);
  ASSERT_TRUE(fd.ok());
  EXPECT_EQ(rt::drm_ioctl(*r.proc, *fd, 0, nullptr), 0);
  EXPECT_EQ(dev->calls.load(), 5);  // four restarts, then the answer
  dev->calls = 0;
  EXPECT_EQ(rt::drm_ioctl(*r.proc, *fd, 1, nullptr), -ENOTTY);  // other errors come back as they are
  EXPECT_EQ(dev->calls.load(), 5);
  EXPECT_EQ(rt::drm_ioctl(*r.proc, *fd + 1, 0, nullptr), -EBADF);
  EXPECT_EQ(devfs::close(*r.proc, *fd), 0);
}

}  // namespace
}  // namespace gpusvm::sysalloc
