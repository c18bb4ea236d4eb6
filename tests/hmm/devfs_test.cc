// devfs: the in-process device files the hmm port (and later refgpu) runs on. A small real
// driver (EchoDevice) shows the contracts: fd numbering, -EBADF, release at the last
// reference (an ioctl in flight keeps the file open), fork sharing files, exit order.
#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "drivers/devfs/process.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::devfs {
namespace {

constexpr unsigned long kEcho = 1;   // *arg = its value + 1
constexpr unsigned long kBlock = 2;  // waits until released by the test

class EchoDevice;

class EchoFile : public File {
 public:
  EchoFile(EchoDevice* dev, std::shared_ptr<mm::AddressSpace> mm) : dev_(dev), mm_(std::move(mm)) {}
  ~EchoFile() override;
  int ioctl(Process& caller, unsigned long request, void* arg) override;

 private:
  EchoDevice* dev_;
  std::shared_ptr<mm::AddressSpace> mm_;
};

class EchoDevice : public Device {
 public:
  Result<std::shared_ptr<File>> open(Process& opener) override {
    opened++;
    return std::shared_ptr<File>(std::make_shared<EchoFile>(this, opener.mm_ref()));
  }
  std::atomic<int> opened{0};
  std::atomic<int> released{0};
  std::atomic<bool> released_after_mm_exit{false};
  std::mutex m;
  std::condition_variable cv;
  bool blocked = false;
  bool unblock = false;
};

EchoFile::~EchoFile() {
  if (mm_->exited()) dev_->released_after_mm_exit = true;
  dev_->released++;
}

int EchoFile::ioctl(Process& caller, unsigned long request, void* arg) {
  (void)caller;
  switch (request) {
    case kEcho:
      ++*static_cast<int*>(arg);
      return 0;
    case kBlock: {
      std::unique_lock<std::mutex> l(dev_->m);
      dev_->blocked = true;
      dev_->cv.notify_all();
      return dev_->cv.wait_for(l, std::chrono::seconds(30), [&] { return dev_->unblock; }) ? 0 : -ETIMEDOUT;
    }
    default:
      return -EINVAL;
  }
}

class DevfsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<mm::PhysMem>> m = mm::PhysMem::create({.ram_bytes = 16ULL << 20});
    ASSERT_TRUE(m.ok());
    mem = std::move(*m);
    dev = std::make_shared<EchoDevice>();
    ASSERT_EQ(registry.add("echo", dev), 0);
    Result<std::unique_ptr<Process>> p = Process::create(mem.get(), &registry);
    ASSERT_TRUE(p.ok());
    proc = std::move(*p);
  }
  std::unique_ptr<mm::PhysMem> mem;
  DeviceRegistry registry;
  std::shared_ptr<EchoDevice> dev;
  std::unique_ptr<Process> proc;
};

TEST_F(DevfsTest, RegistryRejectsDuplicatesAndUnknownNames) {
  EXPECT_EQ(registry.add("echo", dev), -EEXIST);
  EXPECT_EQ(registry.add("", dev), -EINVAL);
  EXPECT_EQ(registry.add("x", nullptr), -EINVAL);
  EXPECT_EQ(open("nope", *proc).error(), -ENOENT);
  EXPECT_EQ(registry.remove("nope"), -ENOENT);
}

TEST_F(DevfsTest, LowestFreeFdAndBadFds) {
  const int a = *open("echo", *proc);
  const int b = *open("echo", *proc);
  EXPECT_EQ(a, 0);
  EXPECT_EQ(b, 1);
  int v = 41;
  EXPECT_EQ(ioctl(*proc, b, kEcho, &v), 0);
  EXPECT_EQ(v, 42);
  EXPECT_EQ(ioctl(*proc, b, 99, &v), -EINVAL);
  EXPECT_EQ(close(*proc, a), 0);
  EXPECT_EQ(dev->released.load(), 1);
  EXPECT_EQ(close(*proc, a), -EBADF);
  EXPECT_EQ(ioctl(*proc, a, kEcho, &v), -EBADF);
  EXPECT_EQ(ioctl(*proc, -1, kEcho, &v), -EBADF);
  EXPECT_EQ(*open("echo", *proc), 0);  // the lowest free fd again
}

// close() while an ioctl is in flight: the file is released when the ioctl returns.
TEST_F(DevfsTest, CloseDuringIoctlReleasesAfterIt) {
  const int fd = *open("echo", *proc);
  int rc = -1;
  std::thread t([&] { rc = ioctl(*proc, fd, kBlock, nullptr); });
  {
    std::unique_lock<std::mutex> l(dev->m);
    ASSERT_TRUE(dev->cv.wait_for(l, std::chrono::seconds(30), [&] { return dev->blocked; }));
  }
  EXPECT_EQ(close(*proc, fd), 0);
  EXPECT_EQ(dev->released.load(), 0);  // still in use by the ioctl
  {
    std::lock_guard<std::mutex> l(dev->m);
    dev->unblock = true;
    dev->cv.notify_all();
  }
  t.join();
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(dev->released.load(), 1);
}

// fork shares open files; a file goes when the last process holding it closes it. Exit
// closes files after the address space exited.
TEST_F(DevfsTest, ForkSharesFilesAndExitClosesAfterMm) {
  const int fd = *open("echo", *proc);
  Result<std::unique_ptr<Process>> child = proc->fork();
  ASSERT_TRUE(child.ok());
  int v = 0;
  EXPECT_EQ(ioctl(**child, fd, kEcho, &v), 0);
  EXPECT_EQ(close(*proc, fd), 0);
  EXPECT_EQ(dev->released.load(), 0);
  EXPECT_EQ(dev->opened.load(), 1);
  child->reset();  // exit: the child's mm exits, then its fds close
  EXPECT_EQ(dev->released.load(), 1);
  // The file mirrors the parent's mm (the opener's), which is still alive.
  EXPECT_FALSE(dev->released_after_mm_exit.load());
  (void)*open("echo", *proc);
  proc.reset();
  EXPECT_EQ(dev->released.load(), 2);
  EXPECT_TRUE(dev->released_after_mm_exit.load());
}

}  // namespace
}  // namespace gpusvm::devfs
