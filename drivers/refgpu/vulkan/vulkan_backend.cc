// The Vulkan backend: VRAM allocation and the process-wide table of contexts (vulkan_backend.h).
#include "drivers/refgpu/vulkan/vulkan_backend.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vulkan/vulkan_internal.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/log.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::refgpu {

namespace {

using vk::Context;

constexpr uint64_t kSZ2MiB = 2ull << 20;
constexpr uintptr_t kMapAlign = 4096;  // what VramMemory::data() promises

// One VRAM region: a buffer on host-visible device memory, mapped for its whole life.
class VulkanVramMemory final : public VramMemory {
 public:
  VulkanVramMemory(std::shared_ptr<Context> ctx, VkBuffer buf, VkDeviceMemory mem, std::byte* p, uint64_t size)
      : ctx_(std::move(ctx)), buf_(buf), mem_(mem), p_(p), size_(size) {
    ctx_->add_vram({p_, size_, buf_});
  }
  ~VulkanVramMemory() override {
    ctx_->remove_vram(p_);
    vkUnmapMemory(ctx_->device(), mem_);
    vkDestroyBuffer(ctx_->device(), buf_, nullptr);
    vkFreeMemory(ctx_->device(), mem_, nullptr);
  }
  std::byte* data() const override { return p_; }
  uint64_t size() const override { return size_; }

 private:
  const std::shared_ptr<Context> ctx_;
  const VkBuffer buf_;
  const VkDeviceMemory mem_;
  std::byte* const p_;
  const uint64_t size_;
};

class VulkanBackend final : public Backend {
 public:
  explicit VulkanBackend(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) {}
  BackendKind kind() const override { return BackendKind::kVulkan; }
  std::string description() const override { return ctx_->description(); }
  bool lost() const { return ctx_->lost(); }

  Result<std::unique_ptr<VramMemory>> alloc_vram(uint64_t size) override {
    if (size == 0 || size % kSZ2MiB != 0) return Err{-EINVAL};
    if (ctx_->lost()) return Err{-EIO};
    if (ctx_->vram_type() < 0) {
      log::get().error("refgpu vulkan: {} has no host-visible device-local memory (staging not built)",
                       ctx_->description());
      return Err{-EOPNOTSUPP};
    }
    const VkDevice dev = ctx_->device();
    const VkBufferCreateInfo bci{.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                 .size = size,
                                 .usage = VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                                 .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkBuffer buf = VK_NULL_HANDLE;
    VkResult r = vkCreateBuffer(dev, &bci, nullptr, &buf);
    if (r != VK_SUCCESS) return Err{to_alloc_errno(r)};
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(dev, buf, &req);
    if (!(req.memoryTypeBits & (1u << ctx_->vram_type()))) {
      vkDestroyBuffer(dev, buf, nullptr);
      return Err{-EOPNOTSUPP};
    }
    const VkMemoryAllocateInfo mai{.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                   .allocationSize = req.size,
                                   .memoryTypeIndex = static_cast<uint32_t>(ctx_->vram_type())};
    VkDeviceMemory mem = VK_NULL_HANDLE;
    r = vkAllocateMemory(dev, &mai, nullptr, &mem);
    if (r != VK_SUCCESS) {
      vkDestroyBuffer(dev, buf, nullptr);
      log::get().warn("refgpu vulkan: VRAM allocation of {} bytes: {}", size, static_cast<int>(r));
      return Err{to_alloc_errno(r)};
    }
    void* p = nullptr;
    r = vkBindBufferMemory(dev, buf, mem, 0);
    if (r == VK_SUCCESS) r = vkMapMemory(dev, mem, 0, VK_WHOLE_SIZE, 0, &p);
    if (r != VK_SUCCESS || reinterpret_cast<uintptr_t>(p) % kMapAlign != 0) {
      if (p) vkUnmapMemory(dev, mem);
      vkDestroyBuffer(dev, buf, nullptr);
      vkFreeMemory(dev, mem, nullptr);
      if (r == VK_SUCCESS) {
        log::get().error("refgpu vulkan: VRAM mapping {} is not 4 KiB aligned", p);
        return Err{-EOPNOTSUPP};
      }
      return Err{to_alloc_errno(r)};
    }
    // Device memory need not read as zero; fresh VRAM does here (as on the host backend).
    std::memset(p, 0, size);
    return std::unique_ptr<VramMemory>(new VulkanVramMemory(ctx_, buf, mem, static_cast<std::byte*>(p), size));
  }

  Result<std::unique_ptr<CopyBackend>> make_copy(mm::PhysMem* mem, unsigned threads,
                                                 uint64_t threshold_bytes) override {
    (void)threads;  // the device's queue does the work
    (void)threshold_bytes;
    if (!mem) return Err{-EINVAL};
    return vk::make_copy_backend(ctx_, mem->ram_data(0), mem->ram_pages() * mm::kPageSize);
  }

 private:
  int to_alloc_errno(VkResult r) {
    if (r == VK_ERROR_DEVICE_LOST) ctx_->mark_lost();
    return vk::to_errno(r);
  }
  const std::shared_ptr<Context> ctx_;
};

// Contexts by selector string: every device opened with the same selector shares one
// VkDevice (so VRAM-to-VRAM copies between them are copies within that device). A lost
// context is not handed out again: the next open creates a fresh VkDevice (as a driver
// recreates its device after a reset); the devices on the lost one keep failing with -EIO.
struct Registry {
  Mutex lock{&kVulkanRegistryLockClass};  // held while a context is created (a leaf)
  std::map<std::string, std::weak_ptr<VulkanBackend>> backends GPUSVM_GUARDED_BY(lock);
};

Registry& registry() {
  static Registry* r = new Registry();  // never destroyed: devices may outlive static destructors
  return *r;
}

}  // namespace

Result<std::shared_ptr<Backend>> open_vulkan_backend(const std::string& selector) {
  std::string sel = selector;
  if (sel.empty())
    if (const char* env = std::getenv("GPUSVM_VULKAN_DEVICE")) sel = env;
  Registry& reg = registry();
  MutexLock g(&reg.lock);
  if (auto b = reg.backends[sel].lock(); b && !b->lost()) return std::shared_ptr<Backend>(b);
  auto ctx = Context::create(sel);
  if (!ctx) return Err{ctx.error()};
  auto b = std::make_shared<VulkanBackend>(std::move(*ctx));
  reg.backends[sel] = b;
  return std::shared_ptr<Backend>(b);
}

}  // namespace gpusvm::refgpu
