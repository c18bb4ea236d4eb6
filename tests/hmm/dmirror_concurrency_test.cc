// dmirror under concurrency: device threads (READ / WRITE / MIGRATE_TO_DEV / MIGRATE_TO_SYS,
// two of them on one file, one on a second file of the same device, one on the other device)
// race with CPU threads storing to the same pages and with a thread that mprotects part of
// the buffer and munmaps / re-mmaps another part. Seeded (printed), bounded by op counts.
//
// What makes the result checkable: every writer - CPU or device - writes the same value to a
// given word, value(va, word), which names the page it belongs to. So at any time each word
// must be 0 (never written since the page was mapped) or its own value; a device read or a
// store that went to a stale or wrong frame shows up as a foreign value. In the region that
// is never unmapped, a word that some writer is known to have written must hold its value at
// the end (no write lost by a migration or a stale device mapping).
//
// The CPU threads store with atomic exchanges and the device moves bytes as atomic words
// (drivers/dmirror/page_copy.h), so the races are the model's, not C++ data races: the test
// runs clean under TSan.
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>

#include "gpusvm/mm/address_space.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

constexpr uint64_t kWordsPerPage = kPageSize / sizeof(uint64_t);
constexpr uint64_t kStablePages = 48;  // never unmapped; the first 16 are mprotect-toggled
constexpr uint64_t kToggledPages = 16;
constexpr uint64_t kChurnPages = 16;   // munmap + mmap(MAP_FIXED) again and again
constexpr uint64_t kPages = kStablePages + kChurnPages;
#ifdef GPUSVM_TSAN
constexpr int kDeviceOps = 60;
constexpr int kCpuOps = 1500;
constexpr int kChaosOps = 40;
#else
constexpr int kDeviceOps = 300;
constexpr int kCpuOps = 8000;
constexpr int kChaosOps = 200;
#endif

uint64_t value(Va page_va, uint64_t word) { return (1ULL << 63) | ((page_va >> kPageShift) << 16) | (word + 1); }

class DmirrorConcurrency : public ::testing::Test, protected HmmMachine {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(start()); }
  void TearDown() override { stop(); }
};

struct Shared {
  Va base = 0;
  std::atomic<bool> device_wrote[kStablePages] = {};  // a device WRITE covering the page succeeded
  std::atomic<int> unexpected{0};
};

// Checks a buffer the device read for [va, va + n pages): every word 0 or its own value.
int check_read(const std::vector<uint64_t>& buf, Va va, uint64_t n) {
  int bad = 0;
  for (uint64_t p = 0; p < n; p++) {
    for (uint64_t w = 0; w < kWordsPerPage; w++) {
      const uint64_t v = buf[p * kWordsPerPage + w];
      if (v != 0 && v != value(va + p * kPageSize, w)) {
        if (bad++ < 3) ADD_FAILURE() << "device read " << std::hex << v << " at page " << va + p * kPageSize;
      }
    }
  }
  return bad;
}

void device_thread(devfs::Process& proc, int fd, Shared& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> buf(16 * kWordsPerPage);
  for (int op = 0; op < kDeviceOps; op++) {
    const uint64_t n = 1 + rng() % 16;
    const uint64_t first = rng() % (kPages - n + 1);
    const Va va = s.base + first * kPageSize;
    struct hmm_dmirror_cmd cmd{};
    cmd.addr = va;
    cmd.ptr = reinterpret_cast<uintptr_t>(buf.data());
    cmd.npages = n;
    // Now and then the device gives all its memory back (RELEASE) while everything runs: its
    // pagemap goes away under migrations and faults waiting on them.
    const int kind = rng() % 64 == 0 ? 4 : static_cast<int>(rng() % 4);
    int rc;
    switch (kind) {
      case 0:  // READ
        rc = devfs::ioctl(proc, fd, HMM_DMIRROR_READ, &cmd);
        if (rc == 0) check_read(buf, va, n);
        if (rc != 0 && rc != -EFAULT && rc != -EBUSY) s.unexpected++;
        break;
      case 1: {  // WRITE
        for (uint64_t p = 0; p < n; p++) {
          for (uint64_t w = 0; w < kWordsPerPage; w++) buf[p * kWordsPerPage + w] = value(va + p * kPageSize, w);
        }
        rc = devfs::ioctl(proc, fd, HMM_DMIRROR_WRITE, &cmd);
        if (rc == 0) {
          for (uint64_t p = first; p < first + n && p < kStablePages; p++) s.device_wrote[p] = true;
        } else if (rc != -EFAULT && rc != -EPERM && rc != -EBUSY) {
          s.unexpected++;
        }
        break;
      }
      case 2:  // MIGRATE_TO_DEV: -ENOENT when an invalidation raced the read-back
        rc = devfs::ioctl(proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, &cmd);
        if (rc == 0) check_read(buf, va, n);
        if (rc != 0 && rc != -EINVAL && rc != -ENOENT && rc != -EBUSY) s.unexpected++;
        break;
      case 3:  // MIGRATE_TO_SYS
        rc = devfs::ioctl(proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, &cmd);
        if (rc != 0 && rc != -EINVAL && rc != -ENOMEM) s.unexpected++;
        break;
      default:  // RELEASE
        rc = devfs::ioctl(proc, fd, HMM_DMIRROR_RELEASE, &cmd);
        if (rc != 0 && rc != -EBUSY) s.unexpected++;
        break;
    }
    if (rc != 0 && rc != -EFAULT && rc != -EPERM && rc != -EINVAL && rc != -ENOENT &&
        rc != -EBUSY && rc != -ENOMEM) {
      ADD_FAILURE() << "op " << kind << " at " << std::hex << va << " npages " << std::dec << n
                    << ": " << rc;
    }
  }
}

