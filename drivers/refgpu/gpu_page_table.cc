#include "drivers/refgpu/gpu_page_table.h"

#include <cerrno>

#include "gpusvm/base/fault_inject.h"

namespace gpusvm::refgpu {

GPUSVM_FAULT_POINT(g_fail_pt_alloc, "refgpu.pt_alloc");

namespace {
// Entry encoding (an L1 entry with a child is a table, its pte word is 0).
constexpr uint64_t kPresent = 1ull << 0;
constexpr uint64_t kWrite = 1ull << 1;
constexpr uint64_t kAtomic = 1ull << 2;
constexpr uint64_t kVram = 1ull << 3;
constexpr uint64_t kPs64 = 1ull << 4;  // L0: one of the 16 entries of a 64 KiB leaf
constexpr uint64_t kAddrMask = ~uint64_t{kSZ4K - 1};
constexpr unsigned kEntries = 512;

unsigned idx(uint64_t va, unsigned level) { return (va >> (12 + 9 * level)) & (kEntries - 1); }
uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }

uint64_t encode(Target t, uint64_t addr, uint8_t perms) {
  uint64_t pte = kPresent | (addr & kAddrMask);
  if (perms & kPermWrite) pte |= kWrite;
  if (perms & kPermAtomic) pte |= kAtomic;
  if (t == Target::kVram) pte |= kVram;
  return pte;
}

GpuLeaf decode(uint64_t pte, uint64_t va, uint64_t size) {
  GpuLeaf l;
  l.va = va;
  l.size = size;
  l.target = (pte & kVram) ? Target::kVram : Target::kSystem;
  l.addr = pte & kAddrMask;
  l.perms = static_cast<uint8_t>(((pte & kWrite) ? kPermWrite : 0) | ((pte & kAtomic) ? kPermAtomic : 0));
  return l;
}
}  // namespace

struct PtNode {
  std::array<uint64_t, kEntries> pte{};
  std::array<PtNode*, kEntries> child{};  // owned; L3..L1 only
  uint32_t used = 0;                      // slots with a present pte or a child
  PtNode* next = nullptr;                 // reservation list link
  ~PtNode() {
    for (PtNode* c : child) delete c;
  }
};

PtReservation::PtReservation() = default;
PtReservation::~PtReservation() {
  for (auto& n : pool_) {
    if (stats_) stats_->nodes_freed.add();
    n.reset();
  }
}
PtReservation::PtReservation(PtReservation&&) noexcept = default;
PtReservation& PtReservation::operator=(PtReservation&&) noexcept = default;

GpuPageTable::GpuPageTable() : root_(std::make_unique<PtNode>()) {}
GpuPageTable::~GpuPageTable() = default;

// Nodes a commit of [start, end) needs now: a map builds the path to every 2 MiB slot (and an
// L0 table under it for small leaves); an unmap needs an L0 table only to split a 2 MiB leaf
// it covers in part.
uint64_t GpuPageTable::count_needed_locked(uint64_t start, uint64_t end, uint64_t leaf_size) const {
  lock_.assert_held();
  const bool unmap = leaf_size == 0;
  uint64_t need = 0;
  uint64_t last_l2 = ~0ull;
  uint64_t last_l1 = ~0ull;
  uint64_t slot = align_down(start, kSZ2M);
  // A missing table covering 1 << shift bytes at slot (L2: 39, L1: 30): an unmap has nothing
  // there and moves slot past it (true: go on from there); a map needs one node per missing
  // table it crosses (*last: the last table counted).
  auto missing = [&](unsigned shift, uint64_t* last) {
    if (unmap) {
      slot = align_down(slot, 1ull << shift) + (1ull << shift);
      return true;
    }
    if (*last != slot >> shift) need++;
    *last = slot >> shift;
    return false;
  };
  while (slot < end) {
    const PtNode* l2 = root_->child[idx(slot, 3)];
    if (!l2 && missing(39, &last_l2)) continue;
    const PtNode* l1 = l2 ? l2->child[idx(slot, 2)] : nullptr;
    if (!l1 && missing(30, &last_l1)) continue;
    const unsigned i1 = idx(slot, 1);
    const bool has_l0 = l1 && l1->child[i1];
    const bool is_leaf = l1 && (l1->pte[i1] & kPresent);
    const bool full = slot >= start && slot + kSZ2M <= end;
    if (!has_l0) {
      if (!unmap && leaf_size < kSZ2M) need++;
      if (unmap && is_leaf && !full) need++;
    }
    slot += kSZ2M;
  }
  return need;
}

