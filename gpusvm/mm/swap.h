// The in-memory swap device and its swap cache (mm/swapfile.c, mm/swap_state.c).
//
// Design notes
//  - One swap area per PhysMem with Config::swap_slots slots of 4 KiB. A slot's bytes are
//    host memory allocated when the slot is first written and freed with the slot.
//  - A swap entry (Pte::make_swap, SoftLeafType::kSwap) names a slot. The slot's count is the
//    number of swap PTEs that name it (the kernel's swap_map count): try_to_unmap and fork
//    add one per entry they install (swap_duplicate), a zap or a swap-in removes one.
//  - The swap cache maps a slot to the folio that holds its bytes in memory: while a folio is
//    being swapped out (from the slot's allocation until the folio is freed) and after a
//    swap-in (until the folio is reclaimed again, or a write fault frees the slot). It holds
//    one folio reference. A cached folio whose slot still holds its bytes and that nobody
//    dirtied since is reclaimed without a write.
//  - A slot is in use while its count is non-zero or a folio caches it. Every path that can
//    bring a slot to (count 0, cached folio unmapped) drops the folio from the cache, so an
//    unmapped cached folio always has a swap entry that can still find it (mm::check).
//
// Locking: the swap lock (kSwapLockClass, a spin lock ranked after the PTE locks: a zap frees
// slots under the PTE lock) guards counts, the cache and the free list. A folio enters and
// leaves the swap cache only with its folio lock held, so a folio-lock holder sees
// kFolioSwapCache and swap_slot() stable. A slot's bytes are written by reclaim with the
// cached folio locked and no PTE naming the slot yet mapped back, and read by a swap-in with
// the new cached folio locked; the folio lock orders the two.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/result.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::mm {

class SwapArea {
 public:
  explicit SwapArea(uint64_t nr_slots);
  SwapArea(const SwapArea&) = delete;
  SwapArea& operator=(const SwapArea&) = delete;

  uint64_t nr_slots() const { return nr_slots_; }
  uint64_t nr_used() const;

  // add_to_swap: a free slot for `folio` (locked, small, anonymous, not cached), which joins
  // the swap cache (one reference taken for the cache). Returns the slot, -ENOSPC when the
  // area is full or absent, -ENOMEM when "mm.swap_alloc_slot" fires. Leaf: swap lock only.
  [[nodiscard]] Result<uint64_t> add_to_swap(Folio* folio);
  // swap_duplicate: one more swap PTE names `slot` (in use). Caller holds that PTE's PTL.
  void duplicate(uint64_t slot);
  // A swap PTE naming `slot` went away (swap_free / free_swap_and_cache). When that was the
  // last one and the cached folio (if any) is unmapped and can be trylocked, the folio leaves
  // the cache and the slot is freed: the cache's reference is returned for the caller to drop
  // once its page-table lock is released (nullptr: nothing to drop). A cached folio that is
  // locked stays: its holder runs release_if_unused before unlocking. May run under a PTL.
  [[nodiscard]] Folio* free_entry(uint64_t slot);
  // do_swap_page's exclusivity test: if exactly one swap PTE names `slot` (the caller's, which
  // it is replacing under its PTL), that entry is dropped (count 0; the cached folio the
  // caller holds keeps the slot) and true returned. Otherwise nothing changes.
  [[nodiscard]] bool take_last_entry(uint64_t slot);
  // The cached folio of `slot` with a reference taken, or nullptr (swap_cache_get_folio).
  Folio* cache_get(uint64_t slot);
  // swap-in: adds `folio` (new, locked, small) as the cache of `slot`. 0, -EEXIST (a folio is
  // cached already: use that one) or -ENOENT (no PTE names the slot any more: the entry that
  // was read is gone). Takes the cache's reference on success.
  [[nodiscard]] int cache_add(uint64_t slot, Folio* folio);
  // The folio (locked, cached) leaves the cache if its slot's count is 0 and it is unmapped;
  // returns the cache's reference to drop, or nullptr. Run by every holder of a cached folio's
  // lock before it unlocks a folio it may have left in that state.
  [[nodiscard]] Folio* release_if_unused(Folio* folio);
  // folio_free_swap: the folio (locked, cached) leaves the cache and its slot is freed, if
  // no swap PTE names the slot any more (a write fault that just took the last entry: the page
  // is about to be dirtied, its slot's bytes would be stale). Returns whether it left; then
  // the cache's reference is the caller's to drop.
  [[nodiscard]] bool free_swap(Folio* folio);
  // Reclaim's last step: the folio (locked, cached, unmapped) leaves the cache if nobody but
  // the cache and the caller holds it (refcount == 2), checked under the swap lock, which
  // every cache lookup takes: a swap-in racing with it either found the folio (and holds a
  // reference, so this fails) or finds the slot uncached and reads it. The slot and its bytes
  // stay for the swap PTEs. Returns whether it left; then the cache's reference is dropped
  // here (the caller's remains, the last).
  [[nodiscard]] bool remove_mapping(Folio* folio);

  // The bytes of a slot (in use).
  void write(uint64_t slot, const Folio* folio);
  void read(uint64_t slot, Folio* folio) const;

  // For mm::check at a quiescent point: count and cached folio of each slot in use.
  struct SlotState {
    uint64_t slot;
    uint32_t count;
    Folio* cache;
    bool has_data;
  };
  std::vector<SlotState> snapshot() const;

 private:
  struct Slot {
    uint32_t count = 0;
    bool used = false;
    Folio* cache = nullptr;
    std::unique_ptr<std::byte[]> data;
  };
  void free_slot_locked(uint64_t slot) GPUSVM_REQUIRES(lock_);
  void cache_clear_locked(Folio* folio) GPUSVM_REQUIRES(lock_);

  const uint64_t nr_slots_;
  mutable SpinLock lock_{&kSwapLockClass};
  std::vector<Slot> slots_ GPUSVM_GUARDED_BY(lock_);  // size fixed at construction
  std::vector<uint64_t> free_ GPUSVM_GUARDED_BY(lock_);
};

}  // namespace gpusvm::mm
