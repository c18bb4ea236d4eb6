// Case family "walk": hmm_range_fault snapshot over populated memory.
//
// ours:     hmm_range_fault with no request flags (a snapshot) over the whole range, called
//           the way a driver calls it: interval notifier inserted over the range,
//           read_begin / mmap read lock / hmm_range_fault / driver lock / read_retry.
// baseline: a plain page-table walk without hmm bookkeeping: walk_page_range with
//           callbacks that read every PMD / PTE under the same locks hmm takes (PMD lock for
//           a huge leaf, pte_offset_map_lock for a PTE table) and store the pfn.
// Both walk the same page tables of the same address space in the same run, alternating.
// The figure is ns per 4 KiB page of the range; ratio = baseline / ours, so ratio < 1 is the
// cost of hmm's per-page bookkeeping (request flags, output encoding, VMA checks).
//
// Variants: walk-4k (MADV_NOHUGEPAGE: 512 PTEs per PMD) and walk-thp (MADV_HUGEPAGE:
// one PMD leaf per 2 MiB). Memory is populated by a one-byte CPU store per page.
#include <cerrno>
#include <cstring>

#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/pagewalk.h"
#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {
namespace {

using mm::kPageSize;
using mm::kPmdSize;
using mm::Pfn;
using mm::Va;

// The byte stored in page i: never 0, so an unpopulated page cannot pass for a written one.
uint8_t page_tag(uint64_t i) { return static_cast<uint8_t>((i * 131 + 7) % 255 + 1); }

// ---- the baseline walker ----

constexpr uint64_t kPlainNone = ~0ULL;  // "no page" in the baseline's output

struct PlainWalk {
  Va start;
  uint64_t* out;  // one pfn per page, kPlainNone where nothing is mapped
};

int plain_pte_hole(Va start, Va end, mm::MmWalk& walk) {
  PlainWalk& p = *static_cast<PlainWalk*>(walk.priv);
  for (Va a = start; a < end; a += kPageSize) p.out[(a - p.start) / kPageSize] = kPlainNone;
  return 0;
}

int plain_pmd_entry(mm::PmdSlot slot, Va start, Va end, mm::MmWalk& walk) {
  PlainWalk& p = *static_cast<PlainWalk*>(walk.priv);
  uint64_t* out = p.out + (start - p.start) / kPageSize;
  for (;;) {
    const mm::Pmd pmd = slot.load_lockless();
    if (pmd.is_none()) return plain_pte_hole(start, end, walk);
    if (pmd.is_leaf()) {
      mm::Pte leaf;
      {
        SpinLockGuard g(&slot.table->lock);
        const mm::Pmd locked = slot.table->get(slot.index);
        if (!locked.is_leaf()) continue;  // split meanwhile: read the PMD again
        leaf = locked.leaf();
      }
      const Pfn first = leaf.pfn() + ((start - mm::pmd_align_down(start)) >> mm::kPageShift);
      const uint64_t n = (end - start) / kPageSize;
      for (uint64_t i = 0; i < n; i++) out[i] = leaf.present() ? first + i : kPlainNone;
      return 0;
    }
    mm::PteTable* t = walk.mm->page_table().pte_offset_map_lock(slot);
    if (!t) continue;  // the PMD changed between the read and the lock
    for (Va a = start; a < end; a += kPageSize) {
      const mm::Pte pte = t->get(mm::pte_index(a));
      *out++ = pte.present() ? pte.pfn() : kPlainNone;
    }
    mm::PageTable::pte_unmap_unlock(t);
    return 0;
  }
}

constexpr mm::MmWalkOps kPlainWalkOps{
    .pte_hole = plain_pte_hole,
    .pmd_entry = plain_pmd_entry,
};

// ---- the case ----

Report run_walk(const Options& opt, uint64_t size, bool thp) {
  Report rep;
  rep.case_name = thp ? "walk-thp" : "walk-4k";
  size = mm::pmd_align_up(size);
  const uint64_t npages = size / kPageSize;

  // RAM for the data, the zero pages and some slack; page tables live outside PhysMem.
  Machine m = Machine::create(size + (64ULL << 20));
  mm::AddressSpace& as = *m.as;
  const Va base = map_anon(as, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);

  // Populate: one byte per page through the CPU-access API (first-touch write faults).
  uint64_t t0 = now_ns();
  for (uint64_t i = 0; i < npages; i++) {
    require_ok(mm::cpu::store<uint8_t>(as, base + i * kPageSize, page_tag(i)),
               fmt::format("cpu::store at {:#x}", base + i * kPageSize));
  }
  const double populate_ns = static_cast<double>(now_ns() - t0);
  const uint64_t thps = as.stats().faults_thp.get(), smalls = as.stats().faults_anon.get();
  if (thp ? (thps != size / kPmdSize || smalls != 0) : (thps != 0 || smalls != npages)) {
    fail("populating {} took {} THP faults and {} 4 KiB faults; expected {}", human_bytes(size),
         thps, smalls, thp ? fmt::format("{} THP faults", size / kPmdSize)
                           : fmt::format("{} 4 KiB faults", npages));
  }
  const mm::PageKind want_kind = thp ? mm::PageKind::kThpPmd : mm::PageKind::kSmall;
  for (Va va = base; va < base + size; va += kPmdSize) {
    const mm::PageState st = mm::query_page(as, va);
    if (st.kind != want_kind) {
      fail("page {:#x} is {} after populating, expected {}", va, mm::page_kind_name(st.kind),
           mm::page_kind_name(want_kind));
    }
  }
  rep.detail("{} {} populated by {} one-byte CPU stores in {:.0f} ms ({} faults, {:.0f} ns/page)",
             human_bytes(size), thp ? "THP-backed (MADV_HUGEPAGE)" : "4 KiB-backed (MADV_NOHUGEPAGE)",
             npages, populate_ns / 1e6, as.stats().faults.get(), populate_ns / npages);

  TrivialMirror mirror;
  mm::MmuIntervalNotifier notifier;
  require_ok(notifier.insert(&as, base, size, &mirror), "MmuIntervalNotifier::insert");

  std::vector<uint64_t> hmm_pfns(npages), plain_pfns(npages);
  const uint64_t walks_before = as.stats().hmm_walks.get();
  int retries_total = 0;

  auto time_hmm = [&]() {
    std::fill(hmm_pfns.begin(), hmm_pfns.end(), 0);  // outputs: nothing may survive a run
    int retries = 0;
    const uint64_t s = now_ns();
    const int rc = mirror_range(as, notifier, mirror, base, base + size, 0, hmm_pfns.data(),
                                &retries);
    const uint64_t e = now_ns();
    require_ok(rc, "hmm_range_fault snapshot");
    retries_total += retries;
    return static_cast<double>(e - s) / npages;
  };
  auto time_plain = [&]() {
    std::fill(plain_pfns.begin(), plain_pfns.end(), 0);
    PlainWalk pw{base, plain_pfns.data()};
    const uint64_t s = now_ns();
    int rc;
    {
      ReadLock g(&as.mmap_lock());
      rc = mm::walk_page_range(as, base, base + size, kPlainWalkOps, &pw);
    }
    const uint64_t e = now_ns();
    require_ok(rc, "walk_page_range");
    return static_cast<double>(e - s) / npages;
  };

  // One untimed run of each warms caches and the branch predictors alike; then alternate
  // the order so neither side always runs on the caches the other one left behind.
  (void)time_plain();
  (void)time_hmm();
  std::vector<double> ours, base_line;
  for (int r = 0; r < opt.repeat; r++) {
    if (r % 2 == 0) {
      base_line.push_back(time_plain());
      ours.push_back(time_hmm());
    } else {
      ours.push_back(time_hmm());
      base_line.push_back(time_plain());
    }
  }

  // Verify the last run of both walks, page by page.
  const unsigned want_order = thp ? mm::kPmdOrder : 0;
  for (uint64_t i = 0; i < npages; i++) {
    const uint64_t h = hmm_pfns[i];
    const Va va = base + i * kPageSize;
    if (!(h & mm::HMM_PFN_VALID) || !(h & mm::HMM_PFN_WRITE) || (h & mm::HMM_PFN_ERROR)) {
      fail("hmm snapshot of populated page {:#x} (page {}) is {:#x}: expected VALID|WRITE", va,
           i, h);
    }
    if (mm::hmm_pfn_to_map_order(h) != want_order) {
      fail("hmm snapshot of {:#x} reports map order {}, expected {}", va,
           mm::hmm_pfn_to_map_order(h), want_order);
    }
    const Pfn pfn = mm::hmm_pfn_to_pfn(h);
    if (pfn != plain_pfns[i]) {
      fail("page {:#x}: hmm reports pfn {:#x}, the plain walk pfn {:#x}", va, pfn, plain_pfns[i]);
    }
    if (pfn >= m.mem->ram_pages()) fail("page {:#x}: hmm pfn {:#x} is not RAM", va, pfn);
    const uint8_t got = static_cast<uint8_t>(*m.mem->ram_data(pfn));
    if (got != page_tag(i)) {
      fail("page {:#x}: frame {:#x} holds {:#x}, the CPU wrote {:#x}", va, pfn, got, page_tag(i));
    }
  }
  if (as.stats().hmm_faults.get() != 0) fail("a snapshot walk took {} faults", as.stats().hmm_faults.get());
  rep.detail("verified: all {} pages VALID|WRITE, map order {}, same pfn as the plain walk, "
             "frame holds the byte the CPU wrote",
             npages, want_order);
  const uint64_t walks = as.stats().hmm_walks.get() - walks_before;
  rep.detail("hmm_range_fault: {} calls, {} page walks, {} protocol retries, {} invalidations",
             opt.repeat + 1, walks, retries_total, mirror.invalidations());

  check_machine(*m.mem, rep, "with the range populated");
  notifier.remove();
  require_ok(as.munmap(base, size), "munmap");
  check_machine(*m.mem, rep, "after munmap");

  rep.ours = {median(ours), "ns/page"};
  rep.baseline_name = "plain-walk";
  rep.baseline = {median(base_line), "ns/page"};
  rep.ratio = rep.baseline.value / rep.ours.value;
  rep.detail("runs (ns/page): ours {}; plain walk {}", runs_string(ours), runs_string(base_line));
  rep.detail("per 2 MiB: ours {:.0f} ns, plain walk {:.0f} ns; hmm bookkeeping costs {:+.1f} ns/page",
             rep.ours.value * 512, rep.baseline.value * 512, rep.ours.value - rep.baseline.value);
  rep.metric("populate_ns_per_page", populate_ns / npages);
  rep.metric("pages", static_cast<double>(npages));
  rep.metric("hmm_walks", static_cast<double>(walks));
  rep.metric("protocol_retries", retries_total);
  for (size_t i = 0; i < ours.size(); i++) {
    rep.metric(fmt::format("ours_run{}", i), ours[i]);
    rep.metric(fmt::format("baseline_run{}", i), base_line[i]);
  }
  return rep;
}

const Registrar kWalk4k({
    .name = "walk-4k",
    .family = "walk",
    .summary = "hmm_range_fault snapshot vs plain page-table walk, 4 KiB-backed memory",
    .default_size = 1ULL << 30,
    .run = [](const Options& o, uint64_t size) { return run_walk(o, size, false); },
});
const Registrar kWalkThp({
    .name = "walk-thp",
    .family = "walk",
    .summary = "hmm_range_fault snapshot vs plain page-table walk, THP-backed memory",
    .default_size = 1ULL << 30,
    .run = [](const Options& o, uint64_t size) { return run_walk(o, size, true); },
});

}  // namespace
}  // namespace gpusvm::bench
