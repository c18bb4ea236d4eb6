// The ISA interpreter: every instruction with its data checked, its error cases, faults that
// are serviced and replayed, faults that fail the job, and the fetch of the batch itself
// through the GPU MMU.
#include "drivers/refgpu/isa.h"

#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <thread>
#include <vector>

#include "refgpu_test_util.h"

namespace gpusvm::refgpu {
namespace {

using testing::Batch;
using testing::kVa;
using testing::Rig;

constexpr uint64_t kBatchVa = kVa + (32ull << 20);
constexpr uint64_t kData = kVa;

// A fault sink run inline by the faulting thread: calls `service` and records the fault.
class InlineSink : public FaultSink {
 public:
  explicit InlineSink(std::function<int(const GpuFault&)> s) : service_(std::move(s)) {}
  int raise(const GpuFault& f) override {
    faults.push_back(f);
    return service_(f);
  }
  std::vector<GpuFault> faults;

 private:
  std::function<int(const GpuFault&)> service_;
};

class Isa : public ::testing::Test {
 protected:
  void SetUp() override {
    r.map_system(kBatchVa, 16 * kSZ4K);
    r.map_system(kData, 16 * kSZ4K);
  }
  int run(Batch& b, FaultSink* sink = nullptr) {
    r.write(kBatchVa, b.bytes.data(), b.bytes.size());
    JobContext ctx;
    ctx.mmu = r.mmu.get();
    ctx.faults = sink;
    ctx.exec_queue_id = 7;
    ctx.stats = &stats;
    ctx.on_fence_write = [this] { fence_writes++; };
    return execute_batch(ctx, kBatchVa);
  }
  Rig r;
  IsaStats stats;
  int fence_writes = 0;
};

TEST_F(Isa, StoreDwordAndQword) {
  Batch b;
  b.store_dword(kData + 4, 0xdeadbeef).store_qword(kData + 8, 0x0123456789abcdefull).end();
  ASSERT_EQ(run(b), 0);
  EXPECT_EQ(r.read<uint32_t>(kData), 0u) << "neighbours untouched";
  EXPECT_EQ(r.read<uint32_t>(kData + 4), 0xdeadbeefu);
  EXPECT_EQ(r.read<uint64_t>(kData + 8), 0x0123456789abcdefull);
  EXPECT_EQ(r.read<uint64_t>(kData + 16), 0u);
  EXPECT_EQ(stats.instructions.get(), 3u);
}

TEST_F(Isa, LoadCompareEveryOpWithMask) {
  uint64_t v = 0x1234'0000'0000'0042ull;
  r.write(kData, &v, 8);
  struct Case {
    uint16_t op;
    uint64_t value;
    bool holds;
  };
  const Case cases[] = {
      {REFGPU_UFENCE_WAIT_OP_EQ, 0x42, true},  {REFGPU_UFENCE_WAIT_OP_EQ, 0x43, false},
      {REFGPU_UFENCE_WAIT_OP_NEQ, 0x43, true}, {REFGPU_UFENCE_WAIT_OP_NEQ, 0x42, false},
      {REFGPU_UFENCE_WAIT_OP_GT, 0x41, true},  {REFGPU_UFENCE_WAIT_OP_GT, 0x42, false},
      {REFGPU_UFENCE_WAIT_OP_GTE, 0x42, true}, {REFGPU_UFENCE_WAIT_OP_GTE, 0x43, false},
      {REFGPU_UFENCE_WAIT_OP_LT, 0x43, true},  {REFGPU_UFENCE_WAIT_OP_LT, 0x42, false},
      {REFGPU_UFENCE_WAIT_OP_LTE, 0x42, true}, {REFGPU_UFENCE_WAIT_OP_LTE, 0x41, false},
  };
  for (const Case& c : cases) {
    Batch b;
    // The mask keeps only the low dword of the qword: the high bits do not take part.
    b.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), c.op, REFGPU_CMD_FLAG_QWORD,
                                  kData, c.value | 0xffff'0000'0000'0000ull, 0xffffffffull, 0})
        .end();
    EXPECT_EQ(run(b), c.holds ? 0 : -EBADMSG) << "op " << c.op << " value " << c.value;
  }
  Batch bad;
  bad.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), 9, 0, kData, 0, ~0ull, 0}).end();
  EXPECT_EQ(run(bad), -EINVAL) << "unknown compare op";
}

