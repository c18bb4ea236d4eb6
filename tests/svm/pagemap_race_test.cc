// Races of the provider: deterministic replays of one window each (schedule points), and
// threads running CPU faults against migrate_to_devmem and evict_to_ram (run under TSan).
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "tests/svm/pagemap_test_util.h"

namespace gpusvm::svm::testing {
namespace {

// Two migrations of one range: the second finds the first's migration entries and does not
// wait on them (the walk skips entries under another migration): all or nothing, -EBUSY.
// A CPU access in the window waits for the first to finish, then brings the pages back.
//
//   migrator (thread)                        test thread               cpu (thread)
//   walk: collect, migration entries
//   -- stopped at svm.migrate_to_devmem.collected --
//                                            migrate_to_devmem: -EBUSY
//                                                                      load: waits on the
//                                                                      migration entry
//   release: copy, commit (device entries)
//                                                                      fault -> migrate_to_ram
//                                                                      -> the right bytes
TEST_F(PagemapTest, SecondMigrationOfACollectedRangeIsBusy) {
  const uint64_t len = 16 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  sched_point::Pause pause("svm.migrate_to_devmem.collected");
  ASSERT_EQ(pause.status(), 0);
  TestDevmem* first = vram->alloc_devmem(as.get(), len);
  int rc1 = 1;
  std::thread migrator([&] { rc1 = migrate_to_devmem(first, as.get(), va, va + len, {}); });
  ASSERT_TRUE(pause.wait_reached());
  EXPECT_EQ(migrate(va, len), -EBUSY);
  EXPECT_TRUE(last->released());
  std::atomic<bool> loaded{false};
  uint64_t got = 0;
  std::thread cpu([&] {
    Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, va + 3 * kPageSize);
    got = w ? *w : 0;
    loaded = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(loaded.load()) << "the CPU access went through a migration entry";
  pause.release();
  migrator.join();
  cpu.join();
  EXPECT_EQ(rc1, 0);
  EXPECT_EQ(got, word_at(va + 3 * kPageSize, 1));
  // The fault may meet pages the migrator's finalize still holds locked and leave those in
  // device memory (migrate_to_ram skips what it cannot lock); reading every page brings the
  // rest back, and then nothing of the allocation is left.
  EXPECT_EQ(cpu_bad_words(*as, va, len, 1), 0u);
  EXPECT_TRUE(first->released());
  EXPECT_MM_CHECK_OK(*mem);
}

// A CPU fault holds the allocation's pages (collected, locked) while the driver evicts: the
// eviction cannot take them, retries, and reports -EBUSY; once the fault is done the
// allocation is detached and a new eviction has nothing to do.
//
//   cpu (thread)                              test thread
//   fault -> migrate_to_ram: collected
//   -- stopped at svm.migrate_to_ram.collected --
//                                             evict_to_ram: pages busy, 3 attempts: -EBUSY
//   release: copy, commit
//                                             evict_to_ram: detached: 0
TEST_F(PagemapTest, EvictionWhileACpuFaultHoldsThePages) {
  const uint64_t len = 8 * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 2);
  ASSERT_EQ(migrate(va, len), 0);
  TestDevmem* dm = last;
  sched_point::Pause pause("svm.migrate_to_ram.collected");
  ASSERT_EQ(pause.status(), 0);
  uint64_t bad = 1;
  std::thread cpu([&] { bad = cpu_bad_words(*as, va, len, 2); });
  ASSERT_TRUE(pause.wait_reached());
  EXPECT_EQ(evict_to_ram(dm), -EBUSY);
  EXPECT_FALSE(dm->released());
  pause.release();
  cpu.join();
  EXPECT_EQ(bad, 0u);
  EXPECT_TRUE(dm->released());
  EXPECT_EQ(evict_to_ram(dm), 0);
  EXPECT_MM_CHECK_OK(*mem);
}

// The other order: eviction collected the pages, a CPU access waits on the migration entries
// and reads the evicted copy.
//
//   evictor (thread)                          cpu (thread)
//   migrate_device_pfns: migration entries
//   -- stopped at svm.evict_to_ram.collected --
//                                             load: waits on the migration entry
//   release: copy to RAM, commit
//                                             -> the system page, right bytes
TEST_F(PagemapTest, CpuAccessDuringEvictionWaitsAndReadsTheCopy) {
  const uint64_t len = kPmdSize;
  const Va va = map_anon(*as, len, PROT_READ | PROT_WRITE, /*huge=*/true);
  fill_bytes(*as, va, len, 3);
  ASSERT_EQ(migrate(va, len), 0);
  TestDevmem* dm = last;
  sched_point::Pause pause("svm.evict_to_ram.collected");
  ASSERT_EQ(pause.status(), 0);
  int rc = 1;
  std::thread evictor([&] { rc = evict_to_ram(dm); });
  ASSERT_TRUE(pause.wait_reached());
  const uint64_t faults = pagemap_stats().cpu_faults.load();
  std::atomic<bool> loaded{false};
  uint64_t got = 0;
  std::thread cpu([&] {
    Result<uint64_t> w = mm::cpu::load<uint64_t>(*as, va + 77 * kPageSize + 64);
    got = w ? *w : 0;
    loaded = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(loaded.load());
  pause.release();
  evictor.join();
  cpu.join();
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(got, word_at(va + 77 * kPageSize + 64, 3));
  EXPECT_EQ(pagemap_stats().cpu_faults.load(), faults);  // no device fault: it waited
  EXPECT_EQ(mm::query_page(*as, va).kind, mm::PageKind::kThpPmd);
  EXPECT_EQ(cpu_bad_words(*as, va, len, 3), 0u);
  EXPECT_MM_CHECK_OK(*mem);
}

// Threads: CPU writers (each owning some pages: it writes a new generation and reads it
// back) against a migrator moving the whole range to device memory over and over and an
// evictor evicting the latest allocation. Every access sees its own last write; at the end
// every byte is right and nothing leaked.
TEST_F(PagemapTest, CpuFaultsAgainstMigrationAndEvictionThreads) {
  constexpr int kWriters = 3;
  constexpr uint64_t kPagesEach = 4;
  const uint64_t len = kWriters * kPagesEach * kPageSize;
  const Va va = map_anon(*as, len);
  fill_bytes(*as, va, len, 1);
  std::atomic<bool> stop{false};
  std::atomic<TestDevmem*> latest{nullptr};
  std::atomic<int> migrated{0}, evicted{0}, busy{0};
  std::vector<uint64_t> gens(kWriters, 1);
  std::vector<uint64_t> errors(kWriters, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; t++) {
    threads.emplace_back([&, t] {
      const Va mine = va + t * kPagesEach * kPageSize;
      for (uint64_t gen = 2; !stop.load() && gen < 400; gen++) {
        std::vector<uint64_t> buf(kPagesEach * kPageSize / 8);
        for (uint64_t i = 0; i < buf.size(); i++) buf[i] = word_at(mine + i * 8, gen);
        if (mm::cpu::copy_in(*as, mine, buf.data(), buf.size() * 8) != 0) errors[t]++;
        errors[t] += cpu_bad_words(*as, mine, kPagesEach * kPageSize, gen);
        gens[t] = gen;
      }
    });
  }
  threads.emplace_back([&] {
    for (int i = 0; !stop.load() && i < 300; i++) {
      TestDevmem* d = vram->alloc_devmem(as.get(), len);
      if (!d) {
        std::this_thread::yield();
        continue;
      }
      const int rc = migrate_to_devmem(d, as.get(), va, va + len, {});
      if (rc == 0) {
        migrated++;
        latest = d;
      } else if (rc == -EBUSY) {
        busy++;
      } else {
        ADD_FAILURE() << "migrate_to_devmem: " << rc;
      }
    }
  });
  threads.emplace_back([&] {
    for (int i = 0; !stop.load() && i < 300; i++) {
      if (TestDevmem* d = latest.load()) {
        const int rc = evict_to_ram(d);
        if (rc == 0) evicted++;
        else EXPECT_EQ(rc, -EBUSY);
      }
      std::this_thread::yield();
    }
  });
  for (int t = 0; t < kWriters; t++) threads[t].join();
  stop = true;
  for (size_t t = kWriters; t < threads.size(); t++) threads[t].join();
  for (int t = 0; t < kWriters; t++) {
    EXPECT_EQ(errors[t], 0u) << "writer " << t;
    EXPECT_EQ(cpu_bad_words(*as, va + t * kPagesEach * kPageSize, kPagesEach * kPageSize, gens[t]), 0u);
  }
  EXPECT_GT(migrated.load(), 0);
  EXPECT_MM_CHECK_OK(*mem);
  RecordProperty("migrated", migrated.load());
  RecordProperty("evicted", evicted.load());
  RecordProperty("busy", busy.load());
}

}  // namespace
}  // namespace gpusvm::svm::testing
