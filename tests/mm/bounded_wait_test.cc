// Every wait is bounded and says what it waited for (issue 9 §3): a folio lock that is never
// released (a leaked lock, as a buggy driver or a lost unlock leaves it) makes a CPU fault,
// an hmm_range_fault, a migrating walk and a MAP_POPULATE fail within hang_timeout() with a
// diagnostic that names the address, the folio and the thread holding its lock - instead of
// retrying for hours.
#include <atomic>
#include <chrono>
#include <functional>
#include <string>
#include <thread>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/device_exclusive.h"
#include "tests/base/log_capture.h"
#include "tests/base/test_util.h"
#include "tests/mm/leaked_folio_lock.h"
#include "tests/mm/mm_test_util.h"
#include "tests/mm/test_device.h"

namespace gpusvm::mm::testing {
namespace {

using namespace std::chrono_literals;
using testing_util::LogCapture;
using testing_util::wait_until;

constexpr auto kShortHang = 200ms;
// A bounded wait that fails takes about one hang_timeout(); the unbounded ones these tests
// replace took (at least) 64 of them. Generous for sanitizer builds.
constexpr auto kFailWithin = 5s;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

class BoundedWaitTest : public MmTest {
 protected:
  void SetUp() override {
    MmTest::SetUp();
    dev = std::make_unique<TestDevice>(mem.get(), 64);
    other = std::make_unique<TestDevice>(mem.get(), 64);
    ASSERT_TRUE(dev->ok() && other->ok());
    saved_hang = hang_timeout();
  }
  void TearDown() override {
    set_hang_timeout(saved_hang);
    if (as) as->exit();
    EXPECT_EQ(dev->free_pages(), 64u) << "device pages leaked";
    dev.reset();
    other.reset();
    MmTest::TearDown();
  }
  // One written page moved to dev's memory: its device-private folio.
  Folio* device_page(Va va) {
    fill_pages(*as, va, kPageSize, 1);
    Result<uint64_t> moved = dev->migrate_to_device(*as, va, va + kPageSize);
    EXPECT_TRUE(moved.ok() && *moved == 1);
    const PageState st = query_page(*as, va);
    EXPECT_EQ(st.leaf, SoftLeafType::kDevicePrivateWrite);
    return mem->folio_of(st.pfn);
  }
  // The diagnostic every timed-out fault logs: address, folio and the lock's holder.
  static std::vector<std::string> fault_diag(Va va, const Folio* f, pid_t holder) {
    return {"fault at " + hex(va), "pfn " + hex(f->pfn()), "locked by tid " + std::to_string(holder)};
  }
  std::unique_ptr<TestDevice> dev, other;
  std::chrono::milliseconds saved_hang{};
};

// A CPU access to a device-private page whose folio lock is never released: the fault's wait
// for the lock (folio_lock_or_retry) ends after hang_timeout() with -ETIMEDOUT and a log line
// naming the page. Before: the result of the wait was dropped, the fault returned kRetry and
// the access retried for 64 waits and more, then failed -EBUSY without naming anything.
TEST_F(BoundedWaitTest, CpuFault_LeakedFolioLock_TimesOutNamingFolio) {
  const Va va = map_anon(*as, kPageSize);
  Folio* folio = device_page(va);
  LeakedFolioLock leak(folio);
  set_hang_timeout(kShortHang);
  LogCapture log;
  const auto t0 = std::chrono::steady_clock::now();
  Result<uint64_t> v = cpu::load<uint64_t>(*as, va);
  const auto took = std::chrono::steady_clock::now() - t0;
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error(), -ETIMEDOUT);
  EXPECT_LT(took, kFailWithin);
  EXPECT_NE(log.find(fault_diag(va, folio, leak.tid())), "") << log.all();
  EXPECT_NE(log.find({"device-private entry"}), "") << log.all();
  // Nothing changed: the page is still on the device, and comes back once the lock goes.
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  leak.release();
  set_hang_timeout(saved_hang);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
  EXPECT_EQ(dev->cpu_faults.load(), 1);
}

// The same for a device-exclusive entry whose folio a device keeps locked.
TEST_F(BoundedWaitTest, CpuFault_LeakedExclusiveLock_TimesOutNamingFolio) {
  const Va va = map_anon(*as, kPageSize);
  fill_pages(*as, va, kPageSize, 2);
  static const int kOwner = 0;
  LeakedFolioLock leak(
      [&]() -> Folio* {
        ReadLock g(&as->mmap_lock());
        Result<Folio*> page = make_device_exclusive(*as, va, &kOwner);
        return page.ok() ? (*page)->head() : nullptr;  // locked, referenced
      },
      [](Folio* f) {
        folio_unlock(f);
        f->put();
      });
  ASSERT_NE(leak.folio(), nullptr);
  set_hang_timeout(kShortHang);
  LogCapture log;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(cpu::store<uint64_t>(*as, va, 9), -ETIMEDOUT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, kFailWithin);
  EXPECT_NE(log.find(fault_diag(va, leak.folio(), leak.tid())), "") << log.all();
  EXPECT_NE(log.find({"device-exclusive entry"}), "") << log.all();
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDeviceExclusive);
  leak.release();
  set_hang_timeout(saved_hang);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 2), 0);
}