// CPU thread t owns the words w with w % nthreads == t; records which stable words it wrote.
void cpu_thread(devfs::Process& proc, Shared& s, int t, int nthreads, uint64_t seed,
                std::vector<uint8_t>* wrote) {
  std::mt19937_64 rng(seed);
  for (int op = 0; op < kCpuOps; op++) {
    const uint64_t p = rng() % kPages;
    const uint64_t w = (rng() % (kWordsPerPage / nthreads)) * nthreads + t;
    const Va page = s.base + p * kPageSize;
    Result<uint64_t> old = mm::cpu::atomic_exchange(proc.mm(), page + w * sizeof(uint64_t), value(page, w));
    if (old.ok()) {
      if (*old != 0 && *old != value(page, w)) ADD_FAILURE() << "CPU found " << std::hex << *old << " at page " << page;
      if (p < kStablePages) (*wrote)[p * kWordsPerPage + w] = 1;
    } else if (old.error() != -EFAULT) {
      ADD_FAILURE() << "CPU store: " << old.error();
    }
  }
}

void chaos_thread(devfs::Process& proc, Shared& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const Va churn = s.base + kStablePages * kPageSize;
  for (int op = 0; op < kChaosOps; op++) {
    if (rng() % 2) {
      EXPECT_EQ(proc.mm().mprotect(s.base, kToggledPages * kPageSize, PROT_READ), 0);
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
      EXPECT_EQ(proc.mm().mprotect(s.base, kToggledPages * kPageSize, PROT_READ | PROT_WRITE), 0);
    } else {
      EXPECT_EQ(proc.mm().munmap(churn, kChurnPages * kPageSize), 0);
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
      Result<Va> r = proc.mm().mmap(churn, kChurnPages * kPageSize, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED);
      EXPECT_TRUE(r.ok() && *r == churn);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
  }
}

TEST_F(DmirrorConcurrency, DeviceCpuUnmapProtectRace) {
  // GPUSVM_TEST_SEED=<n> replays a run.
  const char* env = std::getenv("GPUSVM_TEST_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 0) : std::random_device{}();
  std::printf("DmirrorConcurrency seed %llu (GPUSVM_TEST_SEED to replay)\n", static_cast<unsigned long long>(seed));
  SCOPED_TRACE("seed " + std::to_string(seed));
  Shared s;
  Result<Va> base = proc->mm().mmap(0, kPages * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(base.ok());
  s.base = *base;
  const int fd_a = hmm_open(*proc, 0);
  const int fd_a2 = hmm_open(*proc, 0);
  const int fd_b = hmm_open(*proc, 1);
  ASSERT_GE(fd_a, 0);
  ASSERT_GE(fd_a2, 0);
  ASSERT_GE(fd_b, 0);

  constexpr int kCpuThreads = 2;
  std::vector<std::vector<uint8_t>> wrote(kCpuThreads, std::vector<uint8_t>(kStablePages * kWordsPerPage));
  std::vector<std::thread> threads;
  threads.emplace_back(device_thread, std::ref(*proc), fd_a, std::ref(s), seed + 1);
  threads.emplace_back(device_thread, std::ref(*proc), fd_a, std::ref(s), seed + 2);
  threads.emplace_back(device_thread, std::ref(*proc), fd_a2, std::ref(s), seed + 3);
  threads.emplace_back(device_thread, std::ref(*proc), fd_b, std::ref(s), seed + 4);
  for (int t = 0; t < kCpuThreads; t++) {
    threads.emplace_back(cpu_thread, std::ref(*proc), std::ref(s), t, kCpuThreads, seed + 10 + t, &wrote[t]);
  }
  threads.emplace_back(chaos_thread, std::ref(*proc), std::ref(s), seed + 20);
  for (auto& t : threads) t.join();
  EXPECT_EQ(s.unexpected.load(), 0);

  // Every byte of the buffer: stable words known written hold their value, every other word
  // is 0 or its value.
  std::vector<uint64_t> all(kPages * kWordsPerPage);
  ASSERT_EQ(mm::cpu::copy_out(proc->mm(), s.base, all.data(), kPages * kPageSize), 0);
  int bad = 0;
  for (uint64_t p = 0; p < kPages; p++) {
    const Va page = s.base + p * kPageSize;
    for (uint64_t w = 0; w < kWordsPerPage; w++) {
      const uint64_t v = all[p * kWordsPerPage + w];
      bool must = false;
      if (p < kStablePages) {
        must = s.device_wrote[p] || wrote[w % kCpuThreads][p * kWordsPerPage + w];
      }
      const bool ok = must ? v == value(page, w) : (v == 0 || v == value(page, w));
      if (!ok && bad++ < 5) {
        ADD_FAILURE() << "page " << p << " word " << w << ": " << std::hex << v << (must ? " (written)" : "");
      }
    }
  }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(devfs::close(*proc, fd_a), 0);
  EXPECT_EQ(devfs::close(*proc, fd_a2), 0);
  EXPECT_EQ(devfs::close(*proc, fd_b), 0);
  EXPECT_EQ(proc->mm().munmap(s.base, kPages * kPageSize), 0);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
