// get_pages and scan_mm over device memory (with the provider's TestVram): pages of our own
// owner mapped in place, a foreign owner's faulted back to RAM, mixed placement, a peer of
// the owner group mapped over the interconnect, device_map failure, range_evict, and an
// eviction while a get_pages is in flight (the owner-tagged MIGRATE path).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "gpusvm/base/errno.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/svm/devmem.h"
#include "tests/svm/svm_test_util.h"
#include "tests/svm/test_vram.h"

namespace gpusvm::svm::testing {
namespace {

class SvmDevmemTest : public SvmTest {
 protected:
  void SetUp() override {
    SvmTest::SetUp();
    vram = std::make_unique<TestVram>(mem.get(), 8 * mm::kPagesPerPmd, "vram0");
    ASSERT_TRUE(vram->ok());
  }
  void TearDown() override {
    if (gpu) {
      gpu->unbind_all();
      EXPECT_EQ(gpu->device()->dma_mappings(), 0u);
      gpu.reset();
    }
    EXPECT_EQ(vram->live_device_maps.load(), 0);
    if (peer) {
      EXPECT_EQ(peer->live_device_maps.load(), 0);
    }
    if (as) as->exit();  // frees the device pages: allocations release
    peer.reset();
    vram.reset();
    SvmTest::TearDown();
  }
  const void* owner() { return vram->pagemap()->owner(); }
  void make_vram_gpu(const void* own = nullptr) {
    make_gpu({.owner = own ? own : owner(), .use_devices = {vram->device()}});
  }
  int migrate(mm::Va va, uint64_t len, TestVram* to = nullptr) {
    TestVram* v = to ? to : vram.get();
    TestDevmem* dm = v->alloc_devmem(as.get(), len);
    if (!dm) return -ENOMEM;
    return migrate_to_devmem(dm, as.get(), va, va + len, {});
  }
  ScanResult scan(mm::Va va, const Pagemap* pm) {
    RangeRef r = find(va);
    return gpu->gpusvm()->scan_mm(r.get(), owner(), pm);
  }
  std::unique_ptr<TestVram> vram;
  std::unique_ptr<TestVram> peer;
};

TEST_F(SvmDevmemTest, OwnDevicePagesAreMappedInPlaceAndEvicted) {
  make_vram_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 1);
  ASSERT_EQ(migrate(kBase, k2M), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  {
    ReadLock g(&gpu->gpusvm()->notifier_lock());
    EXPECT_TRUE(r->pages().has_devmem_pages());
    EXPECT_EQ(r->pages().pagemap(), vram->pagemap());
    EXPECT_EQ(r->pages().addr(0).proto, PagemapAddrProto::kDeviceLocal);
  }
  EXPECT_EQ(gpu->device()->dma_mappings(), 0u) << "device pages need no system DMA mapping";
  EXPECT_GT(vram->live_device_maps.load(), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kEqual);
  // Eviction: the pages come back; the GPU mapping of them was zapped on the way.
  ASSERT_EQ(gpu->gpusvm()->range_evict(r.get()), 0);
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  EXPECT_EQ(vram->live_device_maps.load(), 0);
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kSystem);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 1), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_FALSE(r->pages().has_devmem_pages());
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
}

TEST_F(SvmDevmemTest, ForeignOwnerPagesAreFaultedBackToRam) {
  static int other_owner;
  make_vram_gpu(&other_owner);
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 2);
  ASSERT_EQ(migrate(kBase, k2M), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  EXPECT_FALSE(r->pages().has_devmem_pages());
  EXPECT_EQ(gpu->device()->dma_mappings(), k2M / k4K);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 2), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

TEST_F(SvmDevmemTest, MixedPlacementNeedsAllowMixed) {
  make_vram_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 3);
  ASSERT_EQ(migrate(kBase, k64K), 0);
  {
    Result<RangeRef> r = insert(kBase);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ((*r)->size(), k2M);
  }
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kMixed);
  RangeRef r = find(kBase);
  Ctx c;
  c.device_private_page_owner = owner();
  {
    MutexLock g(&gpu->vm_lock());
    EXPECT_EQ(gpu->gpusvm()->range_get_pages(r.get(), c), -EOPNOTSUPP);
    c.devmem_only = true;
    c.allow_mixed = true;
    EXPECT_EQ(gpu->gpusvm()->range_get_pages(r.get(), c), -EFAULT);
    c.devmem_only = false;
    ASSERT_EQ(gpu->gpusvm()->range_get_pages(r.get(), c), 0);
    EXPECT_TRUE(r->pages().has_devmem_pages());
  }
  EXPECT_EQ(gpu->device()->dma_mappings(), k2M / k4K - k64K / k4K);
  {
    Ctx ic;
    ic.in_notifier = false;
    gpu->gpusvm()->range_unmap_pages(r.get(), ic);
  }
  // The driver's answer to -EOPNOTSUPP: evict and retry, all in system memory then.
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_FALSE(r->pages().has_devmem_pages());
  EXPECT_GE(r->stats().evictions.get(), 1u);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 3), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
}

