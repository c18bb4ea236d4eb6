// The commit contract raced: GPU fault threads (find_or_insert, get_pages, pages_valid under
// the notifier lock, commit or -EAGAIN) against CPU threads changing the page tables with
// munmap + mmap, mprotect, mremap, fork and MADV_DONTNEED. Afterwards, with nothing in
// flight, every committed GPU PTE must match the CPU page table (check_ptes), and after a
// final fault of everything the GPU must read exactly what the CPU reads. Seeded: the seed is
// printed and GPUSVM_SEED replays it.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "tests/svm/svm_test_util.h"

namespace gpusvm::svm::testing {
namespace {

using SvmRaceTest = SvmTest;

uint64_t test_seed() {
  if (const char* s = std::getenv("GPUSVM_SEED")) return std::strtoull(s, nullptr, 0);
  return std::random_device{}();
}

TEST_F(SvmRaceTest, CommitContractAgainstCpuPageTableChanges) {
  const uint64_t seed = test_seed();
  std::printf("seed %llu (GPUSVM_SEED replays)\n", static_cast<unsigned long long>(seed));
  make_gpu({.notifier_size = 4 * k2M});
  constexpr uint64_t kLen = 8 * k2M;
  constexpr int kGpuThreads = 3;
  constexpr int kRounds = 15;
  constexpr int kEpochs = 12;
  map_at(kBase, kLen, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_pages(*as, kBase, kLen, 1);
  gpu->commit_delay_us = 20;  // widen the get_pages -> commit window
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> faults_ok{0};
  // One CPU-side change (the CPU side is one thread, so the layout stays restorable).
  auto cpu_change = [&](std::mt19937_64& rng, int round) {
    const mm::Va b = kBase + (rng() % (kLen / k2M)) * k2M;
    const mm::Va sub = b + (rng() % 32) * k64K;
    switch (rng() % 5) {
      case 0:  // munmap part of a block and map it again (fresh zero pages)
        ASSERT_EQ(as->munmap(sub, k64K), 0);
        ASSERT_TRUE(as->mmap(sub, k64K, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).ok());
        break;
      case 1:  // mprotect a block read-only and back
        ASSERT_EQ(as->mprotect(b, k2M, PROT_READ), 0);
        ASSERT_EQ(as->mprotect(b, k2M, PROT_READ | PROT_WRITE), 0);
        break;
      case 2:  // MADV_DONTNEED part of a block, then a CPU write
        ASSERT_EQ(as->madvise(sub, k64K, MADV_DONTNEED), 0);
        ASSERT_EQ(mm::cpu::store<uint64_t>(*as, sub, pattern(sub, round)), 0);
        break;
      case 3: {  // fork, a parent write (COW), the child exits
        Result<std::unique_ptr<mm::AddressSpace>> child = as->fork();
        ASSERT_TRUE(child.ok());
        ASSERT_EQ(mm::cpu::store<uint64_t>(*as, sub, pattern(sub, round)), 0);
        (*child)->exit();
        break;
      }
      case 4: {  // mremap a 64 KiB piece away and back (UNMAP both ways)
        const mm::Va away = kBase + kLen + 2 * k2M;
        Result<mm::Va> m = as->mremap(sub, k64K, k64K, MREMAP_MAYMOVE | MREMAP_FIXED, away);
        ASSERT_TRUE(m.ok()) << m.error();
        m = as->mremap(away, k64K, k64K, MREMAP_MAYMOVE | MREMAP_FIXED, sub);
        ASSERT_TRUE(m.ok()) << m.error();
        break;
      }
    }
  };
  // Epochs: GPU threads fault while the CPU thread changes page tables; at the end of each
  // the GPU threads stop (their last commits race the CPU's last changes), and with nothing
  // in flight every committed PTE must agree with the CPU page table.
  std::mt19937_64 rng(seed ^ 0xc0ffee);
  for (int epoch = 0; epoch < kEpochs; epoch++) {
    stop.store(false);
    std::vector<std::thread> threads;
    for (int t = 0; t < kGpuThreads; t++) {
      threads.emplace_back([&, t] {
        std::mt19937_64 trng(seed + t + 1000 * epoch);
        while (!stop.load(std::memory_order_relaxed)) {
          const mm::Va va = kBase + (trng() % (kLen / k4K)) * k4K;
          const int rc = gpu->fault(va, trng() & 1);
          // Allowed outcomes while the CPU side churns: mapped, no VMA, read-only, gone.
          if (rc == 0) {
            faults_ok.fetch_add(1, std::memory_order_relaxed);
          } else if (rc != -ENOENT && rc != -EPERM && rc != -EFAULT && rc != -EAGAIN &&
                     rc != -EBUSY) {
            ADD_FAILURE() << "fault at " << std::hex << va << ": " << std::dec << rc;
          }
        }
      });
    }
    for (int round = 0; round < kRounds; round++) cpu_change(rng, epoch * kRounds + round);
    stop.store(true);
    for (auto& t : threads) t.join();
    ASSERT_EQ(gpu->check_ptes(), 0) << "epoch " << epoch;
  }
  gpu->commit_delay_us = 0;
  std::printf("faults %llu, -EAGAIN %llu, invalidations %llu\n",
              static_cast<unsigned long long>(faults_ok.load()),
              static_cast<unsigned long long>(gpu->eagain.load()),
              static_cast<unsigned long long>(gpu->invalidations.load()));
  EXPECT_GT(faults_ok.load(), 0u);
  // Fault everything for writing and compare every page's data.
  for (mm::Va va = kBase; va < kBase + kLen; va += k4K) {
    ASSERT_EQ(gpu->fault(va, true), 0) << std::hex << va;
  }
  EXPECT_EQ(gpu_matches_cpu(kBase, kLen), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

}  // namespace
}  // namespace gpusvm::svm::testing
