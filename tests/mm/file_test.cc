// File objects (ShmemObject as an O_TMPFILE + ftruncate file): pwrite/pread without a mapping,
// MAP_SHARED and MAP_PRIVATE mappings of the same pages, hmm_range_fault on them, and which
// of their pages migrate_vma may take (docs/mm.md "File objects").
#include <cstring>

#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

constexpr uint64_t kFilePages = 8;
constexpr uint64_t kFileSize = kFilePages * kPageSize;

// Bytes that say which file offset they were written at, and by which generation.
std::vector<uint8_t> pattern_bytes(uint64_t off, uint64_t len, uint8_t gen) {
  std::vector<uint8_t> v(len);
  for (uint64_t i = 0; i < len; i++) v[i] = static_cast<uint8_t>(((off + i) * 31) ^ gen ^ ((off + i) >> 12));
  return v;
}

class FileTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    Result<std::shared_ptr<ShmemObject>> f = ShmemObject::create(mem.get(), kFileSize, "tmpfile");
    ASSERT_TRUE(f.ok());
    file = *f;
  }
  void TearDown() override {
    if (as) as->exit();
    file.reset();  // the page cache goes with the last reference: nothing may leak
    MmTest::TearDown();
  }
  // The pfn of the page-cache folio at pgoff (0 when none is cached).
  Pfn cache_pfn(uint64_t pgoff) {
    Folio* f = file->find_folio(pgoff);
    if (!f) return 0;
    const Pfn pfn = f->pfn();
    f->put();
    return pfn;
  }
  std::shared_ptr<ShmemObject> file;
};

TEST_F(FileTest, PwritePreadRoundTripWithoutMapping) {
  // 1. An unaligned write across three pages allocates exactly those three cache pages.
  const uint64_t off = kPageSize - 100, len = 2 * kPageSize + 50;  // pages 0..2
  const uint64_t free0 = mem->free_pages();
  std::vector<uint8_t> in = pattern_bytes(off, len, 1);
  ASSERT_EQ(file->pwrite(in.data(), len, off), static_cast<int64_t>(len));
  EXPECT_EQ(free0 - mem->free_pages(), 3u);
  EXPECT_NE(cache_pfn(0), 0u);
  EXPECT_NE(cache_pfn(2), 0u);
  EXPECT_EQ(cache_pfn(3), 0u);
  // 2. The same bytes come back, and the untouched bytes around them are zero.
  std::vector<uint8_t> out(kFileSize, 0xAA);
  ASSERT_EQ(file->pread(out.data(), kFileSize, 0), static_cast<int64_t>(kFileSize));
  for (uint64_t i = 0; i < kFileSize; i++) {
    const uint8_t want = (i >= off && i < off + len) ? in[i - off] : 0;
    ASSERT_EQ(out[i], want) << "offset " << i;
  }
  // 3. Reading holes allocated nothing; the cache pages are dirty.
  EXPECT_EQ(free0 - mem->free_pages(), 3u);
  Folio* f = file->find_folio(1);
  ASSERT_NE(f, nullptr);
  EXPECT_TRUE(f->test(kFolioDirty));
  f->put();
  // 4. Short read at the end, nothing past it.
  EXPECT_EQ(file->pread(out.data(), 2 * kPageSize, kFileSize - 10), 10);
  EXPECT_EQ(file->pread(out.data(), 16, kFileSize), 0);
  EXPECT_EQ(file->pread(out.data(), 16, kFileSize + kPageSize), 0);
}

TEST_F(FileTest, BadInput) {
  uint8_t buf[16] = {};
  EXPECT_EQ(ShmemObject::create(mem.get(), 0).error(), -EINVAL);
  EXPECT_EQ(ShmemObject::create(nullptr, kPageSize).error(), -EINVAL);
  EXPECT_EQ(file->pwrite(nullptr, 16, 0), -EINVAL);
  EXPECT_EQ(file->pread(nullptr, 16, 0), -EINVAL);
  EXPECT_EQ(file->pwrite(buf, 16, ~0ULL - 4), -EINVAL);  // offset + len wraps
  EXPECT_EQ(file->pread(buf, 16, ~0ULL - 4), -EINVAL);
  EXPECT_EQ(file->pwrite(buf, 16, kFileSize - 8), -EFBIG);  // the size is fixed
  EXPECT_EQ(file->pwrite(buf, 0, 0), 0);
  EXPECT_EQ(file->pread(buf, 0, 0), 0);
  EXPECT_EQ(cache_pfn(kFilePages - 1), 0u) << "a failed pwrite allocated a page";
}

