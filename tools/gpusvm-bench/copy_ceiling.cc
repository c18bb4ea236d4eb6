// The raw copy ceiling of a refgpu backend (copy_ceiling.h).
#include "tools/gpusvm-bench/copy_ceiling.h"

#include <algorithm>
#include <cstring>

#include "tools/gpusvm-bench/bench.h"

namespace gpusvm::bench {

namespace {

void fill(std::byte* p, uint64_t len, uint64_t salt) {
  for (uint64_t off = 0; off < len; off += 8) {
    const uint64_t v = ((off + 8) * 0x9e3779b97f4a7c15ULL) ^ (salt * 0xc2b2ae3d27d4eb4fULL);
    std::memcpy(p + off, &v, 8);
  }
}

}  // namespace

CopyCeiling::CopyCeiling(mm::PhysMem& mem, refgpu::Backend& backend, uint64_t bytes)
    : mem_(mem), bytes_(mm::pmd_align_up(bytes)) {
  for (uint64_t off = 0; off < bytes_; off += mm::kPmdSize) {
    mm::Folio* f = mem_.folio_alloc(mm::kPmdOrder, false);
    if (!f) fail("copy ceiling: no 2 MiB folio ({} of {} allocated)", human_bytes(off), human_bytes(bytes_));
    folios_.push_back(f);
  }
  std::vector<mm::Folio*> by_pfn = folios_;
  std::sort(by_pfn.begin(), by_pfn.end(), [](mm::Folio* a, mm::Folio* b) { return a->pfn() < b->pfn(); });
  uint64_t vram_off = 0;
  for (mm::Folio* f : by_pfn) {
    std::byte* p = mem_.ram_data(f->pfn());
    if (!sys_runs_.empty() && sys_runs_.back().sys + sys_runs_.back().bytes == p) {
      sys_runs_.back().bytes += mm::kPmdSize;
    } else {
      sys_runs_.push_back({p, vram_off, mm::kPmdSize});
    }
    vram_off += mm::kPmdSize;
  }
  auto v = refgpu::VramArena::create(backend, bytes_);
  if (!v) require_ok(v.error(), "copy ceiling: VramArena::create");
  vram_ = std::move(*v);
  auto c = backend.make_copy(&mem_, 0, 0);
  if (!c) require_ok(c.error(), "copy ceiling: Backend::make_copy");
  copy_ = std::move(*c);
}

CopyCeiling::~CopyCeiling() {
  copy_.reset();
  for (mm::Folio* f : folios_) f->put();
}

uint64_t CopyCeiling::copy(bool to_vram, uint64_t salt) {
  std::vector<refgpu::CopyRegion> regions;
  for (const Run& r : sys_runs_) {
    std::byte* v = vram_->data(r.vram_off);
    fill(to_vram ? r.sys : v, r.bytes, salt);
    regions.push_back(to_vram ? refgpu::CopyRegion{v, r.sys, r.bytes} : refgpu::CopyRegion{r.sys, v, r.bytes});
  }
  const uint64_t t0 = now_ns();
  require_ok(copy_->copy(regions), "copy ceiling: CopyBackend::copy");
  const uint64_t t = now_ns() - t0;
  for (const refgpu::CopyRegion& r : regions) {
    if (std::memcmp(r.dst, r.src, r.bytes) != 0)
      fail("copy ceiling: {} bytes differ after the {} copy", human_bytes(r.bytes), to_vram ? "system -> VRAM" : "VRAM -> system");
  }
  return t;
}

uint64_t CopyCeiling::to_vram_ns(uint64_t salt) { return copy(true, salt); }
uint64_t CopyCeiling::to_sys_ns(uint64_t salt) { return copy(false, salt); }

}  // namespace gpusvm::bench
