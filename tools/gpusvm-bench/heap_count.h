// Live heap bytes of the benchmark process, for the svm metadata figures (svm_get_pages.cc,
// svm_memory.cc): heap_count.cc replaces the global operator new / delete of gpusvm-bench with
// ones that add and subtract malloc_usable_size of every block (what the allocator really
// hands out, rounding included). Sanitizer builds keep their own allocator: there
// heap_counting() is false and the cases fall back to sizeof-based figures.
#pragma once

#include <cstdint>

namespace gpusvm::bench {

bool heap_counting();
// Bytes live in operator new blocks now (all threads).
int64_t live_heap_bytes();

}  // namespace gpusvm::bench
