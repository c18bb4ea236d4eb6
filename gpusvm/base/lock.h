// Locks that know who holds them.
//
// Mutex (sleeping), SpinLock (busy-waiting, for short critical sections) and RwLock (sleeping
// reader-writer, writer preference like an rwsem). Each:
//  - is a clang capability, so -Wthread-safety checks GPUSVM_GUARDED_BY data statically;
//  - records itself in a per-thread held-lock list, so assert_held() / assert_not_held() work
//    in every build (the kernel's lockdep_assert_held), and a rank check enforces the
//    documented lock order at every blocking acquisition (a "lockdep-lite"): a thread may
//    acquire a lock only if its rank is above every rank it holds, or equal with a higher
//    nesting subclass (the kernel's spin_lock_nested). try_lock()/try_lock_shared() never
//    wait, so, as in the kernel's lockdep, they skip the order check (a try on a lock this
//    thread already holds exclusively just fails) and are still recorded as held;
//  - never waits forever: an acquisition that takes longer than hang_timeout() panics with a
//    diagnostic naming the lock, its holder and the locks the waiter holds, so a deadlock
//    fails a test instead of hanging CI.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <sys/types.h>

#include "gpusvm/base/thread_annotations.h"

namespace gpusvm {

// A lock class: the name used in diagnostics and the rank that places it in the lock order.
// Rank 0 means "not ordered" (only held-tracking). Classes are static constants owned by the
// layer that defines the lock (gpusvm/base/lock_order.h is the one table of all of them).
struct LockClass {
  const char* name;
  uint32_t rank;
};

enum class LockMode : uint8_t { kExclusive, kShared };

// Upper bound for every sleeping or spinning wait in gpusvm (locks, wait queues, folio locks,
// notifier waits). Default 60 s; tests may shorten it.
std::chrono::milliseconds hang_timeout();
void set_hang_timeout(std::chrono::milliseconds timeout);

// Reports a fatal bug with the current thread's held locks and aborts.
[[noreturn]] void panic(const std::string& message);

// Per-thread held-lock tracking, used by the lock types below and by bit locks defined
// elsewhere (the folio lock).
namespace lockdep {
// Records that this thread acquired `lock`; checks the lock order first. `subclass` allows
// nesting two locks of the same rank in a fixed order (lower subclass first).
// `spin`: the lock is a SpinLock (spin_locks_held counts it).
void acquire(const void* lock, const LockClass* cls, LockMode mode, unsigned subclass = 0,
             bool spin = false);
// Whether this build checks ranks (GPUSVM_LOCK_RANK_CHECKS; off only in the benchmark
// `release` preset). When off, check_order() and check_class_order() do nothing: no order or
// recursion check, while holder tracking and assert_held() work as always.
bool rank_checks_enabled();
// Checks the order as acquire() would, without recording; used before a blocking wait so an
// inversion is reported even when the lock happens to be free.
void check_order(const void* lock, const LockClass* cls, unsigned subclass = 0);
void release(const void* lock);
bool held(const void* lock, LockMode* mode = nullptr);
// Locks a thread may hold many of at once (folio locks: a migration locks every folio of its
// range) are tracked per class with a count. Their order against other classes is checked;
// their order among themselves is the caller's contract (pfn order, or trylock and back off).
void check_class_order(const LockClass* cls);
void acquire_class(const LockClass* cls);
void release_class(const LockClass* cls);
// Number of locks this thread holds (for "must hold no lock" assertions before sleeping).
int held_count();
// Number of SpinLocks this thread holds (a thread holding one must not sleep). Scans the
// held-lock list: for slow paths.
int spin_locks_held();
// Highest rank among the locks this thread holds (0 when none): "no lock of rank >= R held"
// is how a function that sleeps or faults asserts that the inner locks were dropped.
uint32_t max_held_rank();
// Human-readable list of this thread's held locks, for diagnostics.
std::string held_locks_string();
// Panics unless this thread holds no tracked lock; `where` names the caller.
void assert_none_held(const char* where);
}  // namespace lockdep

pid_t current_tid();

class GPUSVM_CAPABILITY("mutex") Mutex {
 public:
  explicit Mutex(const LockClass* cls = nullptr) : cls_(cls) {}
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() GPUSVM_ACQUIRE() { lock_nested(0); }
  void lock_nested(unsigned subclass) GPUSVM_ACQUIRE();
  bool try_lock() GPUSVM_TRY_ACQUIRE(true);
  void unlock() GPUSVM_RELEASE();

  void assert_held() const GPUSVM_ASSERT_CAPABILITY(this);
  void assert_not_held() const;
  bool held_by_me() const { return lockdep::held(this); }
  const char* name() const { return cls_ ? cls_->name : "mutex"; }

