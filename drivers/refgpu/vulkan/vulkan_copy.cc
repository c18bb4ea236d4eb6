// The Vulkan copy backend: system memory imported as buffers, copies as vkCmdCopyBuffer
// batches and clears as vkCmdFillBuffer on the context's queue, timeline-semaphore
// completion (vulkan_backend.h).
//
// Concurrency: kSlots command buffers, each with its own command pool (pools are externally
// synchronised; a slot belongs to one request at a time, claimed with an atomic flag), so up
// to kSlots requests record and run at once; a request beyond that waits for a slot
// (bounded). The timeline counter is only touched under the context's queue lock (submit()).
#include <algorithm>
#include <array>
#include <cerrno>
#include <map>
#include <vector>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/vulkan/vulkan_internal.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/waitqueue.h"

namespace gpusvm::refgpu::vk {

// "refgpu.vulkan.device_lost": the wait for a copy returns VK_ERROR_DEVICE_LOST (what a GPU
// reset or a driver crash gives), so the lost-device path runs on a device that never loses.
GPUSVM_FAULT_POINT(g_device_lost, "refgpu.vulkan.device_lost");

namespace {

constexpr size_t kSlots = 4;
constexpr uint64_t kImportChunk = 1ull << 30;

struct Slot {
  VkCommandPool pool = VK_NULL_HANDLE;
  VkCommandBuffer cb = VK_NULL_HANDLE;
  std::atomic<bool> busy{false};
};

struct Imported {
  Span span;
  VkDeviceMemory mem = VK_NULL_HANDLE;
};

// A region endpoint as (buffer, offset) and how many bytes the buffer holds from there.
struct Place {
  VkBuffer buffer = VK_NULL_HANDLE;
  uint64_t offset = 0;
  uint64_t avail = 0;
};

class VulkanCopyBackend final : public CopyBackend {
 public:
  explicit VulkanCopyBackend(std::shared_ptr<Context> ctx) : ctx_(std::move(ctx)) {}
  ~VulkanCopyBackend() override {
    const VkDevice dev = ctx_->device();
    if (sem_) {
      // Requests are over (the copy engine's owner is going); a timed-out one may still run.
      const VkSemaphoreWaitInfo wi{.sType = VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO,
                                   .semaphoreCount = 1,
                                   .pSemaphores = &sem_,
                                   .pValues = &submitted_};
      (void)vkWaitSemaphores(dev, &wi, std::chrono::nanoseconds(hang_timeout()).count());
      vkDestroySemaphore(dev, sem_, nullptr);
    }
    for (Slot& s : slots_)
      if (s.pool) vkDestroyCommandPool(dev, s.pool, nullptr);
    for (Imported& i : ram_) {
      vkDestroyBuffer(dev, i.span.buffer, nullptr);
      vkFreeMemory(dev, i.mem, nullptr);
    }
  }
  const char* name() const override { return "vulkan"; }

  int init(const std::byte* ram, uint64_t ram_bytes) {
    const VkDevice dev = ctx_->device();
    const VkSemaphoreTypeCreateInfo st{.sType = VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                       .semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE,
                                       .initialValue = 0};
    const VkSemaphoreCreateInfo sci{.sType = VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, .pNext = &st};
    VkResult r = vkCreateSemaphore(dev, &sci, nullptr, &sem_);
    if (r != VK_SUCCESS) {
      sem_ = VK_NULL_HANDLE;
      return vk::to_errno(r);
    }
    for (Slot& s : slots_) {
      const VkCommandPoolCreateInfo pci{.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                        .flags = VK_COMMAND_POOL_CREATE_TRANSIENT_BIT,
                                        .queueFamilyIndex = ctx_->queue_family()};
      r = vkCreateCommandPool(dev, &pci, nullptr, &s.pool);
      if (r != VK_SUCCESS) {
        s.pool = VK_NULL_HANDLE;
        return vk::to_errno(r);
      }
      const VkCommandBufferAllocateInfo cai{.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                            .commandPool = s.pool,
                                            .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                            .commandBufferCount = 1};
      r = vkAllocateCommandBuffers(dev, &cai, &s.cb);
      if (r != VK_SUCCESS) return vk::to_errno(r);
    }
    return import_ram(ram, ram_bytes);
  }

  int copy(std::span<const CopyRegion> regions) override {
    Work w;
    // Batches by (source buffer, destination buffer): one vkCmdCopyBuffer each.
    for (const CopyRegion& reg : regions) {
      for (uint64_t done = 0; done < reg.bytes;) {
        const Place s = place(reg.src + done), d = place(reg.dst + done);
        if (!s.buffer || !d.buffer) {
          log::get().error("refgpu vulkan: copy {} -> {}: not memory of this device", static_cast<const void*>(reg.src + done),
                           static_cast<void*>(reg.dst + done));
          return -EXDEV;
        }
        // A region may cross an import chunk's end: split it there.
        const uint64_t n = std::min({reg.bytes - done, s.avail, d.avail});
        w.copies[{s.buffer, d.buffer}].push_back({s.offset, d.offset, n});
        done += n;
      }
    }
    return execute(w, regions.size());
  }

