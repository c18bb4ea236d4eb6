// devfs: the in-process device files the hmm port (and later refgpu) runs on. A small real
// driver (EchoDevice) shows the contracts: fd numbering, -EBADF, release at the last
// reference (an ioctl in flight keeps the file open), fork sharing files, exit order.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <ostream>
#include <thread>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::devfs {

// gtest prints a status as "exited 7" / "killed by SIGSEGV (fault EFAULT)".
void PrintTo(const ExitStatus& s, std::ostream* os) { *os << s.to_string(); }

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
  ~EchoDevice() override {
    if (destroyed_with_files_open) *destroyed_with_files_open = opened.load() != released.load();
  }
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
  bool* destroyed_with_files_open = nullptr;  // set by the destructor when non-null
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

// ---- fork with a main thread, exit status, wait (waitpid) ----

constexpr auto kWait = std::chrono::seconds(30);  // a bound, never reached when all is well

// A page of `p`'s memory filled with `v` (one 8-byte word checked per call).
mm::Va map_word_page(Process& p, uint64_t v, int prot = PROT_READ | PROT_WRITE) {
  Result<mm::Va> va = p.mm().mmap(0, mm::kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  EXPECT_TRUE(va.ok());
  if (!va) return 0;
  EXPECT_EQ(mm::cpu::store<uint64_t>(p.mm(), *va, v), 0);
  if (prot != (PROT_READ | PROT_WRITE)) {
    EXPECT_EQ(p.mm().mprotect(*va, mm::kPageSize, prot), 0);
  }
  return *va;
}

TEST(ExitStatus, FromMainAndNames) {
  EXPECT_EQ(ExitStatus::from_main(0), ExitStatus::exited_with(0));
  EXPECT_EQ(ExitStatus::from_main(300).code, 300 & 0xff);  // exit(300): the low 8 bits
  EXPECT_EQ(ExitStatus::from_main(-EFAULT), ExitStatus::killed_by(SIGSEGV, -EFAULT));
  EXPECT_EQ(ExitStatus::from_main(-EINVAL), ExitStatus::killed_by(SIGBUS, -EINVAL));
  EXPECT_EQ(ExitStatus::from_main(-ENOMEM), ExitStatus::killed_by(SIGKILL, -ENOMEM));
  EXPECT_EQ(ExitStatus::exited_with(3).to_string(), "exited 3");
  EXPECT_EQ(ExitStatus::killed_by(SIGKILL).to_string(), "killed by SIGKILL");
  EXPECT_EQ(ExitStatus::from_main(-EFAULT).to_string(), "killed by SIGSEGV (fault EFAULT)");
}

// The child runs on its own thread: it sees the parent's data (copy-on-write), writes its
// own, uses an inherited fd, and its return value is the status wait() reports. The parent's
// page is untouched.
TEST_F(DevfsTest, ForkMainExitCodeIsCollectedByWait) {
  const int fd = *open("echo", *proc);
  const mm::Va va = map_word_page(*proc, 0x1111);
  Result<std::unique_ptr<Process>> child = proc->fork([&](Process& c) {
    Result<uint64_t> v = mm::cpu::load<uint64_t>(c.mm(), va);
    if (!v || *v != 0x1111) return 10;
    if (mm::cpu::store<uint64_t>(c.mm(), va, 0x2222) != 0) return 11;
    int echo = 6;
    if (ioctl(c, fd, kEcho, &echo) != 0 || echo != 7) return 12;
    Result<uint64_t> w = mm::cpu::load<uint64_t>(c.mm(), va);
    return w && *w == 0x2222 ? echo : 13;  // exit(7)
  });
  ASSERT_TRUE(child.ok()) << child.error();
  Result<ExitStatus> st = (*child)->wait(kWait);
  ASSERT_TRUE(st.ok()) << st.error();
  EXPECT_EQ(*st, ExitStatus::exited_with(7)) << st->to_string();
  EXPECT_EQ((*child)->exit_status(), ExitStatus::exited_with(7));
  EXPECT_TRUE((*child)->mm().exited());
  EXPECT_EQ(*(*child)->wait(kWait), ExitStatus::exited_with(7));  // not reaped: same answer
  EXPECT_EQ(*mm::cpu::load<uint64_t>(proc->mm(), va), 0x1111u);
  EXPECT_EQ(dev->released.load(), 0);  // the parent still holds the file
  EXPECT_TRUE(mm::check(*mem).ok()) << mm::check(*mem).to_string();
  child->reset();
  EXPECT_TRUE(mm::check(*mem).ok()) << mm::check(*mem).to_string();
}

// A child whose CPU access faults dies of it as the CPU's exception would kill it: a store
// to a read-only page is SIGSEGV, recorded with the access's error.
TEST_F(DevfsTest, ForkMainKilledByFault) {
  const mm::Va ro = map_word_page(*proc, 0x3333, PROT_READ);
  std::atomic<bool> after_fault{false};
  Result<std::unique_ptr<Process>> child = proc->fork([&](Process& c) {
    const int rc = mm::cpu::store<uint64_t>(c.mm(), ro, 1);
    if (rc == 0) return 0;  // no fault: exits 0, which the test rejects
    after_fault = true;
    return rc;
  });
  ASSERT_TRUE(child.ok());
  Result<ExitStatus> st = (*child)->wait(kWait);
  ASSERT_TRUE(st.ok()) << st.error();
  EXPECT_TRUE(st->killed());
  EXPECT_EQ(*st, ExitStatus::killed_by(SIGSEGV, -EFAULT)) << st->to_string();
  EXPECT_TRUE(after_fault.load());
  EXPECT_EQ(*mm::cpu::load<uint64_t>(proc->mm(), ro), 0x3333u);
  EXPECT_TRUE(mm::check(*mem).ok()) << mm::check(*mem).to_string();
}

// wait() is bounded: while the child's main is blocked in an ioctl it times out with nothing
// changed, and exit_status() (WNOHANG) says "still running"; once main returns, wait reports
// its status.
TEST_F(DevfsTest, WaitTimesOutWhileTheChildRuns) {
  const int fd = *open("echo", *proc);
  Result<std::unique_ptr<Process>> child =
      proc->fork([&](Process& c) { return ioctl(c, fd, kBlock, nullptr) == 0 ? 5 : 6; });
  ASSERT_TRUE(child.ok());
  {
    std::unique_lock<std::mutex> l(dev->m);
    ASSERT_TRUE(dev->cv.wait_for(l, kWait, [&] { return dev->blocked; }));
  }
  Result<ExitStatus> st = (*child)->wait(std::chrono::milliseconds(20));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error(), -ETIMEDOUT);
  EXPECT_FALSE((*child)->exit_status().has_value());
  EXPECT_FALSE((*child)->mm().exited());
  {
    std::lock_guard<std::mutex> l(dev->m);
    dev->unblock = true;
    dev->cv.notify_all();
  }
  st = (*child)->wait(kWait);
  ASSERT_TRUE(st.ok()) << st.error();
  EXPECT_EQ(*st, ExitStatus::exited_with(5)) << st->to_string();
}

