#include "gpusvm/base/lock.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "gpusvm/base/log.h"

namespace gpusvm {
namespace {

std::atomic<int64_t> g_hang_timeout_ms{60'000};

struct HeldLock {
  const void* lock;  // the lock, or the class itself for class-counted locks
  const LockClass* cls;
  LockMode mode;
  unsigned subclass;
  int count;  // acquisitions of a class-counted entry; 1 otherwise
  bool spin;  // a SpinLock: its holder must not sleep
};

// Deep enough for the deepest legal nesting (mmap lock, folio locks of a split, PMD and PTE
// locks of two tables during mremap/fork, rmap and allocator locks).
constexpr int kMaxHeld = 64;

struct HeldLocks {
  HeldLock locks[kMaxHeld];
  int n = 0;
};

thread_local HeldLocks t_held;

std::string describe(const void* lock, const LockClass* cls) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "%s@%p(rank %u)", cls ? cls->name : "?", lock,
                cls ? cls->rank : 0u);
  return buf;
}

// Spins this many times before yielding; spinning longer burns the second core for nothing.
constexpr int kSpinBeforeYield = 128;

}  // namespace

std::chrono::milliseconds hang_timeout() {
  // relaxed: a configuration value, read on slow paths only.
  return std::chrono::milliseconds(g_hang_timeout_ms.load(std::memory_order_relaxed));
}

void set_hang_timeout(std::chrono::milliseconds timeout) {
  g_hang_timeout_ms.store(timeout.count(), std::memory_order_relaxed);
}

pid_t current_tid() {
  thread_local pid_t tid = static_cast<pid_t>(gettid());
  return tid;
}

void panic(const std::string& message) {
  std::string full = "gpusvm panic: " + message + "\n  thread " +
                     std::to_string(current_tid()) + " holds: " + lockdep::held_locks_string();
  log::get().critical("{}", full);
  log::get().flush();
  std::fprintf(stderr, "%s\n", full.c_str());
  std::fflush(stderr);
  std::abort();
}

namespace lockdep {

bool rank_checks_enabled() { return GPUSVM_LOCK_RANK_CHECKS; }

void check_order(const void* lock, const LockClass* cls, unsigned subclass) {
  if (!GPUSVM_LOCK_RANK_CHECKS) return;
  const HeldLocks& h = t_held;
  for (int i = 0; i < h.n; i++) {
    if (h.locks[i].lock == lock) {
      panic("recursive acquisition of " + describe(lock, cls));
    }
  }
  if (!cls || cls->rank == 0) return;
  for (int i = 0; i < h.n; i++) {
    const HeldLock& held = h.locks[i];
    if (!held.cls || held.cls->rank == 0) continue;
    bool ok = held.cls->rank < cls->rank ||
              (held.cls->rank == cls->rank && held.subclass < subclass);
    if (!ok) {
      panic("lock order violation: acquiring " + describe(lock, cls) + " subclass " +
            std::to_string(subclass) + " while holding " + describe(held.lock, held.cls) +
            " subclass " + std::to_string(held.subclass));
    }
  }
}

void acquire(const void* lock, const LockClass* cls, LockMode mode, unsigned subclass, bool spin) {
  HeldLocks& h = t_held;
  if (h.n == kMaxHeld) panic("held-lock list overflow acquiring " + describe(lock, cls));
  h.locks[h.n++] = HeldLock{lock, cls, mode, subclass, 1, spin};
}

void check_class_order(const LockClass* cls) {
  if (!GPUSVM_LOCK_RANK_CHECKS) return;
  const HeldLocks& h = t_held;
  for (int i = 0; i < h.n; i++) {
    const HeldLock& held = h.locks[i];
    if (held.lock == cls || !held.cls || held.cls->rank == 0) continue;
    if (held.cls->rank >= cls->rank) {
      panic("lock order violation: acquiring a " + std::string(cls->name) + " while holding " +
            describe(held.lock, held.cls));
    }
  }
}

void acquire_class(const LockClass* cls) {
  HeldLocks& h = t_held;
  for (int i = 0; i < h.n; i++) {
    if (h.locks[i].lock == cls) {
      h.locks[i].count++;
      return;
    }
  }
  acquire(cls, cls, LockMode::kExclusive, 0);
}

void release_class(const LockClass* cls) {
  HeldLocks& h = t_held;
  for (int i = 0; i < h.n; i++) {
    if (h.locks[i].lock == cls) {
      if (--h.locks[i].count == 0) release(cls);
      return;
    }
  }
  panic(std::string("releasing a ") + cls->name + " this thread does not hold");
}


void release(const void* lock) {
  HeldLocks& h = t_held;
  for (int i = h.n - 1; i >= 0; i--) {
    if (h.locks[i].lock == lock) {
      for (int j = i; j + 1 < h.n; j++) h.locks[j] = h.locks[j + 1];
      h.n--;
      return;
    }
  }
  panic("releasing a lock this thread does not hold: " + describe(lock, nullptr));
}

bool held(const void* lock, LockMode* mode) {
  const HeldLocks& h = t_held;
  for (int i = 0; i < h.n; i++) {
    if (h.locks[i].lock == lock) {
      if (mode) *mode = h.locks[i].mode;
      return true;
    }
  }
  return false;
}

int held_count() { return t_held.n; }

int spin_locks_held() {
  int n = 0;
  for (int i = 0; i < t_held.n; i++) n += t_held.locks[i].spin;
  return n;
}

uint32_t max_held_rank() {
  uint32_t r = 0;
  for (int i = 0; i < t_held.n; i++) {
    if (t_held.locks[i].cls) r = std::max(r, t_held.locks[i].cls->rank);
  }
  return r;
}

std::string held_locks_string() {
  const HeldLocks& h = t_held;
  if (h.n == 0) return "(none)";
  std::string s;
  for (int i = 0; i < h.n; i++) {
    if (i) s += ", ";
    s += describe(h.locks[i].lock, h.locks[i].cls);
    if (h.locks[i].mode == LockMode::kShared) s += "[read]";
  }
  return s;
}

void assert_none_held(const char* where) {
  if (t_held.n != 0) panic(std::string(where) + ": must be called with no lock held");
}

}  // namespace lockdep