TEST_F(Isa, LoadCompareWaitPollsUntilAnotherWriterMakesItTrue) {
  std::atomic<uint64_t>* word = reinterpret_cast<std::atomic<uint64_t>*>(r.host(kData));
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    word->store(5);
  });
  Batch b;
  b.add(refgpu_cmd_load_compare{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), REFGPU_UFENCE_WAIT_OP_EQ,
                                REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT, kData, 5, ~0ull, 0})
      .store_dword(kData + 8, 1)
      .end();
  EXPECT_EQ(run(b), 0);
  writer.join();
  EXPECT_EQ(r.read<uint32_t>(kData + 8), 1u);
}

TEST_F(Isa, AtomicsIncAddCmpxchgWithReturn) {
  uint64_t v = 10;
  r.write(kData, &v, 8);
  uint32_t d = 0xfffffffe;
  r.write(kData + 16, &d, 4);
  Batch b;
  b.atomic(REFGPU_ATOMIC_OP_INC, kData, 0, 0, REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN, kData + 64)
      .atomic(REFGPU_ATOMIC_OP_ADD, kData, 100, 0, REFGPU_CMD_FLAG_QWORD)
      .atomic(REFGPU_ATOMIC_OP_CMPXCHG, kData, 7, 111, REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN, kData + 72)
      .atomic(REFGPU_ATOMIC_OP_CMPXCHG, kData, 9, 1, REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN, kData + 80)
      .atomic(REFGPU_ATOMIC_OP_ADD, kData + 16, 3)  // dword wraps
      .end();
  ASSERT_EQ(run(b), 0);
  EXPECT_EQ(r.read<uint64_t>(kData + 64), 10u) << "INC returned the old value";
  EXPECT_EQ(r.read<uint64_t>(kData + 72), 111u) << "successful CMPXCHG returns the compare value";
  EXPECT_EQ(r.read<uint64_t>(kData + 80), 7u) << "failed CMPXCHG returns the current value";
  EXPECT_EQ(r.read<uint64_t>(kData), 7u);
  EXPECT_EQ(r.read<uint32_t>(kData + 16), 1u);
  EXPECT_EQ(r.read<uint32_t>(kData + 20), 0u) << "a dword atomic stays in its dword";
}

TEST_F(Isa, AtomicsAreAtomicAgainstConcurrentJobs) {
  constexpr int kThreads = 4;
  constexpr int kIncs = 500;
  Batch b;
  for (int i = 0; i < kIncs; i++) b.atomic(REFGPU_ATOMIC_OP_INC, kData, 0, 0, REFGPU_CMD_FLAG_QWORD);
  b.end();
  r.write(kBatchVa, b.bytes.data(), b.bytes.size());
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; t++) {
    ts.emplace_back([&] {
      JobContext ctx;
      ctx.mmu = r.mmu.get();
      EXPECT_EQ(execute_batch(ctx, kBatchVa), 0);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(r.read<uint64_t>(kData), uint64_t{kThreads} * kIncs);
}

TEST_F(Isa, MemsetAndCopyAcrossPagesAndOddEdges) {
  Batch b;
  b.add(refgpu_cmd_memset{REFGPU_CMD_HEADER(REFGPU_OP_MEMSET, 6), 0xa5, kData + 3, 2 * kSZ4K + 10})
      .add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, kData + 5 * kSZ4K + 1, kData + 3,
                           2 * kSZ4K + 10})
      .end();
  ASSERT_EQ(run(b), 0);
  for (uint64_t i = 0; i < 4 * kSZ4K; i++) {
    const uint8_t want = (i >= 3 && i < 3 + 2 * kSZ4K + 10) ? 0xa5 : 0;
    ASSERT_EQ(r.read<uint8_t>(kData + i), want) << "memset byte " << i;
  }
  for (uint64_t i = 0; i < 3 * kSZ4K; i++) {
    const uint8_t want = (i >= 1 && i < 1 + 2 * kSZ4K + 10) ? 0xa5 : 0;
    ASSERT_EQ(r.read<uint8_t>(kData + 5 * kSZ4K + i), want) << "copy byte " << i;
  }
  Batch bad;
  bad.add(refgpu_cmd_copy{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, kData + 8, kData, 16}).end();
  EXPECT_EQ(run(bad), -EINVAL) << "overlapping copy";
  Batch bad2;
  bad2.add(refgpu_cmd_memset{REFGPU_CMD_HEADER(REFGPU_OP_MEMSET, 6), 0x100, kData, 8}).end();
  EXPECT_EQ(run(bad2), -EINVAL) << "memset value above a byte";
}

