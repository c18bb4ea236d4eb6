// Every public entry point rejects bad arguments with a clear errno and changes nothing.
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

using BadInputTest = MmTest;

TEST_F(BadInputTest, MmapRejectsAndLeavesNoVma) {
  const int anon = MAP_PRIVATE | MAP_ANONYMOUS;
  EXPECT_EQ(as->mmap(0, 0, PROT_READ, anon).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPageSize, 0x80, anon).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, MAP_ANONYMOUS).error(), -EINVAL);  // no type
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, anon | 0x40000000).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, ~0ULL - 10, PROT_READ, anon).error(), -ENOMEM);  // length overflow
  EXPECT_EQ(as->mmap(0, kTaskSize + kPageSize, PROT_READ, anon).error(), -ENOMEM);
  EXPECT_EQ(as->mmap(0x10001, kPageSize, PROT_READ, anon | MAP_FIXED).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0x1000, kPageSize, PROT_READ, anon | MAP_FIXED).error(), -EPERM);
  EXPECT_EQ(as->mmap(kTaskSize - kPageSize, 2 * kPageSize, PROT_READ, anon | MAP_FIXED).error(), -ENOMEM);
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, MAP_PRIVATE).error(), -EBADF);  // file mapping without file
  auto file = ShmemObject::create(mem.get(), kPageSize);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, anon, *file).error(), -EINVAL);
  EXPECT_EQ(as->mmap(0, kPageSize, PROT_READ, MAP_SHARED, *file, 100).error(), -EINVAL);
  EXPECT_EQ(ShmemObject::create(mem.get(), 0).error(), -EINVAL);
  ReadLock g(&as->mmap_lock());
  EXPECT_TRUE(as->vmas().empty());
}

TEST_F(BadInputTest, MunmapMprotectMadviseMremap) {
  Va va = map_anon(*as, 4 * kPageSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  EXPECT_EQ(as->munmap(va + 1, kPageSize), -EINVAL);
  EXPECT_EQ(as->munmap(va, 0), -EINVAL);
  EXPECT_EQ(as->munmap(kTaskSize + kPageSize, kPageSize), -EINVAL);
  EXPECT_EQ(as->munmap(va, ~0ULL), -EINVAL);
  EXPECT_EQ(as->mprotect(va, kPageSize, PROT_READ | 0x100), -EINVAL);
  EXPECT_EQ(as->mprotect(va, ~0ULL - 5, PROT_READ), -ENOMEM);
  // Runs past the VMA: Linux changes the VMA, then fails at the hole (do_mprotect_pkey); the
  // protection asked for is the one it has, so nothing changes here. The differential
  // scenario mprotect_over_hole checks the change itself.
  EXPECT_EQ(as->mprotect(va, 8 * kPageSize, PROT_READ | PROT_WRITE), -ENOMEM);
  EXPECT_EQ(as->mprotect(va - kPageSize, 2 * kPageSize, PROT_READ), -ENOMEM);  // hole first
  EXPECT_EQ(as->madvise(va, kPageSize, -1), -EINVAL);
  EXPECT_EQ(as->madvise(va, ~0ULL - 5, MADV_DONTNEED), -EINVAL);
  EXPECT_EQ(as->madvise(kTaskSize - kPageSize, 2 * kPageSize, MADV_DONTNEED), -ENOMEM);
  EXPECT_EQ(as->mremap(va + 1, kPageSize, kPageSize, 0).error(), -EINVAL);
  EXPECT_EQ(as->mremap(va, 0, kPageSize, 0).error(), -EINVAL);
  EXPECT_EQ(as->mremap(va, kPageSize, 0, 0).error(), -EINVAL);
  EXPECT_EQ(as->mremap(va, kPageSize, kPageSize, MREMAP_FIXED, 0x700000000).error(), -EINVAL);
  // Growing a range that runs past its VMA: -EFAULT. (The same size without MREMAP_FIXED is a
  // no-op that returns va, as in Linux: mremap_at does not look past the first VMA then.)
  EXPECT_EQ(as->mremap(va, 8 * kPageSize, 16 * kPageSize, MREMAP_MAYMOVE).error(), -EFAULT);
  EXPECT_EQ(*as->mremap(va, 8 * kPageSize, 8 * kPageSize, MREMAP_MAYMOVE), va);
  // Nothing changed: still mapped, writable, same data.
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
  EXPECT_TRUE(query_page(*as, va).writable);
  // Empty mprotect/madvise succeed without doing anything, as on Linux.
  EXPECT_EQ(as->mprotect(va, 0, PROT_NONE), 0);
  EXPECT_EQ(as->madvise(va, 0, MADV_DONTNEED), 0);
  EXPECT_EQ(verify_pages(*as, va, 4 * kPageSize, 1), 0);
}

TEST_F(BadInputTest, NotifierInsertRejects) {
  TestMirror m;
  MmuIntervalNotifier n;
  EXPECT_EQ(n.insert(as.get(), 0x10000, 0, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), ~0ULL - kPageSize, 2 * kPageSize, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), kTaskSize, kPageSize, &m), -EINVAL);
  EXPECT_EQ(n.insert(as.get(), 0x10000, kPageSize, nullptr), -EINVAL);
  EXPECT_FALSE(n.inserted());
  ASSERT_EQ(n.insert(as.get(), 0x10000, kPageSize, &m), 0);
  EXPECT_EQ(n.insert(as.get(), 0x10000, kPageSize, &m), -EINVAL);  // already inserted
  n.remove();
}

}  // namespace
}  // namespace gpusvm::mm::testing