 private:
  const LockClass* cls_;
  std::mutex m_;
  std::condition_variable cv_;
  bool locked_ = false;       // under m_
  int waiters_ = 0;           // under m_
  std::atomic<pid_t> owner_{0};  // diagnostics only: read racily by a timed-out waiter
};

class GPUSVM_CAPABILITY("spinlock") SpinLock {
 public:
  explicit SpinLock(const LockClass* cls = nullptr) : cls_(cls) {}
  SpinLock(const SpinLock&) = delete;
  SpinLock& operator=(const SpinLock&) = delete;

  void lock() GPUSVM_ACQUIRE() { lock_nested(0); }
  void lock_nested(unsigned subclass) GPUSVM_ACQUIRE();
  bool try_lock() GPUSVM_TRY_ACQUIRE(true);
  void unlock() GPUSVM_RELEASE();

  void assert_held() const GPUSVM_ASSERT_CAPABILITY(this);
  void assert_not_held() const;
  bool held_by_me() const { return lockdep::held(this); }
  const char* name() const { return cls_ ? cls_->name : "spinlock"; }

 private:
  const LockClass* cls_;
  // acquire on lock / release on unlock: orders the critical sections of successive holders.
  std::atomic<bool> locked_{false};
  std::atomic<pid_t> owner_{0};  // diagnostics only
};

class GPUSVM_CAPABILITY("rwlock") RwLock {
 public:
  explicit RwLock(const LockClass* cls = nullptr) : cls_(cls) {}
  RwLock(const RwLock&) = delete;
  RwLock& operator=(const RwLock&) = delete;

  void lock() GPUSVM_ACQUIRE() { lock_nested(0); }
  // Write-locks a second lock of the same class in a fixed order (e.g. parent then child
  // address space in fork).
  void lock_nested(unsigned subclass) GPUSVM_ACQUIRE();
  bool try_lock() GPUSVM_TRY_ACQUIRE(true);
  void unlock() GPUSVM_RELEASE();
  void lock_shared() GPUSVM_ACQUIRE_SHARED();
  bool try_lock_shared() GPUSVM_TRY_ACQUIRE_SHARED(true);
  void unlock_shared() GPUSVM_RELEASE_SHARED();
  // Atomically turns a write hold into a read hold (mmap_write_downgrade).
  void downgrade() GPUSVM_RELEASE() GPUSVM_ACQUIRE_SHARED();

  // Held in either mode by this thread.
  void assert_held() const GPUSVM_ASSERT_SHARED_CAPABILITY(this);
  void assert_write_held() const GPUSVM_ASSERT_CAPABILITY(this);
  void assert_not_held() const;
  bool held_by_me() const { return lockdep::held(this); }
  bool write_held_by_me() const;
  const char* name() const { return cls_ ? cls_->name : "rwlock"; }

 private:
  [[noreturn]] void timeout(const char* what);
  const LockClass* cls_;
  std::mutex m_;
  std::condition_variable cv_;
  int readers_ = 0;          // under m_
  bool writer_ = false;      // under m_
  int writers_waiting_ = 0;  // under m_; new readers wait while > 0 (no writer starvation)
  std::atomic<pid_t> writer_tid_{0};  // diagnostics only
};

// RAII holders. Where a holder must drop and retake its lock around slow work, the code
// writes the unlock/lock pair explicitly with a comment saying why.
class GPUSVM_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) GPUSVM_ACQUIRE(mu) : mu_(mu) { mu_->lock(); }
  ~MutexLock() GPUSVM_RELEASE() { mu_->unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* mu_;
};

class GPUSVM_SCOPED_CAPABILITY SpinLockGuard {
 public:
  explicit SpinLockGuard(SpinLock* l) GPUSVM_ACQUIRE(l) : l_(l) { l_->lock(); }
  SpinLockGuard(SpinLock* l, unsigned subclass) GPUSVM_ACQUIRE(l) : l_(l) {
    l_->lock_nested(subclass);
  }
  ~SpinLockGuard() GPUSVM_RELEASE() { l_->unlock(); }
  SpinLockGuard(const SpinLockGuard&) = delete;
  SpinLockGuard& operator=(const SpinLockGuard&) = delete;

 private:
  SpinLock* l_;
};

class GPUSVM_SCOPED_CAPABILITY ReadLock {
 public:
  explicit ReadLock(RwLock* l) GPUSVM_ACQUIRE_SHARED(l) : l_(l) { l_->lock_shared(); }
  ~ReadLock() GPUSVM_RELEASE() { l_->unlock_shared(); }
  ReadLock(const ReadLock&) = delete;
  ReadLock& operator=(const ReadLock&) = delete;

 private:
  RwLock* l_;
};

class GPUSVM_SCOPED_CAPABILITY WriteLock {
 public:
  explicit WriteLock(RwLock* l) GPUSVM_ACQUIRE(l) : l_(l) { l_->lock(); }
  ~WriteLock() GPUSVM_RELEASE() { l_->unlock(); }
  WriteLock(const WriteLock&) = delete;
  WriteLock& operator=(const WriteLock&) = delete;

 private:
  RwLock* l_;
};

}  // namespace gpusvm
