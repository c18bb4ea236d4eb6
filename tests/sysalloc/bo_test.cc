// Buffer objects next to the system allocator (xe_exec_system_allocator's new-bo-map and
// malloc-bo-unmap): a BO bound over part of a malloc'd mirror range, jobs that see the BO's
// bytes in its window and the process's memory elsewhere, and the window given back to the
// mirror by the unbind. Every byte is checked, by the GPU (LOAD_STRIDED CHECK) and the CPU.
#include <vector>

#include "tests/sysalloc/sysalloc_test_util.h"

namespace gpusvm::sysalloc {
namespace {

constexpr uint64_t kBuf = 2ull << 20;
constexpr uint32_t kSysVram = GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM;

// Qword i of a pattern: tag << 40 | i (what STORE_STRIDED / LOAD_STRIDED with increment 1 write
// and check, starting at `first`).
uint64_t pat(uint64_t tag, uint64_t i) { return (tag << 40) + i; }

int gpu_fill(Rig& r, rt::Va a, uint64_t len, uint64_t tag, uint64_t first = 0) {
  rt::CmdBuf cb;
  if (int rc = cb.store_strided(REFGPU_CMD_FLAG_QWORD, a, 8, len / 8, pat(tag, first), 1)) return rc;
  return r.run(cb);
}

int gpu_check(Rig& r, rt::Va a, uint64_t len, uint64_t tag, uint64_t first = 0) {
  rt::CmdBuf cb;
  if (int rc = cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, a, 8, len / 8, pat(tag, first), 1))
    return rc;
  return r.run(cb);
}

int cpu_fill(Rig& r, rt::Va a, uint64_t len, uint64_t tag, uint64_t first = 0) {
  std::vector<uint64_t> v(len / 8);
  for (uint64_t i = 0; i < v.size(); ++i) v[i] = pat(tag, first + i);
  return r.ctx.write<uint64_t>(a, v);
}

// The CPU's view of [a, a + len): qword i must be pat(tag, first + i).
void cpu_expect(Rig& r, rt::Va a, uint64_t len, uint64_t tag, uint64_t first, const char* what) {
  std::vector<uint64_t> v(len / 8);
  ASSERT_EQ(r.ctx.read<uint64_t>(a, v), 0) << what;
  for (uint64_t i = 0; i < v.size(); ++i) ASSERT_EQ(v[i], pat(tag, first + i)) << what << " qword " << i;
}

// new-bo-map: a BO over a malloc'd range. Layout of the 2 MiB buffer:
//   [0, 512K) mirror | [512K, 768K) BO a (system+VRAM, CPU-mapped) | mirror |
//   [1536K, 1664K) BO b (VRAM only) | mirror
TEST(SysallocBo, NewBoMapOverlay) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto buf = r.ctx.aligned_alloc(kBuf, kBuf);
  ASSERT_TRUE(buf.ok());
  ASSERT_EQ(cpu_fill(r, *buf, kBuf, 1), 0);  // the process's bytes: tag 1
  constexpr uint64_t kOffA = 512 << 10, kLenA = 256 << 10, kOffB = 1536 << 10, kLenB = 128 << 10;
  auto a = rt::Bo::create(r.ctx, kLenA, kSysVram);
  ASSERT_TRUE(a.ok()) << a.error();
  auto b = rt::Bo::create(r.ctx, kLenB, GPUSVM_RT_BO_PLACEMENT_VRAM);
  ASSERT_TRUE(b.ok()) << b.error();
  auto view = a->mmap();  // the CPU view (a moves to system memory for good)
  ASSERT_TRUE(view.ok()) << view.error();
  ASSERT_EQ(cpu_fill(r, *view, kLenA, 2), 0);  // BO a's bytes: tag 2
  ASSERT_EQ(a->bind(*buf + kOffA), 0);
  ASSERT_EQ(b->bind(*buf + kOffB), 0);

