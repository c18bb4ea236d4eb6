#include "drivers/refgpu/vram_lru.h"

#include <string>

namespace gpusvm::refgpu {

VramLru::~VramLru() {
  SpinLockGuard g(&lock_);
  if (count_ != 0) panic("VramLru destroyed with " + std::to_string(count_) + " entries linked");
}

void VramLru::link_tail_locked(VramLruEntry* e) {
  e->prev_ = tail_;
  e->next_ = nullptr;
  if (tail_) {
    tail_->next_ = e;
  } else {
    head_ = e;
  }
  tail_ = e;
  e->linked_ = true;
  count_++;
  bytes_ += e->vram_size();
}

void VramLru::unlink_locked(VramLruEntry* e) {
  if (e->prev_) {
    e->prev_->next_ = e->next_;
  } else {
    head_ = e->next_;
  }
  if (e->next_) {
    e->next_->prev_ = e->prev_;
  } else {
    tail_ = e->prev_;
  }
  e->prev_ = e->next_ = nullptr;
  e->linked_ = false;
  count_--;
  bytes_ -= e->vram_size();
}

void VramLru::add(VramLruEntry* e) {
  SpinLockGuard g(&lock_);
  if (e->dead_) return;
  e->wanted_ = true;
  if (!e->linked_ && !e->evicting_) link_tail_locked(e);
}

void VramLru::unlink(VramLruEntry* e) {
  SpinLockGuard g(&lock_);
  e->wanted_ = false;
  if (e->linked_) unlink_locked(e);
}

bool VramLru::linked(const VramLruEntry* e) const {
  SpinLockGuard g(&lock_);
  return e->linked_;
}

void VramLru::touch(VramLruEntry* e) {
  SpinLockGuard g(&lock_);
  if (!e->linked_ || tail_ == e) return;
  unlink_locked(e);
  link_tail_locked(e);
}

void VramLru::remove(VramLruEntry* e) {
  SpinLockGuard g(&lock_);
  if (e->linked_) unlink_locked(e);
  e->wanted_ = false;
  e->dead_ = true;
}

uint64_t VramLru::evict(uint64_t bytes) {
  uint64_t freed = 0;
  uint64_t budget;
  {
    SpinLockGuard g(&lock_);
    budget = count_;
  }
  while (freed < bytes && budget > 0) {
    VramLruEntry* victim = nullptr;
    {
      SpinLockGuard g(&lock_);
      // The least recently used entry that is not busy and not being destroyed. Entries
      // passed over stay where they are (the walk is bounded by the budget).
      for (VramLruEntry* e = head_; e && budget > 0; e = e->next_) {
        budget--;
        if (e->busy() || !e->try_get()) {
          stats_->eviction_skips.add();
          continue;
        }
        victim = e;
        break;
      }
      if (!victim) break;
      // Unlinked while it is evicted, so a concurrent evictor takes the next one; busy so
      // that its owner's own paths see it in use.
      unlink_locked(victim);
      victim->evicting_ = true;
      victim->begin_busy();
    }
    const uint64_t size = victim->vram_size();
    const int rc = victim->evict();  // no lock held: may sleep, migrate, take mm locks
    victim->end_busy();
    {
      SpinLockGuard g(&lock_);
      victim->evicting_ = false;
      // Back at the most-recent end if its owner still wants it listed: it was in use (a
      // failed eviction), or it came back into VRAM meanwhile. An entry whose VRAM went was
      // unlinked (unlink) or removed for good (remove) by its owner.
      if (victim->wanted_ && !victim->dead_ && !victim->linked_) link_tail_locked(victim);
    }
    if (rc == 0) {
      freed += size;
      stats_->evictions.add();
      stats_->evicted_bytes.add(size);
    } else {
      stats_->eviction_skips.add();
    }
    victim->put();
  }
  return freed;
}

uint64_t VramLru::linked_count() const {
  SpinLockGuard g(&lock_);
  return count_;
}

uint64_t VramLru::linked_bytes() const {
  SpinLockGuard g(&lock_);
  return bytes_;
}

std::vector<VramLruEntry*> VramLru::snapshot() const {
  std::vector<VramLruEntry*> out;
  SpinLockGuard g(&lock_);
  out.reserve(count_);
  for (VramLruEntry* e = head_; e; e = e->next_) out.push_back(e);
  return out;
}

}  // namespace gpusvm::refgpu
