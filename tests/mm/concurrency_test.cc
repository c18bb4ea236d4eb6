// Concurrency: real threads faulting, mirroring and changing the address space at once.
// Every test is seeded (printed, GPUSVM_SEED overrides) and bounded; data is verified after.
#include <atomic>
#include <cstdlib>
#include <random>
#include <thread>

#include "gpusvm/base/sched_point.h"
#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

uint64_t test_seed() {
  const char* env = std::getenv("GPUSVM_SEED");
  uint64_t seed = env ? std::strtoull(env, nullptr, 0) : std::random_device{}();
  std::printf("seed=%llu (GPUSVM_SEED to replay)\n", static_cast<unsigned long long>(seed));
  return seed;
}

using ConcurrencyTest = MmTest;

// Many threads fault the same pages (each writes its own word of every page) and different
// pages; nothing is lost and each page is allocated once.
TEST_F(ConcurrencyTest, ManyThreadsFaultSameAndDifferentPages) {
  constexpr int kThreads = 4;
  constexpr uint64_t kPages = 64;
  Va shared = map_anon(*as, kPages * kPageSize);
  Va huge = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  Va own = map_anon(*as, kThreads * kPages * kPageSize);
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      for (uint64_t p = 0; p < kPages; p++) {
        const Va a = shared + p * kPageSize + t * 8;
        if (cpu::load<uint64_t>(*as, a).error()) errors++;  // races read faults with writes
        if (cpu::store<uint64_t>(*as, a, pattern(a, t))) errors++;
        const Va h = huge + (p * 512 / kPages) * kPageSize * 2 + t * 8;
        if (cpu::atomic_fetch_add(*as, h, 1).error()) errors++;
        const Va o = own + (t * kPages + p) * kPageSize;
        if (cpu::store<uint64_t>(*as, o, pattern(o, t))) errors++;
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(errors.load(), 0);
  for (uint64_t p = 0; p < kPages; p++) {
    for (int t = 0; t < kThreads; t++) {
      const Va a = shared + p * kPageSize + t * 8;
      EXPECT_EQ(*cpu::load<uint64_t>(*as, a), pattern(a, t));
      const Va o = own + (t * kPages + p) * kPageSize;
      EXPECT_EQ(*cpu::load<uint64_t>(*as, o), pattern(o, t));
    }
    EXPECT_EQ(query_page(*as, shared + p * kPageSize).kind, PageKind::kSmall);
  }
  for (uint64_t p = 0; p < kPages; p++) {
    const Va h = huge + (p * 512 / kPages) * kPageSize * 2;
    uint64_t sum = 0;
    for (int t = 0; t < kThreads; t++) sum += *cpu::load<uint64_t>(*as, h + t * 8);
    EXPECT_EQ(sum, static_cast<uint64_t>(kThreads));
  }
  EXPECT_EQ(query_page(*as, huge).kind, PageKind::kThpPmd);
  EXPECT_EQ(as->stats().faults_thp.get(), 2u);  // one THP per 2 MiB, however many racers
}

// A device mirror following the protocol: what it keeps after all threads stop must match
// the CPU page table exactly (anything stale would have been zapped by invalidate()).
class Mirror : public MmuIntervalNotifierOps {
 public:
  Mirror(AddressSpace& as, Va start, uint64_t pages) : as_(as), start_(start), dev_pt_(pages, 0) {}

  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& r, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock_);
    n->set_seq(cur_seq);
    for (Va va = std::max(r.start, start_); va < std::min(r.end, start_ + dev_pt_.size() * kPageSize);
         va += kPageSize) {
      dev_pt_[(va - start_) / kPageSize] = 0;  // zap device PTE
    }
    return true;
  }

  // One device fault on [va, va + n pages): returns true when it committed.
  bool fault(MmuIntervalNotifier& n, Va va, uint64_t npages, bool write) {
    std::vector<uint64_t> pfns(npages);
    for (int tries = 0; tries < 1000; tries++) {
      HmmRange r{.notifier = &n, .notifier_seq = n.read_begin(), .start = va,
                 .end = va + npages * kPageSize, .hmm_pfns = pfns.data(),
                 .default_flags = HMM_PFN_REQ_FAULT | (write ? HMM_PFN_REQ_WRITE : 0)};
      int rc;
      {
        ReadLock g(&as_.mmap_lock());
        rc = hmm_range_fault(&r);
      }
      if (rc == -EBUSY) continue;
      if (rc) return false;  // unmapped meanwhile
      std::lock_guard<std::mutex> g(lock_);
      if (n.read_retry(r.notifier_seq)) continue;
      for (uint64_t i = 0; i < npages; i++) dev_pt_[(va - start_) / kPageSize + i] = pfns[i];
      commits_++;
      return true;
    }
    return false;
  }

  // At a quiescent point: every device PTE still set must equal the CPU's entry.
  int verify() {
    int bad = 0;
    for (size_t i = 0; i < dev_pt_.size(); i++) {
      const uint64_t d = dev_pt_[i];
      if (!(d & HMM_PFN_VALID)) continue;
      PageState st = query_page(as_, start_ + i * kPageSize);
      const bool present = st.kind != PageKind::kNone && st.kind != PageKind::kSoftLeaf;
      if (!present || st.pfn != hmm_pfn_to_pfn(d) || ((d & HMM_PFN_WRITE) && !st.writable)) {
        if (bad++ < 5) {
          ADD_FAILURE() << "stale device PTE at " << std::hex << start_ + i * kPageSize << ": dev pfn "
                        << hmm_pfn_to_pfn(d) << " cpu " << page_kind_name(st.kind) << " pfn " << st.pfn;
        }
      }
    }
    return bad;
  }
  int commits() const { return commits_; }

 private:
  AddressSpace& as_;
  const Va start_;
  std::mutex lock_;
  std::vector<uint64_t> dev_pt_;  // guarded by lock_
  int commits_ = 0;               // guarded by lock_
};

