// mm::check: proves the invariants listed in check.h.
#include "gpusvm/mm/check.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <tuple>
#include <unordered_map>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/devmap.h"
#include "gpusvm/mm/shmem.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {
namespace {

// What the page tables say about one folio.
struct Observed {
  int pmd_maps = 0;
  std::map<uint64_t, int> pte_maps;  // page index -> PTE mappings
  std::vector<RmapItem> items;
};

class Checker {
 public:
  explicit Checker(PhysMem& mem) : mem_(mem) {}

  void problem(const char* fmt, auto... args) {
    char buf[320];
    std::snprintf(buf, sizeof(buf), fmt, args...);
    report_.problems.emplace_back(buf);
  }

  void check_space(AddressSpace& mm) {
    ReadLock g(&mm.mmap_lock());
    mm.page_table().for_each_pmd_slot(0, kTaskSize, [&](Va haddr, PmdTable* t, unsigned i) {
      check_pmd(mm, PmdSlot{t, i}, haddr);
    });
  }

  void check_pmd(AddressSpace& mm, PmdSlot slot, Va haddr) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
    SpinLockGuard g(&slot.table->lock);
    const Pmd pmd = slot.table->get(slot.index);
    if (pmd.is_none()) return;
    if (pmd.is_table()) {
      PteTable* t = pmd.table();
      SpinLockGuard tg(&t->ptl);
      for (unsigned i = 0; i < kPtrsPerTable; i++) {
        const Pte pte = t->get(i);
        if (!pte.is_none()) check_entry(mm, haddr + i * kPageSize, pte, false);
      }
      return;
    }
    // Every huge leaf has a deposited table except a page-cache THP's (do_set_pmd deposits
    // none: splitting a file PMD zaps it).
    const Pte leaf = pmd.leaf();
    const bool file_thp = leaf.present() && !mm.mem()->is_huge_zero_pfn(leaf.pfn()) &&
                          mm.mem()->folio_of(leaf.pfn())->test(kFolioShmem);
    if (!file_thp && !slot.table->has_deposit(slot.index)) {
      problem("%p: huge leaf at %#lx has no deposited PTE table", (void*)&mm, (unsigned long)haddr);
    }
    if (file_thp && slot.table->has_deposit(slot.index)) {
      problem("%p: page-cache THP PMD at %#lx has a deposited table", (void*)&mm,
              (unsigned long)haddr);
    }
    check_entry(mm, haddr, pmd.leaf(), true);
  }