// kill() from the parent while the child's main is in a loop of CPU accesses: the address
// space goes at once, the child's next access fails, its main returns, and the status is the
// signal (the fault main then returns does not overwrite it). Run under TSan too.
//   1. child: loads its page in a loop (the loop is bounded: 30 s)
//   2. parent: sees the child running (its loads counted), kill(SIGKILL)
//   3. child: the next load finds no VMA: -EFAULT, main returns it
//   4. parent: wait() -> killed by SIGKILL, fault 0
TEST_F(DevfsTest, KillEndsARunningChildAndWaitReportsTheSignal) {
  const mm::Va va = map_word_page(*proc, 0x4444);
  std::atomic<uint64_t> loads{0};
  std::atomic<int> last_rc{0};
  Result<std::unique_ptr<Process>> child = proc->fork([&](Process& c) {
    const auto deadline = std::chrono::steady_clock::now() + kWait;
    while (std::chrono::steady_clock::now() < deadline) {
      Result<uint64_t> v = mm::cpu::load<uint64_t>(c.mm(), va);
      if (!v) {
        last_rc = v.error();
        return v.error();
      }
      if (*v != 0x4444) return 20;
      loads++;
    }
    return 21;
  });
  ASSERT_TRUE(child.ok());
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (loads.load() < 100 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_GE(loads.load(), 100u) << "the child never ran";
  EXPECT_EQ((*child)->kill(SIGKILL), 0);
  Result<ExitStatus> st = (*child)->wait(kWait);
  ASSERT_TRUE(st.ok()) << st.error();
  EXPECT_EQ(*st, ExitStatus::killed_by(SIGKILL)) << st->to_string();
  EXPECT_EQ(last_rc.load(), -EFAULT);  // main saw its memory go
  EXPECT_EQ(*mm::cpu::load<uint64_t>(proc->mm(), va), 0x4444u);
  EXPECT_TRUE(mm::check(*mem).ok()) << mm::check(*mem).to_string();
}

// Two threads wait for the same child at once: both get the status, the main thread is
// joined once.
TEST_F(DevfsTest, ConcurrentWaitersBothSeeTheStatus) {
  Result<std::unique_ptr<Process>> child = proc->fork([](Process&) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return 3;
  });
  ASSERT_TRUE(child.ok());
  Result<ExitStatus> a = Err{-EINVAL}, b = Err{-EINVAL};
  std::thread t([&] { a = (*child)->wait(kWait); });
  b = (*child)->wait(kWait);
  t.join();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, ExitStatus::exited_with(3));
  EXPECT_EQ(*b, ExitStatus::exited_with(3));
}

