// xe_exec_system_allocator's threads, race and free sections: many CPU threads submitting on
// a shared VM and on VMs of their own, GPU and CPU atomics racing on one counter, a buffer
// freed while a job that uses it is stalled, and free()-without-munmap followed by a
// multi-threaded CPU initialisation of a new allocation over the same pages.
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

// Each thread mallocs its buffer, runs jobs that check the previous round and write the next,
// and checks each round on the CPU.
void thread_rounds(const rt::Context& ctx, uint32_t engine, uint32_t seed, std::atomic<int>* failures) {
  auto q = rt::Queue::create(ctx, engine);
  if (!q) {
    failures->fetch_add(1);
    return;
  }
  constexpr uint64_t kN = 8192;  // 32 KiB
  auto a = ctx.malloc(kN * 4);
  if (!a) {
    failures->fetch_add(1);
    return;
  }
  std::vector<uint32_t> v(kN);
  for (uint32_t round = 0; round < 4; ++round) {
    rt::CmdBuf cb;
    if (round > 0) (void)cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, kN, seed + round - 1, 1);
    (void)cb.store_strided(0, *a, 4, kN, seed + round, 1);
    auto f = q->submit(cb);
    if (!f || f->wait(kWaitNs) != 0 || ctx.read<uint32_t>(*a, v) != 0) {
      failures->fetch_add(1);
      break;
    }
    for (uint64_t i = 0; i < kN; ++i) {
      if (v[i] != seed + round + i) {
        failures->fetch_add(1);
        break;
      }
    }
  }
  if (ctx.free(*a)) failures->fetch_add(1);
}

// IGT "threads-shared-vm-*": 8 threads, one context (VM), a queue each.
TEST(SysallocThreads, ThreadsSharedVm) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < 8; ++t) ts.emplace_back(thread_rounds, std::cref(r.ctx), t % 2, t * 100000, &failures);
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  r.check_mm();
}

// IGT "threads-many-vm-*": 4 threads, a context (VM) each, on one device and one process.
TEST(SysallocThreads, ThreadsSeparateVms) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  std::vector<rt::Context> ctxs;
  for (int t = 0; t < 4; ++t) {
    auto c = rt::Context::create(r.dev);
    ASSERT_TRUE(c.ok());
    ctxs.push_back(std::move(*c));
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < 4; ++t) ts.emplace_back(thread_rounds, std::cref(ctxs[t]), t % 2, t * 100000, &failures);
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  ctxs.clear();
  r.check_mm();
}

