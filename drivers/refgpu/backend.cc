// The host backend and backend selection (backend.h).
#include "drivers/refgpu/backend.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vram.h"
#include "gpusvm/base/log.h"
#ifdef GPUSVM_HAVE_VULKAN
#include "drivers/refgpu/vulkan/vulkan_backend.h"
#endif

namespace gpusvm::refgpu {

namespace {

// VRAM on the host backend: a 2 MiB aligned block of host memory.
class HostVramMemory final : public VramMemory {
 public:
  HostVramMemory(std::byte* p, uint64_t size) : p_(p), size_(size) {}
  ~HostVramMemory() override { std::free(p_); }
  std::byte* data() const override { return p_; }
  uint64_t size() const override { return size_; }

 private:
  std::byte* const p_;
  const uint64_t size_;
};

class HostBackend final : public Backend {
 public:
  BackendKind kind() const override { return BackendKind::kHost; }
  std::string description() const override { return "host"; }
  Result<std::unique_ptr<VramMemory>> alloc_vram(uint64_t size) override {
    if (size == 0 || size % kSZ2M != 0) return Err{-EINVAL};
    void* p = std::aligned_alloc(kSZ2M, size);
    if (!p) return Err{-ENOMEM};
    // Fresh device memory reads as zero (and the host pages are touched now, not in a timed copy).
    std::memset(p, 0, size);
    return std::unique_ptr<VramMemory>(new HostVramMemory(static_cast<std::byte*>(p), size));
  }
  Result<std::unique_ptr<CopyBackend>> make_copy(mm::PhysMem* mem, unsigned threads,
                                                 uint64_t threshold_bytes) override {
    (void)mem;  // memcpy reaches every host address
    return std::unique_ptr<CopyBackend>(new HostCopyBackend(threads, threshold_bytes));
  }
};

}  // namespace

Result<BackendKind> parse_backend_kind(std::string_view s) {
  if (s.empty() || s == "auto") return BackendKind::kAuto;
  if (s == "host") return BackendKind::kHost;
  if (s == "vulkan") return BackendKind::kVulkan;
  return Err{-EINVAL};
}

const char* backend_kind_name(BackendKind k) {
  switch (k) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kHost:
      return "host";
    case BackendKind::kVulkan:
      return "vulkan";
  }
  return "?";
}

std::shared_ptr<Backend> host_backend() {
  static const std::shared_ptr<Backend> b = std::make_shared<HostBackend>();
  return b;
}

Result<std::shared_ptr<Backend>> open_backend(const BackendConfig& cfg) {
  BackendKind kind = cfg.kind;
  if (kind == BackendKind::kAuto) {
    const char* env = std::getenv("GPUSVM_REFGPU_BACKEND");
    auto k = parse_backend_kind(env ? env : "");
    if (!k) {
      log::get().error("refgpu: GPUSVM_REFGPU_BACKEND={}: not host or vulkan", env);
      return Err{k.error()};
    }
    kind = *k == BackendKind::kAuto ? BackendKind::kHost : *k;
  }
  if (kind == BackendKind::kHost) return host_backend();
#ifdef GPUSVM_HAVE_VULKAN
  return open_vulkan_backend(cfg.vulkan_device);
#else
  log::get().error("refgpu: the vulkan backend was asked for, but this build has no Vulkan (GPUSVM_VULKAN=OFF)");
  return Err{-ENODEV};
#endif
}

}  // namespace gpusvm::refgpu