Result<PtReservation> GpuPageTable::reserve(uint64_t start, uint64_t end, uint64_t leaf_size) {
  if (leaf_size != 0 && leaf_size != kSZ4K && leaf_size != kSZ64K && leaf_size != kSZ2M)
    return Err{-EINVAL};
  const uint64_t align = leaf_size ? leaf_size : kSZ4K;
  if (start >= end || end > kVaLimit || start % align || end % align) return Err{-EINVAL};
  uint64_t need;
  {
    ReadLock g(&lock_);
    need = count_needed_locked(start, end, leaf_size);
  }
  // Allocate with no lock held: this is the step that may fail.
  PtReservation res;
  res.stats_ = &stats_;
  for (uint64_t i = 0; i < need; i++) {
    if (g_fail_pt_alloc.should_fail()) return Err{-ENOMEM};
    res.pool_.push_back(std::make_unique<PtNode>());
    stats_.nodes_allocated.add();
  }
  // The list of nodes a commit takes from and gives emptied nodes back to; reserve its
  // capacity for every node the table holds plus the new ones, so giving back never
  // allocates either.
  res.pool_.reserve(res.pool_.size() + nodes() + 8);
  return res;
}

// The child at parent->child[idx], taken from the reservation when missing.
PtNode* GpuPageTable::get_or_take_locked(PtNode* parent, unsigned i, PtReservation* res) {
  lock_.assert_write_held();
  if (!parent->child[i]) {
    if (res->pool_.empty()) panic("refgpu pt: commit ran out of reserved nodes after counting");
    parent->child[i] = res->pool_.back().release();
    res->pool_.pop_back();
    nodes_++;
    if (!(parent->pte[i] & kPresent)) parent->used++;
  }
  return parent->child[i];
}

// Turns the 2 MiB leaf (or hole) at l1->pte[i] into an L0 table; a leaf becomes 512 4 KiB
// entries with the same target and permissions.
PtNode* GpuPageTable::split_l1_leaf_locked(PtNode* l1, unsigned i, PtReservation* res) {
  lock_.assert_write_held();
  const uint64_t leaf = l1->pte[i];
  l1->pte[i] = 0;
  const bool was_leaf = leaf & kPresent;
  if (was_leaf) l1->used--;
  PtNode* l0 = get_or_take_locked(l1, i, res);
  if (was_leaf) {
    for (unsigned k = 0; k < kEntries; k++) l0->pte[k] = leaf + k * kSZ4K;
    l0->used = kEntries;
    stats_.leaf_splits.add();
  }
  return l0;
}

PtNode* GpuPageTable::l1_for_locked(uint64_t va) const {
  lock_.assert_held();
  PtNode* l2 = root_->child[idx(va, 3)];
  return l2 ? l2->child[idx(va, 2)] : nullptr;
}

namespace {
// The first 2 MiB slot after `slot` that may have an L1 table: past the 1 GiB (no L1) or
// 512 GiB (no L2) hole that `slot` is in. Walks over the whole VA (a VM's teardown zaps
// 2^48 bytes) then cost one step per table, not one per 2 MiB.
uint64_t skip_hole(const PtNode* root, uint64_t slot) {
  const PtNode* l2 = root->child[idx(slot, 3)];
  if (!l2) return align_down(slot, 1ull << 39) + (1ull << 39);
  return align_down(slot, 1ull << 30) + (1ull << 30);
}

// Clears kPs64 on the 64 KiB group of L0 entry k when [first, last] (entry indices of the
// range in this table) does not cover the group: its entries become 4 KiB leaves.
bool split_ps64_group(PtNode* l0, unsigned k, unsigned first, unsigned last) {
  if (!(l0->pte[k] & kPs64)) return false;
  const unsigned g = k & ~15u;
  if (g >= first && g + 15 <= last) return false;
  for (unsigned j = g; j < g + 16; j++) l0->pte[j] &= ~kPs64;
  return true;
}
}  // namespace

void GpuPageTable::set_range_locked(PtReservation* res, uint64_t start, uint64_t end, uint64_t leaf_size,
                                    uint64_t pte_tmpl, uint64_t addr, bool* replaced) {
  lock_.assert_write_held();
  for (uint64_t slot = align_down(start, kSZ2M); slot < end; slot += kSZ2M) {
    PtNode* l2 = get_or_take_locked(root_.get(), idx(slot, 3), res);
    PtNode* l1 = get_or_take_locked(l2, idx(slot, 2), res);
    const unsigned i1 = idx(slot, 1);
    if (leaf_size == kSZ2M) {
      if (PtNode* old = l1->child[i1]) {  // the L0 table goes back to the reservation
        *replaced |= old->used > 0;
        old->pte.fill(0);
        old->used = 0;
        res->pool_.emplace_back(old);
        l1->child[i1] = nullptr;
        nodes_--;
      } else if (l1->pte[i1] & kPresent) {
        *replaced = true;
      } else {
        l1->used++;
      }
      l1->pte[i1] = pte_tmpl | ((addr + (slot - start)) & kAddrMask);
      continue;
    }
    PtNode* l0 = l1->child[i1] ? l1->child[i1] : split_l1_leaf_locked(l1, i1, res);
    const uint64_t lo = std::max(start, slot);
    const uint64_t hi = std::min(end, slot + kSZ2M);
    const unsigned first = idx(lo, 0);
    const unsigned last = idx(hi - kSZ4K, 0);
    for (unsigned k = first; k <= last; k++) {
      if (l0->pte[k] & kPresent) {
        *replaced = true;
        if (split_ps64_group(l0, k, first, last)) stats_.leaf_splits.add();
      } else {
        l0->used++;
      }
      const uint64_t va = slot + uint64_t{k} * kSZ4K;
      l0->pte[k] = pte_tmpl | ((addr + (va - start)) & kAddrMask) | (leaf_size == kSZ64K ? kPs64 : 0);
    }
  }
}

