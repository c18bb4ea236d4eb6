// The swap area: slots, swap counts and the swap cache (swap.h).
#include <cerrno>
#include <cstring>
#include <string>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/swap.h"

namespace gpusvm::mm {
namespace {
GPUSVM_FAULT_POINT(g_fail_swap_alloc_slot, "mm.swap_alloc_slot");
}  // namespace

SwapArea::SwapArea(uint64_t nr_slots) : nr_slots_(nr_slots) {
  SpinLockGuard g(&lock_);
  slots_.resize(nr_slots);
  free_.reserve(nr_slots);
  // Lowest slot handed out first (pop_back).
  for (uint64_t s = nr_slots; s-- > 0;) free_.push_back(s);
}

uint64_t SwapArea::nr_used() const {
  SpinLockGuard g(&lock_);
  return slots_.size() - free_.size();
}

void SwapArea::free_slot_locked(uint64_t slot) {
  lock_.assert_held();
  Slot& s = slots_[slot];
  s.used = false;
  s.count = 0;
  s.data.reset();
  free_.push_back(slot);
}

void SwapArea::cache_clear_locked(Folio* folio) {
  lock_.assert_held();
  slots_[folio->swap_slot_].cache = nullptr;
  folio->clear(kFolioSwapCache);
  folio->swap_slot_ = 0;
}

Result<uint64_t> SwapArea::add_to_swap(Folio* folio) {
  folio_assert_locked(folio);
  if (folio->test(kFolioSwapCache) || folio->large()) {
    panic("add_to_swap: folio " + folio_describe(folio) + " is cached or large");
  }
  if (g_fail_swap_alloc_slot.should_fail()) return Err{-ENOMEM};
  SpinLockGuard g(&lock_);
  if (free_.empty()) return Err{-ENOSPC};
  const uint64_t slot = free_.back();
  free_.pop_back();
  Slot& s = slots_[slot];
  s.used = true;
  s.count = 0;
  s.cache = folio;
  folio->get();  // the swap cache's reference
  folio->swap_slot_ = slot;
  folio->set(kFolioSwapCache);
  return slot;
}

void SwapArea::duplicate(uint64_t slot) {
  SpinLockGuard g(&lock_);
  if (slot >= slots_.size() || !slots_[slot].used) {
    panic("swap_duplicate of slot " + std::to_string(slot) + ", which is not in use");
  }
  slots_[slot].count++;
}

Folio* SwapArea::free_entry(uint64_t slot) {
  SpinLockGuard g(&lock_);
  if (slot >= slots_.size() || !slots_[slot].used || slots_[slot].count == 0) {
    panic("swap_free of slot " + std::to_string(slot) + ", which no entry names");
  }
  Slot& s = slots_[slot];
  if (--s.count > 0) return nullptr;
  if (!s.cache) {
    free_slot_locked(slot);
    return nullptr;
  }
  // free_swap_and_cache: the folio may only be tried here (we may hold a PTL). A holder of its
  // lock (a swap-in reading it, reclaim writing it) checks release_if_unused before it unlocks.
  Folio* folio = s.cache;
  if (!folio_trylock(folio)) return nullptr;
  Folio* drop = nullptr;
  if (!folio->mapped()) {
    cache_clear_locked(folio);
    free_slot_locked(slot);
    drop = folio;
  }
  folio_unlock(folio);
  return drop;
}

bool SwapArea::take_last_entry(uint64_t slot) {
  SpinLockGuard g(&lock_);
  Slot& s = slots_[slot];
  if (!s.used || s.count != 1 || !s.cache) return false;
  s.count = 0;
  return true;
}

Folio* SwapArea::cache_get(uint64_t slot) {
  SpinLockGuard g(&lock_);
  if (slot >= slots_.size()) return nullptr;
  Folio* folio = slots_[slot].cache;
  // try_get: the cache's reference keeps it alive while it is cached, and it leaves the cache
  // only under this lock, so the count is not zero here; try_get documents that.
  return folio && folio->try_get() ? folio : nullptr;
}

int SwapArea::cache_add(uint64_t slot, Folio* folio) {
  folio_assert_locked(folio);
  SpinLockGuard g(&lock_);
  Slot& s = slots_[slot];
  if (!s.used || s.count == 0) return -ENOENT;
  if (s.cache) return -EEXIST;
  s.cache = folio;
  folio->get();
  folio->swap_slot_ = slot;
  folio->set(kFolioSwapCache);
  return 0;
}

Folio* SwapArea::release_if_unused(Folio* folio) {
  folio_assert_locked(folio);
  if (!folio->test(kFolioSwapCache)) return nullptr;
  SpinLockGuard g(&lock_);
  const uint64_t slot = folio->swap_slot_;
  if (slots_[slot].count > 0 || folio->mapped()) return nullptr;
  cache_clear_locked(folio);
  free_slot_locked(slot);
  return folio;
}

bool SwapArea::free_swap(Folio* folio) {
  folio_assert_locked(folio);
  if (!folio->test(kFolioSwapCache)) return false;
  SpinLockGuard g(&lock_);
  const uint64_t slot = folio->swap_slot_;
  if (slots_[slot].count > 0) return false;
  cache_clear_locked(folio);
  free_slot_locked(slot);
  return true;
}

bool SwapArea::remove_mapping(Folio* folio) {
  folio_assert_locked(folio);
  {
    SpinLockGuard g(&lock_);
    if (folio->refcount() != 2 || folio->mapped()) return false;
    const uint64_t slot = folio->swap_slot_;
    cache_clear_locked(folio);
    if (slots_[slot].count == 0) free_slot_locked(slot);  // every entry went meanwhile
  }
  folio->put();  // the cache's; the caller's is the last
  return true;
}

void SwapArea::write(uint64_t slot, const Folio* folio) {
  std::byte* dst;
  {
    SpinLockGuard g(&lock_);
    Slot& s = slots_[slot];
    if (!s.used) panic("swap write to free slot " + std::to_string(slot));
    if (!s.data) s.data = std::make_unique<std::byte[]>(kPageSize);
    dst = s.data.get();
  }
  // Outside the lock: the slot cannot be freed meanwhile, the caller's cached folio holds it.
  std::memcpy(dst, folio->data(0), kPageSize);
}

void SwapArea::read(uint64_t slot, Folio* folio) const {
  const std::byte* src;
  {
    SpinLockGuard g(&lock_);
    const Slot& s = slots_[slot];
    if (!s.used || !s.data) panic("swap read of slot " + std::to_string(slot) + " without data");
    src = s.data.get();
  }
  // The caller's locked cached folio keeps the slot in use (see write).
  std::memcpy(folio->data(0), src, kPageSize);
}

std::vector<SwapArea::SlotState> SwapArea::snapshot() const {
  SpinLockGuard g(&lock_);
  std::vector<SlotState> out;
  for (uint64_t i = 0; i < slots_.size(); i++) {
    const Slot& s = slots_[i];
    if (s.used) out.push_back(SlotState{i, s.count, s.cache, s.data != nullptr});
  }
  return out;
}

}  // namespace gpusvm::mm
