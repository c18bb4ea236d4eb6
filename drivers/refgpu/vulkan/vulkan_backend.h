// The reference GPU's Vulkan backend (DESIGN.md §5b, backend.h): a library of its own
// (gpusvm::refgpu_vulkan), built when CMake finds the Vulkan headers (GPUSVM_VULKAN).
//
// Architecture:
//  - One VulkanContext per device selector string, shared by every refgpu device that opens
//    that selector (a process-wide registry of weak references): VkInstance, the selected
//    VkPhysicalDevice, a VkDevice with one transfer-capable queue (a dedicated transfer family
//    when the device has one, else the first family that can copy) and the memory types.
//  - VRAM: a VkBuffer on DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT memory, mapped for the
//    life of the region; the mapping is the VramArena the engines and the driver's CPU paths
//    use. A device without such memory gives -EOPNOTSUPP (staging is not built yet).
//  - System memory: the PhysMem arena imported with VK_EXT_external_memory_host, in chunks
//    of at most 1 GiB (each a VkBuffer), once per copy backend. The arena's base and size
//    must be multiples of minImportedHostPointerAlignment (-EOPNOTSUPP otherwise).
//  - Copies: a copy request's regions are translated to (buffer, offset) pairs and recorded
//    as vkCmdCopyBuffer calls, one per (source buffer, destination buffer) pair with every
//    region of the request, into one of a few command buffers (each with its own pool, so
//    concurrent requests record and run in parallel); the submit signals a timeline
//    semaphore, and the request waits for that value (bounded by hang_timeout()).
//  - Errors: no loader/driver/device or no device matching the selector -> -ENODEV; missing
//    extension or feature -> -EOPNOTSUPP; out of host or device memory -> -ENOMEM; a lost
//    device -> -EIO from then on (every later copy fails, nothing falls back).
#pragma once

#include <memory>
#include <string>

#include "drivers/refgpu/backend.h"
#include "gpusvm/base/result.h"

namespace gpusvm::refgpu {

// The Vulkan backend on the device `selector` names: an index ("1"), a substring of the
// device name ("llvmpipe"), or empty: GPUSVM_VULKAN_DEVICE, else the first discrete GPU,
// else the first CPU device, else the first device (that has what the backend needs).
// Shared with every earlier caller of the same selector whose backend is still alive.
Result<std::shared_ptr<Backend>> open_vulkan_backend(const std::string& selector);

}  // namespace gpusvm::refgpu
