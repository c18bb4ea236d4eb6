// xe_exec_system_allocator's mmap sections: private, shared and huge mappings, mremap (move,
// DONTUNMAP, read-only), and "new" (typed allocations through the C++ wrapper).
#include <cstring>
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

constexpr int kRw = PROT_READ | PROT_WRITE;

// The GPU overwrites every dword of [a, a + bytes) with pattern(i, seed) after checking the
// CPU's pattern(i, seed - 1); the CPU then checks the GPU's.
void gpu_rewrite(Rig& r, rt::Va a, uint64_t bytes, uint32_t seed) {
  std::vector<uint32_t> v(bytes / 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint32_t>(seed + i);
  ASSERT_EQ(r.ctx.write<uint32_t>(a, v), 0);
  rt::CmdBuf cb;
  ASSERT_EQ(cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, a, 4, v.size(), seed, 1), 0);
  ASSERT_EQ(cb.store_strided(0, a, 4, v.size(), seed * 3, 5), 0);
  ASSERT_EQ(r.run(cb), 0);
  ASSERT_EQ(r.ctx.read<uint32_t>(a, v), 0);
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], static_cast<uint32_t>(seed * 3 + 5 * i)) << i;
}

// IGT "mmap": an anonymous private mapping.
TEST(SysallocMmap, Mmap) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.mmap(1 << 20, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  gpu_rewrite(r, *a, 1 << 20, 100);
  EXPECT_EQ(r.ctx.munmap(*a, 1 << 20), 0);
  r.check_mm();
}

// IGT "mmap-shared": MAP_SHARED anonymous memory (shmem-backed).
TEST(SysallocMmap, MmapShared) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto a = r.ctx.mmap(512 << 10, kRw, MAP_SHARED | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  gpu_rewrite(r, *a, 512 << 10, 200);
  EXPECT_EQ(r.ctx.munmap(*a, 512 << 10), 0);
  r.check_mm();
}

// IGT "mmap-huge": a 2 MiB-aligned THP mapping (MADV_HUGEPAGE), so faults see PMD-mapped folios.
TEST(SysallocMmap, MmapHuge) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto big = r.ctx.mmap(8ull << 20, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(big.ok());
  const rt::Va a = (*big + (2ull << 20) - 1) & ~((2ull << 20) - 1);
  ASSERT_EQ(r.ctx.madvise_host(a, 4ull << 20, MADV_HUGEPAGE), 0);
  gpu_rewrite(r, a, 4ull << 20, 300);
  EXPECT_GT(r.stat(REFGPU_STAT_FAULTS_2M), 0u);
  EXPECT_EQ(r.ctx.munmap(*big, 8ull << 20), 0);
  r.check_mm();
}

// IGT "mmap-remap" and "mmap-remap-dontunmap": the GPU used the pages, mremap moves them, the
// GPU reads them at the new address and the old one is gone (or, with DONTUNMAP, empty).
TEST(SysallocMmap, MmapRemap) {
  for (int flags : {MREMAP_MAYMOVE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP}) {
    SCOPED_TRACE(flags);
    Rig r;
    ASSERT_EQ(r.open(), 0);
    constexpr uint64_t kLen = 256 << 10;
    auto a = r.ctx.mmap(kLen, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(a.ok());
    gpu_rewrite(r, *a, kLen, 400);  // the GPU has them mapped (and maybe migrated)
    // Reserve a destination elsewhere to force a move.
    auto dst = r.ctx.mmap(kLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(dst.ok());
    auto moved = r.ctx.mremap(*a, kLen, kLen, flags | MREMAP_FIXED, *dst);
    ASSERT_TRUE(moved.ok()) << moved.error();
    ASSERT_EQ(*moved, *dst);
    rt::CmdBuf cb;  // the GPU sees the old data at the new address
    ASSERT_EQ(cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *moved, 4, kLen / 4, 400 * 3, 5), 0);
    ASSERT_EQ(r.run(cb), 0);
    if (flags & MREMAP_DONTUNMAP) {
      // The old range stays mapped and empty: reads see zeros, on the CPU and the GPU.
      EXPECT_EQ(*r.ctx.load<uint32_t>(*a + 4096), 0u);
      rt::CmdBuf z;
      ASSERT_EQ(z.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, kLen / 4, 0, 0), 0);
      EXPECT_EQ(r.run(z), 0);
      EXPECT_EQ(r.ctx.munmap(*a, kLen), 0);
    } else {
      EXPECT_EQ(r.ctx.load<uint32_t>(*a).error(), -EFAULT);
    }
    EXPECT_EQ(r.ctx.munmap(*moved, kLen), 0);
    r.check_mm();
  }
}

