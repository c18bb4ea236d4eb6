// Pieces the Vulkan backend's files share (vulkan_backend.h has the architecture).
#pragma once

#include <vulkan/vulkan.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "drivers/refgpu/backend.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/result.h"

namespace gpusvm::refgpu::vk {

// A VkResult as a negative errno (VK_SUCCESS: 0).
int to_errno(VkResult r);

// A buffer's place in the process: [base, base + size) is bound to `buffer` at offset 0.
struct Span {
  const std::byte* base = nullptr;
  uint64_t size = 0;
  VkBuffer buffer = VK_NULL_HANDLE;
};

// The device and its queue. Thread safety: the Vulkan objects are const after create();
// the queue is externally synchronised by queue_lock_. queue_lock_ and spans_lock_ are ranked
// leaves (lock_order.h: nothing is taken under them, no callback runs under them), held for a
// submit or a map lookup only; copies take them under folio locks.
class Context {
 public:
  static Result<std::shared_ptr<Context>> create(const std::string& selector);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  VkDevice device() const { return device_; }
  const VkPhysicalDeviceProperties& props() const { return props_; }
  const std::string& description() const { return description_; }
  uint64_t import_alignment() const { return import_alignment_; }
  // The memory type of VRAM (DEVICE_LOCAL | HOST_VISIBLE | HOST_COHERENT), -1 if none.
  int vram_type() const { return vram_type_; }
  // Lowest-index memory type in `bits` (-1: none).
  static int first_type(uint32_t bits);
  VkResult host_pointer_props(const void* p, VkMemoryHostPointerPropertiesEXT* out) const;

  // vkQueueSubmit of one command buffer that signals `sem` to the next value of *counter
  // (incremented under the queue lock, so values rise in submission order). Returns the
  // value, or a negative errno (a lost device is remembered: lost()).
  int64_t submit(VkCommandBuffer cb, VkSemaphore sem, uint64_t* counter);
  uint32_t queue_family() const { return family_; }
  void mark_lost() { lost_.store(true, std::memory_order_relaxed); }
  bool lost() const { return lost_.load(std::memory_order_relaxed); }

  // VRAM buffers of every device on this context (peer copies translate through them).
  void add_vram(const Span& s);
  void remove_vram(const std::byte* base);
  // The VRAM span holding [p, p + 1), or an empty span.
  Span find_vram(const std::byte* p);

 private:
  Context() = default;
  VkInstance instance_ = VK_NULL_HANDLE;
  VkPhysicalDevice phys_ = VK_NULL_HANDLE;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  uint32_t family_ = 0;
  VkPhysicalDeviceProperties props_{};
  VkPhysicalDeviceMemoryProperties mem_props_{};
  uint64_t import_alignment_ = 0;
  int vram_type_ = -1;
  std::string description_;
  PFN_vkGetMemoryHostPointerPropertiesEXT get_host_ptr_props_ = nullptr;
  std::atomic<bool> lost_{false};
  Mutex queue_lock_{&kVulkanQueueLockClass};
  Mutex spans_lock_{&kVulkanSpansLockClass};
  std::map<const std::byte*, Span> vram_ GPUSVM_GUARDED_BY(spans_lock_);
};

// The copy backend over one PhysMem (vulkan_copy.cc).
Result<std::unique_ptr<CopyBackend>> make_copy_backend(std::shared_ptr<Context> ctx, const std::byte* ram,
                                                       uint64_t ram_bytes);

}  // namespace gpusvm::refgpu::vk
