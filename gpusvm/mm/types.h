// Basic sizes and flag sets of the host memory model.
//
// The model takes the same PROT_*, MAP_*, MADV_* and MREMAP_* values as the Linux system
// calls (from <sys/mman.h>), so a scenario reads the same on the model and on the real kernel
// (the differential tests run both).
#pragma once

#include <sys/mman.h>

#include <cstdint>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

namespace gpusvm::mm {

using Va = uint64_t;   // a virtual address in a simulated address space
using Pfn = uint64_t;  // a physical frame number in PhysMem's pfn space

inline constexpr unsigned kPageShift = 12;
inline constexpr uint64_t kPageSize = 1ULL << kPageShift;
inline constexpr unsigned kPtrsPerTable = 512;
inline constexpr unsigned kPmdShift = 21;
inline constexpr uint64_t kPmdSize = 1ULL << kPmdShift;
inline constexpr unsigned kPmdOrder = kPmdShift - kPageShift;  // 9
inline constexpr uint64_t kPagesPerPmd = 1ULL << kPmdOrder;     // 512
inline constexpr unsigned kPudShift = 30;
inline constexpr unsigned kPgdShift = 39;
// 4-level page tables translate 48 bits; like x86-64 Linux, user space is the lower half.
inline constexpr unsigned kVaBits = 48;
inline constexpr Va kTaskSize = 1ULL << (kVaBits - 1);
inline constexpr Va kMmapMinAddr = 0x10000;  // vm.mmap_min_addr default

inline constexpr Va page_align_down(Va a) { return a & ~(kPageSize - 1); }
inline constexpr Va page_align_up(Va a) { return (a + kPageSize - 1) & ~(kPageSize - 1); }
inline constexpr Va pmd_align_down(Va a) { return a & ~(kPmdSize - 1); }
inline constexpr Va pmd_align_up(Va a) { return (a + kPmdSize - 1) & ~(kPmdSize - 1); }
inline constexpr bool page_aligned(uint64_t a) { return (a & (kPageSize - 1)) == 0; }
inline constexpr bool pmd_aligned(uint64_t a) { return (a & (kPmdSize - 1)) == 0; }
inline constexpr uint64_t pages(uint64_t bytes) { return bytes >> kPageShift; }

// THP policy of the simulated machine (/sys/kernel/mm/transparent_hugepage/*).
enum class ThpMode { kAlways, kMadvise, kNever };

}  // namespace gpusvm::mm
