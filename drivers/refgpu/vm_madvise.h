// Memory-range attributes of a VM's CPU_ADDR_MIRROR regions (what xe_vm_madvise.c keeps in
// its CPU-address-mirror VMAs): preferred location, migration policy, atomic policy.
//
// Design notes:
//  - Attributes live in an interval map of disjoint [start, end) pieces covering exactly the
//    mirrored VA (a bind of a mirror inserts one piece with the defaults). set() splits the
//    pieces at start and end, changes the covered ones, then merges neighbours whose
//    attributes are equal again, so the map never holds two equal adjacent pieces
//    (xe_vm_madvise splits and merges VMAs the same way).
//  - A piece remembers whether it came from a MADVISE_AUTORESET mirror: reset(start, end) on
//    a CPU munmap restores the defaults there (xe's "madvise autoreset").
//  - generation() is bumped by every change of the piece boundaries; the range-attribute
//    query's second call compares it to detect a change between the two calls (-ENOSPC when
//    more pieces are needed than the caller allocated).
//
// Locking: the tree is guarded by the VM lock of its Vm (the caller's; not checked here).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "uapi/refgpu.h"

namespace gpusvm::refgpu {

struct MemAttrs {
  int32_t devmem_fd = REFGPU_PREFERRED_LOC_DEFAULT_DEVICE;  // or DEFAULT_SYSTEM, or a device fd
  uint16_t migration_policy = REFGPU_MIGRATE_ALL_PAGES;
  uint16_t region_instance = 0;  // VRAM instance of devmem_fd's device; 0: its first
  uint32_t atomic = REFGPU_ATOMIC_UNDEFINED;
  bool operator==(const MemAttrs&) const = default;
};

// One attribute range as the query reports it.
struct MemAttrRange {
  uint64_t start = 0;
  uint64_t end = 0;
  MemAttrs attrs;
};

class MemAttrTree {
 public:
  // A new mirrored region [start, end) with default attributes (the caller checked that it
  // overlaps nothing mirrored).
  void insert(uint64_t start, uint64_t end, bool autoreset);
  // Removes [start, end) from the mirrored VA (UNMAP of a mirror, or a BO carved out of it).
  void remove(uint64_t start, uint64_t end);
  // Whether every byte of [start, end) is mirrored.
  bool covers(uint64_t start, uint64_t end) const;
  // Applies fn to the attributes of [start, end) (split at both ends, merged after).
  // The caller checked covers(start, end).
  template <typename Fn>
  void set(uint64_t start, uint64_t end, Fn fn) {
    split_at(start);
    split_at(end);
    for (auto it = pieces_.lower_bound(start); it != pieces_.end() && it->first < end; ++it) {
      fn(&it->second.attrs);
    }
    merge_around(start, end);
  }
  // Restores the defaults of the autoreset pieces in [start, end) (CPU munmap). Returns
  // whether anything changed.
  bool reset(uint64_t start, uint64_t end);
  // The attributes at va (defaults when va is not mirrored).
  MemAttrs at(uint64_t va) const;
  // The largest [s, e) around va inside [lo, hi) with one set of attributes (for a fault's
  // range: the GPU VA window a range may span). {va, va} when not mirrored.
  std::pair<uint64_t, uint64_t> extent(uint64_t va) const;
  // The pieces intersecting [start, end), clipped to it.
  std::vector<MemAttrRange> query(uint64_t start, uint64_t end) const;
  size_t count(uint64_t start, uint64_t end) const;
  uint64_t generation() const { return generation_; }
  size_t size() const { return pieces_.size(); }

 private:
  struct Piece {
    uint64_t end;
    MemAttrs attrs;
    bool autoreset;
  };
  void split_at(uint64_t va);
  void merge_around(uint64_t start, uint64_t end);
  std::map<uint64_t, Piece> pieces_;  // by start; disjoint
  uint64_t generation_ = 0;
};

}  // namespace gpusvm::refgpu
