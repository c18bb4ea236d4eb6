// Owner groups: two devices with an interconnect share one owner (each sees the other's device
// pages in place, and a migration between their memories is copied by the source device);
// without one they have distinct owners and go through system memory.
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/svm/pagemap_owner.h"
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

TEST(SvmPagemapOwner, LinkedPeersShareAnOwnerUnlinkedOnesDoNot) {
  PagemapOwnerList list;
  // a-b linked, c linked to a only: c cannot join {a, b} (b does not reach it).
  PagemapPeer a, b, c, d;
  auto linked = [&](const PagemapPeer& x, const PagemapPeer& y) {
    auto is = [&](const PagemapPeer& p, const PagemapPeer& q) { return &x == &p && &y == &q; };
    return is(b, a) || is(c, a) || is(a, c) || is(d, c);
  };
  ASSERT_EQ(a.acquire_owner(&list, linked), 0);
  ASSERT_EQ(b.acquire_owner(&list, linked), 0);
  ASSERT_EQ(c.acquire_owner(&list, linked), 0);
  ASSERT_EQ(d.acquire_owner(&list, linked), 0);
  EXPECT_NE(a.owner(), nullptr);
  EXPECT_EQ(a.owner(), b.owner());
  EXPECT_NE(c.owner(), a.owner());
  EXPECT_EQ(d.owner(), c.owner());  // d reaches c, the only member of c's group
  EXPECT_EQ(a.acquire_owner(&list, linked), -EINVAL);  // already has one
  PagemapPeer e;
  EXPECT_EQ(e.acquire_owner(nullptr, linked), -EINVAL);
  EXPECT_EQ(e.acquire_owner(&list, nullptr), -EINVAL);
  // A group lives while it has members.
  const void* ab = a.owner();
  a.release_owner();
  EXPECT_EQ(a.owner(), nullptr);
  EXPECT_EQ(b.owner(), ab);
  ASSERT_EQ(a.acquire_owner(&list, [](const PagemapPeer&, const PagemapPeer&) { return true; }), 0);
  EXPECT_EQ(a.owner(), ab);  // joined the first group that reaches it all: {b}
  b.release_owner();
  c.release_owner();
  d.release_owner();
  a.release_owner();
}

class PagemapOwnerTest : public PagemapTest {
 protected:
  void make(bool linked) {
    auto link = [linked](const PagemapPeer&, const PagemapPeer&) { return linked; };
    ASSERT_EQ(p0.acquire_owner(&list, link), 0);
    ASSERT_EQ(p1.acquire_owner(&list, link), 0);
    v0 = std::make_unique<TestVram>(mem.get(), kVramPages, "gpu0", p0.owner());
    v1 = std::make_unique<TestVram>(mem.get(), kVramPages, "gpu1", p1.owner());
    ASSERT_TRUE(v0->ok() && v1->ok());
    if (linked) {
      v0->add_peer(v1->device());
      v1->add_peer(v0->device());
    }
    len = 16 * kPageSize + kPmdSize;
    va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
    fill_bytes(*as, va, kPmdSize, 1);  // a THP: a 2 MiB device folio in gpu0
    mem->set_thp_mode(mm::ThpMode::kNever);
    fill_bytes(*as, va + kPmdSize, 16 * kPageSize, 1);
    mem->set_thp_mode(mm::ThpMode::kMadvise);
    ASSERT_EQ(notifier.insert(as.get(), va, 2 * kPmdSize, &mirror), 0);
  }
  void TearDown() override {
    notifier.remove();
    if (as) as->exit();
    v0.reset();
    v1.reset();
    p0.release_owner();
    p1.release_owner();
    PagemapTest::TearDown();
  }
  // What hmm_range_fault (snapshot) reports for `owner`: pages VALID in device memory.
  uint64_t valid_device_pages(const void* owner, TestVram& in) {
    std::vector<uint64_t> pfns;
    EXPECT_EQ(mm::testing::mirror_range(*as, notifier, va, va + len, 0, pfns, owner), 0);
    uint64_t n = 0;
    for (uint64_t w : pfns) n += (w & mm::HMM_PFN_VALID) && in.dev_pagemap()->contains(mm::hmm_pfn_to_pfn(w));
    return n;
  }

  PagemapOwnerList list;
  PagemapPeer p0, p1;
  std::unique_ptr<TestVram> v0, v1;
  mm::testing::TestMirror mirror;
  mm::MmuIntervalNotifier notifier;
  Va va = 0;
  uint64_t len = 0;
};

