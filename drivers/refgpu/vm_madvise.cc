// MemAttrTree: the attribute pieces of a VM's mirrored VA (see vm_madvise.h).
#include "drivers/refgpu/vm_madvise.h"

#include <algorithm>
#include <iterator>

namespace gpusvm::refgpu {

void MemAttrTree::insert(uint64_t start, uint64_t end, bool autoreset) {
  if (start >= end) return;
  pieces_[start] = Piece{end, MemAttrs{}, autoreset};
  generation_++;
  merge_around(start, end);
}

void MemAttrTree::split_at(uint64_t va) {
  auto it = pieces_.upper_bound(va);
  if (it == pieces_.begin()) return;
  --it;
  if (it->first == va || it->second.end <= va) return;
  Piece tail = it->second;
  it->second.end = va;
  pieces_.emplace(va, tail);
  generation_++;
}

void MemAttrTree::merge_around(uint64_t start, uint64_t end) {
  // Merge every piece in [start, end] (inclusive of the neighbours) with its successor when
  // they touch and are equal.
  auto it = pieces_.upper_bound(start);
  if (it != pieces_.begin()) --it;
  if (it != pieces_.begin()) --it;
  while (it != pieces_.end() && it->first <= end) {
    auto next = std::next(it);
    if (next == pieces_.end()) break;
    if (it->second.end == next->first && it->second.attrs == next->second.attrs &&
        it->second.autoreset == next->second.autoreset) {
      it->second.end = next->second.end;
      pieces_.erase(next);
      generation_++;
      continue;
    }
    it = next;
  }
}

void MemAttrTree::remove(uint64_t start, uint64_t end) {
  if (start >= end) return;
  split_at(start);
  split_at(end);
  auto it = pieces_.lower_bound(start);
  while (it != pieces_.end() && it->first < end) {
    it = pieces_.erase(it);
    generation_++;
  }
}

bool MemAttrTree::covers(uint64_t start, uint64_t end) const {
  uint64_t at = start;
  auto it = pieces_.upper_bound(start);
  if (it != pieces_.begin()) --it;
  for (; it != pieces_.end() && at < end; ++it) {
    if (it->second.end <= at) continue;
    if (it->first > at) return false;
    at = it->second.end;
  }
  return at >= end;
}

bool MemAttrTree::reset(uint64_t start, uint64_t end) {
  if (start >= end) return false;
  split_at(start);
  split_at(end);
  bool changed = false;
  for (auto it = pieces_.lower_bound(start); it != pieces_.end() && it->first < end; ++it) {
    if (it->second.autoreset && !(it->second.attrs == MemAttrs{})) {
      it->second.attrs = MemAttrs{};
      changed = true;
    }
  }
  merge_around(start, end);  // undoes the splits when nothing changed
  return changed;
}

MemAttrs MemAttrTree::at(uint64_t va) const {
  auto it = pieces_.upper_bound(va);
  if (it == pieces_.begin()) return {};
  --it;
  return it->second.end > va ? it->second.attrs : MemAttrs{};
}

std::pair<uint64_t, uint64_t> MemAttrTree::extent(uint64_t va) const {
  auto it = pieces_.upper_bound(va);
  if (it == pieces_.begin()) return {va, va};
  --it;
  if (it->second.end <= va) return {va, va};
  return {it->first, it->second.end};
}

std::vector<MemAttrRange> MemAttrTree::query(uint64_t start, uint64_t end) const {
  std::vector<MemAttrRange> out;
  auto it = pieces_.upper_bound(start);
  if (it != pieces_.begin()) --it;
  for (; it != pieces_.end() && it->first < end; ++it) {
    if (it->second.end <= start) continue;
    out.push_back({std::max(it->first, start), std::min(it->second.end, end), it->second.attrs});
  }
  return out;
}

size_t MemAttrTree::count(uint64_t start, uint64_t end) const { return query(start, end).size(); }

}  // namespace gpusvm::refgpu
