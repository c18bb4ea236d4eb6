// A program that uses gpusvm from outside its tree: a machine with one dmirror unit, a process
// that writes a buffer, a device that mirrors and migrates it, a forked child that reads it,
// and the checks. Exit status 0 when everything held, 1 otherwise (the reason on stderr).
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/dmirror/dmirror_machine.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "uapi/dmirror.h"

namespace {

using namespace gpusvm;

constexpr uint64_t kPages = 16;
constexpr uint64_t kLen = kPages * mm::kPageSize;

uint64_t word(uint64_t i) { return 0xC0FFEE00ULL + i; }

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "gpusvm-consumer: %s failed (line %d)\n", #cond, __LINE__); \
      return 1;                                                      \
    }                                                                \
  } while (0)

int device_cmd(devfs::Process& p, int fd, unsigned long request, mm::Va addr, void* buf) {
  hmm_dmirror_cmd cmd{};
  cmd.addr = addr;
  cmd.ptr = reinterpret_cast<uintptr_t>(buf);
  cmd.npages = kPages;
  const int rc = devfs::ioctl(p, fd, request, &cmd);
  return rc ? rc : (cmd.cpages == kPages ? 0 : -EIO);
}

int run() {
  Result<std::unique_ptr<devfs::Machine>> m = devfs::Machine::create({.ram_bytes = 64ULL << 20});
  CHECK(m.ok());
  CHECK(dmirror::add_unit(**m, 0).ok());
  Result<devfs::Process*> p = (*m)->create_process();
  CHECK(p.ok());
  devfs::Process& proc = **p;

  Result<mm::Va> buf = proc.mm().mmap(0, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  CHECK(buf.ok());
  for (uint64_t i = 0; i < kLen / 8; i++) CHECK(mm::cpu::store<uint64_t>(proc.mm(), *buf + i * 8, word(i)) == 0);

  // The device reads the buffer through its mirror, then migrates it into device memory.
  Result<int> fd = devfs::open(dmirror::unit_name(0), proc);
  CHECK(fd.ok());
  std::vector<uint64_t> mirror(kLen / 8);
  CHECK(device_cmd(proc, *fd, HMM_DMIRROR_READ, *buf, mirror.data()) == 0);
  for (uint64_t i = 0; i < mirror.size(); i++) CHECK(mirror[i] == word(i));
  CHECK(device_cmd(proc, *fd, HMM_DMIRROR_MIGRATE_TO_DEV, *buf, mirror.data()) == 0);
  CHECK(mm::check((*m)->mem()).ok());

  // A child reads it back (device pages fault back to RAM) and exits with the count it saw.
  Result<devfs::Process*> child = (*m)->fork(proc, [&](devfs::Process& c) {
    uint64_t good = 0;
    for (uint64_t i = 0; i < kLen / 8; i++) {
      Result<uint64_t> v = mm::cpu::load<uint64_t>(c.mm(), *buf + i * 8);
      if (!v) return v.error();
      good += *v == word(i);
    }
    return good == kLen / 8 ? 42 : 1;
  });
  CHECK(child.ok());
  Result<devfs::ExitStatus> st = (*child)->wait(std::chrono::seconds(30));
  CHECK(st.ok());
  CHECK(*st == devfs::ExitStatus::exited_with(42));
  for (uint64_t i = 0; i < kLen / 8; i++) CHECK(*mm::cpu::load<uint64_t>(proc.mm(), *buf + i * 8) == word(i));
  CHECK(mm::check((*m)->mem()).ok());

  CHECK(devfs::close(proc, *fd) == 0);
  CHECK((*m)->exit_processes() == 0);
  CHECK(mm::check((*m)->mem()).ok());
  std::printf("gpusvm-consumer: ok (child %s)\n", st->to_string().c_str());
  return 0;
}

}  // namespace

int main() { return run(); }
