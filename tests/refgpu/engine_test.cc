// Engines, exec queues, the fault queue and its handler threads: in-order jobs, several queues
// on several engines faulting concurrently, error fences that leave the VM usable, queue
// destruction and device removal with jobs in flight (every fence completes).
#include "drivers/refgpu/engine.h"

#include <gtest/gtest.h>

#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "drivers/refgpu/fault_queue.h"
#include "refgpu_test_util.h"

namespace gpusvm::refgpu {
namespace {

using testing::Batch;
using testing::kVa;
using testing::Rig;

constexpr auto kWait = std::chrono::seconds(30);

// Writes a batch into freshly mapped pages at va.
void place(Rig& r, uint64_t va, const Batch& b) {
  r.map_system(va, (b.bytes.size() + kSZ4K - 1) / kSZ4K * kSZ4K);
  r.write(va, b.bytes.data(), b.bytes.size());
}

TEST(Engine, JobsOfOneQueueRunInOrder) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  Engine e(0, nullptr);
  auto q = e.create_queue(1, r.mmu.get());
  ASSERT_TRUE(q.ok());
  std::vector<std::shared_ptr<Fence>> fences;
  for (uint32_t i = 0; i < 20; i++) {
    // Job i checks that job i-1 left i there, then writes i + 1.
    Batch b;
    b.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ, 0, kVa,
                                  i, ~0ull, 0})
        .store_dword(kVa, i + 1)
        .end();
    const uint64_t bva = kVa + (1ull << 20) + i * kSZ4K;
    place(r, bva, b);
    auto f = (*q)->submit(bva);
    ASSERT_TRUE(f.ok());
    fences.push_back(*f);
  }
  for (auto& f : fences) EXPECT_EQ(f->wait(kWait), 0);
  EXPECT_EQ(r.read<uint32_t>(kVa), 20u);
  EXPECT_EQ(e.stats().jobs.get(), 20u);
}

// Four queues on two engines, every job faulting on pages nobody mapped yet (the same pages
// from every queue), serviced by a pool of three handler threads. Every job's data is
// checked, and duplicate faults on one page are each completed.
TEST(Engine, SeveralQueuesFaultTheSameRangeConcurrently) {
  Rig r;
  FaultQueue fq;
  std::mutex map_mu;
  std::set<uint64_t> mapped;
  FaultHandlers handlers(&fq, 3, [&](const GpuFault& f) {
    std::lock_guard<std::mutex> g(map_mu);  // test-side: one mapper at a time
    const uint64_t page = f.address & ~(kSZ4K - 1);
    if (mapped.insert(page).second) r.map_system(page, kSZ4K);
    return 0;
  });
  Engine e0(0, &fq);
  Engine e1(1, &fq);
  constexpr int kQueues = 4;
  constexpr int kPages = 16;
  const uint64_t data = kVa + (8ull << 20);
  std::vector<std::shared_ptr<ExecQueue>> queues;
  for (int i = 0; i < kQueues; i++) {
    auto q = (i % 2 ? e1 : e0).create_queue(10 + i, r.mmu.get());
    ASSERT_TRUE(q.ok());
    queues.push_back(*q);
  }
  std::vector<std::shared_ptr<Fence>> fences;
  for (int i = 0; i < kQueues; i++) {
    // Queue i: an atomic inc on every page's first qword, then its own qword in each page.
    Batch b;
    for (int p = 0; p < kPages; p++) {
      b.atomic(REFGPU_ATOMIC_OP_INC, data + p * kSZ4K, 0, 0, REFGPU_CMD_FLAG_QWORD);
      b.store_qword(data + p * kSZ4K + 8 * (1 + i), (uint64_t{0xa0} + i) << 32 | p);
    }
    b.end();
    const uint64_t bva = kVa + (1ull << 20) + i * 4 * kSZ4K;
    place(r, bva, b);
    auto f = queues[i]->submit(bva);
    ASSERT_TRUE(f.ok());
    fences.push_back(*f);
  }
  for (auto& f : fences) ASSERT_EQ(f->wait(kWait), 0);
  for (int p = 0; p < kPages; p++) {
    EXPECT_EQ(r.read<uint64_t>(data + p * kSZ4K), uint64_t{kQueues}) << "page " << p;
    for (int i = 0; i < kQueues; i++)
      EXPECT_EQ(r.read<uint64_t>(data + p * kSZ4K + 8 * (1 + i)), (uint64_t{0xa0} + i) << 32 | p);
  }
  EXPECT_GE(fq.stats().raised.get(), uint64_t{kPages});
  EXPECT_EQ(fq.stats().raised.get(), fq.stats().serviced.get());
  EXPECT_EQ(fq.records(1, false).size(), fq.stats().raised.get());
}