  // The GPU sees the process's memory, BO a's bytes, the memory, BO b's zeros, the memory.
  EXPECT_EQ(gpu_check(r, *buf, kOffA, 1), 0);
  EXPECT_EQ(gpu_check(r, *buf + kOffA, kLenA, 2), 0);
  EXPECT_EQ(gpu_check(r, *buf + kOffA + kLenA, kOffB - kOffA - kLenA, 1, (kOffA + kLenA) / 8), 0);
  {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.load_strided(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK, *buf + kOffB, 8, kLenB / 8, 0, 0), 0);
    EXPECT_EQ(r.run(cb), 0);
  }
  EXPECT_EQ(gpu_check(r, *buf + kOffB + kLenB, kBuf - kOffB - kLenB, 1, (kOffB + kLenB) / 8), 0);

  // The GPU rewrites all 2 MiB (tag 3): the windows' writes go to the BOs.
  ASSERT_EQ(gpu_fill(r, *buf, kBuf, 3), 0);
  // A copy of BO b's window into malloc'd memory, for the CPU to see it (VRAM-only: no view).
  auto scratch = r.ctx.malloc(kLenB);
  ASSERT_TRUE(scratch.ok());
  {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.copy(*scratch, *buf + kOffB, kLenB), 0);
    ASSERT_EQ(r.run(cb), 0);
  }
  // The CPU: tag 3 outside the windows, its own tag-1 bytes under them; BO a's view tag 3.
  cpu_expect(r, *buf, kOffA, 3, 0, "mirror before a");
  cpu_expect(r, *buf + kOffA, kLenA, 1, kOffA / 8, "process memory under a");
  cpu_expect(r, *buf + kOffA + kLenA, kOffB - kOffA - kLenA, 3, (kOffA + kLenA) / 8, "mirror between");
  cpu_expect(r, *buf + kOffB, kLenB, 1, kOffB / 8, "process memory under b");
  cpu_expect(r, *buf + kOffB + kLenB, kBuf - kOffB - kLenB, 3, (kOffB + kLenB) / 8, "mirror after b");
  cpu_expect(r, *view, kLenA, 3, kOffA / 8, "BO a's view");
  cpu_expect(r, *scratch, kLenB, 3, kOffB / 8, "BO b's copy");

  EXPECT_EQ(a->reset(), 0);  // unbinds, unmaps the view, closes
  EXPECT_EQ(b->reset(), 0);
  EXPECT_EQ(r.ctx.free(*scratch), 0);
  EXPECT_EQ(r.ctx.free(*buf), 0);
  r.check_mm();
}

// malloc-bo-unmap: a BO bound over a malloc'd window and unbound again; the window goes back
// to the system allocator: the GPU faults the process's memory there, the BO keeps its bytes.
TEST(SysallocBo, MallocBoUnmap) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  auto buf = r.ctx.aligned_alloc(kBuf, kBuf);
  ASSERT_TRUE(buf.ok());
  ASSERT_EQ(cpu_fill(r, *buf, kBuf, 1), 0);
  constexpr uint64_t kOff = 1 << 20, kLen = 512 << 10;
  const rt::Va win = *buf + kOff;
  auto bo = rt::Bo::create(r.ctx, kLen, kSysVram);
  ASSERT_TRUE(bo.ok());
  ASSERT_EQ(bo->bind(win), 0);
  ASSERT_EQ(gpu_fill(r, win, kLen, 2), 0);  // into the BO (in VRAM)
  ASSERT_EQ(bo->unbind(win), 0);
  EXPECT_EQ(bo->unbind(win), -EINVAL);  // gone

  // The same VA now faults through the mirror: the CPU's bytes, all 2 MiB of them.
  EXPECT_EQ(gpu_check(r, *buf, kBuf, 1), 0);
  ASSERT_EQ(gpu_fill(r, win, kLen, 3), 0);
  cpu_expect(r, *buf, kOff, 1, 0, "before the window");
  cpu_expect(r, win, kLen, 3, 0, "the window, through the mirror");
  cpu_expect(r, win + kLen, kBuf - kOff - kLen, 1, (kOff + kLen) / 8, "after the window");
  // The window has the mirror's advice again (one piece, the defaults).
  auto attrs = r.ctx.attrs(win, kLen);
  ASSERT_TRUE(attrs.ok());
  ASSERT_EQ(attrs->size(), 1u);
  EXPECT_LE((*attrs)[0].start, win);
  EXPECT_GE((*attrs)[0].end, win + kLen);
  EXPECT_EQ((*attrs)[0].preferred_location, GPUSVM_RT_LOCATION_DEVICE);
  EXPECT_EQ((*attrs)[0].atomic, REFGPU_ATOMIC_UNDEFINED);

  // The GPU has mirrored pages in the window now: binding there again is refused, and
  // nothing changed (the GPU still sees the process's memory).
  EXPECT_EQ(bo->bind(win), -EBUSY);
  EXPECT_EQ(gpu_check(r, win, kLen, 3), 0);
  // The BO kept what the GPU wrote through its binding.
  auto view = bo->mmap(PROT_READ);
  ASSERT_TRUE(view.ok());
  cpu_expect(r, *view, kLen, 2, 0, "the BO after the unbind");
  EXPECT_EQ(bo->munmap(), 0);
  EXPECT_EQ(bo->reset(), 0);
  EXPECT_EQ(r.ctx.free(*buf), 0);
  r.check_mm();
}

