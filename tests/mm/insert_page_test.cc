// Device-file mappings: AddressSpace::mmap_device with a driver's mmap hook, vm_insert_page,
// and what VM_MIXEDMAP means for faults, hmm_range_fault, migration, fork and munmap.
#include <cstring>

#include "gpusvm/mm/insert_page.h"
#include "gpusvm/mm/migrate.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

class InsertPageTest : public MmTest {
 protected:
  // A driver's mmap: one page per address, filled with fill(va), inserted, then the
  // allocation's reference dropped (dmirror_fops_mmap). Returns what the hook returned.
  Result<Va> map_device(uint64_t pages, int prot, int flags, uint64_t fill_gen = 0) {
    return as->mmap_device(0, pages * kPageSize, prot, flags, &file_identity, [&](Vma& vma) {
      as->mmap_assert_write_locked();  // the hook's context (mmap_device holds it for write)
      for (Va va = vma.start; va < vma.end; va += kPageSize) {
        Folio* page = mem->folio_alloc(0, true);
        if (!page) return -ENOMEM;
        const uint64_t v = fill_gen ? pattern(va, fill_gen) : 0;
        std::memcpy(page->data(), &v, sizeof(v));
        const int rc = vm_insert_page(*as, vma, va, page);
        page->put();
        if (rc) return rc;
      }
      return 0;
    });
  }
  int file_identity = 0;  // the "device file" (only its address matters)
};

TEST_F(InsertPageTest, PrivateMappingIsReadOnlyMixedMapAndCopiesOnWrite) {
  const uint64_t free0 = mem->free_pages();
  Result<Va> va = map_device(4, PROT_READ | PROT_WRITE, MAP_PRIVATE, 1);
  ASSERT_TRUE(va.ok()) << va.error();
  EXPECT_EQ(free0 - mem->free_pages(), 4u);
  {
    ReadLock g(&as->mmap_lock());
    const Vma* v = as->vma_lookup(*va);
    ASSERT_NE(v, nullptr);
    EXPECT_TRUE(v->flags & VM_MIXEDMAP);
    EXPECT_FALSE(v->is_anonymous());
  }
  // 1. Present, read-only, the mapping's reference only; hmm reports a normal page.
  PageState st = query_page(*as, *va);
  EXPECT_EQ(st.kind, PageKind::kSmall);
  EXPECT_FALSE(st.writable);
  EXPECT_EQ(st.refcount, 1);
  TestMirror mirror;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), *va, 4 * kPageSize, &mirror), 0);
  std::vector<uint64_t> pfns;
  ASSERT_EQ(mirror_range(*as, n, *va, *va + 4 * kPageSize, 0, pfns), 0);
  for (uint64_t p = 0; p < 4; p++) {
    EXPECT_EQ(pfns[p] & (HMM_PFN_VALID | HMM_PFN_WRITE | HMM_PFN_ERROR), HMM_PFN_VALID) << p;
  }
  EXPECT_MM_CHECK_OK(*mem);
  // 2. The driver's bytes are visible; a CPU write copies the page into an anonymous one and
  //    the inserted page, no longer mapped, is freed.
  EXPECT_EQ(verify_pages(*as, *va, 4 * kPageSize, 1), 0);
  const Pfn old = st.pfn;
  ASSERT_EQ(cpu::store<uint64_t>(*as, *va + 8, 42), 0);
  st = query_page(*as, *va);
  EXPECT_NE(st.pfn, old);
  EXPECT_TRUE(st.writable);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va), pattern(*va, 1));
  EXPECT_EQ(free0 - mem->free_pages(), 4u);
  // 3. migrate_vma refuses a VM_MIXEDMAP VMA.
  std::vector<uint64_t> src(4), dst(4);
  MigrateVma m{.mm = as.get(), .start = *va, .end = *va + 4 * kPageSize, .src = src.data(),
               .dst = dst.data(), .flags = MIGRATE_VMA_SELECT_SYSTEM};
  {
    ReadLock g(&as->mmap_lock());
    EXPECT_EQ(migrate_vma_setup(&m), -EINVAL);
  }
  n.remove();
  EXPECT_MM_CHECK_OK(*mem);
  // 4. munmap frees every page.
  ASSERT_EQ(as->munmap(*va, 4 * kPageSize), 0);
  EXPECT_EQ(mem->free_pages(), free0);
}