// A job whose fault cannot be serviced ends with an error fence; the next job on the same
// queue (and VM) runs normally.
TEST(Engine, ErrorFenceLeavesTheQueueAndVmUsable) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  FaultQueue fq;
  FaultHandlers handlers(&fq, 1, [](const GpuFault&) { return -EFAULT; });
  Engine e(0, &fq);
  auto q = e.create_queue(1, r.mmu.get());
  ASSERT_TRUE(q.ok());
  Batch bad;
  bad.store_dword(kVa + (40ull << 20), 1).end();
  Batch good;
  good.store_dword(kVa, 9).end();
  place(r, kVa + (1ull << 20), bad);
  place(r, kVa + (2ull << 20), good);
  auto f1 = (*q)->submit(kVa + (1ull << 20));
  auto f2 = (*q)->submit(kVa + (2ull << 20));
  ASSERT_TRUE(f1.ok() && f2.ok());
  EXPECT_EQ((*f1)->wait(kWait), -EFAULT);
  EXPECT_EQ((*f2)->wait(kWait), 0);
  EXPECT_EQ(r.read<uint32_t>(kVa), 9u);
  EXPECT_EQ(e.stats().job_errors.get(), 1u);
  auto recs = fq.records(1, true);
  ASSERT_EQ(recs.size(), 1u);
  EXPECT_EQ(recs[0].status, -EFAULT);
  EXPECT_EQ(recs[0].fault.address, kVa + (40ull << 20));
  EXPECT_TRUE(fq.records(1, false).empty()) << "cleared";
}

// Destroying a queue: queued jobs get -ECANCELED, the running one (polling a value that never
// comes) stops with -ECANCELED, later submits fail.
TEST(Engine, DestroyQueueCancelsQueuedAndRunningJobs) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  Engine e(0, nullptr);
  auto q = e.create_queue(1, r.mmu.get());
  ASSERT_TRUE(q.ok());
  Batch spin;
  spin.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                   REFGPU_LOAD_COMPARE_FLAG_WAIT, kVa, 1, ~0ull, 0})
      .end();
  place(r, kVa + (1ull << 20), spin);
  auto running = (*q)->submit(kVa + (1ull << 20));
  auto queued = (*q)->submit(kVa + (1ull << 20));
  ASSERT_TRUE(running.ok() && queued.ok());
  while ((*q)->queued() != 1) std::this_thread::yield();  // the first one started
  ASSERT_EQ(e.destroy_queue(*q), 0);
  EXPECT_EQ((*running)->wait(kWait), -ECANCELED);
  EXPECT_EQ((*queued)->wait(kWait), -ECANCELED);
  EXPECT_EQ((*q)->submit(kVa + (1ull << 20)).error(), -ECANCELED);
  EXPECT_EQ(e.destroy_queue(*q), -ENOENT);
}

// Device removal with jobs in flight: one job stalled on a fault nobody services, others
// queued behind it and on a second engine. Shutting the fault queue down and stopping the
// engines completes every fence, with -ENODEV for each job that could not finish.
TEST(Engine, DeviceRemovalCompletesEveryFence) {
  Rig r;
  r.map_system(kVa, kSZ4K);
  FaultQueue fq;  // no handlers: the fault stays pending
  auto e0 = std::make_unique<Engine>(0, &fq);
  auto e1 = std::make_unique<Engine>(1, &fq);
  auto q0 = e0->create_queue(1, r.mmu.get());
  auto q1 = e1->create_queue(2, r.mmu.get());
  ASSERT_TRUE(q0.ok() && q1.ok());
  Batch faulting;
  faulting.store_dword(kVa + (40ull << 20), 1).end();
  place(r, kVa + (1ull << 20), faulting);
  std::vector<std::shared_ptr<Fence>> fences;
  for (int i = 0; i < 3; i++) fences.push_back(*(*q0)->submit(kVa + (1ull << 20)));
  for (int i = 0; i < 3; i++) fences.push_back(*(*q1)->submit(kVa + (1ull << 20)));
  while (fq.pending() < 2) std::this_thread::yield();  // both engines stalled on a fault
  fq.shutdown(-ENODEV);
  e0->stop(-ENODEV);
  e1->stop(-ENODEV);
  for (auto& f : fences) {
    ASSERT_TRUE(f->signaled());
    EXPECT_EQ(f->status(), -ENODEV);
  }
  EXPECT_EQ((*q0)->submit(kVa).error(), -ENODEV);
  EXPECT_EQ(e0->create_queue(3, r.mmu.get()).error(), -ENODEV);
}

TEST(FaultQueue, RaiseAfterShutdownFailsAtOnceAndPopReturnsNothing) {
  FaultQueue fq;
  fq.shutdown(-ENODEV);
  EXPECT_EQ(fq.raise(GpuFault{}), -ENODEV);
  EXPECT_EQ(fq.pop(std::chrono::milliseconds(1)), nullptr);
}

TEST(FaultQueue, UnservicedRaiseTimesOut) {
  const auto saved = hang_timeout();
  set_hang_timeout(std::chrono::milliseconds(50));
  FaultQueue fq;
  EXPECT_EQ(fq.raise(GpuFault{}), -ETIMEDOUT);
  set_hang_timeout(saved);
  EXPECT_EQ(fq.pending(), 0u) << "a timed-out fault is taken back";
  EXPECT_EQ(fq.stats().failed.get(), 1u);
}

TEST(Fence, FirstSignalWinsAndWaitTimesOut) {
  Fence f;
  EXPECT_EQ(f.wait(std::chrono::milliseconds(1)), -ETIME);
  EXPECT_TRUE(f.signal(-EIO));
  EXPECT_FALSE(f.signal(0));
  EXPECT_EQ(f.wait(std::chrono::milliseconds(1)), -EIO);
}

}  // namespace
}  // namespace gpusvm::refgpu