Result<bool> GpuPageTable::map(PtReservation* res, uint64_t start, uint64_t end, uint64_t leaf_size,
                               Target target, uint64_t addr, uint8_t perms) {
  if (leaf_size != kSZ4K && leaf_size != kSZ64K && leaf_size != kSZ2M) return Err{-EINVAL};
  if (start >= end || end > kVaLimit || start % leaf_size || end % leaf_size || addr % leaf_size)
    return Err{-EINVAL};
  if (perms & ~(kPermWrite | kPermAtomic)) return Err{-EINVAL};
  if (addr + (end - start) < addr) return Err{-EINVAL};
  WriteLock g(&lock_);
  if (count_needed_locked(start, end, leaf_size) > res->pool_.size()) {
    stats_.commit_eagain.add();
    return Err{-EAGAIN};
  }
  bool replaced = false;
  set_range_locked(res, start, end, leaf_size, encode(target, 0, perms), addr, &replaced);
  stats_.maps.add();
  return replaced;
}

// Gives L0..L2 tables that [start, end) left empty back to the reservation.
void GpuPageTable::prune_locked(uint64_t start, uint64_t end, PtReservation* res) {
  lock_.assert_write_held();
  for (uint64_t gb = align_down(start, 1ull << 30); gb < end; gb += 1ull << 30) {
    PtNode* l2 = root_->child[idx(gb, 3)];
    if (!l2) continue;
    const unsigned i2 = idx(gb, 2);
    PtNode* l1 = l2->child[i2];
    if (!l1) continue;
    for (uint64_t slot = std::max(gb, align_down(start, kSZ2M)); slot < std::min<uint64_t>(end, gb + (1ull << 30));
         slot += kSZ2M) {
      const unsigned i1 = idx(slot, 1);
      PtNode* l0 = l1->child[i1];
      if (l0 && l0->used == 0) {
        l1->child[i1] = nullptr;
        l1->used--;
        res->pool_.emplace_back(l0);
        nodes_--;
      }
    }
    if (l1->used == 0) {
      l2->child[i2] = nullptr;
      l2->used--;
      res->pool_.emplace_back(l1);
      nodes_--;
    }
    if (l2->used == 0) {
      root_->child[idx(gb, 3)] = nullptr;
      root_->used--;
      res->pool_.emplace_back(l2);
      nodes_--;
    }
  }
}

Result<bool> GpuPageTable::unmap(PtReservation* res, uint64_t start, uint64_t end) {
  if (start >= end || end > kVaLimit || start % kSZ4K || end % kSZ4K) return Err{-EINVAL};
  WriteLock g(&lock_);
  if (count_needed_locked(start, end, 0) > res->pool_.size()) {
    stats_.commit_eagain.add();
    return Err{-EAGAIN};
  }
  bool unmapped = false;
  for (uint64_t slot = align_down(start, kSZ2M); slot < end; slot += kSZ2M) {
    PtNode* l1 = l1_for_locked(slot);
    if (!l1) {
      slot = skip_hole(root_.get(), slot) - kSZ2M;
      continue;
    }
    const unsigned i1 = idx(slot, 1);
    const bool full = slot >= start && slot + kSZ2M <= end;
    if (!l1->child[i1]) {
      if (!(l1->pte[i1] & kPresent)) continue;
      if (full) {
        l1->pte[i1] = 0;
        l1->used--;
        unmapped = true;
        continue;
      }
      split_l1_leaf_locked(l1, i1, res);
    }
    PtNode* l0 = l1->child[i1];
    const unsigned first = idx(std::max(start, slot), 0);
    const unsigned last = idx(std::min(end, slot + kSZ2M) - kSZ4K, 0);
    for (unsigned k = first; k <= last; k++) {
      if (!(l0->pte[k] & kPresent)) continue;
      if (split_ps64_group(l0, k, first, last)) stats_.leaf_splits.add();
      l0->pte[k] = 0;
      l0->used--;
      unmapped = true;
    }
  }
  prune_locked(start, end, res);
  stats_.unmaps.add();
  return unmapped;
}