// Only the first end counts: exit(1) then kill() leaves "exited 1"; a process without a main
// that nobody ends times out; kill() refuses a bad signal number.
TEST_F(DevfsTest, FirstEndIsTheStatus) {
  Result<std::unique_ptr<Process>> child = proc->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ((*child)->wait(std::chrono::milliseconds(1)).error(), -ETIMEDOUT);
  EXPECT_EQ((*child)->kill(0), -EINVAL);
  EXPECT_EQ((*child)->kill(65), -EINVAL);
  EXPECT_FALSE((*child)->exit_status().has_value());
  (*child)->exit(1);
  EXPECT_EQ((*child)->kill(SIGKILL), 0);
  (*child)->exit(2);
  EXPECT_EQ(*(*child)->wait(kWait), ExitStatus::exited_with(1));
  EXPECT_EQ(proc->fork(Process::Main{}).error(), -EINVAL);
}

// ---- Machine: set-up in a few lines, teardown in order ----

// A machine with a device, a process and a forked child still running: shutdown kills the
// child and the parent, every file is released before the device is destroyed, and the
// memory is checked clean after the processes went.
TEST(DevfsMachine, ShutdownEndsProcessesBeforeDevices) {
  Result<std::unique_ptr<Machine>> m = Machine::create({.ram_bytes = 16ULL << 20});
  ASSERT_TRUE(m.ok()) << m.error();
  const uint64_t free_at_start = (*m)->mem().free_pages();
  bool destroyed_with_files_open = true;
  {
    auto echo = std::make_shared<EchoDevice>();
    echo->destroyed_with_files_open = &destroyed_with_files_open;
    ASSERT_EQ((*m)->add_device("echo", echo), 0);
    EXPECT_EQ((*m)->add_device("echo", echo), -EEXIST);
  }
  Result<Process*> p = (*m)->create_process();
  ASSERT_TRUE(p.ok());
  ASSERT_GE(*open("echo", **p), 0);
  const mm::Va va = map_word_page(**p, 0x5555);
  std::atomic<bool> started{false};
  Result<Process*> child = (*m)->fork(**p, [&](Process& c) {
    started = true;
    const auto deadline = std::chrono::steady_clock::now() + kWait;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Result<uint64_t> v = mm::cpu::load<uint64_t>(c.mm(), va); !v) return v.error();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return 0;
  });
  ASSERT_TRUE(child.ok());
  Result<Process*> idle = (*m)->fork(**p);  // driven by nobody
  ASSERT_TRUE(idle.ok());
  const auto deadline = std::chrono::steady_clock::now() + kWait;
  while (!started.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_TRUE(started.load());

  EXPECT_EQ((*m)->exit_processes(), 0);
  EXPECT_EQ(*(*child)->wait(kWait), ExitStatus::killed_by(SIGKILL));
  EXPECT_EQ(*(*idle)->wait(kWait), ExitStatus::killed_by(SIGKILL));
  EXPECT_EQ(*(*p)->wait(kWait), ExitStatus::killed_by(SIGKILL));
  mm::CheckReport r = mm::check((*m)->mem());
  EXPECT_TRUE(r.ok()) << r.to_string();
  EXPECT_EQ((*m)->mem().free_pages(), free_at_start);
  EXPECT_NE((*m)->devices().find("echo"), nullptr);
  (*m)->remove_devices();
  EXPECT_EQ((*m)->devices().find("echo"), nullptr);
  EXPECT_FALSE(destroyed_with_files_open);  // destroyed, and after its last file
  EXPECT_EQ((*m)->shutdown(), 0);           // idempotent
}

// The destructor alone: a machine dropped with a process that holds a file open, and a child
// running on its own thread, ends both before the device goes.
TEST(DevfsMachine, DestructorTearsDownInOrder) {
  bool destroyed_with_files_open = true;
  {
    Result<std::unique_ptr<Machine>> m = Machine::create({.ram_bytes = 16ULL << 20});
    ASSERT_TRUE(m.ok());
    auto echo = std::make_shared<EchoDevice>();
    echo->destroyed_with_files_open = &destroyed_with_files_open;
    ASSERT_EQ((*m)->add_device("echo", std::move(echo)), 0);
    Result<Process*> p = (*m)->create_process();
    ASSERT_TRUE(p.ok());
    const int fd = *open("echo", **p);
    Result<Process*> child = (*m)->fork(**p, [fd](Process& c) {
      int v = 0;
      while (ioctl(c, fd, kEcho, &v) == 0 && v < 1000000) std::this_thread::yield();
      return v;  // -EBADF (its fds closed by the kill) ends the loop
    });
    ASSERT_TRUE(child.ok());
  }
  EXPECT_FALSE(destroyed_with_files_open);
}

}  // namespace
}  // namespace gpusvm::devfs
