// dmirror's own contracts, beyond the hmm-tests port: the owner-skip protocol (seed 001),
// FAIL_ALLOC, RELEASE and close eviction, and uapi argument checking.
#include <condition_variable>
#include <mutex>
#include <thread>

#include "drivers/dmirror/dmirror.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/page_state.h"
#include "tests/hmm/hmm_test_util.h"

namespace gpusvm::hmm_tests {
namespace {

class DmirrorTest : public ::testing::Test, protected HmmMachine {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(start()); }
  void TearDown() override { stop(); }

  dmirror::Dmirror* file(int fd) {
    return dynamic_cast<dmirror::Dmirror*>(proc->fd_get(fd).get());
  }
  std::unique_ptr<HmmBuffer> filled(uint64_t npages) {
    auto b = HmmBuffer::map(*proc, npages * kPageSize, npages * kPageSize, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS);
    EXPECT_EQ(cpu_write_ints(*proc, b->ptr, npages * kPageSize / sizeof(int),
                             [](uint64_t i) { return static_cast<int>(i * 3 + 1); }),
              0);
    return b;
  }
  void expect_filled(Va va, uint64_t npages) {
    int rc;
    std::vector<int> v = cpu_read_ints(*proc, va, npages * kPageSize / sizeof(int), &rc);
    ASSERT_EQ(rc, 0);
    for (uint64_t i = 0; i < v.size(); i++) ASSERT_EQ(v[i], static_cast<int>(i * 3 + 1)) << i;
  }
  bool on_device(Va va) {
    mm::PageState st = mm::query_page(proc->mm(), va);
    return st.kind == mm::PageKind::kSoftLeaf && mem->pfn_to_page(st.pfn)->pagemap() != nullptr;
  }
};

// Seed 001, point 3: a mirror fault of a file that sampled the notifier sequence before that
// same file migrated the page must retry, not store the page that moved away.
//  1. thread B: READ -> device fault: read_begin, hmm_range_fault maps system page X
//  2. (B pauses before taking the mutex and checking read_retry)
//  3. main: MIGRATE_TO_DEV on the same file: X moves to device page D, X is freed; the
//     MIGRATE invalidation is the file's own, so its callback skips erasing - but sets the
//     sequence
//  4. B resumes: read_retry(seq) is true -> B walks again and stores D.
// Without set_seq on the own migration B would store X, a freed page.
TEST_F(DmirrorTest, OwnerSkip_ConcurrentMirrorFaultSameNotifier_RetriesNotStale) {
  std::mutex m;
  std::condition_variable cv;
  bool walked = false;
  bool go = false;
  std::atomic<bool> armed{true};
  // A device with the interleaving hook (the fixture's devices have none).
  dmirror::DmirrorDevice::Config cfg;
  cfg.after_range_fault = [&] {
    if (!armed.exchange(false)) return;
    std::unique_lock<std::mutex> l(m);
    walked = true;
    cv.notify_all();
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(30), [&] { return go; })) << "main never resumed B";
  };
  Result<std::shared_ptr<dmirror::DmirrorDevice>> d = dmirror::DmirrorDevice::create(mem, 7, cfg);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ(registry->add("hmm_dmirror7", *d), 0);
  const int fd = hmm_open(*proc, 7);
  ASSERT_GE(fd, 0);
  auto buffer = filled(1);
  const mm::Pfn x = mm::query_page(proc->mm(), buffer->ptr).pfn;

  HmmBuffer b_view;
  b_view.ptr = buffer->ptr;
  b_view.mirror.assign(kPageSize / sizeof(int), 0);
  int b_rc = -1;
  std::thread b([&] { b_rc = hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_READ, &b_view, 1); });
  {
    std::unique_lock<std::mutex> l(m);
    ASSERT_TRUE(cv.wait_for(l, std::chrono::seconds(30), [&] { return walked; }));
  }
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 1), 0);
  const mm::PageState st = mm::query_page(proc->mm(), buffer->ptr);
  ASSERT_TRUE(on_device(buffer->ptr));
  {
    std::lock_guard<std::mutex> l(m);
    go = true;
    cv.notify_all();
  }
  b.join();
  ASSERT_EQ(b_rc, 0);
  EXPECT_EQ(b_view.faults, 1u);
  EXPECT_GE((*d)->fault_retries.get(), 1u);
  std::optional<dmirror::DptEntry> e = file(fd)->pt_lookup(buffer->ptr);
  ASSERT_TRUE(e.has_value());
  EXPECT_NE(e->pfn, x) << "stored the page that migrated away";
  EXPECT_EQ(e->pfn, st.pfn);
  for (uint64_t i = 0; i < b_view.mirror.size(); i++) ASSERT_EQ(b_view.mirror[i], static_cast<int>(i * 3 + 1));
  buffer.reset();
  EXPECT_EQ(devfs::close(*proc, fd), 0);
  EXPECT_EQ(registry->remove("hmm_dmirror7"), 0);
}

