// The runtime's malloc heap (runtime_internal.h): first fit over 2 MiB arenas with coalescing,
// large blocks as mappings of their own (glibc's mmap threshold, fixed).
#include <sys/mman.h>

#include <cerrno>

#include "gpusvm/base/fault_inject.h"
#include "runtime/runtime_internal.h"

namespace gpusvm::rt {

namespace {

GPUSVM_FAULT_POINT(fp_arena_mmap, "runtime.heap_arena");

constexpr int kProt = PROT_READ | PROT_WRITE;
constexpr int kFlags = MAP_PRIVATE | MAP_ANONYMOUS;

uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }
bool pow2(uint64_t v) { return v && !(v & (v - 1)); }

}  // namespace

Heap::~Heap() {
  MutexLock l(&lock_);
  for (auto& [addr, lg] : large_) (void)mm_.munmap(lg.map_start, lg.map_len);
  for (mm::Va a : arenas_) (void)mm_.munmap(a, kArenaBytes);
}

Result<mm::Va> Heap::alloc_large(uint64_t size, uint64_t align) {
  lock_.assert_held();
  const uint64_t len = mm::page_align_up(size);
  if (len < size) return Err{-EINVAL};
  // Over-map by the alignment beyond a page, then trim both ends.
  const uint64_t extra = align > mm::kPageSize ? align : 0;
  if (len + extra < len) return Err{-EINVAL};
  Result<mm::Va> m = mm_.mmap(0, len + extra, kProt, kFlags);
  if (!m) return Err{m.error()};
  mm::Va start = *m;
  mm::Va user = align_up(start, align > mm::kPageSize ? align : mm::kPageSize);
  if (extra) {
    if (user > start) (void)mm_.munmap(start, user - start);
    const mm::Va end = start + len + extra;
    if (end > user + len) (void)mm_.munmap(user + len, end - (user + len));
  }
  large_[user] = Large{user, len, size};
  live_ += size;
  return user;
}

std::pair<mm::Va, uint64_t> Heap::insert_free(mm::Va s, uint64_t len) {
  lock_.assert_held();
  auto next = free_.lower_bound(s);
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == s) {
      s = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  if (next != free_.end() && s + len == next->first) {
    len += next->second;
    free_.erase(next);
  }
  free_[s] = len;
  return {s, len};
}

Result<mm::Va> Heap::carve(uint64_t size, uint64_t align) {
  lock_.assert_held();
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const mm::Va s = it->first;
    const uint64_t len = it->second;
    const mm::Va a = align_up(s, align);
    if (a + size > s + len || a < s) continue;
    free_.erase(it);
    if (a > s) free_[s] = a - s;
    if (a + size < s + len) free_[a + size] = s + len - (a + size);
    used_[a] = size;
    live_ += size;
    return a;
  }
  return Err{-ENOMEM};
}

Result<mm::Va> Heap::alloc(uint64_t size, uint64_t align) {
  if (size == 0 || !pow2(align)) return Err{-EINVAL};
  if (align < kMinAlign) align = kMinAlign;
  if (size > (1ull << 46)) return Err{-ENOMEM};
  MutexLock l(&lock_);
  if (size >= GPUSVM_RT_MMAP_THRESHOLD || align > kArenaBytes / 4) return alloc_large(size, align);
  const uint64_t rounded = align_up(size, kMinAlign);
  if (Result<mm::Va> a = carve(rounded, align)) return a;
  // No room: a new arena.
  if (fp_arena_mmap.should_fail()) return Err{-ENOMEM};
  Result<mm::Va> arena = mm_.mmap(0, kArenaBytes, kProt, kFlags);
  if (!arena) return Err{arena.error()};
  if (int rc = pages_fn_(*arena, kArenaBytes)) {
    (void)mm_.munmap(*arena, kArenaBytes);
    return Err{rc};
  }
  arenas_.push_back(*arena);
  insert_free(*arena, kArenaBytes);
  return carve(rounded, align);
}

int Heap::free(mm::Va p) {
  MutexLock l(&lock_);
  if (auto lg = large_.find(p); lg != large_.end()) {
    const Large b = lg->second;
    const int rc = mm_.munmap(b.map_start, b.map_len);
    if (rc) return rc;
    live_ -= b.size;
    large_.erase(lg);
    // The mirror's MADVISE_AUTORESET resets advice only where the GPU had ranges, and only
    // when the driver's garbage collector runs (as xe's): reset the whole block now, so the
    // next mapping there starts with the defaults whatever the GPU did.
    return pages_fn_(b.map_start, b.map_len);
  }
  auto it = used_.find(p);
  if (it == used_.end()) return -EINVAL;
  const uint64_t len = it->second;
  used_.erase(it);
  live_ -= len;
  auto [s, merged] = insert_free(p, len);
  // The pages wholly inside the free span hold no live block: reset their advice, which a
  // free that does not unmap would otherwise leave to the next owner of the pages.
  const mm::Va ps = mm::page_align_up(s);
  const mm::Va pe = mm::page_align_down(s + merged);
  if (pe > ps) return pages_fn_(ps, pe - ps);
  return 0;
}

Result<uint64_t> Heap::usable_size(mm::Va p) {
  MutexLock l(&lock_);
  if (auto lg = large_.find(p); lg != large_.end()) return lg->second.map_len;
  auto it = used_.find(p);
  if (it == used_.end()) return Err{-EINVAL};
  return it->second;
}

uint64_t Heap::live_bytes() {
  MutexLock l(&lock_);
  return live_;
}

}  // namespace gpusvm::rt