  int fill_zero(std::span<const FillRegion> regions) override {
    Work w;
    for (const FillRegion& reg : regions) {
      if (reinterpret_cast<uintptr_t>(reg.dst) % 4 || reg.bytes % 4) return -EINVAL;  // vkCmdFillBuffer's rule
      for (uint64_t done = 0; done < reg.bytes;) {
        const Place d = place(reg.dst + done);
        if (!d.buffer) {
          log::get().error("refgpu vulkan: fill of {}: not memory of this device", static_cast<void*>(reg.dst + done));
          return -EXDEV;
        }
        const uint64_t n = std::min(reg.bytes - done, d.avail);
        w.fills.push_back({d.buffer, d.offset, n});
        done += n;
      }
    }
    return execute(w, regions.size());
  }

 private:
  // What one submission does: copies batched by (source, destination) buffer, and fills.
  struct Fill {
    VkBuffer buffer;
    uint64_t offset;
    uint64_t bytes;
  };
  struct Work {
    std::map<std::pair<VkBuffer, VkBuffer>, std::vector<VkBufferCopy>> copies;
    std::vector<Fill> fills;
    bool empty() const { return copies.empty() && fills.empty(); }
  };

  // Records `w` into a free slot's command buffer, submits it and waits (bounded) for its
  // timeline value. `regions`: the caller's count, for the diagnostic.
  int execute(const Work& w, size_t regions) {
    if (ctx_->lost()) return -EIO;
    if (w.empty()) return 0;
    Slot* slot = take_slot();
    if (!slot) {
      log::get().error("refgpu vulkan: no command buffer free after {} ms", hang_timeout().count());
      return -ETIMEDOUT;
    }
    int err = record(slot, w);
    int64_t value = err ? err : ctx_->submit(slot->cb, sem_, &submitted_);
    if (value >= 0) {
      const uint64_t v = static_cast<uint64_t>(value);
      const VkSemaphoreWaitInfo wi{.sType = VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO,
                                   .semaphoreCount = 1,
                                   .pSemaphores = &sem_,
                                   .pValues = &v};
      VkResult r = vkWaitSemaphores(ctx_->device(), &wi, std::chrono::nanoseconds(hang_timeout()).count());
      if (r == VK_SUCCESS && g_device_lost.should_fail()) r = VK_ERROR_DEVICE_LOST;
      if (r == VK_TIMEOUT) {
        // The command buffer may still run: the slot is never reused.
        log::get().error("refgpu vulkan: {} of {} regions did not complete in {} ms",
                         w.fills.empty() ? "copy" : "fill", regions, hang_timeout().count());
        return -ETIMEDOUT;
      }
      if (r != VK_SUCCESS) {
        if (r == VK_ERROR_DEVICE_LOST) ctx_->mark_lost();
        err = vk::to_errno(r);
      }
    } else {
      err = static_cast<int>(value);
    }
    slot->busy.store(false, std::memory_order_release);
    slot_wq_.wake_all();
    return err;
  }