TEST_F(ConcurrencyTest, MirrorRacesMunmapMprotectForkAndDontneed) {
  const uint64_t seed = test_seed();
  constexpr uint64_t kPages = 256;
  const Va base = 0x100000000;
  ASSERT_TRUE(as->mmap(base, kPages * kPageSize, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).ok());
  Mirror mirror(*as, base, kPages);
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), base, kPages * kPageSize, &mirror), 0);
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      while (!stop.load(std::memory_order_relaxed)) {
        const uint64_t p = rng() % (kPages - 8);
        (void)mirror.fault(n, base + p * kPageSize, 1 + rng() % 8, rng() & 1);
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(seed + 100);
    for (int i = 0; i < 300; i++) {
      const uint64_t p = rng() % (kPages - 16);
      const Va va = base + p * kPageSize;
      const uint64_t len = (1 + rng() % 16) * kPageSize;
      switch (rng() % 5) {
        case 0:
          EXPECT_EQ(as->munmap(va, len), 0);
          EXPECT_TRUE(as->mmap(va, len, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED).ok());
          break;
        case 1:
          EXPECT_EQ(as->mprotect(va, len, PROT_READ), 0);
          EXPECT_EQ(as->mprotect(va, len, PROT_READ | PROT_WRITE), 0);
          break;
        case 2: {
          Result<std::unique_ptr<AddressSpace>> child = as->fork();
          EXPECT_TRUE(child.ok());
          if (child.ok()) {
            EXPECT_EQ(cpu::store<uint64_t>(**child, va, 1), 0);
          }
          break;
        }
        case 3:
          EXPECT_EQ(as->madvise(va, len, MADV_DONTNEED), 0);
          break;
        default:
          EXPECT_EQ(cpu::store<uint64_t>(*as, va, i), 0);
      }
    }
    stop.store(true);
  });
  for (auto& th : threads) th.join();
  EXPECT_GT(mirror.commits(), 0);
  EXPECT_EQ(mirror.verify(), 0);
  n.remove();
}

// Page-table reclaim (MADV_DONTNEED of a whole PTE table, mmap lock held for read) races CPU
// faults and accesses of other threads in the same table: a reclaimed table is never freed
// while a walker may hold it (type-stable reuse), so nothing crashes, every load sees either
// the value its thread stored or zero (zapped meanwhile), and the checker is green after.
//   1. thread A stores to its pages, thread B to its pages (faults fill the table);
//   2. thread C zaps the whole 2 MiB and reclaims the table, A and B keep faulting it back
//      (small pages, or a THP / the huge zero folio once the PMD is none again).
TEST_F(ConcurrencyTest, PageTableReclaimRacesFaults) {
  const uint64_t seed = test_seed();
  Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, /*huge=*/true);
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::vector<std::thread> cpus;
  for (int t = 0; t < 2; t++) {
    cpus.emplace_back([&, t] {
      std::mt19937_64 rng(seed + t);
      for (int it = 0; it < 400 && !stop.load(); it++) {
        const Va a = va + (rng() % (kPagesPerPmd / 2) * 2 + t) * kPageSize;
        if (cpu::store<uint64_t>(*as, a, pattern(a, t))) errors++;
        Result<uint64_t> v = cpu::load<uint64_t>(*as, a);
        if (!v || (*v != pattern(a, t) && *v != 0)) errors++;
      }
    });
  }
  std::thread zapper([&] {
    for (int it = 0; it < 200; it++) {
      if (as->madvise(va, kPmdSize, MADV_DONTNEED) != 0) errors++;
      std::this_thread::yield();
    }
    stop = true;
  });
  for (auto& th : cpus) th.join();
  zapper.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  EXPECT_EQ(*cpu::load<uint64_t>(*as, va), 0u);
  EXPECT_EQ(query_page(*as, va).kind, PageKind::kHugeZero);  // the table was reclaimed
}