// IGT "race": GPU jobs from 4 threads (2 engines) and 2 CPU threads increment one counter
// concurrently; every increment lands exactly once.
TEST(SysallocThreads, RaceGpuAndCpuAtomics) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.malloc(64);
  ASSERT_TRUE(a.ok());
  ASSERT_EQ(r.ctx.store<uint64_t>(*a, 0), 0);
  ASSERT_EQ(r.ctx.advise_atomic(*a, 8, REFGPU_ATOMIC_GLOBAL), 0);
  constexpr int kJobs = 8, kIncPerJob = 16, kCpuInc = 200;
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < 4; ++t) {
    ts.emplace_back([&, t] {
      auto q = rt::Queue::create(r.ctx, t % 2);
      if (!q) return (void)failures.fetch_add(1);
      for (int j = 0; j < kJobs; ++j) {
        rt::CmdBuf cb;
        for (int k = 0; k < kIncPerJob; ++k) (void)cb.atomic(REFGPU_ATOMIC_OP_INC, REFGPU_CMD_FLAG_QWORD, *a);
        auto f = q->submit(cb);
        if (!f || f->wait(kWaitNs) != 0) failures.fetch_add(1);
      }
    });
  }
  for (int t = 0; t < 2; ++t) {
    ts.emplace_back([&] {
      for (int k = 0; k < kCpuInc; ++k)
        if (!r.ctx.atomic_fetch_add(*a, 1).ok()) failures.fetch_add(1);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(*r.ctx.load<uint64_t>(*a), uint64_t{4 * kJobs * kIncPerJob + 2 * kCpuInc});
  EXPECT_EQ(r.ctx.free(*a), 0);
  r.check_mm();
}

// IGT "free" / "free-race": a job stalls on a flag (LOAD_COMPARE WAIT) before it writes a
// large malloc'd buffer; the CPU frees the buffer (it is unmapped) and releases the flag. The
// job fails with a write fault inside the freed block instead of writing freed memory, and a
// new allocation's data is untouched.
TEST(SysallocThreads, FreeWhileMapped) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kLen = 1 << 20;
  auto flag = r.ctx.malloc(8);
  ASSERT_TRUE(flag.ok());
  ASSERT_EQ(r.ctx.store<uint64_t>(*flag, 0), 0);
  auto buf = r.ctx.malloc(kLen);
  ASSERT_TRUE(buf.ok());
  ASSERT_EQ(r.ctx.memset(*buf, 1, kLen), 0);
  rt::CmdBuf pre;  // the GPU maps the buffer first
  ASSERT_EQ(pre.store_strided(0, *buf, 4096, kLen / 4096, 9, 0), 0);
  ASSERT_EQ(r.run(pre), 0);
  rt::CmdBuf cb;
  ASSERT_EQ(cb.load_compare(*flag, REFGPU_UFENCE_WAIT_OP_EQ, 1, ~0ull, REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT), 0);
  ASSERT_EQ(cb.store_strided(0, *buf, 4, kLen / 4, 7, 0), 0);
  auto f = r.queues[0].submit(cb);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->status(), 1);  // stalled on the flag
  ASSERT_EQ(r.ctx.free(*buf), 0);
  ASSERT_TRUE(r.ctx.atomic_exchange(*flag, 1).ok());  // the job polls it: an atomic store
  EXPECT_EQ(f->wait(kWaitNs), -EFAULT);
  auto e = f->error();
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->access, static_cast<uint32_t>(REFGPU_ACCESS_WRITE));
  EXPECT_GE(e->address, *buf);
  EXPECT_LT(e->address, *buf + kLen);
  // The queue is still usable and memory mapped again at that address is not written.
  auto again = r.ctx.malloc(kLen);
  ASSERT_TRUE(again.ok());
  ASSERT_EQ(r.ctx.memset(*again, 3, kLen), 0);
  rt::CmdBuf ok;
  ASSERT_EQ(ok.store_dword(*flag, 5), 0);
  EXPECT_EQ(r.run(ok), 0);
  std::vector<uint8_t> back(kLen);
  ASSERT_EQ(r.ctx.read<uint8_t>(*again, back), 0);
  for (uint8_t b : back) ASSERT_EQ(b, 3);
  EXPECT_EQ(r.ctx.free(*again), 0);
  EXPECT_EQ(r.ctx.free(*flag), 0);
  r.check_mm();
}

// IGT "free-race": two threads on one VM, each mallocs a new block for every job and frees
// it after checking; the blocks share arenas (and GPU ranges), so one thread's free (which
// resets the advice of the coalesced free space) races the other's jobs faulting the
// neighbouring block. Every job checks the CPU's bytes and rewrites them; the CPU checks.
TEST(SysallocThreads, FreeRace) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  std::atomic<int> failures{0};
  auto body = [&](size_t qi, uint32_t seed) {
    constexpr uint64_t kN = 12 << 10;  // 48 KiB: an arena block
    std::vector<uint32_t> v(kN);
    for (uint32_t it = 0; it < 24 && !failures.load(); ++it) {
      auto a = r.ctx.malloc(kN * 4);
      if (!a) {
        failures.fetch_add(1);
        return;
      }
      const uint32_t base = seed + it * 100000;
      for (uint64_t i = 0; i < kN; ++i) v[i] = static_cast<uint32_t>(base + i);
      rt::CmdBuf cb;
      int rc = r.ctx.write<uint32_t>(*a, v);
      if (!rc) rc = cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, kN, base, 1);
      if (!rc) rc = cb.store_strided(0, *a, 4, kN, base + 7, 2);
      if (!rc) rc = r.run(cb, qi);
      if (!rc) rc = r.ctx.read<uint32_t>(*a, v);
      for (uint64_t i = 0; !rc && i < kN; ++i) {
        if (v[i] != static_cast<uint32_t>(base + 7 + 2 * i)) rc = -EBADMSG;
      }
      if (rc) {
        ADD_FAILURE() << "thread " << qi << " iteration " << it << ": " << rc;
        failures.fetch_add(1);
      }
      if (r.ctx.free(*a)) failures.fetch_add(1);
    }
  };
  std::thread t0(body, 0, 1u << 28);
  std::thread t1(body, 1, 2u << 28);
  t0.join();
  t1.join();
  EXPECT_EQ(failures.load(), 0);
  r.check_mm();
}

