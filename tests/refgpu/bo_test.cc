// Buffer objects: created in VRAM or system memory, CPU mmap through the AddressSpace (the
// shmem backing), eviction of a VRAM BO to system memory (by hand and by VRAM pressure)
// preserving every byte and telling the binding observers first, move back, argument checks.
#include <gtest/gtest.h>

#include <sys/mman.h>

#include <atomic>

#include "drivers/refgpu/bo.h"
#include "gpusvm/base/errno.h"
#include "gpusvm/base/lock.h"
#include "tests/refgpu/vram_test_util.h"

namespace gpusvm::refgpu::testing {
namespace {

// Records move notifications and what the backing looked like when each came: the old
// backing must still be in place (the BO tells before it moves).
class RecordingObserver : public BoBindingObserver {
 public:
  void bo_move_notify(Bo* bo) override {
    notifies.fetch_add(1);
    EXPECT_EQ(lockdep::held_count(), 1) << "only the BO lock is held";
    last = bo;
  }
  std::atomic<int> notifies{0};
  Bo* last = nullptr;
};

class BoTest : public VramTest {
 protected:
  BoRef make(uint64_t size, uint32_t placement, uint32_t flags = 0) {
    Result<BoRef> r = Bo::create({.mem = mem.get(), .vram = vram.get(), .size = size, .placement = placement,
                                  .flags = flags});
    EXPECT_TRUE(r.ok()) << r.error();
    return r ? *r : BoRef();
  }
  int create_error(BoCreateInfo info) {
    Result<BoRef> r = Bo::create(info);
    return r.error();
  }
  // Bytes of the BO that differ from fill_bytes(seed) at address `va` (Bo::read).
  int64_t bo_bad_bytes(Bo* bo, mm::Va va, uint64_t seed) {
    std::vector<uint8_t> got(bo->size());
    if (bo->read(0, got.data(), got.size()) != 0) return -1;
    std::vector<uint8_t> want = bytes_for(va, bo->size(), seed);
    int64_t bad = 0;
    for (size_t i = 0; i < got.size(); i++) bad += got[i] != want[i];
    return bad;
  }
  void bo_fill(Bo* bo, mm::Va va, uint64_t seed) {
    std::vector<uint8_t> b = bytes_for(va, bo->size(), seed);
    ASSERT_EQ(bo->write(0, b.data(), b.size()), 0);
  }
};

TEST_F(BoTest, CreatedInVramOrSystemAndReadZeroes) {
  BoRef v = make(k2M + 64 * k4K, kBoPlacementVram | kBoPlacementSystem);
  ASSERT_TRUE(v);
  EXPECT_EQ(v->backing(), BoBacking::kVram);
  EXPECT_EQ(region->buddy().used_bytes(), k2M + 64 * k4K);
  EXPECT_EQ(vram->lru().linked_count(), 1u);
  BoRef s = make(16 * k4K, kBoPlacementSystem);
  ASSERT_TRUE(s);
  EXPECT_EQ(s->backing(), BoBacking::kSystem);
  EXPECT_EQ(region->buddy().used_bytes(), k2M + 64 * k4K);
  EXPECT_NE(v->mmap_offset(), s->mmap_offset());
  EXPECT_EQ(v->mmap_offset() % k4K, 0u);
  // Fresh BOs read zeroes wherever they are (VRAM is cleared: dirty it first to be sure).
  bo_fill(v.get(), 0, 1);
  v.reset();
  EXPECT_EQ(region->buddy().used_bytes(), 0u) << "the last reference frees the VRAM";
  EXPECT_EQ(vram->lru().linked_count(), 0u);
  BoRef v2 = make(k2M + 64 * k4K, kBoPlacementVram);
  std::vector<uint8_t> got(v2->size(), 0xff), zero(v2->size(), 0);
  ASSERT_EQ(v2->read(0, got.data(), got.size()), 0);
  EXPECT_EQ(got, zero);
  ASSERT_EQ(s->read(0, got.data(), s->size()), 0);
  EXPECT_TRUE(std::all_of(got.begin(), got.begin() + s->size(), [](uint8_t b) { return b == 0; }));
  // Written bytes read back, in VRAM and in system memory.
  bo_fill(v2.get(), 100, 2);
  bo_fill(s.get(), 200, 3);
  EXPECT_EQ(bo_bad_bytes(v2.get(), 100, 2), 0);
  EXPECT_EQ(bo_bad_bytes(s.get(), 200, 3), 0);
}

TEST_F(BoTest, CpuMmapSharesThePagesWithTheBo) {
  BoRef s = make(32 * k4K, kBoPlacementSystem);
  Result<mm::Va> va = s->cpu_map(as.get(), 0, PROT_READ | PROT_WRITE);
  ASSERT_TRUE(va.ok()) << va.error();
  fill_bytes(*as, *va, s->size(), 4);  // CPU stores through the mapping
  EXPECT_EQ(bo_bad_bytes(s.get(), *va, 4), 0) << "the BO sees the CPU's bytes";
  bo_fill(s.get(), *va, 5);  // the driver writes the BO
  EXPECT_EQ(bad_bytes(*as, *va, s->size(), 5), 0) << "the CPU sees the BO's bytes";
  // A VRAM BO is moved to system memory to be mapped, and stays there.
  BoRef v = make(16 * k4K, kBoPlacementVram | kBoPlacementSystem);
  bo_fill(v.get(), 0x1000, 6);
  ASSERT_EQ(v->backing(), BoBacking::kVram);
  Result<mm::Va> va2 = v->cpu_map(as.get(), 0, PROT_READ);
  ASSERT_TRUE(va2.ok()) << va2.error();
  EXPECT_EQ(v->backing(), BoBacking::kSystem);
  EXPECT_EQ(region->buddy().used_bytes(), 0u);
  {
    std::vector<uint8_t> got(v->size());
    ASSERT_EQ(mm::cpu::copy_out(*as, *va2, got.data(), got.size()), 0);
    EXPECT_EQ(got, bytes_for(0x1000, v->size(), 6)) << "bytes written in VRAM are what the CPU maps";
  }
  EXPECT_EQ(v->move_to_vram(), -EBUSY) << "a CPU-mapped BO stays in system memory";
  EXPECT_MM_CHECK_OK(*mem);
  // A VRAM-only BO has no CPU-visible placement in the model.
  BoRef vo = make(16 * k4K, kBoPlacementVram);
  EXPECT_EQ(vo->cpu_map(as.get(), 0, PROT_READ).error(), -EINVAL);
  EXPECT_EQ(s->cpu_map(as.get(), 0, PROT_EXEC).error(), -EINVAL);
  EXPECT_EQ(s->cpu_map(as.get(), 0, 0).error(), -EINVAL);
}

TEST_F(BoTest, EvictionPreservesBytesAndNotifiesObserversFirst) {
  BoRef v = make(k2M + 16 * k4K, kBoPlacementVram | kBoPlacementSystem);
  bo_fill(v.get(), 0x5000, 7);
  RecordingObserver obs;
  std::vector<BoPageAddr> pages(v->npages());
  ASSERT_EQ(v->get_backing(0, v->npages(), pages.data(), &obs), 0);
  for (uint64_t i = 0; i < v->npages(); i++) {
    ASSERT_EQ(pages[i].where, BoBacking::kVram);
    ASSERT_LT(pages[i].addr, region->total_size());
  }
  EXPECT_EQ(pages[0].addr % k2M, 0u) << "a 2 MiB block first";
  // Bytes in VRAM at the offsets the binder got.
  EXPECT_EQ(bad_vram_bytes(region->arena(), pages[0].addr, 0x5000, k2M, 7), 0);
  ASSERT_EQ(v->move_to_system(), 0);
  EXPECT_EQ(obs.notifies.load(), 1);
  EXPECT_EQ(obs.last, v.get());
  EXPECT_EQ(v->backing(), BoBacking::kSystem);
  EXPECT_EQ(region->buddy().used_bytes(), 0u);
  EXPECT_EQ(vram->lru().linked_count(), 0u);
  EXPECT_EQ(bo_bad_bytes(v.get(), 0x5000, 7), 0);
  // The binder's new view: system pages holding the same bytes.
  ASSERT_EQ(v->get_backing(0, v->npages(), pages.data(), &obs), 0);
  for (uint64_t i = 0; i < v->npages(); i++) {
    ASSERT_EQ(pages[i].where, BoBacking::kSystem);
    mm::Folio* f = mem->pfn_to_page(pages[i].addr >> mm::kPageShift);
    ASSERT_NE(f, nullptr);
    std::vector<uint8_t> want = bytes_for(0x5000 + i * k4K, k4K, 7);
    ASSERT_EQ(std::memcmp(f->data(), want.data(), k4K), 0) << "page " << i;
  }
  EXPECT_EQ(v->move_to_system(), 0) << "already there";
  EXPECT_EQ(obs.notifies.load(), 1);
  // And back into VRAM: told again, bytes again.
  ASSERT_EQ(v->move_to_vram(), 0);
  EXPECT_EQ(obs.notifies.load(), 2);
  EXPECT_EQ(v->backing(), BoBacking::kVram);
  EXPECT_EQ(bo_bad_bytes(v.get(), 0x5000, 7), 0);
  v->remove_observer(&obs);
  ASSERT_EQ(v->move_to_system(), 0);
  EXPECT_EQ(obs.notifies.load(), 2) << "a removed observer is not told";
  EXPECT_EQ(v->stats().evictions.get(), 2u);
  EXPECT_EQ(v->stats().moves_to_vram.get(), 1u);
}

// VRAM pressure: a new VRAM BO evicts the least recently used one; a busy one is skipped.
TEST_F(BoTest, VramPressureEvictsTheLeastRecentlyUsedBo) {
  const uint64_t sz = 3 * k2M;  // 16 MiB of VRAM: two fit, the third needs room
  BoRef a = make(sz, kBoPlacementVram | kBoPlacementSystem);
  BoRef b = make(sz, kBoPlacementVram | kBoPlacementSystem);
  bo_fill(a.get(), 0xa000, 8);
  bo_fill(b.get(), 0xb000, 9);
  RecordingObserver oa, ob;
  BoPageAddr p;
  ASSERT_EQ(a->get_backing(0, 1, &p, &oa), 0);
  ASSERT_EQ(b->get_backing(0, 1, &p, &ob), 0);
  vram->lru().touch(a.get());  // a used last: b is the victim
  BoRef c = make(sz, kBoPlacementVram);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->backing(), BoBacking::kVram);
  EXPECT_EQ(b->backing(), BoBacking::kSystem);
  EXPECT_EQ(a->backing(), BoBacking::kVram);
  EXPECT_EQ(ob.notifies.load(), 1);
  EXPECT_EQ(oa.notifies.load(), 0);
  EXPECT_EQ(bo_bad_bytes(a.get(), 0xa000, 8), 0);
  EXPECT_EQ(bo_bad_bytes(b.get(), 0xb000, 9), 0);
  EXPECT_GE(vram->stats().evictions.get(), 1u);
  // Everything busy (a held busy by its owner, c VRAM-only but evictable): a fourth BO evicts
  // c, never a.
  a->begin_busy();
  BoRef d = make(sz, kBoPlacementVram | kBoPlacementSystem);
  EXPECT_EQ(a->backing(), BoBacking::kVram) << "a busy entry is skipped";
  EXPECT_EQ(c->backing(), BoBacking::kSystem);
  EXPECT_EQ(d->backing(), BoBacking::kVram);
  a->end_busy();
  a->remove_observer(&oa);
  b->remove_observer(&ob);
}

TEST_F(BoTest, BadArgumentsAreInvalid) {
  BoCreateInfo ok{.mem = mem.get(), .vram = vram.get(), .size = k4K, .placement = kBoPlacementSystem};
  auto with = [&](auto f) {
    BoCreateInfo i = ok;
    f(i);
    return create_error(i);
  };
  EXPECT_EQ(create_error(ok), 0);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.mem = nullptr; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.size = 0; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.size = k4K + 1; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.size = kBoMaxSize + k4K; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.placement = 0; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.placement = 1u << 7; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.flags = 1u << 9; }), -EINVAL);
  EXPECT_EQ(with([](BoCreateInfo& i) { i.flags = kBoFlagVramContiguous; }), -EINVAL) << "contiguous without VRAM";
  EXPECT_EQ(with([](BoCreateInfo& i) { i.placement = kBoPlacementVram; i.vram = nullptr; }), -EINVAL);
  EXPECT_EQ(with([&](BoCreateInfo& i) { i.placement = kBoPlacementVram; i.size = region->total_size() + k2M; }),
            -ENOSPC) << "a VRAM-only BO larger than VRAM";
  BoRef s = make(2 * k4K, kBoPlacementSystem);
  BoPageAddr p[2];
  EXPECT_EQ(s->get_backing(2, 1, p, nullptr), -EINVAL);
  EXPECT_EQ(s->get_backing(1, 2, p, nullptr), -EINVAL);
  EXPECT_EQ(s->get_backing(0, 0, p, nullptr), -EINVAL);
  EXPECT_EQ(s->move_to_vram(), -EINVAL) << "VRAM is not an allowed placement";
  uint8_t buf[8];
  EXPECT_EQ(s->read(2 * k4K - 4, buf, 8), -EINVAL);
  EXPECT_EQ(s->write(2 * k4K + 1, buf, 0), -EINVAL);
  // Contiguous VRAM: one run.
  BoRef c = make(3 * k2M, kBoPlacementVram, kBoFlagVramContiguous);
  std::vector<BoPageAddr> pages(c->npages());
  ASSERT_EQ(c->get_backing(0, c->npages(), pages.data(), nullptr), 0);
  for (uint64_t i = 1; i < c->npages(); i++) ASSERT_EQ(pages[i].addr, pages[0].addr + i * k4K);
}

}  // namespace
}  // namespace gpusvm::refgpu::testing