// The same race, replayed step by step: a PTE table reclaimed between a CPU access's lockless
// PMD load and its taking the table's lock.
//   1. thread "cpu" loads from p1: pte_offset_map_lock has read the PMD (table T) and stops
//      before locking T (mm.pgtable.pte_offset_map; it holds the mmap lock for read);
//   2. this thread: MADV_DONTNEED of the whole 2 MiB zaps T and reclaims it (the PMD is none);
//   3. "cpu" goes on: it locks T, which must still be a table (kept for reuse, not freed: ASan
//      reports a use after free otherwise), sees the PMD changed, and faults: the huge zero
//      folio, the VMA being MADV_HUGEPAGE.
TEST_F(ConcurrencyTest, PageTableReclaimedBetweenPmdLoadAndLock) {
  Va va = map_anon(*as, kPmdSize);
  fill_pages(*as, va, 4 * kPageSize, 1);
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_HUGEPAGE), 0);
  sched_point::Pause pause("mm.pgtable.pte_offset_map", {.thread = "cpu"});
  ASSERT_EQ(pause.status(), 0);
  Result<uint64_t> v = Err{-EINVAL};
  std::thread cpu([&] {
    sched_point::set_thread_name("cpu");
    v = cpu::load<uint64_t>(*as, va + kPageSize);
  });
  ASSERT_TRUE(pause.wait_reached());
  ASSERT_EQ(as->madvise(va, kPmdSize, MADV_DONTNEED), 0);
  pause.release();
  cpu.join();
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0u);  // zapped before the load
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kHugeZero);
  EXPECT_MM_CHECK_OK(*mem);
}

// Writers keep writing and checking their own pages of two THPs while another thread splits
// the PMDs (mprotect of neighbouring pages, partial DONTNEED) and collapses them back.
TEST_F(ConcurrencyTest, ThpSplitUnderConcurrentAccess) {
  const uint64_t seed = test_seed();
  Va va = map_anon(*as, 2 * kPmdSize, PROT_READ | PROT_WRITE, true);
  fill_pages(*as, va, 2 * kPmdSize, 0);
  constexpr int kWriters = 3;
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  // Writers own the pages p with p % 4 == t (t < 3); page p % 4 == 3 belongs to the splitter.
  for (int t = 0; t < kWriters; t++) {
    threads.emplace_back([&, t] {
      uint64_t gen = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        gen++;
        for (uint64_t p = t; p < 2 * kPagesPerPmd; p += 4) {
          const Va a = va + p * kPageSize;
          if (cpu::store<uint64_t>(*as, a + 8, gen)) errors++;
          Result<uint64_t> v = cpu::load<uint64_t>(*as, a + 8);
          if (!v || *v != gen) errors++;
          Result<uint64_t> first = cpu::load<uint64_t>(*as, a);
          if (!first || *first != pattern(a, 0)) errors++;  // data survives every split
        }
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 60; i++) {
      const uint64_t p = (rng() % (2 * kPagesPerPmd / 4)) * 4 + 3;
      const Va a = va + p * kPageSize;
      switch (rng() % 3) {
        case 0:
          EXPECT_EQ(as->mprotect(a, kPageSize, PROT_READ), 0);
          EXPECT_EQ(as->mprotect(a, kPageSize, PROT_READ | PROT_WRITE), 0);
          break;
        case 1:
          EXPECT_EQ(as->madvise(a, kPageSize, MADV_DONTNEED), 0);
          break;
        default: {
          int rc = as->madvise(pmd_align_down(a), kPmdSize, MADV_COLLAPSE);
          EXPECT_TRUE(rc == 0 || rc == -EAGAIN) << rc;
        }
      }
    }
    stop.store(true);
  });
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(as->stats().thp_split_pmd.get(), 0u);
}

// Folio splits (partial MADV_FREE) while other threads read and write the same THP: accesses
// that hit the split's migration entries wait and then see their data.
TEST_F(ConcurrencyTest, FolioSplitUnderConcurrentAccess) {
  constexpr int kRounds = 20;
  std::atomic<int> errors{0};
  for (int round = 0; round < kRounds; round++) {
    Va va = map_anon(*as, kPmdSize, PROT_READ | PROT_WRITE, true);
    fill_pages(*as, va, kPmdSize, round);
    std::atomic<bool> stop{false};
    std::thread reader([&] {
      while (!stop.load(std::memory_order_relaxed)) {
        for (uint64_t p = 16; p < kPagesPerPmd; p += 7) {
          const Va a = va + p * kPageSize;
          Result<uint64_t> v = cpu::load<uint64_t>(*as, a);
          if (!v || *v != pattern(a, round)) errors++;
          if (cpu::store<uint64_t>(*as, a + 16, p)) errors++;
        }
      }
    });
    EXPECT_EQ(as->madvise(va + kPageSize, kPageSize, MADV_FREE), 0);
    stop.store(true);
    reader.join();
    EXPECT_EQ(query_page(*as, va + 100 * kPageSize).kind, PageKind::kSmall);
    EXPECT_EQ(verify_pages(*as, va, kPmdSize, round), 0);
    EXPECT_EQ(as->munmap(va, kPmdSize), 0);
  }
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(as->stats().thp_split_folio.get(), static_cast<uint64_t>(kRounds));
}

}  // namespace
}  // namespace gpusvm::mm::testing