TEST_F(FileTest, PwriteAllocationFailureIsCleanOrShort) {
  std::vector<uint8_t> in = pattern_bytes(0, 2 * kPageSize, 2);
  {
    // The first page cannot be allocated: nothing written, nothing cached.
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 1});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ(file->pwrite(in.data(), in.size(), 0), -ENOMEM);
  }
  EXPECT_EQ(cache_pfn(0), 0u);
  {
    // The second one fails: a short write of the first page, as write(2) reports.
    fault_inject::ScopedArm arm("mm.alloc_folio", {.nth = 2});
    EXPECT_EQ(file->pwrite(in.data(), in.size(), 0), static_cast<int64_t>(kPageSize));
  }
  std::vector<uint8_t> out(2 * kPageSize, 0xAA);
  ASSERT_EQ(file->pread(out.data(), out.size(), 0), static_cast<int64_t>(out.size()));
  EXPECT_EQ(std::memcmp(out.data(), in.data(), kPageSize), 0);
  for (uint64_t i = kPageSize; i < 2 * kPageSize; i++) ASSERT_EQ(out[i], 0) << i;
  EXPECT_EQ(cache_pfn(1), 0u);
}

TEST_F(FileTest, SharedMappingAndPreadSeeTheSamePages) {
  std::vector<uint8_t> in = pattern_bytes(0, kFileSize, 3);
  ASSERT_EQ(file->pwrite(in.data(), kFileSize, 0), static_cast<int64_t>(kFileSize));
  Result<Va> va = as->mmap(0, kFileSize, PROT_READ | PROT_WRITE, MAP_SHARED, file);
  ASSERT_TRUE(va.ok());
  // 1. Loads see what pwrite wrote, through the cache pages themselves.
  std::vector<uint8_t> seen(kFileSize);
  ASSERT_EQ(cpu::copy_out(*as, *va, seen.data(), kFileSize), 0);
  EXPECT_EQ(seen, in);
  // 2. Stores through the mapping are what pread returns.
  ASSERT_EQ(cpu::store<uint64_t>(*as, *va + 5 * kPageSize + 8, 0x1122334455667788ULL), 0);
  uint64_t word = 0;
  ASSERT_EQ(file->pread(&word, sizeof(word), 5 * kPageSize + 8), 8);
  EXPECT_EQ(word, 0x1122334455667788ULL);
  // 3. A later pwrite is visible to the mapping without a fault.
  const uint64_t faults = as->stats().faults.get();
  const uint64_t v2 = 0xCAFEF00DULL;
  ASSERT_EQ(file->pwrite(&v2, sizeof(v2), 2 * kPageSize), 8);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va + 2 * kPageSize), v2);
  EXPECT_EQ(as->stats().faults.get(), faults);
  EXPECT_MM_CHECK_OK(*mem);  // cache reference + one mapping per page
}

TEST_F(FileTest, PrivateMappingCopiesOnWriteAndKeepsItsCopy) {
  std::vector<uint8_t> in = pattern_bytes(0, kFileSize, 4);
  ASSERT_EQ(file->pwrite(in.data(), kFileSize, 0), static_cast<int64_t>(kFileSize));
  Result<Va> va = as->mmap(0, kFileSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, file);
  ASSERT_TRUE(va.ok());
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), *va, kFileSize, &mirror), 0);
  std::vector<uint64_t> pfns;
  // 1. Read faults map the cache pages read-only (hmm: VALID, not WRITE, the cache pfn).
  ASSERT_EQ(mirror_range(*as, n, *va, *va + kFileSize, HMM_PFN_REQ_FAULT, pfns), 0);
  for (uint64_t p = 0; p < kFilePages; p++) {
    EXPECT_EQ(pfns[p] & (HMM_PFN_VALID | HMM_PFN_WRITE), HMM_PFN_VALID) << p;
    EXPECT_EQ(hmm_pfn_to_pfn(pfns[p]), cache_pfn(p)) << p;
  }
  // 2. A CPU store to page 1 copies it; a device write fault on page 2 too. The file keeps
  //    its bytes.
  ASSERT_EQ(cpu::store<uint64_t>(*as, *va + kPageSize, 0x5555), 0);
  ASSERT_EQ(mirror_range(*as, n, *va + 2 * kPageSize, *va + 3 * kPageSize,
                         HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  EXPECT_TRUE(pfns[0] & HMM_PFN_WRITE);
  EXPECT_NE(hmm_pfn_to_pfn(pfns[0]), cache_pfn(2));
  uint64_t word = 0;
  ASSERT_EQ(file->pread(&word, 8, kPageSize), 8);
  uint64_t want = 0;
  std::memcpy(&want, in.data() + kPageSize, 8);
  EXPECT_EQ(word, want);
  // 3. A pwrite after the copy reaches the pages still shared with the cache (page 3), not
  //    the private copy (page 1).
  const uint64_t v = 0x7777;
  ASSERT_EQ(file->pwrite(&v, 8, kPageSize), 8);
  ASSERT_EQ(file->pwrite(&v, 8, 3 * kPageSize), 8);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va + kPageSize), 0x5555u);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va + 3 * kPageSize), v);
  // 4. The copy carries the rest of the page's file bytes.
  std::vector<uint8_t> page(kPageSize);
  ASSERT_EQ(cpu::copy_out(*as, *va + 2 * kPageSize, page.data(), kPageSize), 0);
  EXPECT_EQ(std::memcmp(page.data(), in.data() + 2 * kPageSize, kPageSize), 0);
  n.remove();
  EXPECT_MM_CHECK_OK(*mem);
}