// Two VRAMs in one owner group with a link: our device maps the peer's pages in place.
TEST_F(SvmDevmemTest, PeerOwnerPagesMapOverTheInterconnect) {
  peer = std::make_unique<TestVram>(mem.get(), 4 * mm::kPagesPerPmd, "vram1", owner());
  ASSERT_TRUE(peer->ok());
  peer->add_peer(vram->device());
  make_vram_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 4);
  ASSERT_EQ(migrate(kBase, k2M, peer.get()), 0);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  RangeRef r = find(kBase);
  {
    ReadLock g(&gpu->gpusvm()->notifier_lock());
    EXPECT_EQ(r->pages().pagemap(), peer->pagemap());
    EXPECT_EQ(r->pages().addr(0).proto, PagemapAddrProto::kDeviceInterconnect);
  }
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kOther);
  EXPECT_EQ(scan(kBase, peer->pagemap()), ScanResult::kEqual);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// Pages of two pagemaps of one owner in one range: scan_mm says mixed_device, get_pages
// refuses (one pagemap per Pages object) even with allow_mixed; an unpopulated range scans
// as such.
TEST_F(SvmDevmemTest, TwoPagemapsInOneRange) {
  peer = std::make_unique<TestVram>(mem.get(), 4 * mm::kPagesPerPmd, "vram1", owner());
  ASSERT_TRUE(peer->ok());
  peer->add_peer(vram->device());
  make_vram_gpu();
  map_at(kBase, 2 * k2M);
  fill_pages(*as, kBase, k2M, 8);
  ASSERT_EQ(migrate(kBase, k2M / 2), 0);
  ASSERT_EQ(migrate(kBase + k2M / 2, k2M / 2, peer.get()), 0);
  ASSERT_TRUE(insert(kBase).ok());
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kMixedDevice);
  RangeRef r = find(kBase);
  Ctx c;
  c.device_private_page_owner = owner();
  c.allow_mixed = true;
  {
    MutexLock g(&gpu->vm_lock());
    EXPECT_EQ(gpu->gpusvm()->range_get_pages(r.get(), c), -EOPNOTSUPP);
  }
  EXPECT_EQ(vram->live_device_maps.load() + peer->live_device_maps.load(), 0);
  // An untouched 2 MiB VMA: a 2 MiB range over nothing.
  Result<RangeRef> u = insert(kBase + k2M);
  ASSERT_TRUE(u.ok());
  EXPECT_EQ((*u)->size(), k2M);
  EXPECT_EQ(scan(kBase + k2M, vram->pagemap()), ScanResult::kUnpopulated);
  // The driver's fault evicts and maps everything from system memory.
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_EQ(scan(kBase, vram->pagemap()), ScanResult::kSystem);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 8), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
}

// device_map failing part-way rolls back: nothing mapped, the next try works.
TEST_F(SvmDevmemTest, DeviceMapFailureRollsBack) {
  make_vram_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 5);
  ASSERT_EQ(migrate(kBase, k2M), 0);
  vram->fail_device_map.arm(1);
  EXPECT_EQ(gpu->fault(kBase, true), -EFAULT);
  EXPECT_EQ(vram->live_device_maps.load(), 0);
  EXPECT_EQ(gpu->valid_ptes(), 0u);
  ASSERT_EQ(gpu->fault(kBase, true), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

// Eviction while get_pages is in flight:
//   1. fault thread: hmm_range_fault found our device pages, stops at svm.get_pages.faulted
//   2. test thread: range_evict migrates them to RAM; the MIGRATE invalidation carries our
//      owner and the range holds no mapping, so the driver's invalidate is skipped, but the
//      sequence is bumped
//   3. fault thread: read_retry is true: retry, now mapping the system pages
// Were the skip to drop the sequence bump, step 3 would map freed device pages.
TEST_F(SvmDevmemTest, EvictionWhileGetPagesIsInFlight) {
  make_vram_gpu();
  map_at(kBase, k2M);
  fill_pages(*as, kBase, k2M, 6);
  ASSERT_EQ(migrate(kBase, k2M), 0);
  ASSERT_TRUE(insert(kBase).ok());
  RangeRef r = find(kBase);
  const uint64_t skipped = gpu->gpusvm()->skipped_invalidations();
  sched_point::Pause pause("svm.get_pages.faulted");
  ASSERT_EQ(pause.status(), 0);
  int rc = -1;
  std::thread t([&] { rc = gpu->fault(kBase, true); });
  ASSERT_TRUE(pause.wait_reached());
  ASSERT_EQ(gpu->gpusvm()->range_evict(r.get()), 0);
  EXPECT_GT(gpu->gpusvm()->skipped_invalidations(), skipped);
  pause.release();
  t.join();
  ASSERT_EQ(rc, 0);
  EXPECT_GE(r->stats().get_pages_retries.get(), 1u);
  EXPECT_FALSE(r->pages().has_devmem_pages());
  EXPECT_EQ(vram->live_device_maps.load(), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, k2M), 0);
  EXPECT_EQ(verify_pages(*as, kBase, k2M, 6), 0);
}

}  // namespace
}  // namespace gpusvm::svm::testing