// IGT "mmap-remap-ro": a read-only mapping; the GPU reads it, and a GPU write fails its job
// with a write fault on that address, leaving the data unchanged.
TEST(SysallocMmap, MmapReadOnly) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kLen = 64 << 10;
  auto a = r.ctx.mmap(kLen, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
  ASSERT_TRUE(a.ok());
  std::vector<uint32_t> v(kLen / 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, 9);
  ASSERT_EQ(r.ctx.write<uint32_t>(*a, v), 0);
  ASSERT_EQ(r.ctx.mprotect(*a, kLen, PROT_READ), 0);
  rt::CmdBuf rd;
  ASSERT_EQ(rd.load_compare(*a + 4, REFGPU_UFENCE_WAIT_OP_EQ, pattern(1, 9), ~0ull, 0), 0);
  ASSERT_EQ(r.run(rd), 0);
  rt::CmdBuf wr;
  ASSERT_EQ(wr.store_dword(*a + 8, 1), 0);
  auto f = r.queues[0].submit(wr);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->wait(kWaitNs), -EFAULT);
  auto e = f->error();
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->has_fault, 1u);
  EXPECT_EQ(e->address, *a + 8);
  EXPECT_EQ(e->access, static_cast<uint32_t>(REFGPU_ACCESS_WRITE));
  std::vector<uint32_t> back(v.size());
  ASSERT_EQ(r.ctx.read<uint32_t>(*a, back), 0);
  EXPECT_EQ(back, v);
  EXPECT_EQ(r.ctx.munmap(*a, kLen), 0);
  r.check_mm();
}

// IGT "mmap-remap-ro" and "mmap-remap-ro-dontunmap": a read-only mapping the GPU has read is
// moved by mremap; the GPU reads it at the new address, a GPU write there fails its job with a
// write fault and changes nothing; with DONTUNMAP the old range stays, empty and read-only.
TEST(SysallocMmap, MmapRemapReadOnly) {
  for (int flags : {MREMAP_MAYMOVE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP}) {
    SCOPED_TRACE(flags);
    Rig r;
    ASSERT_EQ(r.open(), 0);
    constexpr uint64_t kLen = 256 << 10;
    auto a = r.ctx.mmap(kLen, kRw, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(a.ok());
    std::vector<uint32_t> v(kLen / 4);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<uint32_t>(700 + 3 * i);
    ASSERT_EQ(r.ctx.write<uint32_t>(*a, v), 0);
    ASSERT_EQ(r.ctx.mprotect(*a, kLen, PROT_READ), 0);
    rt::CmdBuf rd;
    ASSERT_EQ(rd.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, v.size(), 700, 3), 0);
    ASSERT_EQ(r.run(rd), 0);
    auto dst = r.ctx.mmap(kLen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);
    ASSERT_TRUE(dst.ok());
    auto moved = r.ctx.mremap(*a, kLen, kLen, flags | MREMAP_FIXED, *dst);
    ASSERT_TRUE(moved.ok()) << moved.error();
    rt::CmdBuf rd2;
    ASSERT_EQ(rd2.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *moved, 4, v.size(), 700, 3), 0);
    ASSERT_EQ(r.run(rd2), 0);
    rt::CmdBuf wr;
    ASSERT_EQ(wr.store_dword(*moved + 64, 1), 0);
    auto f = r.queues[0].submit(wr);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->wait(kWaitNs), -EFAULT);
    auto e = f->error();
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->has_fault, 1u);
    EXPECT_EQ(e->address, *moved + 64);
    EXPECT_EQ(e->access, static_cast<uint32_t>(REFGPU_ACCESS_WRITE));
    std::vector<uint32_t> back(v.size());
    ASSERT_EQ(r.ctx.read<uint32_t>(*moved, back), 0);
    EXPECT_EQ(back, v);
    if (flags & MREMAP_DONTUNMAP) {
      rt::CmdBuf z;
      ASSERT_EQ(z.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, *a, 4, v.size(), 0, 0), 0);
      EXPECT_EQ(r.run(z), 0);
      ASSERT_EQ(r.ctx.read<uint32_t>(*a, back), 0);
      for (uint32_t x : back) ASSERT_EQ(x, 0u);
      EXPECT_EQ(r.ctx.munmap(*a, kLen), 0);
    } else {
      EXPECT_EQ(r.ctx.load<uint32_t>(*a).error(), -EFAULT);
    }
    EXPECT_EQ(r.ctx.munmap(*moved, kLen), 0);
    r.check_mm();
  }
}