// Seed 001, point 2: only the migrating file skips its own MIGRATE invalidation; another
// file of the same device (same page owner) drops its entries like any other mirror.
TEST_F(DmirrorTest, OwnMigration_OtherFileOfSameDeviceInvalidated) {
  const int fd_a = hmm_open(*proc, 0);
  const int fd_b = hmm_open(*proc, 0);
  ASSERT_GE(fd_a, 0);
  ASSERT_GE(fd_b, 0);
  auto buffer = filled(4);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_a, HMM_DMIRROR_READ, buffer.get(), 4), 0);
  EXPECT_EQ(file(fd_a)->pt_entries(), 4u);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_b, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 4), 0);
  EXPECT_EQ(file(fd_a)->pt_entries(), 0u) << "a stale mapping of the freed system pages survived";
  EXPECT_EQ(file(fd_b)->pt_entries(), 4u);
  // fd_a faults again and now maps the device pages (same owner: hmm reports them).
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_a, HMM_DMIRROR_READ, buffer.get(), 4), 0);
  EXPECT_EQ(buffer->faults, 1u);
  for (uint64_t i = 0; i < 4 * kPageSize / sizeof(int); i++) ASSERT_EQ(buffer->mirror[i], static_cast<int>(i * 3 + 1));
  EXPECT_EQ(file(fd_a)->pt_lookup(buffer->ptr)->pfn, mm::query_page(proc->mm(), buffer->ptr).pfn);
  EXPECT_EQ(devfs::close(*proc, fd_a), 0);
  EXPECT_EQ(devfs::close(*proc, fd_b), 0);
}