// Every argument of the BO calls is checked first; a refused call changes nothing.
TEST(SysallocBo, ArgumentChecks) {
  Rig r;
  ASSERT_EQ(r.open(), 0);
  gpusvm_rt_bo* raw = nullptr;
  EXPECT_EQ(gpusvm_rt_bo_create(nullptr, 4096, kSysVram, &raw), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 4096, kSysVram, nullptr), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 0, kSysVram, &raw), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 4097, kSysVram, &raw), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 4096, 0, &raw), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 4096, 1u << 2, &raw), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_create(r.ctx.get(), 64ull << 20, GPUSVM_RT_BO_PLACEMENT_VRAM, &raw), -EINVAL);  // > VRAM
  EXPECT_EQ(raw, nullptr);
  EXPECT_EQ(gpusvm_rt_bo_destroy(nullptr), -EINVAL);
  EXPECT_EQ(gpusvm_rt_bo_size(nullptr), 0u);

  auto buf = r.ctx.aligned_alloc(kBuf, kBuf);
  ASSERT_TRUE(buf.ok());
  ASSERT_EQ(cpu_fill(r, *buf, kBuf, 1), 0);
  auto bo = rt::Bo::create(r.ctx, 64 << 10, kSysVram);
  ASSERT_TRUE(bo.ok());
  EXPECT_EQ(bo->size(), 64u << 10);
  EXPECT_EQ(bo->bind(*buf + 8), -EINVAL);                   // unaligned address
  EXPECT_EQ(bo->bind(*buf, 4096, 8), -EINVAL);              // unaligned offset
  EXPECT_EQ(gpusvm_rt_bo_bind(bo->get(), *buf, 0, 0, 0), -EINVAL);  // empty
  EXPECT_EQ(bo->bind(*buf, 4096, 64 << 10), -EINVAL);       // past the BO's end
  EXPECT_EQ(bo->bind(*buf, 128 << 10), -EINVAL);            // longer than the BO
  EXPECT_EQ(bo->bind(mm::kTaskSize - 4096, 8192), -EINVAL);  // past TASK_SIZE
  EXPECT_EQ(bo->bind(*buf, 0, 0, 1u << 1), -EINVAL);        // unknown flag
  EXPECT_EQ(bo->unbind(*buf), -EINVAL);                     // not bound
  EXPECT_EQ(bo->munmap(), -EINVAL);                         // not mapped
  EXPECT_EQ(bo->mmap(0).error(), -EINVAL);
  EXPECT_EQ(bo->mmap(PROT_EXEC).error(), -EINVAL);
  // Nothing was bound: the GPU sees the process's memory.
  EXPECT_EQ(gpu_check(r, *buf, kBuf, 1), 0);

  // Overlaps: with its own binding (runtime), with another BO's (driver).
  auto other = rt::Bo::create(r.ctx, 64 << 10, kSysVram);
  ASSERT_TRUE(other.ok());
  rt::Va spare = 0;
  {
    auto m = r.ctx.mmap(1 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS);  // reserved VA
    ASSERT_TRUE(m.ok());
    spare = *m;
  }
  ASSERT_EQ(bo->bind(spare, 32 << 10), 0);
  EXPECT_EQ(bo->bind(spare + (16 << 10), 32 << 10, 32 << 10), -EINVAL);
  EXPECT_EQ(other->bind(spare + (16 << 10)), -EINVAL);
  ASSERT_EQ(bo->bind(spare + (256 << 10), 32 << 10, 32 << 10), 0);  // a second window
  // A VRAM-only BO has no CPU view; a second view of one BO is refused.
  auto vram_only = rt::Bo::create(r.ctx, 4096, GPUSVM_RT_BO_PLACEMENT_VRAM);
  ASSERT_TRUE(vram_only.ok());
  EXPECT_EQ(vram_only->mmap().error(), -EINVAL);
  auto view = other->mmap();
  ASSERT_TRUE(view.ok());
  EXPECT_EQ(other->mmap().error(), -EBUSY);
  // A context with live BOs cannot be destroyed.
  EXPECT_EQ(gpusvm_rt_context_destroy(r.ctx.get()), -EBUSY);

  EXPECT_EQ(bo->unbind(spare), 0);
  EXPECT_EQ(bo->reset(), 0);  // the second window too
  EXPECT_EQ(other->reset(), 0);
  EXPECT_EQ(vram_only->reset(), 0);
  // Both windows are mirror again: the reservation faults (PROT_NONE: the job fails).
  {
    rt::CmdBuf cb;
    ASSERT_EQ(cb.store_qword(spare + (256 << 10), 1), 0);
    EXPECT_EQ(r.run(cb), -EFAULT);
  }
  EXPECT_EQ(r.ctx.munmap(spare, 1 << 20), 0);
  EXPECT_EQ(r.ctx.free(*buf), 0);
  r.check_mm();
}

}  // namespace
}  // namespace gpusvm::sysalloc