TEST_F(FileTest, HmmWriteFaultOnSharedMappingWritesThePageCache) {
  Result<Va> ro = as->mmap(0, kFileSize, PROT_READ, MAP_SHARED, file);
  Result<Va> rw = as->mmap(0, kFileSize, PROT_READ | PROT_WRITE, MAP_SHARED, file);
  ASSERT_TRUE(ro.ok() && rw.ok());
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), kMmapMinAddr, kTaskSize - kMmapMinAddr, &mirror), 0);
  std::vector<uint64_t> pfns;
  // A write fault on the read-only shared mapping is refused; on the writable one it maps the
  // cache page writable (no copy), so the device writes the file.
  EXPECT_EQ(mirror_range(*as, n, *ro, *ro + kPageSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns),
            -EPERM);
  ASSERT_EQ(mirror_range(*as, n, *rw, *rw + kFileSize, HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE, pfns), 0);
  for (uint64_t p = 0; p < kFilePages; p++) {
    ASSERT_TRUE(pfns[p] & HMM_PFN_WRITE) << p;
    ASSERT_EQ(hmm_pfn_to_pfn(pfns[p]), cache_pfn(p)) << p;
    const uint64_t v = pattern(p, 5);
    std::memcpy(mem->pfn_to_page(hmm_pfn_to_pfn(pfns[p]))->data(), &v, 8);  // the "device" writes
  }
  for (uint64_t p = 0; p < kFilePages; p++) {
    uint64_t word = 0;
    ASSERT_EQ(file->pread(&word, 8, p * kPageSize), 8);
    EXPECT_EQ(word, pattern(p, 5)) << p;
    EXPECT_EQ(*cpu::load<uint64_t>(*as, *ro + p * kPageSize), pattern(p, 5)) << p;
  }
  n.remove();
  EXPECT_MM_CHECK_OK(*mem);
}

// migrate_vma on file mappings: only the anonymous copies of a private mapping move; the
// page cache and the holes stay.
TEST_F(FileTest, MigrateTakesOnlyTheCopiesOfAPrivateMapping) {
  TestDevice dev(mem.get(), 64);
  ASSERT_TRUE(dev.ok());
  std::vector<uint8_t> in = pattern_bytes(0, kFileSize, 6);
  ASSERT_EQ(file->pwrite(in.data(), 4 * kPageSize, 0), static_cast<int64_t>(4 * kPageSize));
  Result<Va> priv = as->mmap(0, kFileSize, PROT_READ | PROT_WRITE, MAP_PRIVATE, file);
  Result<Va> shared = as->mmap(0, kFileSize, PROT_READ | PROT_WRITE, MAP_SHARED, file);
  ASSERT_TRUE(priv.ok() && shared.ok());
  // Pages 0-1 copied (written), 2-3 read (the cache pages mapped), 4-7 holes.
  fill_pages(*as, *priv, 2 * kPageSize, 7);
  ASSERT_TRUE(cpu::load<uint64_t>(*as, *priv + 2 * kPageSize).ok());
  ASSERT_TRUE(cpu::load<uint64_t>(*as, *priv + 3 * kPageSize).ok());
  Result<uint64_t> moved = dev.migrate_to_device(*as, *priv, *priv + kFileSize);
  ASSERT_TRUE(moved.ok()) << moved.error();
  EXPECT_EQ(*moved, 2u);
  EXPECT_EQ(dev.free_pages(), 62u);
  // The shared mapping: accepted (as Linux), nothing collected.
  fill_pages(*as, *shared + 4 * kPageSize, 2 * kPageSize, 8);
  moved = dev.migrate_to_device(*as, *shared, *shared + kFileSize);
  ASSERT_TRUE(moved.ok());
  EXPECT_EQ(*moved, 0u);
  // The device pages come back on CPU access, with their data.
  EXPECT_EQ(verify_pages(*as, *priv, 2 * kPageSize, 7), 0);
  EXPECT_EQ(dev.cpu_faults.load(), 2);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *priv + 4 * kPageSize), pattern(*shared + 4 * kPageSize, 8));
  as->exit();
  EXPECT_EQ(dev.free_pages(), 64u);
}

}  // namespace
}  // namespace gpusvm::mm::testing