// Seed 001, point 5: an invalidation that reached the file before its migration began, and
// that has not ended, must not let the migration store an entry it will invalidate silently:
//  1. thread V: MIGRATE_TO_SYS on file A2 of the same device: its MIGRATE invalidation calls
//     file A's callback (nothing to erase yet), then pauses in a test notifier - before its
//     walk collects anything
//  2. thread T: MIGRATE_TO_DEV on file A: the page moves to device page D; the invalidation
//     of step 1 called A's callback before T published its migration record, so nothing
//     marked the record, and A stores D
//  3. V resumes: its walk collects D (a device-private page of its owner), moves it back to
//     system memory and frees D - its invalidation already called A, so A keeps an entry to
//     a free device page (reused by the next allocation: the device then reads and writes
//     another page's data).
// Fixed: T waits for V's invalidation to end (read_begin) before collecting, so V moves
// nothing and A's entry is the device page that backs the address.
TEST_F(DmirrorTest, OwnMigration_ForeignInvalidationInFlight_NoStaleEntry) {
  // A notifier after the files' ones (it starts at the buffer, they at 0): pauses the first
  // MIGRATE invalidation, once every file's callback has run.
  struct Pauser final : mm::MmuIntervalNotifierOps {
    std::mutex m;
    std::condition_variable cv;
    bool armed = true;
    bool paused = false;
    bool go = false;
    bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range, uint64_t cur_seq) override {
      n->set_seq(cur_seq);  // nobody reads this notifier's sequence
      std::unique_lock<std::mutex> l(m);
      if (range.event != mm::MmuNotifyEvent::kMigrate || !armed) return true;
      armed = false;
      paused = true;
      cv.notify_all();
      EXPECT_TRUE(cv.wait_for(l, std::chrono::seconds(30), [&] { return go; })) << "main never resumed V";
      return true;
    }
  } pauser;
  const int fd_a = hmm_open(*proc, 0);
  const int fd_a2 = hmm_open(*proc, 0);
  ASSERT_GE(fd_a, 0);
  ASSERT_GE(fd_a2, 0);
  auto buffer = filled(1);
  mm::MmuIntervalNotifier pause_notifier;
  ASSERT_EQ(pause_notifier.insert(&proc->mm(), buffer->ptr, kPageSize, &pauser), 0);

  HmmBuffer v_view;
  v_view.ptr = buffer->ptr;
  v_view.mirror.assign(kPageSize / sizeof(int), 0);
  int v_rc = -1;
  std::thread v([&] { v_rc = hmm_dmirror_cmd(*proc, fd_a2, HMM_DMIRROR_MIGRATE_TO_SYS, &v_view, 1); });
  {
    std::unique_lock<std::mutex> l(pauser.m);
    ASSERT_TRUE(pauser.cv.wait_for(l, std::chrono::seconds(30), [&] { return pauser.paused; }));
  }
  HmmBuffer t_view;
  t_view.ptr = buffer->ptr;
  t_view.mirror.assign(kPageSize / sizeof(int), 0);
  int t_rc = -1;
  bool t_done = false;
  std::thread t([&] {
    const int rc = hmm_dmirror_cmd(*proc, fd_a, HMM_DMIRROR_MIGRATE_TO_DEV, &t_view, 1);
    std::lock_guard<std::mutex> l(pauser.m);
    t_rc = rc;
    t_done = true;
    pauser.cv.notify_all();
  });
  {
    // Without the fix T finishes while V is paused; with it T waits for V, so give it a
    // while, then let V go either way.
    std::unique_lock<std::mutex> l(pauser.m);
    pauser.cv.wait_for(l, std::chrono::milliseconds(500), [&] { return t_done; });
    pauser.go = true;
    pauser.cv.notify_all();
  }
  v.join();
  t.join();
  pause_notifier.remove();
  ASSERT_EQ(v_rc, 0);
  ASSERT_EQ(t_rc, 0);
  ASSERT_EQ(t_view.cpages, 1u);
  std::optional<dmirror::DptEntry> e = file(fd_a)->pt_lookup(buffer->ptr);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->pfn, mm::query_page(proc->mm(), buffer->ptr).pfn) << "file A maps a page that moved away";
  EXPECT_TRUE(on_device(buffer->ptr));
  expect_filled(buffer->ptr, 1);
  EXPECT_EQ(devfs::close(*proc, fd_a), 0);
  EXPECT_EQ(devfs::close(*proc, fd_a2), 0);
}

