// dmirror's waits are bounded and name what they waited for (issue 9 §3): a device fault on
// another device's page whose folio lock is never released fails -ETIMEDOUT (hmm_range_fault's
// bounded wait), and RELEASE gives up on a busy page after hang_timeout() with -EBUSY and a log
// line naming the page, instead of retrying forever.
#include <chrono>
#include <string>

#include "drivers/dmirror/dmirror.h"
#include "gpusvm/mm/page_state.h"
#include "tests/base/log_capture.h"
#include "tests/hmm/hmm_test_util.h"
#include "tests/mm/leaked_folio_lock.h"

namespace gpusvm::hmm_tests {
namespace {

using namespace std::chrono_literals;
using mm::testing::LeakedFolioLock;
using testing_util::LogCapture;

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%#llx", static_cast<unsigned long long>(v));
  return buf;
}

class DmirrorWaitTest : public ::testing::Test, protected HmmMachine {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(start());
    fd0 = hmm_open(*proc, 0);
    fd1 = hmm_open(*proc, 1);
    ASSERT_GE(fd0, 0);
    ASSERT_GE(fd1, 0);
    saved = hang_timeout();
  }
  void TearDown() override {
    set_hang_timeout(saved);
    stop();
  }
  // One page written by the CPU and migrated to device 1: returns its device folio.
  mm::Folio* page_on_dev1(HmmBuffer* b) {
    EXPECT_EQ(cpu_write_ints(*proc, b->ptr, kPageSize / sizeof(int), [](uint64_t i) { return int(i ^ 0x5a); }), 0);
    EXPECT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_MIGRATE_TO_DEV, b, 1), 0);
    const mm::PageState st = mm::query_page(proc->mm(), b->ptr);
    EXPECT_EQ(st.kind, mm::PageKind::kSoftLeaf);
    return mem->folio_of(st.pfn);
  }
  void expect_data(HmmBuffer* b) {
    int rc;
    std::vector<int> v = cpu_read_ints(*proc, b->ptr, kPageSize / sizeof(int), &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < v.size(); i++) ASSERT_EQ(v[i], int(i ^ 0x5a)) << i;
  }
  int fd0 = -1, fd1 = -1;
  std::chrono::milliseconds saved{};
};

// Device 0 READs a page that sits in device 1's memory: its fault must bring the page back,
// but the page's folio lock is held forever. The READ fails -ETIMEDOUT within about one
// hang_timeout(), the log naming address, folio and holder; nothing changed.
TEST_F(DmirrorWaitTest, DeviceFault_LeakedFolioLock_TimesOut) {
  auto b = HmmBuffer::map(*proc, kPageSize, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  mm::Folio* folio = page_on_dev1(b.get());
  LeakedFolioLock leak(folio);
  set_hang_timeout(200ms);
  LogCapture log;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_READ, b.get(), 1), -ETIMEDOUT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_NE(log.find({"fault at " + hex(b->ptr), "pfn " + hex(folio->pfn()),
                      "locked by tid " + std::to_string(leak.tid())}),
            "")
      << log.all();
  leak.release();
  set_hang_timeout(saved);
  EXPECT_EQ(mm::query_page(proc->mm(), b->ptr).kind, mm::PageKind::kSoftLeaf);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd0, HMM_DMIRROR_READ, b.get(), 1), 0);
  for (uint64_t i = 0; i < kPageSize / sizeof(int); i++) ASSERT_EQ(b->mirror[i], int(i ^ 0x5a)) << i;
  expect_data(b.get());
}

// RELEASE on device 1 cannot evict a page whose lock stays held: -EBUSY after hang_timeout(),
// the log naming the busy folio and its holder. Once the lock goes, RELEASE evicts it.
TEST_F(DmirrorWaitTest, Release_LeakedFolioLock_EbusyNamingFolio) {
  auto b = HmmBuffer::map(*proc, kPageSize, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  mm::Folio* folio = page_on_dev1(b.get());
  LeakedFolioLock leak(folio);
  set_hang_timeout(200ms);
  LogCapture log;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_RELEASE, b.get(), 1), -EBUSY);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  EXPECT_NE(log.find({"dmirror1: release", "pfn " + hex(folio->pfn()),
                      "locked by tid " + std::to_string(leak.tid())}),
            "")
      << log.all();
  leak.release();
  set_hang_timeout(saved);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd1, HMM_DMIRROR_RELEASE, b.get(), 1), 0);
  EXPECT_EQ(mm::query_page(proc->mm(), b->ptr).kind, mm::PageKind::kSmall);
  expect_data(b.get());
}

}  // namespace
}  // namespace gpusvm::hmm_tests