TEST_F(PagemapOwnerTest, OneGroupSeesPagesInPlaceAndSourceCopies) {
  make(/*linked=*/true);
  ASSERT_EQ(p0.owner(), p1.owner());
  ASSERT_EQ(migrate(va, len, {}, v0.get()), 0);
  TestDevmem* in0 = last;
  // gpu1 (same owner) sees gpu0's pages in place, and reaches them over the interconnect.
  EXPECT_EQ(valid_device_pages(p1.owner(), *v0), len / kPageSize);
  mm::Folio* page = mem->pfn_to_page(pfn_at(*as, va + kPmdSize));
  const PagemapAddr a = page_to_pagemap(page)->device_map(v1->device(), page, 0, DmaDirection::kBidirectional);
  EXPECT_EQ(a.proto, PagemapAddrProto::kDeviceInterconnect);
  page_to_pagemap(page)->device_unmap(v1->device(), a);
  // gpu0 -> gpu1: no CPU fault, gpu0 copies (its copy_to_ram into gpu1's pages).
  const uint64_t faults = pagemap_stats().cpu_faults.load();
  const uint64_t peer = pagemap_stats().peer_copies.load();
  ASSERT_EQ(migrate(va, len, {}, v1.get()), 0);
  EXPECT_EQ(pagemap_stats().cpu_faults.load(), faults);
  EXPECT_EQ(pagemap_stats().peer_copies.load(), peer + 1);
  EXPECT_EQ(v0->copies_to_ram.load(), 1);
  EXPECT_EQ(v1->copies_to_devmem.load(), 0);
  EXPECT_TRUE(in0->released());
  EXPECT_EQ(v0->free_pages(), kVramPages);
  EXPECT_EQ(mem->folio_of(pfn_at(*as, va))->order(), mm::kPmdOrder);  // still one 2 MiB folio
  EXPECT_EQ(device_bad_words(*as, *v1, va, len, 1), 0u);
  EXPECT_EQ(v0->live_device_maps.load() + v1->live_device_maps.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  // Back the other way, pulled by the destination this time.
  ASSERT_EQ(migrate(va, len, MigrateDetails{.source_peer_migrates = false}, v0.get()), 0);
  EXPECT_EQ(v0->copies_to_devmem.load(), 2);
  EXPECT_EQ(v1->copies_to_ram.load(), 0);
  EXPECT_EQ(device_bad_words(*as, *v0, va, len, 1), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 1), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(PagemapOwnerTest, TwoGroupsGoThroughSystemMemory) {
  make(/*linked=*/false);
  ASSERT_NE(p0.owner(), p1.owner());
  ASSERT_EQ(migrate(va, len, {}, v0.get()), 0);
  TestDevmem* in0 = last;
  EXPECT_EQ(valid_device_pages(p1.owner(), *v0), 0u);  // gpu1 cannot see gpu0's pages
  EXPECT_EQ(valid_device_pages(p0.owner(), *v0), len / kPageSize);
  // gpu0 -> gpu1: the walk faults the pages back (gpu0's migrate_to_ram), gpu1 copies from RAM.
  const uint64_t faults = pagemap_stats().cpu_faults.load();
  const uint64_t peer = pagemap_stats().peer_copies.load();
  ASSERT_EQ(migrate(va, len, {}, v1.get()), 0);
  EXPECT_GT(pagemap_stats().cpu_faults.load(), faults);
  EXPECT_EQ(pagemap_stats().peer_copies.load(), peer);
  EXPECT_GE(v0->copies_to_ram.load(), 1);
  EXPECT_EQ(v1->copies_to_devmem.load(), 1);
  EXPECT_TRUE(in0->released());
  EXPECT_EQ(device_bad_words(*as, *v1, va, len, 1), 0u);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 1), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

}  // namespace
}  // namespace gpusvm::svm::testing

namespace gpusvm::svm::testing {
namespace {

// gpu1's memory is fragmented: gpu0's 2 MiB folio moves into 512 small pages, so the source
// device folio is split in the migration (folio_split gives each small folio its own zdd
// reference) and each is freed on its own; the old allocation is released only after the
// last of them.
TEST_F(PagemapOwnerTest, CompoundPeerSourceSplitIntoSmallDestinations) {
  make(/*linked=*/true);
  ASSERT_EQ(migrate(va, len, {}, v0.get()), 0);
  TestDevmem* in0 = last;
  ASSERT_EQ(mem->folio_of(pfn_at(*as, va))->order(), mm::kPmdOrder);
  v1->fragmented = true;
  ASSERT_EQ(migrate(va, len, {}, v1.get()), 0);
  EXPECT_EQ(mem->folio_of(pfn_at(*as, va))->order(), 0u);
  EXPECT_TRUE(in0->released());
  EXPECT_EQ(v0->free_pages(), kVramPages);
  EXPECT_EQ(device_bad_words(*as, *v1, va, len, 1), 0u);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 1), 0u);
  EXPECT_TRUE(last->released());
}

}  // namespace
}  // namespace gpusvm::svm::testing
