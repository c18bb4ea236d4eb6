// Counts the calling thread's operator new calls between begin and end (alloc_count.cc
// replaces the global operator new / delete of the svm test binary; they only count). The
// replacement lives in its own translation unit so no compiler inlines it into a caller and
// pairs a new-expression with free(). Sanitizer runtimes define operator new themselves:
// there alloc_counting() is false and the tests that need it skip.
#pragma once

#include <cstdint>

namespace gpusvm::svm::testing {

bool alloc_counting();
void alloc_count_begin();
// operator new calls of this thread since alloc_count_begin().
uint64_t alloc_count_end();
// operator new's hook (alloc_count.cc).
void note_alloc();

}  // namespace gpusvm::svm::testing