std::pair<uint64_t, uint64_t> GpuPageTable::zap(uint64_t start, uint64_t end) {
  uint64_t lo = ~0ull;
  uint64_t hi = 0;
  auto extend = [&](uint64_t a, uint64_t b) {
    lo = std::min(lo, a);
    hi = std::max(hi, b);
  };
  end = std::min(end, kVaLimit);
  if (start >= end) return {0, 0};
  WriteLock g(&lock_);
  for (uint64_t slot = align_down(start, kSZ2M); slot < end; slot += kSZ2M) {
    PtNode* l1 = l1_for_locked(slot);
    if (!l1) {
      slot = skip_hole(root_.get(), slot) - kSZ2M;
      continue;
    }
    const unsigned i1 = idx(slot, 1);
    if (l1->pte[i1] & kPresent) {
      l1->pte[i1] = 0;
      l1->used--;
      extend(slot, slot + kSZ2M);
      continue;
    }
    PtNode* l0 = l1->child[i1];
    if (!l0) continue;
    const unsigned first = idx(std::max(align_down(start, kSZ4K), slot), 0);
    const unsigned last = idx(std::min(end + kSZ4K - 1, slot + kSZ2M) - kSZ4K, 0);
    for (unsigned k = first; k <= last; k++) {
      if (!(l0->pte[k] & kPresent)) continue;
      unsigned a = k;
      unsigned b = k;
      if (l0->pte[k] & kPs64) {  // a 64 KiB leaf goes whole
        a = k & ~15u;
        b = a + 15;
      }
      for (unsigned j = a; j <= b; j++) {
        if (l0->pte[j] & kPresent) l0->used--;
        l0->pte[j] = 0;
      }
      extend(slot + uint64_t{a} * kSZ4K, slot + uint64_t{b + 1} * kSZ4K);
    }
  }
  stats_.zaps.add();
  if (hi == 0) return {0, 0};
  return {lo, hi};
}

std::optional<GpuLeaf> GpuPageTable::lookup_locked(uint64_t va) const {
  lock_.assert_held();
  if (va >= kVaLimit) return std::nullopt;
  const PtNode* l1 = l1_for_locked(va);
  if (!l1) return std::nullopt;
  const unsigned i1 = idx(va, 1);
  if (l1->pte[i1] & kPresent) return decode(l1->pte[i1], align_down(va, kSZ2M), kSZ2M);
  const PtNode* l0 = l1->child[i1];
  if (!l0) return std::nullopt;
  const uint64_t pte = l0->pte[idx(va, 0)];
  if (!(pte & kPresent)) return std::nullopt;
  if (!(pte & kPs64)) return decode(pte, align_down(va, kSZ4K), kSZ4K);
  const uint64_t base = align_down(va, kSZ64K);
  GpuLeaf l = decode(pte, base, kSZ64K);
  l.addr -= align_down(va, kSZ4K) - base;
  return l;
}

std::optional<GpuLeaf> GpuPageTable::lookup(uint64_t va) const {
  ReadLock g(&lock_);
  return lookup_locked(va);
}

void GpuPageTable::walk(uint64_t start, uint64_t end, const std::function<void(const GpuLeaf&)>& fn) const {
  ReadLock g(&lock_);
  for (uint64_t slot = align_down(start, kSZ2M); slot < end && slot < kVaLimit; slot += kSZ2M) {
    const PtNode* l1 = l1_for_locked(slot);
    if (!l1) {
      slot = align_down(slot, 1ull << 30) + (1ull << 30) - kSZ2M;  // the next GiB
      continue;
    }
    const unsigned i1 = idx(slot, 1);
    if (l1->pte[i1] & kPresent) {
      fn(decode(l1->pte[i1], slot, kSZ2M));
      continue;
    }
    if (!l1->child[i1]) continue;
    const uint64_t lo = std::max(align_down(start, kSZ4K), slot);
    const uint64_t hi = std::min(end, slot + kSZ2M);
    uint64_t last_group = ~0ull;
    for (uint64_t va = lo; va < hi; va += kSZ4K) {
      std::optional<GpuLeaf> l = lookup_locked(va);
      if (!l) continue;
      if (l->size == kSZ64K) {
        if (l->va == last_group) continue;
        last_group = l->va;
      }
      fn(*l);
    }
  }
}

uint64_t GpuPageTable::nodes() const {
  ReadLock g(&lock_);
  return nodes_;
}

}  // namespace gpusvm::refgpu