namespace gpusvm::svm::testing {
namespace {

// The commit contract raced against a second device's migrations: GPU fault threads (of a
// device with its own owner) against a thread migrating random chunks into another owner's
// VRAM and a CPU thread writing and dropping pages. Migrations carry the other owner, so
// every one is a full invalidation for us, and our faults bring the pages back to RAM.
// After each epoch every committed PTE must match the CPU page table; at the end the GPU
// reads what the CPU reads.
TEST_F(SvmDevmemTest, CommitContractAgainstASecondDevicesMigrations) {
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  static int our_owner;
  make_gpu({.owner = &our_owner});
  constexpr uint64_t kLen = 4 * k2M;
  map_at(kBase, kLen);
  fill_pages(*as, kBase, kLen, 1);
  gpu->commit_delay_us = 20;
  std::atomic<uint64_t> migrated{0}, faults_ok{0};
  for (int epoch = 0; epoch < 8; epoch++) {
    std::atomic<bool> stop{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 2; t++) {
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(seed + t + 100 * epoch);
        while (!stop.load(std::memory_order_relaxed)) {
          const mm::Va va = kBase + (rng() % (kLen / k4K)) * k4K;
          const int rc = gpu->fault(va, rng() & 1);
          if (rc == 0) {
            faults_ok.fetch_add(1, std::memory_order_relaxed);
          } else if (rc != -EAGAIN && rc != -EBUSY) {
            ADD_FAILURE() << "fault " << std::hex << va << ": " << std::dec << rc;
          }
        }
      });
    }
    std::mt19937_64 rng(seed ^ (0x5eed + epoch));
    for (int i = 0; i < 12; i++) {
      const mm::Va b = kBase + (rng() % (kLen / k64K)) * k64K;
      // The second device migrates 64 KiB into its VRAM (best effort: busy pages, exhausted
      // memory and a racing fault are normal outcomes).
      const int rc = migrate(b, k64K);
      if (rc == 0) migrated.fetch_add(1);
      if (rc != 0 && rc != -EBUSY && rc != -ENOMEM && rc != -EAGAIN) {
        ADD_FAILURE() << "migrate " << std::hex << b << ": " << std::dec << rc;
      }
      if (rng() % 3 == 0) {
        ASSERT_EQ(as->madvise(b + k4K, k4K, MADV_DONTNEED), 0);
        ASSERT_EQ(mm::cpu::store<uint64_t>(*as, b + k4K, pattern(b, epoch)), 0);
      }
    }
    stop.store(true);
    for (auto& t : threads) t.join();
    ASSERT_EQ(gpu->check_ptes(), 0) << "epoch " << epoch;
  }
  gpu->commit_delay_us = 0;
  std::printf("migrations %llu, faults %llu, -EAGAIN %llu\n",
              static_cast<unsigned long long>(migrated.load()),
              static_cast<unsigned long long>(faults_ok.load()),
              static_cast<unsigned long long>(gpu->eagain.load()));
  EXPECT_GT(migrated.load(), 0u);
  for (mm::Va va = kBase; va < kBase + kLen; va += k4K) ASSERT_EQ(gpu->fault(va, true), 0);
  EXPECT_EQ(gpu_matches_cpu(kBase, kLen), 0);
  EXPECT_EQ(gpu->check_ptes(), 0);
}

}  // namespace
}  // namespace gpusvm::svm::testing
