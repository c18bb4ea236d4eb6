#include "drivers/refgpu/copy_engine.h"

#include <cerrno>
#include <chrono>
#include <cstring>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::refgpu {

GPUSVM_FAULT_POINT(g_fail_copy, "refgpu.copy");

namespace {
constexpr uint64_t kChunk = 256 * 1024;  // what one worker takes at a time
}

// One request shared with the workers: chunks [0, nchunks) claimed through `next`.
struct HostCopyBackend::Work {
  std::span<const CopyRegion> regions;
  std::vector<std::pair<size_t, uint64_t>> chunks;  // (region, offset)
  std::atomic<size_t> next{0};
};

HostCopyBackend::HostCopyBackend(unsigned threads, uint64_t threshold_bytes) : threshold_(threshold_bytes) {
  for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { worker(); });
}

HostCopyBackend::~HostCopyBackend() {
  {
    std::lock_guard<std::mutex> g(m_);
    stop_ = true;
  }
  cv_.notify_all();
  for (std::thread& t : threads_) t.join();
}

void HostCopyBackend::run_chunks(Work* w) {
  for (;;) {
    const size_t i = w->next.fetch_add(1, std::memory_order_relaxed);  // relaxed: a ticket
    if (i >= w->chunks.size()) return;
    const auto [r, off] = w->chunks[i];
    const CopyRegion& reg = w->regions[r];
    std::memcpy(reg.dst + off, reg.src + off, std::min(kChunk, reg.bytes - off));
  }
}

void HostCopyBackend::worker() {
  uint64_t seen = 0;
  for (;;) {
    Work* w;
    {
      std::unique_lock<std::mutex> g(m_);
      cv_.wait(g, [&] { return stop_ || (work_ && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      w = work_;
      active_++;
    }
    run_chunks(w);
    {
      // Under m_: the caller's wait for active_ == 0 then also sees this worker's bytes.
      std::lock_guard<std::mutex> g(m_);
      active_--;
    }
    cv_.notify_all();
  }
}

int HostCopyBackend::fill_zero(std::span<const FillRegion> regions) {
  for (const FillRegion& r : regions) std::memset(r.dst, 0, r.bytes);
  return 0;
}

int HostCopyBackend::copy(std::span<const CopyRegion> regions) {
  uint64_t total = 0;
  for (const CopyRegion& r : regions) total += r.bytes;
  if (threads_.empty() || total < threshold_) {
    for (const CopyRegion& r : regions) std::memcpy(r.dst, r.src, r.bytes);
    return 0;
  }
  MutexLock serial(&lock_);
  Work w;
  w.regions = regions;
  for (size_t i = 0; i < regions.size(); i++)
    for (uint64_t off = 0; off < regions[i].bytes; off += kChunk) w.chunks.emplace_back(i, off);
  {
    std::lock_guard<std::mutex> g(m_);
    work_ = &w;
    generation_++;
  }
  cv_.notify_all();
  run_chunks(&w);
  // No chunk is left to claim. Unpublish the request (a worker waking from now on does not
  // take it), then wait for the workers that took it: they finish the chunks they claimed.
  std::unique_lock<std::mutex> g(m_);
  work_ = nullptr;
  if (!cv_.wait_for(g, hang_timeout(), [&] { return active_ == 0; }))
    panic("refgpu host copy: workers did not finish a request");
  return 0;
}

CopyEngine::CopyEngine(mm::PhysMem* mem, VramArena* vram, std::unique_ptr<CopyBackend> backend)
    : mem_(mem), vram_(vram), backend_(std::move(backend)) {}

bool CopyEngine::valid_pfn(mm::Pfn pfn) const { return mem_ && pfn < mem_->ram_pages(); }

bool CopyEngine::valid_offset(uint64_t off) const {
  return vram_ && off % mm::kPageSize == 0 && vram_->contains(off, mm::kPageSize);
}

int CopyEngine::run(std::span<const CopyRegion> regions, StatCounter* bytes, StatCounter* ns) {
  stats_.requests.add();
  if (g_fail_copy.should_fail()) {
    stats_.failures.add();
    return -EIO;
  }
  const auto t0 = std::chrono::steady_clock::now();
  const int r = backend_->copy(regions);
  if (r) {
    stats_.failures.add();
    return r;
  }
  ns->add(static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()));
  for (const CopyRegion& reg : regions) bytes->add(reg.bytes);
  return 0;
}

namespace {
// Merges page copies whose source and destination both continue the previous one.
void push_page(std::vector<CopyRegion>* out, std::byte* dst, const std::byte* src) {
  if (!out->empty()) {
    CopyRegion& b = out->back();
    if (b.dst + b.bytes == dst && b.src + b.bytes == src) {
      b.bytes += mm::kPageSize;
      return;
    }
  }
  out->push_back({dst, src, mm::kPageSize});
}
}  // namespace

int CopyEngine::copy_to_vram(const mm::Pfn* src_pfns, const uint64_t* dst_offsets, uint64_t npages) {
  for (uint64_t i = 0; i < npages; i++)
    if (!valid_pfn(src_pfns[i]) || !valid_offset(dst_offsets[i])) return -EINVAL;
  std::vector<CopyRegion> regions;
  for (uint64_t i = 0; i < npages; i++) push_page(&regions, vram_->data(dst_offsets[i]), mem_->ram_data(src_pfns[i]));
  return run(regions, &stats_.bytes_to_vram, &stats_.ns_to_vram);
}

int CopyEngine::copy_to_ram(const uint64_t* src_offsets, const mm::Pfn* dst_pfns, uint64_t npages) {
  for (uint64_t i = 0; i < npages; i++)
    if (!valid_pfn(dst_pfns[i]) || !valid_offset(src_offsets[i])) return -EINVAL;
  std::vector<CopyRegion> regions;
  for (uint64_t i = 0; i < npages; i++) push_page(&regions, mem_->ram_data(dst_pfns[i]), vram_->data(src_offsets[i]));
  return run(regions, &stats_.bytes_to_ram, &stats_.ns_to_ram);
}

int CopyEngine::clear_vram(const uint64_t* offsets, uint64_t npages) {
  for (uint64_t i = 0; i < npages; i++)
    if (!valid_offset(offsets[i])) return -EINVAL;
  std::vector<FillRegion> regions;
  for (uint64_t i = 0; i < npages; i++) {
    std::byte* p = vram_->data(offsets[i]);
    if (!regions.empty() && regions.back().dst + regions.back().bytes == p) {
      regions.back().bytes += mm::kPageSize;
    } else {
      regions.push_back({p, mm::kPageSize});
    }
  }
  return regions.empty() ? 0 : backend_->fill_zero(regions);
}

}  // namespace gpusvm::refgpu