// FAIL_ALLOC is one-shot: the first page of the next migration gets no device page (order
// 0: it stays in system memory, so the read-back finds no entry for it).
TEST_F(DmirrorTest, FailAlloc_ToDevice_OneShot) {
  const int fd = hmm_open(*proc, 0);
  auto buffer = filled(2);
  HmmBuffer flags;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &flags, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 2), -ENOENT);
  EXPECT_FALSE(on_device(buffer->ptr));
  EXPECT_TRUE(on_device(buffer->ptr + kPageSize));
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 2), 0);
  EXPECT_EQ(buffer->cpages, 2u);
  EXPECT_TRUE(on_device(buffer->ptr));
  expect_filled(buffer->ptr, 2);
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// Device -> system with FAIL_ALLOC: -ENOMEM, and nothing of the chunk moved.
TEST_F(DmirrorTest, FailAlloc_ToSystem_Enomem) {
  const int fd = hmm_open(*proc, 0);
  auto buffer = filled(2);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 2), 0);
  HmmBuffer flags;
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_FLAGS, &flags, HMM_DMIRROR_FLAG_FAIL_ALLOC), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer.get(), 2), -ENOMEM);
  EXPECT_TRUE(on_device(buffer->ptr));
  EXPECT_TRUE(on_device(buffer->ptr + kPageSize));
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_SYS, buffer.get(), 2), 0);
  EXPECT_EQ(buffer->cpages, 2u);
  EXPECT_FALSE(on_device(buffer->ptr));
  EXPECT_EQ(dev[0]->cpu_faults.get(), 0u);
  expect_filled(buffer->ptr, 2);
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

// RELEASE evicts every page of the device (all files) and drops its memory; the next
// allocation adds a chunk again.
TEST_F(DmirrorTest, Release_EvictsAllFilesAndReaddsChunk) {
  const int fd_a = hmm_open(*proc, 0);
  const int fd_b = hmm_open(*proc, 0);
  auto a = filled(8);
  auto b = filled(8);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_a, HMM_DMIRROR_MIGRATE_TO_DEV, a.get(), 8), 0);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_b, HMM_DMIRROR_MIGRATE_TO_DEV, b.get(), 8), 0);
  EXPECT_EQ(dev[0]->pages_in_use(), 16u);
  const uint64_t added = dev[0]->chunks_added.get();
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_a, HMM_DMIRROR_RELEASE, a.get(), 8), 0);
  EXPECT_EQ(dev[0]->chunk_count(), 0u);
  EXPECT_EQ(dev[0]->pages_in_use(), 0u);
  EXPECT_EQ(file(fd_b)->pt_entries(), 0u);
  EXPECT_FALSE(on_device(b->ptr));
  expect_filled(a->ptr, 8);
  expect_filled(b->ptr, 8);
  EXPECT_EQ(dev[0]->cpu_faults.get(), 0u);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd_b, HMM_DMIRROR_MIGRATE_TO_DEV, b.get(), 8), 0);
  EXPECT_EQ(dev[0]->chunks_added.get(), added + 1);
  EXPECT_EQ(devfs::close(*proc, fd_a), 0);
  EXPECT_EQ(devfs::close(*proc, fd_b), 0);
}

// Closing any file of a device migrates the device's pages back (test_hmm's "evict device
// pages on file close").
TEST_F(DmirrorTest, Close_EvictsDevicePages) {
  const int fd = hmm_open(*proc, 0);
  auto buffer = filled(4);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 4), 0);
  EXPECT_TRUE(on_device(buffer->ptr));
  EXPECT_EQ(devfs::close(*proc, fd), 0);
  EXPECT_FALSE(on_device(buffer->ptr));
  EXPECT_EQ(dev[0]->pages_in_use(), 0u);
  expect_filled(buffer->ptr, 4);
}

