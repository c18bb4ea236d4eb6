// Clang thread-safety annotations (-Wthread-safety). They compile to nothing elsewhere.
//
// Every lock type in gpusvm/base is a capability; data guarded by a lock is declared
// GPUSVM_GUARDED_BY(lock) and functions that need a lock say GPUSVM_REQUIRES(lock), so clang
// rejects an access without the lock at compile time. The run-time side (assert_held) lives
// in lock.h and covers what the static analysis cannot follow (locks reached through
// pointers chosen at run time, such as a page-table lock).
#pragma once

#if defined(__clang__)
#define GPUSVM_TSA(x) __attribute__((x))
#else
#define GPUSVM_TSA(x)
#endif

#define GPUSVM_CAPABILITY(x) GPUSVM_TSA(capability(x))
#define GPUSVM_SCOPED_CAPABILITY GPUSVM_TSA(scoped_lockable)
#define GPUSVM_GUARDED_BY(x) GPUSVM_TSA(guarded_by(x))
#define GPUSVM_PT_GUARDED_BY(x) GPUSVM_TSA(pt_guarded_by(x))
#define GPUSVM_ACQUIRED_AFTER(...) GPUSVM_TSA(acquired_after(__VA_ARGS__))
#define GPUSVM_ACQUIRED_BEFORE(...) GPUSVM_TSA(acquired_before(__VA_ARGS__))
#define GPUSVM_REQUIRES(...) GPUSVM_TSA(requires_capability(__VA_ARGS__))
#define GPUSVM_REQUIRES_SHARED(...) GPUSVM_TSA(requires_shared_capability(__VA_ARGS__))
#define GPUSVM_ACQUIRE(...) GPUSVM_TSA(acquire_capability(__VA_ARGS__))
#define GPUSVM_ACQUIRE_SHARED(...) GPUSVM_TSA(acquire_shared_capability(__VA_ARGS__))
#define GPUSVM_RELEASE(...) GPUSVM_TSA(release_capability(__VA_ARGS__))
#define GPUSVM_RELEASE_SHARED(...) GPUSVM_TSA(release_shared_capability(__VA_ARGS__))
#define GPUSVM_RELEASE_GENERIC(...) GPUSVM_TSA(release_generic_capability(__VA_ARGS__))
#define GPUSVM_TRY_ACQUIRE(...) GPUSVM_TSA(try_acquire_capability(__VA_ARGS__))
#define GPUSVM_TRY_ACQUIRE_SHARED(...) GPUSVM_TSA(try_acquire_shared_capability(__VA_ARGS__))
#define GPUSVM_EXCLUDES(...) GPUSVM_TSA(locks_excluded(__VA_ARGS__))
#define GPUSVM_ASSERT_CAPABILITY(x) GPUSVM_TSA(assert_capability(x))
#define GPUSVM_ASSERT_SHARED_CAPABILITY(x) GPUSVM_TSA(assert_shared_capability(x))
#define GPUSVM_RETURN_CAPABILITY(x) GPUSVM_TSA(lock_returned(x))
#define GPUSVM_NO_THREAD_SAFETY_ANALYSIS GPUSVM_TSA(no_thread_safety_analysis)
