// DevicePt: the dmirror device page table - virtual page number -> the frame the device
// reads and writes for it, with permission tags (test_hmm's xarray with DPT_XA_TAG_*).
//
// A frame is either a system page (mirrored through hmm_range_fault) or one of this device's
// pages (after a migration, or mirrored from a device-private entry of this device). The
// table holds no page references: its owner's interval notifier erases entries before the
// CPU page table stops mapping the frame (the hmm mirror contract).
//
// Not internally locked: the owning Dmirror guards it with its mutex.
#pragma once

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "gpusvm/mm/types.h"

namespace gpusvm::dmirror {

enum DptTag : uint8_t {
  kDptWrite = 1u << 0,   // the device may write (DPT_XA_TAG_WRITE); else read-only
  kDptAtomic = 1u << 1,  // mapped for atomic access through a device-exclusive entry
};

struct DptEntry {
  mm::Pfn pfn = 0;
  uint8_t tags = 0;
};

class DevicePt {
 public:
  const DptEntry* find(uint64_t vpn) const {
    auto it = map_.find(vpn);
    return it == map_.end() ? nullptr : &it->second;
  }
  void store(uint64_t vpn, DptEntry e) { map_[vpn] = e; }
  void erase(uint64_t vpn) { map_.erase(vpn); }
  // Erases [first, end).
  void erase_range(uint64_t first, uint64_t end) {
    if (first >= end) return;
    map_.erase(map_.lower_bound(first), map_.lower_bound(end));
  }
  // Whether any entry of [first, end) carries `tag`.
  bool any_tagged(uint64_t first, uint64_t end, uint8_t tag) const {
    for (auto it = map_.lower_bound(first); it != map_.end() && it->first < end; ++it) {
      if (it->second.tags & tag) return true;
    }
    return false;
  }
  size_t size() const { return map_.size(); }
  // Every (vpn, entry), in address order (a copy: for checks, not for the fast path).
  std::vector<std::pair<uint64_t, DptEntry>> entries() const { return {map_.begin(), map_.end()}; }
  void clear() { map_.clear(); }

 private:
  std::map<uint64_t, DptEntry> map_;
};

}  // namespace gpusvm::dmirror