TEST_F(InsertPageTest, SharedWritableMappingIsWritableAndNoneEntryIsSigbus) {
  Result<Va> va = map_device(2, PROT_READ | PROT_WRITE, MAP_SHARED, 2);
  ASSERT_TRUE(va.ok());
  PageState st = query_page(*as, *va);
  EXPECT_TRUE(st.writable);
  ASSERT_EQ(cpu::store<uint64_t>(*as, *va, 7), 0);
  EXPECT_EQ(query_page(*as, *va).pfn, st.pfn);  // written in place, no copy
  // The driver has no fault handler: once an entry is gone, an access is SIGBUS.
  ASSERT_EQ(as->madvise(*va, kPageSize, MADV_DONTNEED), 0);
  EXPECT_EQ(cpu::load<uint64_t>(*as, *va).error(), -EFAULT);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va + kPageSize), pattern(*va + kPageSize, 2));
}

TEST_F(InsertPageTest, ForkSharesTheInsertedPages) {
  Result<Va> va = map_device(2, PROT_READ | PROT_WRITE, MAP_PRIVATE, 3);
  ASSERT_TRUE(va.ok());
  Result<std::unique_ptr<AddressSpace>> child = as->fork();
  ASSERT_TRUE(child.ok());
  EXPECT_EQ(query_page(**child, *va).pfn, query_page(*as, *va).pfn);
  EXPECT_EQ(query_page(*as, *va).refcount, 2);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(cpu::store<uint64_t>(**child, *va, 9), 0);  // the child copies
  EXPECT_EQ(*cpu::load<uint64_t>(*as, *va), pattern(*va, 3));
  EXPECT_EQ(*cpu::load<uint64_t>(**child, *va), 9u);
  EXPECT_MM_CHECK_OK(*mem);
  child->reset();
}

TEST_F(InsertPageTest, BadInput) {
  Folio* page = mem->folio_alloc(0, true);
  ASSERT_NE(page, nullptr);
  Folio* anon_page = nullptr;
  Folio* thp = mem->folio_alloc(kPmdOrder, true);
  Va anon = map_anon(*as, kPageSize);
  ASSERT_EQ(cpu::store<uint64_t>(*as, anon, 1), 0);
  anon_page = mem->pfn_to_page(query_page(*as, anon).pfn);
  int hook_calls = 0;
  Result<Va> va = as->mmap_device(0, 2 * kPageSize, PROT_READ, MAP_PRIVATE, &file_identity, [&](Vma& vma) {
    as->mmap_assert_write_locked();
    hook_calls++;
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start, nullptr), -EINVAL);
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start + 8, page), -EINVAL);            // unaligned
    EXPECT_EQ(vm_insert_page(*as, vma, vma.end, page), -EFAULT);                 // outside
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start - kPageSize, page), -EFAULT);
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start, anon_page), -EINVAL);          // anonymous
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start, mem->zero_page()), -EINVAL);   // zero page
    if (thp) {
      EXPECT_EQ(vm_insert_page(*as, vma, vma.start, thp), -EINVAL);  // large
    }
    Vma* anon_vma = as->vma_lookup(anon);
    EXPECT_EQ(vm_insert_page(*as, *anon_vma, anon, page), -EINVAL);              // anon VMA
    EXPECT_FALSE(vma.flags & VM_MIXEDMAP);  // nothing inserted yet
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start, page), 0);
    EXPECT_EQ(vm_insert_page(*as, vma, vma.start, page), -EBUSY);                // occupied
    return 0;
  });
  ASSERT_TRUE(va.ok());
  EXPECT_EQ(hook_calls, 1);
  EXPECT_EQ(page->refcount(), 2);  // ours + the mapping's
  page->put();
  if (thp) thp->put();
  // mmap_device's own argument checks.
  auto ok_hook = [](Vma&) { return 0; };
  EXPECT_EQ(as->mmap_device(0, kPageSize, PROT_READ, MAP_PRIVATE, nullptr, ok_hook).error(), -EINVAL);
  EXPECT_EQ(as->mmap_device(0, kPageSize, PROT_READ, MAP_PRIVATE, &file_identity, nullptr).error(), -EINVAL);
  EXPECT_EQ(as->mmap_device(0, 0, PROT_READ, MAP_PRIVATE, &file_identity, ok_hook).error(), -EINVAL);
  EXPECT_EQ(as->mmap_device(0, kPageSize, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, &file_identity, ok_hook).error(),
            -EINVAL);
  EXPECT_EQ(as->mmap_device(0, kPageSize, PROT_READ, MAP_PRIVATE | MAP_SHARED, &file_identity, ok_hook).error(),
            -EINVAL);
  EXPECT_EQ(as->mmap_device(*va, kPageSize, PROT_READ, MAP_PRIVATE | MAP_FIXED_NOREPLACE, &file_identity,
                            ok_hook).error(), -EEXIST);
  EXPECT_EQ(as->mmap_device(kPageSize, kPageSize, PROT_READ, MAP_PRIVATE | MAP_FIXED, &file_identity,
                            ok_hook).error(), -EPERM);
  EXPECT_MM_CHECK_OK(*mem);
}