// ---- Mutex ----

void Mutex::lock_nested(unsigned subclass) {
  lockdep::check_order(this, cls_, subclass);
  {
    std::unique_lock<std::mutex> g(m_);
    if (locked_) {
      waiters_++;
      bool got = cv_.wait_for(g, hang_timeout(), [this] { return !locked_; });
      waiters_--;
      if (!got) {
        g.unlock();
        panic(std::string("mutex ") + name() + " not acquired within hang timeout; held by tid " +
              std::to_string(owner_.load(std::memory_order_relaxed)));
      }
    }
    locked_ = true;
  }
  owner_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, subclass);
}

// try_lock never waits, so it cannot take part in a deadlock: like the kernel's lockdep, the
// try variants skip the order check (that is what makes "trylock the folio under the PTE
// lock, skip the page if busy" legal against the folio -> PTE order). A try on a lock this
// thread already holds simply fails. The lock is still recorded as held.
bool Mutex::try_lock() {
  {
    std::lock_guard<std::mutex> g(m_);
    if (locked_) return false;
    locked_ = true;
  }
  owner_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, 0);
  return true;
}

void Mutex::unlock() {
  lockdep::release(this);
  owner_.store(0, std::memory_order_relaxed);
  bool wake;
  {
    std::lock_guard<std::mutex> g(m_);
    locked_ = false;
    wake = waiters_ > 0;
  }
  if (wake) cv_.notify_one();
}

void Mutex::assert_held() const {
  if (!lockdep::held(this)) panic(std::string("mutex ") + name() + " not held");
}

void Mutex::assert_not_held() const {
  if (lockdep::held(this)) panic(std::string("mutex ") + name() + " held");
}

// ---- SpinLock ----

void SpinLock::lock_nested(unsigned subclass) {
  lockdep::check_order(this, cls_, subclass);
  if (locked_.exchange(true, std::memory_order_acquire)) {
    auto deadline = std::chrono::steady_clock::now() + hang_timeout();
    int spins = 0;
    for (;;) {
      // relaxed: only a hint that the lock may be free; the exchange below orders.
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins < kSpinBeforeYield) continue;
        spins = 0;
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() > deadline) {
          panic(std::string("spinlock ") + name() + " not acquired within hang timeout; held by tid " +
                std::to_string(owner_.load(std::memory_order_relaxed)));
        }
      }
      if (!locked_.exchange(true, std::memory_order_acquire)) break;
    }
  }
  owner_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, subclass, /*spin=*/true);
}