TEST_F(DmirrorTest, Uapi_RejectsBadArguments) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  auto buffer = filled(1);
  struct hmm_dmirror_cmd cmd{};
  cmd.addr = buffer->ptr;
  cmd.ptr = reinterpret_cast<uintptr_t>(buffer->mirror.data());
  cmd.npages = 1;
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, nullptr), -EFAULT);
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ + 0x100, &cmd), -EINVAL);  // unknown
  EXPECT_EQ(devfs::ioctl(*proc, fd, DRM_IOWR(DRM_COMMAND_BASE + 0x09, struct hmm_dmirror_cmd), &cmd), -EINVAL);
  struct hmm_dmirror_cmd bad = cmd;
  bad.addr += 8;  // unaligned
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &bad), -EINVAL);
  bad = cmd;
  bad.npages = 0;
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &bad), -EINVAL);
  bad = cmd;
  bad.npages = ~0ULL >> 8;  // wraps the address space
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &bad), -EINVAL);
  bad = cmd;
  bad.ptr = 0;
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &bad), -EFAULT);
  // A failed request does not write the struct back.
  bad = cmd;
  bad.cpages = 77;
  bad.addr = 0x1000;  // nothing mapped there
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &bad), -EFAULT);
  EXPECT_EQ(bad.cpages, 77u);
  // A successful one does.
  cmd.cpages = 77;
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &cmd), 0);
  EXPECT_EQ(cmd.cpages, 1u);
  EXPECT_EQ(cmd.faults, 1u);
  EXPECT_EQ(devfs::ioctl(*proc, fd + 100, HMM_DMIRROR_READ, &cmd), -EBADF);
  EXPECT_EQ(devfs::close(*proc, fd), 0);
  EXPECT_EQ(devfs::close(*proc, fd), -EBADF);
  EXPECT_EQ(devfs::ioctl(*proc, fd, HMM_DMIRROR_READ, &cmd), -EBADF);
  EXPECT_EQ(devfs::open("hmm_dmirror9", *proc).error(), -ENOENT);
}

// mprotect makes a writable device-private entry read-only, as Linux does (a writable entry
// would come back as a writable PTE in a read-only VMA); mprotect back to read-write leaves it
// read-only. hmm reports the caller's own device page as it is, without a fault, so a device
// WRITE migrates such a page back to system memory first and lets the CPU write fault decide:
// -EPERM in a read-only VMA, a writable page otherwise (test_hmm would loop forever there).
TEST_F(DmirrorTest, MprotectedDevicePage_DeviceWriteMigratesItBack) {
  const int fd = hmm_open(*proc, 0);
  ASSERT_GE(fd, 0);
  auto buffer = filled(4);
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_MIGRATE_TO_DEV, buffer.get(), 4), 0);
  ASSERT_TRUE(on_device(buffer->ptr));
  EXPECT_TRUE(mm::query_page(proc->mm(), buffer->ptr).writable);
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, 4 * kPageSize, PROT_READ), 0);
  EXPECT_FALSE(mm::query_page(proc->mm(), buffer->ptr).writable);
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, 4 * kPageSize, PROT_READ | PROT_WRITE), 0);
  EXPECT_TRUE(on_device(buffer->ptr + kPageSize));
  EXPECT_FALSE(mm::query_page(proc->mm(), buffer->ptr + kPageSize).writable);  // stays read-only
  EXPECT_MM_CHECK_OK(*mem);
  // In a read-only VMA the write fails, after the page came back.
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kPageSize, PROT_READ), 0);
  EXPECT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), 1), -EPERM);
  EXPECT_FALSE(on_device(buffer->ptr));
  EXPECT_FALSE(mm::query_page(proc->mm(), buffer->ptr).writable);
  ASSERT_EQ(proc->mm().mprotect(buffer->ptr, kPageSize, PROT_READ | PROT_WRITE), 0);
  // The device writes back what it holds (the buffer's mirror, read back by the migration).
  ASSERT_EQ(hmm_dmirror_cmd(*proc, fd, HMM_DMIRROR_WRITE, buffer.get(), 4), 0);
  EXPECT_EQ(buffer->cpages, 4u);
  EXPECT_FALSE(on_device(buffer->ptr));
  EXPECT_TRUE(mm::query_page(proc->mm(), buffer->ptr).writable);
  expect_filled(buffer->ptr, 4);
  EXPECT_MM_CHECK_OK(*mem);
  EXPECT_EQ(devfs::close(*proc, fd), 0);
}

}  // namespace
}  // namespace gpusvm::hmm_tests