// hmm_range_fault (REQ_FAULT) of a mirror that does not own the device page: the fault it
// runs waits for the leaked lock and the walk fails -ETIMEDOUT (not -EBUSY, which the caller
// would retry), the log naming the page.
TEST_F(BoundedWaitTest, HmmRangeFault_LeakedFolioLock_TimesOutNamingFolio) {
  const Va va = map_anon(*as, kPageSize);
  Folio* folio = device_page(va);
  TestMirror ops;
  MmuIntervalNotifier n;
  ASSERT_EQ(n.insert(as.get(), va, kPageSize, &ops), 0);
  LeakedFolioLock leak(folio);
  set_hang_timeout(kShortHang);
  LogCapture log;
  std::vector<uint64_t> pfns;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(mirror_range(*as, n, va, va + kPageSize, HMM_PFN_REQ_FAULT, pfns), -ETIMEDOUT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, kFailWithin);
  EXPECT_NE(log.find(fault_diag(va, folio, leak.tid())), "") << log.all();
  leak.release();
  set_hang_timeout(saved_hang);
  n.remove();
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
}

// A migrating walk (migrate_vma_setup with MIGRATE_VMA_FAULT, another device) may not sleep
// on a folio lock (it holds the locks of what it collected), so its fault returns at once and
// the walk restarts: the restart deadline ends it with -ETIMEDOUT, the log naming the walk's
// range, the address and the folio. Before: 100000 restarts, then -EBUSY without a name.
TEST_F(BoundedWaitTest, MigratingWalk_LeakedFolioLock_DeadlineNamesFolio) {
  const Va va = map_anon(*as, 2 * kPageSize);
  fill_pages(*as, va + kPageSize, kPageSize, 3);
  Folio* folio = device_page(va);
  LeakedFolioLock leak(folio);
  set_hang_timeout(kShortHang);
  LogCapture log;
  const auto t0 = std::chrono::steady_clock::now();
  Result<uint64_t> moved = other->migrate_to_device(*as, va, va + 2 * kPageSize, MIGRATE_VMA_FAULT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, kFailWithin);
  ASSERT_FALSE(moved.ok());
  EXPECT_EQ(moved.error(), -ETIMEDOUT);
  EXPECT_NE(log.find({"hmm_range_fault [" + hex(va), "no progress", "fault at " + hex(va),
                      "pfn " + hex(folio->pfn()), "locked by tid " + std::to_string(leak.tid())}),
            "")
      << log.all();
  // Every entry the walk had replaced is back: page 1 is an ordinary page again.
  EXPECT_EQ(query_page(*as, va + kPageSize).kind, PageKind::kSmall);
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  leak.release();
  set_hang_timeout(saved_hang);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
  EXPECT_EQ(verify_pages(*as, va + kPageSize, kPageSize, 3), 0);
  EXPECT_EQ(other->free_pages(), 64u);
}

// MAP_POPULATE meets the leaked lock on a page another thread put into the new mapping
// between mmap's write hold and the populate (Linux drops the mmap lock there too):
//   1. thread P: mmap(MAP_FIXED | MAP_POPULATE) installs the VMA, drops the write lock,
//      stops at mm.mmap.populate;
//   2. test: writes page 0 of the new mapping, migrates it to the device, and a holder
//      thread locks the device folio for good;
//   3. P populates: page 0's fault waits for the lock, times out; the populate stops there
//      with a log line (mmap still succeeds, as Linux ignores populate failures).
// Before: the populate loop retried kRetry forever (each try one hang_timeout() wait).
TEST_F(BoundedWaitTest, MapPopulate_LeakedFolioLock_StopsNamingFolio) {
  constexpr uint64_t kLen = 4 * kPageSize;
  const Va va = map_anon(*as, kLen);
  sched_point::Pause pause("mm.mmap.populate", {.thread = "populate"});
  ASSERT_EQ(pause.status(), 0);
  std::atomic<bool> done{false};
  Result<Va> mapped = Err{-EINVAL};
  std::thread p([&] {
    sched_point::set_thread_name("populate");
    mapped = as->mmap(va, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE);
    done = true;
  });
  ASSERT_TRUE(pause.wait_reached());
  Folio* folio = device_page(va);
  LeakedFolioLock leak(folio);
  LogCapture log;
  set_hang_timeout(kShortHang);
  const auto t0 = std::chrono::steady_clock::now();
  pause.release();
  const bool finished = wait_until([&] { return done.load(); }, 10s);
  EXPECT_TRUE(finished) << "MAP_POPULATE still retrying after 10 s";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, kFailWithin);
  if (!finished) leak.release();  // let it finish, so that the join below returns
  p.join();
  ASSERT_TRUE(mapped.ok());
  EXPECT_EQ(*mapped, va);
  EXPECT_NE(log.find(fault_diag(va, folio, leak.tid())), "") << log.all();
  EXPECT_NE(log.find({"mmap populate [" + hex(va), "fault at " + hex(va), "timed out"}), "") << log.all();
  // The populate stopped at page 0: the rest is not populated, page 0 still on the device.
  EXPECT_EQ(query_page(*as, va).leaf, SoftLeafType::kDevicePrivateWrite);
  for (Va a = va + kPageSize; a < va + kLen; a += kPageSize) EXPECT_EQ(query_page(*as, a).kind, PageKind::kNone);
  leak.release();
  set_hang_timeout(saved_hang);
  EXPECT_EQ(verify_pages(*as, va, kPageSize, 1), 0);
}

// folio_lock cannot back out: after hang_timeout() it panics, naming the folio and the
// thread that holds it (and, through panic(), the waiter's own locks).
TEST_F(BoundedWaitTest, FolioLock_LeakedLock_PanicNamesHolder) {
  Folio* folio = mem->folio_alloc(0);
  ASSERT_NE(folio, nullptr);
  LeakedFolioLock leak(folio);
  const std::string want = "folio_lock: folio pfn " + hex(folio->pfn()) + ".*locked by tid " +
                           std::to_string(leak.tid());
  EXPECT_DEATH(
      {
        set_hang_timeout(100ms);
        folio_lock(folio);
      },
      want);
  leak.release();
  folio->put();
}

}  // namespace
}  // namespace gpusvm::mm::testing