TEST_F(Isa, StridedStoreAndLoadWithCheckAndSum) {
  Batch b;
  b.add(refgpu_cmd_store_strided{REFGPU_CMD_HEADER(REFGPU_OP_STORE_STRIDED, 12), REFGPU_CMD_FLAG_QWORD, kData,
                                 kSZ4K + 8, 10, 1000, 3})
      .add(refgpu_cmd_load_strided{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_STRIDED, 14),
                                   REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM,
                                   kData, kSZ4K + 8, 10, 1000, 3, kData + 15 * kSZ4K})
      .end();
  ASSERT_EQ(run(b), 0);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < 10; i++) {
    EXPECT_EQ(r.read<uint64_t>(kData + i * (kSZ4K + 8)), 1000 + 3 * i);
    EXPECT_EQ(r.read<uint64_t>(kData + i * (kSZ4K + 8) + 8), 0u);
    sum += 1000 + 3 * i;
  }
  EXPECT_EQ(r.read<uint64_t>(kData + 15 * kSZ4K), sum);
  Batch mismatch;
  mismatch
      .add(refgpu_cmd_load_strided{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_STRIDED, 14),
                                   REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, kData, kSZ4K + 8, 10,
                                   1000, 4, 0})
      .end();
  EXPECT_EQ(run(mismatch), -EBADMSG);
}

TEST_F(Isa, FenceWriteStoresAndWakes) {
  Batch b;
  b.store_dword(kData, 1).fence(kData + 8, 0xf00d).end();
  ASSERT_EQ(run(b), 0);
  EXPECT_EQ(r.read<uint64_t>(kData + 8), 0xf00du);
  EXPECT_EQ(fence_writes, 1);
}

TEST_F(Isa, MalformedBatchesFailWithTheirErrno) {
  Batch unknown;
  unknown.add(refgpu_cmd_batch_end{REFGPU_CMD_HEADER(0x77, 2), 0});
  EXPECT_EQ(run(unknown), -ENOEXEC);
  Batch zero;
  zero.add(refgpu_cmd_batch_end{0, 0});
  EXPECT_EQ(run(zero), -ENOEXEC);
  Batch length;
  length.add(refgpu_cmd_store_dword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_DWORD, 6), 1, kData}).end();
  EXPECT_EQ(run(length), -ENOEXEC);
  Batch misaligned;
  misaligned.store_qword(kData + 4, 1).end();
  EXPECT_EQ(run(misaligned), -EINVAL);
  EXPECT_EQ(r.read<uint64_t>(kData), 0u);
  Batch pad;
  pad.add(refgpu_cmd_store_qword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_QWORD, 6), 1, kData, 1}).end();
  EXPECT_EQ(run(pad), -EINVAL) << "non-zero pad";
  JobContext ctx;
  ctx.mmu = r.mmu.get();
  EXPECT_EQ(execute_batch(ctx, kBatchVa + 4), -EINVAL) << "misaligned batch address";
}

TEST_F(Isa, BatchWithoutEndStopsAtTheSizeLimit) {
  r.map_system(kVa + (64ull << 20), REFGPU_MAX_BATCH_BYTES + kSZ4K);
  Batch b;
  while (b.bytes.size() < REFGPU_MAX_BATCH_BYTES + kSZ4K) b.store_dword(kData, 1);
  r.write(kVa + (64ull << 20), b.bytes.data(), b.bytes.size());
  JobContext ctx;
  ctx.mmu = r.mmu.get();
  EXPECT_EQ(execute_batch(ctx, kVa + (64ull << 20)), -E2BIG);
}

// A store to an unmapped page: the sink maps it, the access is replayed, the data lands.
TEST_F(Isa, NotPresentFaultIsServicedAndReplayed) {
  const uint64_t va = kData + (1ull << 20);
  InlineSink sink([&](const GpuFault& f) {
    r.map_system(f.address & ~(kSZ4K - 1), kSZ4K);
    return 0;
  });
  Batch b;
  b.store_qword(va + 8, 0xabcd).end();
  ASSERT_EQ(run(b, &sink), 0);
  ASSERT_EQ(sink.faults.size(), 1u);
  EXPECT_EQ(sink.faults[0].address, va + 8);
  EXPECT_EQ(sink.faults[0].access, Access::kWrite);
  EXPECT_EQ(sink.faults[0].type, FaultType::kNotPresent);
  EXPECT_EQ(sink.faults[0].vm_id, 1u);
  EXPECT_EQ(sink.faults[0].exec_queue_id, 7u);
  EXPECT_EQ(r.read<uint64_t>(va + 8), 0xabcdu);
  EXPECT_EQ(stats.faults.get(), 1u);
  EXPECT_EQ(stats.replays.get(), 1u);
}

