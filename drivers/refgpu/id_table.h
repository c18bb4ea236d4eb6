// IdTable<T>: one id table of an open file (VMs, exec queues, syncobjs, GEM handles): ids from
// 1 upwards, never reused while the table lives (an xarray with XA_FLAGS_ALLOC1 and a cursor
// that never wraps: after 2^32 - 1 ids, reserve() returns 0), each naming a shared_ptr<T>.
//
// Locking: none of its own. The owner guards it (RefgpuFile: GPUSVM_GUARDED_BY(lock_), one
// lock for all of its tables, so that a check across two tables - a VM's queue count against
// the queue table - is atomic). remove() and take_all() hand the references out so the caller
// drops them after its lock: an object's destructor never runs under the owner's lock.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <utility>

namespace gpusvm::refgpu {

template <typename T>
class IdTable {
 public:
  using Map = std::map<uint32_t, std::shared_ptr<T>>;

  // A fresh id, never handed out before; 0 once the 32-bit space is spent.
  uint32_t reserve() {
    if (cursor_ == std::numeric_limits<uint32_t>::max()) return 0;
    return ++cursor_;
  }
  // Publishes `obj` under `id` (from reserve(), not yet inserted).
  void insert(uint32_t id, std::shared_ptr<T> obj) { objs_.emplace(id, std::move(obj)); }
  // reserve() and insert() at once: the id, or 0 (ids spent). Copies the reference, so the
  // caller's stays the one to drop after its lock when nothing was inserted.
  uint32_t add(const std::shared_ptr<T>& obj) {
    const uint32_t id = reserve();
    if (id) insert(id, obj);
    return id;
  }
  // The object named `id`, or null.
  std::shared_ptr<T> find(uint32_t id) const {
    auto it = objs_.find(id);
    return it == objs_.end() ? nullptr : it->second;
  }
  // Takes `id` out: its object (the table's reference), or null for an unknown id.
  std::shared_ptr<T> remove(uint32_t id) {
    auto it = objs_.find(id);
    if (it == objs_.end()) return nullptr;
    std::shared_ptr<T> obj = std::move(it->second);
    objs_.erase(it);
    return obj;
  }
  // Empties the table (release); the cursor stays, so no id is handed out again.
  Map take_all() { return std::exchange(objs_, Map{}); }
  size_t size() const { return objs_.size(); }

 private:
  Map objs_;
  uint32_t cursor_ = 0;
};

}  // namespace gpusvm::refgpu
