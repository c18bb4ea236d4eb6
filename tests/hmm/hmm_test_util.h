// The harness of the hmm-tests port (tools/testing/selftests/mm/hmm-tests.c): a machine with
// four dmirror units registered as "hmm_dmirror0" ... "hmm_dmirror3" (0, 1 device-private;
// 2, 3 device-coherent, as test_hmm's minors), a process, and the test's helpers
// (hmm_dmirror_cmd, buffers). Everything reaches the driver through devfs::open / ioctl on
// the uapi, as hmm-tests does through /dev.
//
// Mapping of the C harness: FIXTURE(hmm) -> Hmm, FIXTURE(hmm2) -> Hmm2; FIXTURE_VARIANT ->
// the value parameter (DeviceType), instantiated as hmm_device_private /
// hmm_device_coherent and hmm2_device_private / hmm2_device_coherent; `ptr[i] = i` loops ->
// one CPU copy of the same values into simulated memory (the same faults, page by page);
// buffer->mirror -> a host buffer (uapi: cmd.ptr is a pointer in the calling program);
// fork() -> devfs::Process::fork() with the child's body on a std::thread.
//
// Every test ends (TearDown) with mm::check over the whole machine: reference counts,
// mapcounts, no migration entry left, no folio left locked - after closing the fds, and
// again after the processes exited (then no device page may be in use). Before that, every
// open dmirror file's device page table is checked against the CPU page table
// (DmirrorDevice::check_mirrors): no device entry may point at a frame that no longer backs
// its address.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "drivers/devfs/registry.h"
#include "drivers/dmirror/dmirror_device.h"
#include "drivers/dmirror/dmirror_machine.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/physmem.h"
#include "uapi/dmirror.h"

namespace gpusvm::hmm_tests {

using mm::Va;

// The fixture variant: HMM_PRIVATE_DEVICE_ONE/TWO or HMM_COHERENCE_DEVICE_ONE/TWO.
enum class DeviceType { kDevicePrivate, kDeviceCoherent };
inline constexpr int kDmirrorUnits = 4;
// The unit number of the variant's first device (hmm_open(variant->device_number)); the
// second device of hmm2 is the next one.
inline int first_unit(DeviceType t) { return t == DeviceType::kDeviceCoherent ? 2 : 0; }
inline void PrintTo(DeviceType t, std::ostream* os) {
  *os << (t == DeviceType::kDeviceCoherent ? "device_coherent" : "device_private");
}
// hmm_is_coherent_type().
inline bool hmm_is_coherent_type(DeviceType t) { return t == DeviceType::kDeviceCoherent; }

inline constexpr uint64_t kPageSize = mm::kPageSize;
inline constexpr unsigned kPageShift = mm::kPageShift;
inline constexpr uint64_t HMM_BUFFER_SIZE = 1024 << 12;
inline constexpr uint64_t TWOMEG = 1ULL << 21;
inline constexpr int NTIMES = 10;

inline constexpr uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) & ~(a - 1); }

#define EXPECT_MM_CHECK_OK(mem)                                \
  do {                                                         \
    ::gpusvm::mm::CheckReport r_ = ::gpusvm::mm::check(mem);   \
    EXPECT_TRUE(r_.ok()) << r_.to_string();                    \
  } while (0)

// struct hmm_buffer: the mapping in the simulated process and the host mirror buffer.
struct HmmBuffer {
  devfs::Process* proc = nullptr;
  Va ptr = 0;
  uint64_t size = 0;
  std::vector<int> mirror;  // size / sizeof(int) ints (at least one page's worth of bytes)
  uint64_t cpages = 0;
  uint64_t faults = 0;

  // mmap(NULL, size, prot, flags | MAP_ANONYMOUS?) in proc; ASSERTs on failure.
  static std::unique_ptr<HmmBuffer> map(devfs::Process& p, uint64_t size, uint64_t mirror_bytes,
                                        int prot, int flags);
  ~HmmBuffer();  // hmm_buffer_free: munmap(ptr, size)
  uint8_t* mirror_bytes() { return reinterpret_cast<uint8_t*>(mirror.data()); }
};

// hmm_dmirror_cmd(): addr = buffer->ptr, ptr = the mirror, npages; retried on -EINTR; on
// success copies cpages/faults into the buffer. Returns 0 or the negative errno.
int hmm_dmirror_cmd(devfs::Process& p, int fd, unsigned long request, HmmBuffer* buffer,
                    uint64_t npages);

// CPU access to n ints at va of the process (ptr[i] = f(i) / reads), in one access each way.
[[nodiscard]] int cpu_write_ints(devfs::Process& p, Va va, uint64_t n, int (*f)(uint64_t));
std::vector<int> cpu_read_ints(devfs::Process& p, Va va, uint64_t n, int* rc);

// The machine (devfs::Machine): PhysMem, "/dev" with test_hmm's four dmirror units, and the
// first process. The pointers below point into `machine` and live as long as it.
class HmmMachine {
 public:
  void start();
  void stop();  // mirrors and mm checked, processes exit, mm checked again, devices go
  // Every device's check_mirrors() (the device page tables against the CPU's), one failure
  // per problem. Quiescent points only.
  void expect_mirrors_ok();
  std::unique_ptr<devfs::Machine> machine;
  mm::PhysMem* mem = nullptr;
  devfs::DeviceRegistry* registry = nullptr;
  std::shared_ptr<dmirror::DmirrorDevice> dev[kDmirrorUnits];
  devfs::Process* proc = nullptr;
};

int hmm_open(devfs::Process& p, int unit);

class Hmm : public ::testing::TestWithParam<DeviceType>, protected HmmMachine {
 protected:
  void SetUp() override;
  void TearDown() override;
  bool coherent() const { return hmm_is_coherent_type(GetParam()); }
  dmirror::DmirrorDevice& device() { return *dev[first_unit(GetParam())]; }  // the one fd's
  int fd = -1;
};

class Hmm2 : public ::testing::TestWithParam<DeviceType>, protected HmmMachine {
 protected:
  void SetUp() override;
  void TearDown() override;
  bool coherent() const { return hmm_is_coherent_type(GetParam()); }
  int fd0 = -1;
  int fd1 = -1;
};

}  // namespace gpusvm::hmm_tests