// An atomic on a read-only page: a PERMISSION fault with access ATOMIC; the sink upgrades.
TEST_F(Isa, PermissionFaultForAtomicsIsServicedAndReplayed) {
  const uint64_t va = kData + (2ull << 20);
  auto pfns = r.map_system(va, kSZ4K, 0);
  InlineSink sink([&](const GpuFault& f) {
    r.map_page(f.address & ~(kSZ4K - 1), pfns[0], kPermWrite | kPermAtomic);
    return 0;
  });
  Batch b;
  b.atomic(REFGPU_ATOMIC_OP_ADD, va, 5, 0, REFGPU_CMD_FLAG_QWORD).end();
  ASSERT_EQ(run(b, &sink), 0);
  ASSERT_EQ(sink.faults.size(), 1u);
  EXPECT_EQ(sink.faults[0].access, Access::kAtomic);
  EXPECT_EQ(sink.faults[0].type, FaultType::kPermission);
  EXPECT_EQ(r.read<uint64_t>(va), 5u);
}

// The batch itself is not mapped: the fetch faults (a READ), is serviced, and runs.
TEST_F(Isa, BatchFetchFaultsThroughTheMmu) {
  const uint64_t bva = kVa + (8ull << 20);
  Batch b;
  b.store_dword(kData, 77).end();
  std::vector<std::byte> pending = b.bytes;
  InlineSink sink([&](const GpuFault& f) {
    r.map_system(f.address & ~(kSZ4K - 1), kSZ4K);
    r.write(bva, pending.data(), pending.size());
    return 0;
  });
  JobContext ctx;
  ctx.mmu = r.mmu.get();
  ctx.faults = &sink;
  ASSERT_EQ(execute_batch(ctx, bva), 0);
  ASSERT_EQ(sink.faults.size(), 1u);
  EXPECT_EQ(sink.faults[0].access, Access::kRead);
  EXPECT_EQ(r.read<uint32_t>(kData), 77u);
}

// A fault the sink fails: the job ends with that errno; stores before it happened, stores
// after it did not.
TEST_F(Isa, UnservicedFaultFailsTheJob) {
  InlineSink sink([](const GpuFault&) { return -ENOMEM; });
  Batch b;
  b.store_dword(kData, 1).store_dword(kData + (4ull << 20), 2).store_dword(kData + 4, 3).end();
  EXPECT_EQ(run(b, &sink), -ENOMEM);
  EXPECT_EQ(r.read<uint32_t>(kData), 1u);
  EXPECT_EQ(r.read<uint32_t>(kData + 4), 0u);
  Batch again;
  again.store_dword(kData + (4ull << 20), 2).end();
  EXPECT_EQ(run(again), -EFAULT) << "no fault sink (no fault mode): -EFAULT";
}

// A sink that claims success without fixing anything: the replay budget ends it.
TEST_F(Isa, ReplayBudgetEndsAFaultThatNeverResolves) {
  InlineSink sink([](const GpuFault&) { return 0; });
  Batch b;
  b.store_dword(kData + (4ull << 20), 2).end();
  EXPECT_EQ(run(b, &sink), -EFAULT);
  EXPECT_EQ(sink.faults.size(), kMaxReplays);
}

TEST_F(Isa, VramTargetsWorkLikeSystemMemory) {
  const uint64_t va = kVa + (16ull << 20);
  r.map_vram(va, kSZ2M, kSZ2M, kSZ2M);
  Batch b;
  b.store_qword(va + kSZ2M - 8, 42).atomic(REFGPU_ATOMIC_OP_INC, va, 0, 0, REFGPU_CMD_FLAG_QWORD).end();
  ASSERT_EQ(run(b), 0);
  uint64_t v;
  std::memcpy(&v, r.vram->data(2 * kSZ2M - 8), 8);
  EXPECT_EQ(v, 42u);
  std::memcpy(&v, r.vram->data(kSZ2M), 8);
  EXPECT_EQ(v, 1u);
}

}  // namespace
}  // namespace gpusvm::refgpu