bool SpinLock::try_lock() {  // no order check: see Mutex::try_lock
  if (locked_.load(std::memory_order_relaxed) ||
      locked_.exchange(true, std::memory_order_acquire)) {
    return false;
  }
  owner_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, 0, /*spin=*/true);
  return true;
}

void SpinLock::unlock() {
  lockdep::release(this);
  owner_.store(0, std::memory_order_relaxed);
  locked_.store(false, std::memory_order_release);  // pairs with the acquire in lock()
}

void SpinLock::assert_held() const {
  if (!lockdep::held(this)) panic(std::string("spinlock ") + name() + " not held");
}

void SpinLock::assert_not_held() const {
  if (lockdep::held(this)) panic(std::string("spinlock ") + name() + " held");
}

// ---- RwLock ----

void RwLock::timeout(const char* what) {
  panic(std::string("rwlock ") + name() + ": " + what +
        " not acquired within hang timeout; writer tid " +
        std::to_string(writer_tid_.load(std::memory_order_relaxed)));
}

void RwLock::lock_nested(unsigned subclass) {
  lockdep::check_order(this, cls_, subclass);
  {
    std::unique_lock<std::mutex> g(m_);
    if (writer_ || readers_ > 0) {
      writers_waiting_++;
      bool got = cv_.wait_for(g, hang_timeout(), [this] { return !writer_ && readers_ == 0; });
      writers_waiting_--;
      if (!got) {
        g.unlock();
        timeout("write lock");
      }
    }
    writer_ = true;
  }
  writer_tid_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, subclass);
}

bool RwLock::try_lock() {  // no order check: see Mutex::try_lock
  {
    std::lock_guard<std::mutex> g(m_);
    if (writer_ || readers_ > 0) return false;
    writer_ = true;
  }
  writer_tid_.store(current_tid(), std::memory_order_relaxed);
  lockdep::acquire(this, cls_, LockMode::kExclusive, 0);
  return true;
}

void RwLock::unlock() {
  lockdep::release(this);
  writer_tid_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> g(m_);
    writer_ = false;
  }
  cv_.notify_all();
}

void RwLock::lock_shared() {
  lockdep::check_order(this, cls_, 0);
  {
    std::unique_lock<std::mutex> g(m_);
    if (writer_ || writers_waiting_ > 0) {
      bool got = cv_.wait_for(g, hang_timeout(),
                              [this] { return !writer_ && writers_waiting_ == 0; });
      if (!got) {
        g.unlock();
        timeout("read lock");
      }
    }
    readers_++;
  }
  lockdep::acquire(this, cls_, LockMode::kShared, 0);
}

bool RwLock::try_lock_shared() {  // no order check: see Mutex::try_lock
  {
    std::lock_guard<std::mutex> g(m_);
    if (writer_ || writers_waiting_ > 0) return false;
    readers_++;
  }
  lockdep::acquire(this, cls_, LockMode::kShared, 0);
  return true;
}

void RwLock::unlock_shared() {
  lockdep::release(this);
  bool wake;
  {
    std::lock_guard<std::mutex> g(m_);
    wake = --readers_ == 0 && writers_waiting_ > 0;
  }
  if (wake) cv_.notify_all();
}

void RwLock::downgrade() {
  LockMode mode;
  if (!lockdep::held(this, &mode) || mode != LockMode::kExclusive) {
    panic(std::string("rwlock ") + name() + ": downgrade without the write lock");
  }
  lockdep::release(this);
  writer_tid_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> g(m_);
    writer_ = false;
    readers_++;
  }
  cv_.notify_all();
  lockdep::acquire(this, cls_, LockMode::kShared, 0);
}

void RwLock::assert_held() const {
  if (!lockdep::held(this)) panic(std::string("rwlock ") + name() + " not held");
}

void RwLock::assert_write_held() const {
  if (!write_held_by_me()) panic(std::string("rwlock ") + name() + " not write-held");
}

void RwLock::assert_not_held() const {
  if (lockdep::held(this)) panic(std::string("rwlock ") + name() + " held");
}

bool RwLock::write_held_by_me() const {
  LockMode mode;
  return lockdep::held(this, &mode) && mode == LockMode::kExclusive;
}

}  // namespace gpusvm
