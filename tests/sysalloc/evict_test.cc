// xe_exec_system_allocator's evict sections: a working set of 112.5 % of VRAM, each buffer
// faulted into VRAM in turn, so later faults evict earlier buffers back to system memory;
// every buffer's data is checked afterwards, by the GPU and by the CPU. evict-malloc-mix-bo
// interleaves VRAM buffer objects with the malloc'd buffers; processes-evict-* runs the same
// in several processes at once, which then evict each other's memory.
#include <latch>
#include <string>
#include <thread>
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

TEST(SysallocEvict, EvictMalloc) {
  Rig r({.vram = 16ull << 20});
  ASSERT_EQ(r.open(), 0);
  auto info = r.dev.info();
  ASSERT_TRUE(info.ok());
  const uint64_t total = info->vram_size / 8 * 9;  // 112.5 %
  constexpr uint64_t kBuf = 2ull << 20;
  const uint64_t n = total / kBuf;
  std::vector<rt::Va> bufs;
  for (uint64_t b = 0; b < n; ++b) {
    auto a = r.ctx.aligned_alloc(kBuf, kBuf);
    ASSERT_TRUE(a.ok());
    bufs.push_back(*a);
  }
  // Round 1: each buffer written by the GPU (faults migrate it to VRAM, evicting others).
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, bufs[b], 8, kBuf / 8, b << 32, 1), 0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  EXPECT_GT(r.stat(REFGPU_STAT_EVICTIONS) + r.stat(REFGPU_STAT_MIGRATIONS_TO_SMEM), 0u);
  // Round 2: the GPU checks every buffer (faulting evicted ones back in).
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, bufs[b], 8, kBuf / 8, b << 32, 1),
              0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  auto info2 = r.dev.info();
  ASSERT_TRUE(info2.ok());
  EXPECT_LE(info2->vram_used, info2->vram_size);
  // The CPU reads everything back.
  std::vector<uint64_t> v(kBuf / 8);
  for (uint64_t b = 0; b < n; ++b) {
    ASSERT_EQ(r.ctx.read<uint64_t>(bufs[b], v), 0);
    for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], (b << 32) + i) << b << " " << i;
  }
  for (rt::Va a : bufs) EXPECT_EQ(r.ctx.free(a), 0);
  r.check_mm();
}

// evict-malloc-mix-bo: 112.5 % of VRAM, every other 2 MiB buffer a BO (system + VRAM
// placement, created in VRAM) bound over a reserved address range, the others malloc'd. The
// BOs and the svm ranges evict each other; every byte is checked by the GPU after the round
// that evicted, and by the CPU at the end (the BOs through their CPU views).
TEST(SysallocEvict, EvictMallocMixBo) {
  Rig r({.vram = 16ull << 20});
  ASSERT_EQ(r.open(), 0);
  auto info = r.dev.info();
  ASSERT_TRUE(info.ok());
  constexpr uint64_t kBuf = 2ull << 20;
  const uint64_t n = info->vram_size / 8 * 9 / kBuf;
  std::vector<rt::Va> bufs;
  std::vector<rt::Bo> bos;
  for (uint64_t b = 0; b < n; ++b) {
    if (b % 2) {
      auto va = r.ctx.mmap(kBuf, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);  // the BO's VA
      ASSERT_TRUE(va.ok());
      auto bo = rt::Bo::create(r.ctx, kBuf, GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM);
      ASSERT_TRUE(bo.ok()) << bo.error();
      ASSERT_EQ(bo->bind(*va), 0);
      bos.push_back(std::move(*bo));
      bufs.push_back(*va);
    } else {
      auto a = r.ctx.aligned_alloc(kBuf, kBuf);
      ASSERT_TRUE(a.ok());
      bufs.push_back(*a);
    }
  }
  const uint64_t evictions0 = r.stat(REFGPU_STAT_EVICTIONS);
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, bufs[b], 8, kBuf / 8, b << 32, 1), 0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  EXPECT_GT(r.stat(REFGPU_STAT_EVICTIONS), evictions0);
  for (uint64_t b = 0; b < n; ++b) {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, bufs[b], 8, kBuf / 8, b << 32, 1),
              0);
    ASSERT_EQ(r.run(cb, b % 2), 0) << b;
  }
  auto info2 = r.dev.info();
  ASSERT_TRUE(info2.ok());
  EXPECT_LE(info2->vram_used, info2->vram_size);
  std::vector<uint64_t> v(kBuf / 8);
  for (uint64_t b = 0; b < n; ++b) {
    rt::Va at = bufs[b];
    if (b % 2) {
      auto view = bos[b / 2].mmap(PROT_READ);  // moves the BO to system memory
      ASSERT_TRUE(view.ok()) << view.error();
      at = *view;
    }
    ASSERT_EQ(r.ctx.read<uint64_t>(at, v), 0);
    for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], (b << 32) + i) << b << " " << i;
  }
  bos.clear();  // unbind, unmap the views, close
  for (uint64_t b = 0; b < n; ++b) {
    EXPECT_EQ(b % 2 ? r.ctx.munmap(bufs[b], kBuf) : r.ctx.free(bufs[b]), 0);
  }
  r.check_mm();
}