// IGT "new": C++ objects allocated in the process (rt::Buffer, rt::Allocator), used by jobs.
TEST(SysallocMmap, New) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  struct Rec {
    uint64_t key;
    uint64_t value;
  };
  {
    auto recs = rt::Buffer<Rec>::create(r.ctx, 1000);
    ASSERT_TRUE(recs.ok());
    std::vector<Rec> init(1000);
    for (size_t i = 0; i < init.size(); ++i) init[i] = {i, 0};
    ASSERT_EQ(recs->write(init), 0);
    rt::CmdBuf cb;  // value = 10 + 2 * i for every record, a stride of the struct size
    ASSERT_EQ(cb.store_strided(REFGPU_CMD_FLAG_QWORD, recs->addr() + 8, sizeof(Rec), 1000, 10, 2), 0);
    ASSERT_EQ(r.run(cb), 0);
    auto out = recs->read_all();
    ASSERT_TRUE(out.ok());
    for (size_t i = 0; i < out->size(); ++i) {
      ASSERT_EQ((*out)[i].key, i);
      ASSERT_EQ((*out)[i].value, 10 + 2 * i);
    }
  }  // ~Buffer frees
  rt::Allocator<uint64_t> alloc(r.ctx);
  auto p = alloc.allocate(512);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->addr % 16, 0u);
  rt::CmdBuf cb;
  ASSERT_EQ(cb.store_qword((*p + 511).addr, 77), 0);
  ASSERT_EQ(r.run(cb), 0);
  EXPECT_EQ(*r.ctx.load<uint64_t>((*p + 511).addr), 77u);
  EXPECT_EQ(alloc.deallocate(*p, 512), 0);
  EXPECT_TRUE(alloc == rt::Allocator<char>(r.ctx));
  r.check_mm();
}

// IGT "mmap-file": a file mapped twice, MAP_SHARED at two addresses and MAP_PRIVATE at a third.
// The GPU writes through one shared mapping; the other shared mapping and pread see it (the
// same page-cache pages); the private mapping, copied on write by the CPU before, does not.
TEST(SysallocMmap, MmapFile) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  constexpr uint64_t kLen = 64 << 10;
  gpusvm_rt_file* file = nullptr;
  ASSERT_EQ(gpusvm_rt_file_create(r.ctx.get(), kLen, &file), 0);
  std::vector<uint32_t> v(kLen / 4);
  for (size_t i = 0; i < v.size(); ++i) v[i] = pattern(i, 77);
  ASSERT_EQ(gpusvm_rt_file_pwrite(file, v.data(), kLen, 0), static_cast<int64_t>(kLen));
  rt::Va s1 = 0, s2 = 0, priv = 0;
  ASSERT_EQ(gpusvm_rt_mmap_file(r.ctx.get(), 0, kLen, kRw, MAP_SHARED, file, 0, &s1), 0);
  ASSERT_EQ(gpusvm_rt_mmap_file(r.ctx.get(), 0, kLen, kRw, MAP_SHARED, file, 0, &s2), 0);
  ASSERT_EQ(gpusvm_rt_mmap_file(r.ctx.get(), 0, kLen, kRw, MAP_PRIVATE, file, 0, &priv), 0);
  ASSERT_EQ(r.ctx.store<uint32_t>(priv, 5), 0);  // the private copy of page 0
  rt::CmdBuf cb;  // the GPU checks the file's data through s1, then rewrites it
  ASSERT_EQ(cb.load_compare(s1 + 8, REFGPU_UFENCE_WAIT_OP_EQ, pattern(2, 77), 0xffffffffull, 0), 0);
  ASSERT_EQ(cb.store_strided(0, s1, 4, kLen / 4, 3, 1), 0);
  ASSERT_EQ(r.run(cb), 0);
  std::vector<uint32_t> through(kLen / 4), file_bytes(kLen / 4);
  ASSERT_EQ(r.ctx.read<uint32_t>(s2, through), 0);
  ASSERT_EQ(gpusvm_rt_file_pread(file, file_bytes.data(), kLen, 0), static_cast<int64_t>(kLen));
  for (size_t i = 0; i < through.size(); ++i) {
    ASSERT_EQ(through[i], 3 + i) << i;
    ASSERT_EQ(file_bytes[i], 3 + i) << i;
  }
  EXPECT_EQ(*r.ctx.load<uint32_t>(priv), 5u);  // the copied page keeps the CPU's write
  for (rt::Va m : {s1, s2, priv}) EXPECT_EQ(r.ctx.munmap(m, kLen), 0);
  EXPECT_EQ(gpusvm_rt_file_destroy(file), 0);
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