  void check_entry(AddressSpace& mm, Va va, Pte e, bool huge) GPUSVM_NO_THREAD_SAFETY_ANALYSIS {
    report_.entries_checked++;
    const Vma* vma = mm.vma_lookup(va);
    if (!vma || (huge && va + kPmdSize > vma->end)) {
      problem("%p: entry %#lx at %#lx outside a VMA", (void*)&mm, (unsigned long)e.raw(), (unsigned long)va);
      return;
    }
    if (e.is_swap()) {
      if (huge) problem("%p: swap entry in a PMD at %#lx", (void*)&mm, (unsigned long)va);
      if (!vma->is_anonymous() || vma->is_shared()) {
        problem("%p: swap entry at %#lx outside a private anonymous VMA", (void*)&mm, (unsigned long)va);
      }
      swap_refs_[e.swap_slot()]++;
      return;
    }
    if (e.is_migration()) {
      problem("%p: leftover migration entry at %#lx (pfn %#lx)", (void*)&mm, (unsigned long)va,
              (unsigned long)e.pfn());
      return;
    }
    if (e.present()) {
      if (e.write() && !(vma->flags & VM_WRITE)) {
        problem("%p: writable entry at %#lx in a VMA without VM_WRITE", (void*)&mm, (unsigned long)va);
      }
      if (huge && mem_.is_huge_zero_pfn(e.pfn())) {
        if (e.write()) problem("%p: writable huge zero folio at %#lx", (void*)&mm, (unsigned long)va);
        return;
      }
      if (e.special()) {
        if (!mem_.is_zero_pfn(e.pfn()) || e.write()) {
          problem("%p: bad special entry at %#lx", (void*)&mm, (unsigned long)va);
        }
        return;
      }
    } else if (e.is_device_private() || e.is_device_exclusive()) {
      if (e.is_device_private() && !mem_.pfn_to_pagemap(e.pfn())) {
        problem("%p: device-private entry at %#lx without a registered pagemap", (void*)&mm,
                (unsigned long)va);
        return;
      }
    } else {
      problem("%p: unknown entry %#lx at %#lx", (void*)&mm, (unsigned long)e.raw(), (unsigned long)va);
      return;
    }
    Folio* page = mem_.pfn_to_page(e.pfn());
    if (!page || (page->flags() & kFolioFree) || page->head()->test(kFolioFree)) {
      problem("%p: entry at %#lx maps a free or invalid frame %#lx", (void*)&mm, (unsigned long)va,
              (unsigned long)e.pfn());
      return;
    }
    Folio* head = page->head();
    // Device-private memory is reachable only through device-private entries, everything else
    // only through present (or device-exclusive) ones.
    if (e.is_device_private() != folio_is_device_private(head)) {
      problem("%p: %s entry at %#lx maps %s folio %#lx", (void*)&mm,
              e.present() ? "present" : e.is_device_private() ? "device-private" : "device-exclusive",
              (unsigned long)va,
              folio_is_device_private(head) ? "a device-private" : "a non-device-private",
              (unsigned long)head->pfn());
    }
    // hugetlb pages live in hugetlb VMAs, mapped whole by PMD leaves, and nothing else does.
    if (vma->is_hugetlb() != head->test(kFolioHugetlb) || (vma->is_hugetlb() && !huge)) {
      problem("%p: entry at %#lx: %s folio %#lx in a %s VMA (%s)", (void*)&mm, (unsigned long)va,
              head->test(kFolioHugetlb) ? "hugetlb" : "non-hugetlb", (unsigned long)head->pfn(),
              vma->is_hugetlb() ? "hugetlb" : "non-hugetlb", huge ? "PMD" : "PTE");
    }
    if (huge && (head != page || head->order() != kPmdOrder || !pmd_aligned(va))) {
      problem("%p: PMD leaf at %#lx does not map an aligned PMD-order folio head", (void*)&mm,
              (unsigned long)va);
      return;
    }
    // A page-cache page is mapped where its file offset is: by the VMA of its object, at
    // the address of its index (for a large folio, the page of that index).
    if (head->test(kFolioShmem) &&
        (head->mapping() != vma->file.get() ||
         head->index() + page->page_index() != vma->pgoff_of(va))) {
      problem("%p: entry at %#lx maps page-cache page %lu of folio %#lx (index %lu), not the "
              "VMA's page %lu of its object",
              (void*)&mm, (unsigned long)va, (unsigned long)page->page_index(),
              (unsigned long)head->pfn(), (unsigned long)head->index(),
              (unsigned long)vma->pgoff_of(va));
    }
    if (e.write() && head->test(kFolioAnon) && !vma->is_shared() &&
        !page->test_page(kPageAnonExclusive)) {
      problem("%p: COW-shared page %#lx writable at %#lx", (void*)&mm, (unsigned long)e.pfn(),
              (unsigned long)va);
    }
    Observed& o = observed_[head];
    if (huge) {
      o.pmd_maps++;
      o.items.push_back(RmapItem{&mm, va, 0, true});
    } else {
      o.pte_maps[page->page_index()]++;
      o.items.push_back(RmapItem{&mm, va, static_cast<uint32_t>(page->page_index()), false});
    }
  }

  void check_folios() {
    auto key = [](const RmapItem& r) { return std::make_tuple(r.mm, r.va, r.page, r.pmd); };
    for (auto& [head, o] : observed_) {
      report_.folios_checked++;
      int maps = o.pmd_maps;
      for (auto& [idx, n] : o.pte_maps) maps += n;
      const int expected_ref = maps + (head->test(kFolioShmem) ? 1 : 0) +
                               (head->test(kFolioSwapCache) ? 1 : 0) + head->pincount();
      if (head->refcount() != expected_ref) {
        problem("folio %#lx: refcount %d, expected %d (%d mappings%s + %d pins)",
                (unsigned long)head->pfn(), head->refcount(), expected_ref, maps,
                head->test(kFolioShmem) ? " + page cache" : "", head->pincount());
      }
      if (head->entire_mapcount() != o.pmd_maps) {
        problem("folio %#lx: entire_mapcount %d, %d PMD mappings", (unsigned long)head->pfn(),
                head->entire_mapcount(), o.pmd_maps);
      }
      for (uint64_t i = 0; i < head->nr_pages(); i++) {
        auto it = o.pte_maps.find(i);
        const int want = it == o.pte_maps.end() ? 0 : it->second;
        if (head->page(i)->page_mapcount() != want) {
          problem("folio %#lx page %lu: mapcount %d, %d PTE mappings", (unsigned long)head->pfn(),
                  (unsigned long)i, head->page(i)->page_mapcount(), want);
        }
      }
      std::vector<RmapItem> rmap = folio_rmap_snapshot(head);
      std::sort(rmap.begin(), rmap.end(), [&](auto& a, auto& b) { return key(a) < key(b); });
      std::sort(o.items.begin(), o.items.end(), [&](auto& a, auto& b) { return key(a) < key(b); });
      if (rmap.size() != o.items.size() ||
          !std::equal(rmap.begin(), rmap.end(), o.items.begin(),
                      [&](auto& a, auto& b) { return key(a) == key(b); })) {
        problem("folio %#lx: reverse map has %zu items, page tables %zu mappings",
                (unsigned long)head->pfn(), rmap.size(), o.items.size());
      }
    }
  }

