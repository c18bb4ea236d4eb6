// LeakedFolioLock: a folio lock held by another thread until the test releases it - what a
// waiter sees of a leaked lock. Shared by the mm and hmm suites.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "gpusvm/base/lock.h"
#include "gpusvm/mm/physmem.h"
#include "tests/base/test_util.h"

namespace gpusvm::mm::testing {

// A folio lock taken by another thread and kept until release(): what a waiter sees of a
// leaked lock. (The waiter must not be the holder: it takes the mmap lock, which ranks above
// the folio lock.) `take` runs in the holder thread and returns the folio it locked;
// `give_back` runs there at release.
class LeakedFolioLock {
 public:
  LeakedFolioLock(std::function<Folio*()> take, std::function<void(Folio*)> give_back)
      : thread_([this, take = std::move(take), give_back = std::move(give_back)] {
          Folio* f = take();
          tid_ = current_tid();
          folio_ = f;
          locked_ = true;
          // Bounded: a test that forgets to release does not keep the thread forever.
          (void)testing_util::wait_until([this] { return release_.load(); }, std::chrono::seconds(60));
          if (f) give_back(f);
        }) {
    EXPECT_TRUE(testing_util::wait_until([this] { return locked_.load(); })) << "holder did not lock";
  }
  explicit LeakedFolioLock(Folio* folio)
      : LeakedFolioLock([folio] { folio_lock(folio); return folio; },
                        [](Folio* f) { folio_unlock(f); }) {}
  ~LeakedFolioLock() { release(); }
  void release() {
    release_ = true;
    if (thread_.joinable()) thread_.join();
  }
  pid_t tid() const { return tid_; }
  Folio* folio() const { return folio_; }

 private:
  std::atomic<bool> locked_{false};
  std::atomic<bool> release_{false};
  pid_t tid_ = 0;
  Folio* folio_ = nullptr;
  std::thread thread_;
};

}  // namespace gpusvm::mm::testing
