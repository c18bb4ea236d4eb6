// The reference GPU's backend: where its device memory lives and what moves bytes to and from
// it (DESIGN.md §5b). Two implementations:
//  - host (always available): VRAM is a block of host memory, copies are memcpy (optionally
//    spread over worker threads: HostCopyBackend);
//  - vulkan (built when the Vulkan headers are found, GPUSVM_VULKAN): VRAM is DEVICE_LOCAL +
//    HOST_VISIBLE VkDeviceMemory mapped into the process, system memory (the PhysMem arena)
//    is imported with VK_EXT_external_memory_host, copies are vkCmdCopyBuffer batches on a
//    transfer queue (drivers/refgpu/vulkan/).
// Either way VRAM has a CPU mapping: the engines (CPU threads) and the driver's CPU paths
// (clears, BO access) reach its bytes through VramMemory::data(), and the copy engine's
// CopyRegions are pointers into those mappings and into PhysMem frames.
//
// Selection: BackendConfig::kind; kAuto takes the environment variable GPUSVM_REFGPU_BACKEND
// (host | vulkan), else host. An explicit kind is never overridden, and a backend that cannot
// be opened is an error, never a silent fallback to another one.
//
// Thread safety: a Backend is shared by the devices that opened it (the Vulkan one by every
// device on the same physical device, so peer copies between them are copies within one
// VkDevice); alloc_vram() and make_copy() may be called from any thread and may sleep.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "gpusvm/base/result.h"

namespace gpusvm::mm {
class PhysMem;
}

namespace gpusvm::refgpu {

class CopyBackend;

enum class BackendKind : uint8_t { kAuto, kHost, kVulkan };

// "host" / "vulkan" (case-sensitive); -EINVAL otherwise ("" and "auto" are kAuto).
Result<BackendKind> parse_backend_kind(std::string_view s);
const char* backend_kind_name(BackendKind k);

struct BackendConfig {
  BackendKind kind = BackendKind::kAuto;
  // Vulkan only: the physical device, by index ("0") or by a substring of its name
  // ("llvmpipe"); empty: GPUSVM_VULKAN_DEVICE, else a discrete GPU, else the first device.
  std::string vulkan_device;
};

// One VRAM region's device memory with its CPU mapping. Freed by the destructor (the caller
// guarantees nothing copies into it any more).
class VramMemory {
 public:
  virtual ~VramMemory() = default;
  // The mapping: at least 4 KiB aligned, zero-filled at allocation, size() bytes.
  virtual std::byte* data() const = 0;
  virtual uint64_t size() const = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual BackendKind kind() const = 0;
  // The backend and, for Vulkan, the physical device ("vulkan:llvmpipe (LLVM 15.0.6, 256 bits)").
  virtual std::string description() const = 0;
  // `size`: a non-zero multiple of 2 MiB. -EINVAL, -ENOMEM (no device or host memory left),
  // -EOPNOTSUPP (the device has no host-visible device memory: staging is not built yet),
  // -EIO (device lost).
  virtual Result<std::unique_ptr<VramMemory>> alloc_vram(uint64_t size) = 0;
  // A copy backend for the copy engine of a device on `mem`: its regions point into `mem`'s
  // frames and into VRAM of this backend. -ENOMEM, -EOPNOTSUPP (system memory cannot be
  // imported), -EIO. `threads`, `threshold_bytes`: the host backend's worker threads and the
  // request size from which they help (HostCopyBackend; ignored by Vulkan, whose queue copies).
  virtual Result<std::unique_ptr<CopyBackend>> make_copy(mm::PhysMem* mem, unsigned threads,
                                                         uint64_t threshold_bytes) = 0;
};

// Opens the backend `cfg` names (kAuto resolved as above). -EINVAL (bad GPUSVM_REFGPU_BACKEND
// value), -ENODEV (no Vulkan driver or no such device, or Vulkan not built), -EOPNOTSUPP (the
// device lacks what the backend needs), -ENOMEM.
Result<std::shared_ptr<Backend>> open_backend(const BackendConfig& cfg);

// The host backend (a process-wide instance).
std::shared_ptr<Backend> host_backend();

}  // namespace gpusvm::refgpu