  // Every RAM frame: free ones are unreferenced and counted once; used ones are accounted for.
  void check_frames() {
    uint64_t free = 0;
    for (Pfn pfn = 0; pfn < mem_.ram_pages(); pfn++) {
      Folio* p = mem_.pfn_to_page(pfn);
      if (p->flags() & kFolioFree) {
        free++;
        if (p->refcount() != 0 || p->page_mapcount() != 0) {
          problem("free frame %#lx has refcount %d mapcount %d", (unsigned long)pfn, p->refcount(),
                  p->page_mapcount());
        }
        continue;
      }
      if (!p->is_head() || p->refcount() == 0) continue;  // tail, or reserved frame
      if (p->test(kFolioZero)) continue;
      if (!observed_.count(p) && p->test(kFolioSwapCache)) {
        if (p->refcount() != 1 + p->pincount()) {
          problem("swap-cache folio %#lx: unmapped, %d pins, refcount %d", (unsigned long)pfn,
                  p->pincount(), p->refcount());
        }
        continue;  // owned by the swap cache (checked by check_swap)
      }
      if (!observed_.count(p) && !p->test(kFolioShmem) && p->pincount() == 0) {
        problem("folio %#lx: refcount %d but no mapping and no owner (leaked)", (unsigned long)pfn,
                p->refcount());
      }
      if (!observed_.count(p) && p->pincount() > 0 &&
          p->refcount() != p->pincount() + (p->test(kFolioShmem) ? 1 : 0)) {
        problem("folio %#lx: unmapped, %d pins, refcount %d", (unsigned long)pfn, p->pincount(),
                p->refcount());
      }
      // A pinned hugetlb page zapped meanwhile (MADV_DONTNEED, munmap) stays in use until
      // the pin goes: the pool counts it, no page table does.
      if (!observed_.count(p) && p->pincount() > 0 && p->test(kFolioHugetlb)) pinned_unmapped_hugetlb_++;
      if (p->test(kFolioLocked)) problem("folio %#lx left locked", (unsigned long)pfn);
    }
    if (free != mem_.free_pages()) {
      problem("allocator counts %lu free pages, frames say %lu", (unsigned long)mem_.free_pages(),
              (unsigned long)free);
    }
  }

  // Every frame of every registered pagemap. Device folios have no owner besides the entries
  // that map them (device-private entries; present ones for coherent memory), pins, and a
  // migration in flight - none at a quiescent point: a driver keeps no reference of its own
  // (test_hmm's and drm_pagemap's contract; the device page table holds none). A device
  // folio with references that nothing accounts for is leaked: its memory never returns to
  // the driver (folio_free), and the pagemap cannot be removed.
  void check_device_frames() {
    for (DevPagemap* pgmap : mem_.pagemaps()) {
      for (Pfn pfn = pgmap->first_pfn(); pfn < pgmap->first_pfn() + pgmap->nr_pages(); pfn++) {
        Folio* p = pgmap->pfn_to_page(pfn);
        if (p->flags() & kFolioFree) {
          if (p->refcount() != 0 || p->page_mapcount() != 0) {
            problem("free device frame %#lx has refcount %d mapcount %d", (unsigned long)pfn,
                    p->refcount(), p->page_mapcount());
          }
          continue;
        }
        if (!p->is_head() || p->refcount() == 0) continue;
        report_.folios_checked++;
        if (p->test(kFolioLocked)) problem("device folio %#lx left locked", (unsigned long)pfn);
        if (observed_.count(p)) continue;  // refcount checked against its entries and pins
        if (p->pincount() == 0) {
          problem("device folio %#lx (pagemap owner %p): refcount %d, but no entry maps it and "
                  "no pin or migration holds it (leaked)",
                  (unsigned long)pfn, pgmap->owner(), p->refcount());
        } else if (p->refcount() != p->pincount()) {
          problem("device folio %#lx: unmapped, %d pins, refcount %d", (unsigned long)pfn,
                  p->pincount(), p->refcount());
        }
      }
    }
  }

