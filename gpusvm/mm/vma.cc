#include "gpusvm/mm/vma.h"

#include <iterator>

#include "gpusvm/base/lock.h"

namespace gpusvm::mm {

uint32_t prot_to_vm_flags(int prot) {
  uint32_t f = 0;
  if (prot & PROT_READ) f |= VM_READ;
  if (prot & PROT_WRITE) f |= VM_WRITE;
  if (prot & PROT_EXEC) f |= VM_EXEC;
  return f;
}

int vm_flags_to_prot(uint32_t flags) {
  int prot = 0;
  if (flags & VM_READ) prot |= PROT_READ;
  if (flags & VM_WRITE) prot |= PROT_WRITE;
  if (flags & VM_EXEC) prot |= PROT_EXEC;
  return prot;
}

Vma* VmaTree::lookup(Va va) const {
  Vma* v = find(va);
  return v && v->start <= va ? v : nullptr;
}

Vma* VmaTree::find(Va va) const {
  // The last VMA starting at or below va may contain it; otherwise the next one is the answer.
  auto it = map_.upper_bound(va);
  if (it != map_.begin()) {
    auto prev = std::prev(it);
    if (prev->second->end > va) return prev->second.get();
  }
  return it == map_.end() ? nullptr : it->second.get();
}

Vma* VmaTree::next(const Vma* vma) const {
  auto it = map_.upper_bound(vma->start);
  return it == map_.end() ? nullptr : it->second.get();
}

Vma* VmaTree::insert(std::unique_ptr<Vma> vma) {
  Vma* raw = vma.get();
  auto [it, inserted] = map_.emplace(raw->start, std::move(vma));
  if (!inserted) panic("VmaTree::insert: overlapping VMA");
  return raw;
}

std::unique_ptr<Vma> VmaTree::erase(Vma* vma) {
  auto it = map_.find(vma->start);
  if (it == map_.end() || it->second.get() != vma) panic("VmaTree::erase: VMA not in tree");
  std::unique_ptr<Vma> out = std::move(it->second);
  map_.erase(it);
  return out;
}

Vma* VmaTree::split(Vma* vma, Va addr) {
  if (addr <= vma->start || addr >= vma->end || !page_aligned(addr)) {
    panic("VmaTree::split: bad split address");
  }
  auto upper = std::make_unique<Vma>(*vma);
  upper->start = addr;
  upper->pgoff = vma->pgoff_of(addr);
  vma->end = addr;
  return insert(std::move(upper));
}

namespace {
bool mergeable(const Vma& a, const Vma& b) {
  // A driver's mapping (vm_file) is never merged: it may carry VM_SPECIAL pages, and its
  // identity alone cannot tell two mappings apart (Linux: VM_SPECIAL is never merged).
  return a.end == b.start && a.flags == b.flags && a.file == b.file && !a.vm_file &&
         !b.vm_file && !(a.flags & VM_SPECIAL) && (!a.file || a.pgoff_of(a.end) == b.pgoff);
}
}  // namespace

void VmaTree::try_merge(Vma* vma) {
  auto it = map_.find(vma->start);
  if (it == map_.end()) return;
  // Merge with the next VMA first, then let the previous one absorb this one.
  auto nx = std::next(it);
  if (nx != map_.end() && mergeable(*vma, *nx->second)) {
    vma->end = nx->second->end;
    map_.erase(nx);
  }
  if (it != map_.begin()) {
    auto pv = std::prev(it);
    if (mergeable(*pv->second, *vma)) {
      pv->second->end = vma->end;
      map_.erase(it);
    }
  }
}

Va VmaTree::find_gap_topdown(uint64_t len, Va low, Va high, uint64_t align) const {
  // Walk gaps from the top: between the last VMA below `high` and `high`, then downwards.
  Va gap_end = high;
  auto it = map_.lower_bound(high);
  while (true) {
    Va gap_start = low;
    if (it != map_.begin()) {
      auto pv = std::prev(it);
      gap_start = std::max(pv->second->end, low);
      if (pv->second->end > gap_end) {  // VMA straddles `high`
        gap_end = std::min(gap_end, pv->second->start);
        it = pv;
        continue;
      }
    }
    if (gap_end >= gap_start + len && gap_end - len >= gap_start) {
      Va cand = (gap_end - len) & ~(align - 1);
      if (cand >= gap_start) return cand;
    }
    if (it == map_.begin()) return 0;
    --it;
    gap_end = std::min(gap_end, it->second->start);
  }
}

}  // namespace gpusvm::mm
