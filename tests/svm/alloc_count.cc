// Global operator new / delete that count this thread's allocations (alloc_count.h).
#include "tests/svm/alloc_count.h"

#include <cstdlib>
#include <new>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define GPUSVM_TEST_NO_ALLOC_COUNT 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define GPUSVM_TEST_NO_ALLOC_COUNT 1
#endif

namespace gpusvm::svm::testing {
namespace {
thread_local bool g_counting = false;
thread_local uint64_t g_allocs = 0;
}  // namespace

#ifdef GPUSVM_TEST_NO_ALLOC_COUNT
bool alloc_counting() { return false; }
#else
bool alloc_counting() { return true; }
#endif

void alloc_count_begin() {
  g_allocs = 0;
  g_counting = true;
}

uint64_t alloc_count_end() {
  g_counting = false;
  return g_allocs;
}

// Called by operator new (below), outside every namespace.
void note_alloc() {
  if (g_counting) g_allocs++;
}

}  // namespace gpusvm::svm::testing

#ifndef GPUSVM_TEST_NO_ALLOC_COUNT
// The plain forms only: libstdc++'s array, nothrow and sized forms call these; the aligned
// forms stay libstdc++'s and are not counted (the DMA record uses none).
void* operator new(std::size_t n) {
  gpusvm::svm::testing::note_alloc();
  void* p = std::malloc(n ? n : 1);
  if (!p) throw std::bad_alloc();
  return p;
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif
