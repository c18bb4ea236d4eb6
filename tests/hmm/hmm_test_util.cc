#include "tests/hmm/hmm_test_util.h"

#include <cerrno>

#include "gpusvm/mm/address_space.h"

namespace gpusvm::hmm_tests {

std::unique_ptr<HmmBuffer> HmmBuffer::map(devfs::Process& p, uint64_t size, uint64_t mirror_bytes,
                                          int prot, int flags) {
  auto b = std::make_unique<HmmBuffer>();
  b->proc = &p;
  b->size = size;
  b->mirror.assign(align_up(std::max<uint64_t>(mirror_bytes, sizeof(int)), sizeof(int)) / sizeof(int), 0);
  Result<Va> va = p.mm().mmap(0, size, prot, flags);
  EXPECT_TRUE(va.ok()) << "mmap: " << va.error();
  b->ptr = va.ok() ? *va : 0;
  return b;
}

HmmBuffer::~HmmBuffer() {
  if (ptr && proc) {
    EXPECT_EQ(proc->mm().munmap(ptr, size), 0);
  }
}

int hmm_dmirror_cmd(devfs::Process& p, int fd, unsigned long request, HmmBuffer* buffer,
                    uint64_t npages) {
  struct hmm_dmirror_cmd cmd{};
  cmd.addr = buffer->ptr;
  cmd.ptr = reinterpret_cast<uintptr_t>(buffer->mirror.data());
  cmd.npages = npages;
  // Restarted on -EINTR like the C harness, but bounded (dmirror never returns it today).
  for (int tries = 0;; tries++) {
    const int rc = devfs::ioctl(p, fd, request, &cmd);
    if (rc == 0) break;
    if (rc == -EINTR && tries < 1000) continue;
    EXPECT_NE(rc, -EINTR) << "ioctl " << request << " still -EINTR after 1000 tries";
    return rc;
  }
  buffer->cpages = cmd.cpages;
  buffer->faults = cmd.faults;
  return 0;
}

int cpu_write_ints(devfs::Process& p, Va va, uint64_t n, int (*f)(uint64_t)) {
  std::vector<int> v(n);
  for (uint64_t i = 0; i < n; i++) v[i] = f(i);
  return mm::cpu::copy_in(p.mm(), va, v.data(), n * sizeof(int));
}

std::vector<int> cpu_read_ints(devfs::Process& p, Va va, uint64_t n, int* rc) {
  std::vector<int> v(n);
  *rc = mm::cpu::copy_out(p.mm(), va, v.data(), n * sizeof(int));
  return v;
}

int hmm_open(devfs::Process& p, int unit) {
  Result<int> fd = devfs::open(std::string(HMM_DMIRROR_DEVICE_NAME) + std::to_string(unit), p);
  return fd.ok() ? *fd : fd.error();
}

void HmmMachine::start() {
  Result<std::unique_ptr<devfs::Machine>> m = devfs::Machine::create({.ram_bytes = 256ULL << 20});
  ASSERT_TRUE(m.ok()) << m.error();
  machine = std::move(*m);
  mem = &machine->mem();
  registry = &machine->devices();
  ASSERT_EQ(dmirror::add_test_hmm_units(*machine, dev), 0);
  Result<devfs::Process*> p = machine->create_process();
  ASSERT_TRUE(p.ok()) << p.error();
  proc = *p;
}

void HmmMachine::expect_mirrors_ok() {
  for (int i = 0; i < kDmirrorUnits; i++) {
    if (!dev[i]) continue;
    const std::vector<std::string> problems = dev[i]->check_mirrors();
    std::string all;
    for (size_t k = 0; k < problems.size() && k < 20; k++) all += problems[k] + "\n";
    EXPECT_TRUE(problems.empty()) << problems.size() << " stale device mapping(s) on device " << i
                                  << ":\n" << all;
  }
}

void HmmMachine::stop() {
  if (!machine) return;
  expect_mirrors_ok();
  EXPECT_MM_CHECK_OK(*mem);
  // exit: unmaps everything, closes the fds (a forked child still alive is killed).
  EXPECT_EQ(machine->exit_processes(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  for (int i = 0; i < kDmirrorUnits; i++) {
    if (!dev[i]) continue;
    EXPECT_EQ(dev[i]->pages_in_use(), 0u) << "device " << i << " pages leaked";
    dev[i].reset();
  }
  machine->remove_devices();
  proc = nullptr;
  registry = nullptr;
  mem = nullptr;
  machine.reset();
}

void Hmm::SetUp() {
  ASSERT_NO_FATAL_FAILURE(start());
  fd = hmm_open(*proc, first_unit(GetParam()));
  ASSERT_GE(fd, 0);
}

void Hmm::TearDown() {
  if (proc && fd >= 0) {
    EXPECT_EQ(devfs::close(*proc, fd), 0);
  }
  stop();
}

void Hmm2::SetUp() {
  ASSERT_NO_FATAL_FAILURE(start());
  fd0 = hmm_open(*proc, first_unit(GetParam()));
  ASSERT_GE(fd0, 0);
  fd1 = hmm_open(*proc, first_unit(GetParam()) + 1);
  ASSERT_GE(fd1, 0);
}

void Hmm2::TearDown() {
  if (proc && fd0 >= 0) {
    EXPECT_EQ(devfs::close(*proc, fd0), 0);
  }
  if (proc && fd1 >= 0) {
    EXPECT_EQ(devfs::close(*proc, fd1), 0);
  }
  stop();
}

}  // namespace gpusvm::hmm_tests