  // The hugetlb pool: every live hugetlb folio is mapped or pinned (no leak, counted once),
  // and every reservation belongs to an unfaulted slot of a hugetlb VMA of a live address
  // space.
  void check_hugetlb(const std::vector<AddressSpace*>& spaces) {
    uint64_t mapped = 0;
    for (auto& [head, o] : observed_) mapped += head->test(kFolioHugetlb) ? 1 : 0;
    const PhysMem::HugetlbCounts c = mem_.hugetlb_counts();
    if (c.in_use != mapped + pinned_unmapped_hugetlb_ || c.in_use + c.reserved > c.total) {
      problem("hugetlb pool: %lu in use, %lu mapped, %lu pinned unmapped, %lu reserved, %lu total",
              (unsigned long)c.in_use, (unsigned long)mapped, (unsigned long)pinned_unmapped_hugetlb_,
              (unsigned long)c.reserved, (unsigned long)c.total);
    }
    for (auto [mm, haddr] : mem_.hugetlb_reservations()) {
      if (std::find(spaces.begin(), spaces.end(), mm) == spaces.end()) {
        problem("hugetlb reservation at %#lx of a dead address space %p", (unsigned long)haddr, (void*)mm);
        continue;
      }
      ReadLock g(&mm->mmap_lock());
      const Vma* v = mm->vma_lookup(haddr);
      PmdSlot slot = mm->page_table().pmd_lookup(haddr);
      if (!v || !v->is_hugetlb() || !pmd_aligned(haddr) || (slot && !slot.load_lockless().is_none())) {
        problem("%p: hugetlb reservation at %#lx not on an unfaulted hugetlb slot", (void*)mm,
                (unsigned long)haddr);
      }
    }
  }

  // The swap area: every slot's count is the number of swap PTEs that name it, every swap PTE
  // names a slot in use, a slot's cached folio is a small anonymous folio that knows the slot
  // (and is mapped, or named by a swap PTE, or on the LRU for reclaim to drop), and a slot
  // with no cached folio holds its bytes.
  void check_swap() {
    std::unordered_map<uint64_t, uint32_t> refs = swap_refs_;
    for (const SwapArea::SlotState& st : mem_.swap().snapshot()) {
      const auto it = refs.find(st.slot);
      const uint32_t n = it == refs.end() ? 0 : it->second;
      if (it != refs.end()) refs.erase(it);
      if (st.count != n) {
        problem("swap slot %lu: count %u, %u swap entries", (unsigned long)st.slot, st.count, n);
      }
      if (!st.cache) {
        if (!st.has_data) problem("swap slot %lu: in use without a folio or its bytes", (unsigned long)st.slot);
        if (st.count == 0) problem("swap slot %lu: in use, named by nothing", (unsigned long)st.slot);
        continue;
      }
      Folio* f = st.cache;
      if (!f->test(kFolioSwapCache) || f->swap_slot() != st.slot || f->large() || !f->test(kFolioAnon) ||
          (f->flags() & kFolioFree)) {
        problem("swap slot %lu: cached folio %#lx does not belong to it (flags %#x)", (unsigned long)st.slot,
                (unsigned long)f->pfn(), f->flags());
      }
      if (st.count == 0 && !f->mapped() && !f->test(kFolioLru)) {
        problem("swap slot %lu: cached folio %#lx unreachable (unmapped, no entry, off the LRU)",
                (unsigned long)st.slot, (unsigned long)f->pfn());
      }
    }
    for (auto [slot, n] : refs) {
      problem("%u swap entries name slot %lu, which is not in use", n, (unsigned long)slot);
    }
  }

  CheckReport take() { return std::move(report_); }

 private:
  PhysMem& mem_;
  CheckReport report_;
  std::unordered_map<Folio*, Observed> observed_;
  uint64_t pinned_unmapped_hugetlb_ = 0;  // counted by check_frames, used by check_hugetlb
  std::unordered_map<uint64_t, uint32_t> swap_refs_;  // slot -> swap PTEs naming it
};

}  // namespace

std::string CheckReport::to_string() const {
  if (problems.empty()) return "ok";
  std::string s;
  const size_t shown = std::min<size_t>(problems.size(), 20);
  for (size_t i = 0; i < shown; i++) s += problems[i] + "\n";
  if (shown < problems.size()) s += "... and " + std::to_string(problems.size() - shown) + " more\n";
  return s;
}

CheckReport check(PhysMem& mem) {
  Checker c(mem);
  std::vector<AddressSpace*> spaces = mem.address_spaces();
  std::sort(spaces.begin(), spaces.end());
  // One address space at a time: at a quiescent point nothing changes between them.
  for (AddressSpace* mm : spaces) c.check_space(*mm);
  c.check_folios();
  c.check_frames();
  c.check_device_frames();
  c.check_hugetlb(spaces);
  c.check_swap();
  return c.take();
}

CheckReport check(AddressSpace& mm) { return check(*mm.mem()); }

}  // namespace gpusvm::mm