// free() without munmap, then 4 CPU threads initialise a new allocation over the same pages
// (which the GPU had migrated to VRAM): the faults bring them back and the whole
// initialisation ends in bounded time with every byte right.
TEST(SysallocThreads, FreeWithoutMunmapThenThreadedCpuInit) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kLen = 192 << 10;  // arena blocks (below the mmap threshold)
  auto a = r.ctx.malloc(kLen);
  ASSERT_TRUE(a.ok());
  rt::CmdBuf cb;
  ASSERT_EQ(cb.memset(*a, 0xee, kLen), 0);
  ASSERT_EQ(r.run(cb), 0);
  auto res = r.ctx.residency(*a, kLen);
  ASSERT_TRUE(res.ok());
  EXPECT_GT(res->device, 0u);  // the faults migrated it (default advice: the device)
  ASSERT_EQ(r.ctx.free(*a), 0);
  auto b = r.ctx.malloc(kLen);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a);  // first fit: the same pages
  const auto t0 = std::chrono::steady_clock::now();
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  constexpr int kThreads = 4;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      const uint64_t part = kLen / kThreads;
      std::vector<uint32_t> v(part / 4);
      for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, t);
      if (r.ctx.write<uint32_t>(*b + t * part, v)) failures.fetch_add(1);
    });
  }
  for (auto& t : ts) t.join();
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LT(took, std::chrono::seconds(10));
  for (int t = 0; t < kThreads; ++t) {
    std::vector<uint32_t> v(kLen / kThreads / 4);
    ASSERT_EQ(r.ctx.read<uint32_t>(*b + t * (kLen / kThreads), v), 0);
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], pattern(i, t)) << t << " " << i;
  }
  EXPECT_EQ(r.ctx.residency(*b, kLen)->device, 0u);
  EXPECT_EQ(r.ctx.free(*b), 0);
  r.check_mm();
}

// IGT "process-many-*": 3 processes, each opening the device itself (a file, a context and a
// queue of its own), run jobs concurrently on their own malloc'd memory.
TEST(SysallocThreads, ProcessesMany) {
  Rig r;
  std::atomic<int> failures{0};
  std::vector<std::thread> ts;
  for (uint32_t p = 0; p < 3; ++p) {
    auto proc = r.machine->create_process();
    ASSERT_TRUE(proc.ok());
    ts.emplace_back([&failures, p, pr = *proc] {
      {
        auto d = rt::Device::open(*pr, 0);
        if (!d) return (void)failures.fetch_add(1);
        auto c = rt::Context::create(*d);
        if (!c) return (void)failures.fetch_add(1);
        thread_rounds(*c, p % 2, p * 1000000, &failures);
      }  // context, then device
      pr->exit(0);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(failures.load(), 0);
  const mm::CheckReport rep = mm::check(r.machine->mem());
  EXPECT_TRUE(rep.ok()) << rep.to_string();
}

}  // namespace
}  // namespace gpusvm::sysalloc