// IGT "processes-evict-malloc" and "processes-evict-malloc-mix-bo" (many_allocs per engine):
// kProcs processes, each with its own device file, VM and queue on an engine of its own,
// together allocate 112.5 % of VRAM in 2 MiB buffers (every other one a VRAM BO with mix_bo)
// and have the GPU tag every 4 KiB page of them (faults migrate, later faults evict earlier
// buffers, also other processes' ranges and BOs). Once every process has touched its buffers
// (a latch, so the checks run against a VRAM full of the others' memory), each has the GPU
// check its tags and the CPU read back every byte of every buffer (tags and zeros). Then the
// processes free, close and exit; VRAM use never exceeds its size, evictions happened, and
// mm::check of the whole machine is clean.
void processes_evict(bool mix_bo) {
  constexpr uint32_t kProcs = 3;
  constexpr uint64_t kBuf = 2ull << 20;
  constexpr uint64_t kPage = 4096;
  Rig r({.vram = 16ull << 20, .engines = kProcs});
  ASSERT_EQ(r.open(), 0);
  auto info = r.dev.info();
  ASSERT_TRUE(info.ok());
  const uint64_t n_total = info->vram_size / 8 * 9 / kBuf;  // 112.5 % of VRAM
  const uint64_t evictions0 = r.stat(REFGPU_STAT_EVICTIONS);
  std::latch touched(kProcs);
  std::vector<std::string> errors(kProcs);
  std::vector<devfs::Process*> procs;
  for (uint32_t p = 0; p < kProcs; ++p) {
    auto proc = r.machine->create_process();
    ASSERT_TRUE(proc.ok());
    procs.push_back(*proc);
  }
  std::vector<std::thread> ts;
  for (uint32_t p = 0; p < kProcs; ++p) {
    const uint64_t n = n_total / kProcs + (p < n_total % kProcs ? 1 : 0);
    ts.emplace_back([&touched, &err = errors[p], mix_bo, p, n, pr = procs[p]] {
      auto tag = [p](uint64_t b) { return (uint64_t{p + 1} << 48) | (b << 32); };
      bool counted = false;
      auto arrive = [&] {
        if (!counted) touched.count_down();
        counted = true;
      };
      [&] {
        auto d = rt::Device::open(*pr, 0);
        if (!d) return (void)(err = "open: " + std::to_string(d.error()));
        auto c = rt::Context::create(*d);
        if (!c) return (void)(err = "context: " + std::to_string(c.error()));
        auto q = rt::Queue::create(*c, p);
        if (!q) return (void)(err = "queue: " + std::to_string(q.error()));
        auto run = [&](const rt::CmdBuf& cb) {
          auto f = q->submit(cb);
          return f ? f->wait(kWaitNs) : f.error();
        };
        std::vector<rt::Va> bufs;
        std::vector<rt::Bo> bos;
        for (uint64_t b = 0; b < n; ++b) {
          if (mix_bo && b % 2) {
            auto va = c->mmap(kBuf, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
            auto bo = rt::Bo::create(*c, kBuf, GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM);
            if (!va || !bo || bo->bind(*va) != 0) return (void)(err = "bo " + std::to_string(b));
            bos.push_back(std::move(*bo));
            bufs.push_back(*va);
          } else {
            auto a = c->aligned_alloc(kBuf, kBuf);
            if (!a) return (void)(err = "aligned_alloc: " + std::to_string(a.error()));
            bufs.push_back(*a);
          }
          rt::CmdBuf cb;
          (void)cb.store_strided(REFGPU_CMD_FLAG_QWORD, bufs[b], kPage, kBuf / kPage, tag(b), 1);
          if (const int rc = run(cb)) return (void)(err = "touch " + std::to_string(b) + ": " + std::to_string(rc));
        }
        arrive();
        touched.wait();
        std::vector<uint64_t> v(kBuf / 8);
        for (uint64_t b = 0; b < n; ++b) {
          rt::CmdBuf cb;
          (void)cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, bufs[b], kPage, kBuf / kPage,
                                tag(b), 1);
          if (const int rc = run(cb)) return (void)(err = "gpu check " + std::to_string(b) + ": " + std::to_string(rc));
          rt::Va at = bufs[b];
          if (mix_bo && b % 2) {
            auto view = bos[b / 2].mmap(PROT_READ);
            if (!view) return (void)(err = "bo view: " + std::to_string(view.error()));
            at = *view;
          }
          if (c->read<uint64_t>(at, v) != 0) return (void)(err = "cpu read " + std::to_string(b));
          for (uint64_t i = 0; i < v.size(); ++i) {
            const uint64_t want = i % (kPage / 8) ? 0 : tag(b) + i / (kPage / 8);
            if (v[i] != want) return (void)(err = "buffer " + std::to_string(b) + " qword " + std::to_string(i));
          }
        }
        bos.clear();
        for (uint64_t b = 0; b < n; ++b) {
          if ((mix_bo && b % 2) ? c->munmap(bufs[b], kBuf) : c->free(bufs[b])) err = "free " + std::to_string(b);
        }
      }();
      arrive();  // a process that failed early must not hold the others at the latch
      pr->exit(0);
    });
  }
  for (auto& t : ts) t.join();
  for (uint32_t p = 0; p < kProcs; ++p) EXPECT_EQ(errors[p], "") << "process " << p;
  EXPECT_GT(r.stat(REFGPU_STAT_EVICTIONS), evictions0);
  auto info2 = r.dev.info();
  ASSERT_TRUE(info2.ok());
  EXPECT_LE(info2->vram_used, info2->vram_size);
  r.check_mm();
  r.close();
  const mm::CheckReport rep = mm::check(r.machine->mem());
  EXPECT_TRUE(rep.ok()) << rep.to_string();
}

TEST(SysallocEvict, ProcessesEvictMalloc) { processes_evict(false); }
TEST(SysallocEvict, ProcessesEvictMallocMixBo) { processes_evict(true); }

}  // namespace
}  // namespace gpusvm::sysalloc