  // PhysMem frames as buffers: host-pointer imports of at most kImportChunk bytes each.
  int import_ram(const std::byte* ram, uint64_t bytes) {
    const uint64_t align = ctx_->import_alignment();
    if (!align || reinterpret_cast<uintptr_t>(ram) % align || bytes % align) {
      log::get().error("refgpu vulkan: system memory {}+{:#x} is not aligned to the import alignment {} "
                       "(staging not built)",
                       static_cast<const void*>(ram), bytes, align);
      return -EOPNOTSUPP;
    }
    const VkDevice dev = ctx_->device();
    const uint64_t chunk = kImportChunk / align * align;
    for (uint64_t off = 0; off < bytes; off += chunk) {
      const uint64_t n = std::min(chunk, bytes - off);
      std::byte* p = const_cast<std::byte*>(ram + off);  // Vulkan's import takes a non-const pointer
      VkMemoryHostPointerPropertiesEXT hp{.sType = VK_STRUCTURE_TYPE_MEMORY_HOST_POINTER_PROPERTIES_EXT};
      VkResult r = ctx_->host_pointer_props(p, &hp);
      if (r != VK_SUCCESS) return vk::to_errno(r);
      const VkExternalMemoryBufferCreateInfo ext{.sType = VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_BUFFER_CREATE_INFO,
                                                 .handleTypes = VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT};
      const VkBufferCreateInfo bci{.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                   .pNext = &ext,
                                   .size = n,
                                   .usage = VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                                   .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
      Imported imp;
      r = vkCreateBuffer(dev, &bci, nullptr, &imp.span.buffer);
      if (r != VK_SUCCESS) {
        log::get().error("refgpu vulkan: import buffer of {:#x} bytes: {}", n, static_cast<int>(r));
        return vk::to_errno(r);
      }
      VkMemoryRequirements req;
      vkGetBufferMemoryRequirements(dev, imp.span.buffer, &req);
      const int type = Context::first_type(hp.memoryTypeBits & req.memoryTypeBits);
      if (type < 0) {
        vkDestroyBuffer(dev, imp.span.buffer, nullptr);
        return -EOPNOTSUPP;
      }
      const VkImportMemoryHostPointerInfoEXT imi{.sType = VK_STRUCTURE_TYPE_IMPORT_MEMORY_HOST_POINTER_INFO_EXT,
                                                 .handleType = VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT,
                                                 .pHostPointer = p};
      const VkMemoryAllocateInfo mai{.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                     .pNext = &imi,
                                     .allocationSize = n,
                                     .memoryTypeIndex = static_cast<uint32_t>(type)};
      r = vkAllocateMemory(dev, &mai, nullptr, &imp.mem);
      if (r == VK_SUCCESS) r = vkBindBufferMemory(dev, imp.span.buffer, imp.mem, 0);
      if (r != VK_SUCCESS) {
        log::get().error("refgpu vulkan: importing system memory {}+{:#x}: {}", static_cast<void*>(p), n,
                         static_cast<int>(r));
        vkDestroyBuffer(dev, imp.span.buffer, nullptr);
        if (imp.mem) vkFreeMemory(dev, imp.mem, nullptr);
        return vk::to_errno(r);
      }
      imp.span.base = p;
      imp.span.size = n;
      ram_.push_back(imp);
    }
    return 0;
  }

  // System memory of this backend's PhysMem, else VRAM of any device on the context.
  Place place(const std::byte* p) const {
    for (const Imported& i : ram_)
      if (p >= i.span.base && p < i.span.base + i.span.size)
        return {i.span.buffer, static_cast<uint64_t>(p - i.span.base), static_cast<uint64_t>(i.span.base + i.span.size - p)};
    const Span v = ctx_->find_vram(p);
    if (!v.buffer) return {};
    return {v.buffer, static_cast<uint64_t>(p - v.base), static_cast<uint64_t>(v.base + v.size - p)};
  }

  Slot* take_slot() {
    Slot* got = nullptr;
    auto try_take = [&] {
      for (Slot& s : slots_) {
        bool expected = false;
        if (s.busy.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
          got = &s;
          return true;
        }
      }
      return false;
    };
    if (try_take()) return got;
    return slot_wq_.wait_for(try_take, hang_timeout()) ? got : nullptr;
  }

  int record(Slot* s, const Work& w) {
    VkResult r = vkResetCommandPool(ctx_->device(), s->pool, 0);
    const VkCommandBufferBeginInfo bi{.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                      .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    if (r == VK_SUCCESS) r = vkBeginCommandBuffer(s->cb, &bi);
    if (r != VK_SUCCESS) return vk::to_errno(r);
    for (const auto& [bufs, regs] : w.copies)
      vkCmdCopyBuffer(s->cb, bufs.first, bufs.second, static_cast<uint32_t>(regs.size()), regs.data());
    for (const Fill& f : w.fills) vkCmdFillBuffer(s->cb, f.buffer, f.offset, f.bytes, 0);
    // The writes become visible to the host (the engines and the driver read VRAM and
    // system frames through their mappings once the semaphore is signalled).
    const VkMemoryBarrier mb{.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                             .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                             .dstAccessMask = VK_ACCESS_HOST_READ_BIT | VK_ACCESS_HOST_WRITE_BIT};
    vkCmdPipelineBarrier(s->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_HOST_BIT, 0, 1, &mb, 0, nullptr, 0,
                         nullptr);
    return vk::to_errno(vkEndCommandBuffer(s->cb));
  }

  const std::shared_ptr<Context> ctx_;
  VkSemaphore sem_ = VK_NULL_HANDLE;
  uint64_t submitted_ = 0;  // last value submitted: under the context's queue lock
  std::array<Slot, kSlots> slots_;
  WaitQueue slot_wq_;
  std::vector<Imported> ram_;  // const after init()
};

}  // namespace

Result<std::unique_ptr<CopyBackend>> make_copy_backend(std::shared_ptr<Context> ctx, const std::byte* ram,
                                                       uint64_t ram_bytes) {
  auto b = std::make_unique<VulkanCopyBackend>(std::move(ctx));
  if (const int r = b->init(ram, ram_bytes)) return Err{r};
  return std::unique_ptr<CopyBackend>(std::move(b));
}

}  // namespace gpusvm::refgpu::vk