// The hook fails after inserting some pages: the mapping is gone and so are the pages.
TEST_F(InsertPageTest, HookFailureUndoesTheMapping) {
  const uint64_t free0 = mem->free_pages();
  Va where = 0;
  Result<Va> va = as->mmap_device(0, 4 * kPageSize, PROT_READ, MAP_PRIVATE, &file_identity, [&](Vma& vma) {
    as->mmap_assert_write_locked();  // the hook's context (mmap_device holds it for write)
    where = vma.start;
    for (Va a = vma.start; a < vma.start + 2 * kPageSize; a += kPageSize) {
      Folio* page = mem->folio_alloc(0, true);
      EXPECT_EQ(vm_insert_page(*as, vma, a, page), 0);
      page->put();
    }
    return -EIO;
  });
  EXPECT_EQ(va.error(), -EIO);
  EXPECT_EQ(mem->free_pages(), free0);
  ReadLock g(&as->mmap_lock());
  EXPECT_EQ(as->vma_lookup(where), nullptr);
}

// Allocation failures inside the hook (its page, or vm_insert_page's page tables) fail the
// mmap cleanly, whichever hit fails.
TEST_F(InsertPageTest, InjectedAllocationFailuresFailTheMmapCleanly) {
  const uint64_t free0 = mem->free_pages();
  for (const char* point : {"mm.alloc_folio", "mm.alloc_pgtable"}) {
    for (uint64_t nth = 1; nth <= 4; nth++) {
      fault_inject::ScopedArm arm(point, {.nth = nth});
      ASSERT_EQ(arm.status(), 0);
      Result<Va> va = map_device(4, PROT_READ, MAP_PRIVATE, 4);
      if (fault_inject::failures(point) == 0) {
        ASSERT_TRUE(va.ok());  // fewer hits than nth: it simply worked
        EXPECT_EQ(verify_pages(*as, *va, 4 * kPageSize, 4), 0);
        ASSERT_EQ(as->munmap(*va, 4 * kPageSize), 0);
        continue;
      }
      EXPECT_EQ(va.error(), -ENOMEM) << point << " nth " << nth;
      EXPECT_MM_CHECK_OK(*mem);
    }
  }
  as->exit();  // frees the page tables too
  EXPECT_EQ(mem->free_pages(), free0);
}

}  // namespace
}  // namespace gpusvm::mm::testing
