// The Vulkan context: instance, physical-device selection, the device and its queue, memory
// types (vulkan_internal.h, vulkan_backend.h).
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "drivers/refgpu/vulkan/vulkan_internal.h"
#include "gpusvm/base/log.h"

namespace gpusvm::refgpu::vk {

int to_errno(VkResult r) {
  switch (r) {
    case VK_SUCCESS:
      return 0;
    case VK_ERROR_OUT_OF_HOST_MEMORY:
    case VK_ERROR_OUT_OF_DEVICE_MEMORY:
    case VK_ERROR_TOO_MANY_OBJECTS:
      return -ENOMEM;
    case VK_ERROR_INITIALIZATION_FAILED:
    case VK_ERROR_INCOMPATIBLE_DRIVER:
      return -ENODEV;
    case VK_ERROR_EXTENSION_NOT_PRESENT:
    case VK_ERROR_FEATURE_NOT_PRESENT:
    case VK_ERROR_INVALID_EXTERNAL_HANDLE:
      return -EOPNOTSUPP;
    case VK_TIMEOUT:
      return -ETIMEDOUT;
    case VK_ERROR_DEVICE_LOST:
    default:
      return -EIO;
  }
}

namespace {

bool has_extension(VkPhysicalDevice pd, const char* name) {
  uint32_t n = 0;
  vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, nullptr);
  std::vector<VkExtensionProperties> exts(n);
  vkEnumerateDeviceExtensionProperties(pd, nullptr, &n, exts.data());
  for (const VkExtensionProperties& e : exts)
    if (std::strcmp(e.extensionName, name) == 0) return true;
  return false;
}

// What the backend needs of a device: Vulkan 1.2 (timeline semaphores) and host-pointer import.
bool usable(VkPhysicalDevice pd, std::string* why) {
  VkPhysicalDeviceProperties p;
  vkGetPhysicalDeviceProperties(pd, &p);
  if (p.apiVersion < VK_API_VERSION_1_2) {
    *why = "Vulkan 1.2 needed";
    return false;
  }
  if (!has_extension(pd, VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME)) {
    *why = "no VK_EXT_external_memory_host";
    return false;
  }
  VkPhysicalDeviceVulkan12Features f12{.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
  VkPhysicalDeviceFeatures2 f{.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &f12};
  vkGetPhysicalDeviceFeatures2(pd, &f);
  if (!f12.timelineSemaphore) {
    *why = "no timeline semaphores";
    return false;
  }
  return true;
}

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// The physical device `selector` names (see open_vulkan_backend), or a negative errno.
int select_device(const std::vector<VkPhysicalDevice>& pds, const std::string& selector) {
  std::string why;
  if (all_digits(selector)) {
    const unsigned long i = std::strtoul(selector.c_str(), nullptr, 10);
    if (i >= pds.size()) {
      log::get().error("refgpu vulkan: device index {} out of range ({} devices)", i, pds.size());
      return -ENODEV;
    }
    if (!usable(pds[i], &why)) {
      log::get().error("refgpu vulkan: device {} cannot be used: {}", i, why);
      return -EOPNOTSUPP;
    }
    return static_cast<int>(i);
  }
  if (!selector.empty()) {
    for (size_t i = 0; i < pds.size(); i++) {
      VkPhysicalDeviceProperties p;
      vkGetPhysicalDeviceProperties(pds[i], &p);
      if (!std::strstr(p.deviceName, selector.c_str())) continue;
      if (!usable(pds[i], &why)) {
        log::get().error("refgpu vulkan: device {} ({}) cannot be used: {}", i, p.deviceName, why);
        return -EOPNOTSUPP;
      }
      return static_cast<int>(i);
    }
    log::get().error("refgpu vulkan: no device named like \"{}\" ({} devices)", selector, pds.size());
    return -ENODEV;
  }
  // Auto: a discrete GPU, else a CPU driver, else anything usable.
  for (VkPhysicalDeviceType want : {VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU, VK_PHYSICAL_DEVICE_TYPE_CPU,
                                    VK_PHYSICAL_DEVICE_TYPE_MAX_ENUM})
    for (size_t i = 0; i < pds.size(); i++) {
      VkPhysicalDeviceProperties p;
      vkGetPhysicalDeviceProperties(pds[i], &p);
      if ((want == VK_PHYSICAL_DEVICE_TYPE_MAX_ENUM || p.deviceType == want) && usable(pds[i], &why))
        return static_cast<int>(i);
    }
  log::get().error("refgpu vulkan: none of the {} devices has what the backend needs", pds.size());
  return pds.empty() ? -ENODEV : -EOPNOTSUPP;
}

// A dedicated transfer family (TRANSFER without GRAPHICS/COMPUTE) if any, else the first
// family that can copy (GRAPHICS and COMPUTE imply TRANSFER). Sets *dedicated.
int select_family(VkPhysicalDevice pd, bool* dedicated) {
  uint32_t n = 0;
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, nullptr);
  std::vector<VkQueueFamilyProperties> fam(n);
  vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, fam.data());
  constexpr VkQueueFlags kGc = VK_QUEUE_GRAPHICS_BIT | VK_QUEUE_COMPUTE_BIT;
  for (uint32_t i = 0; i < n; i++)
    if (fam[i].queueCount && (fam[i].queueFlags & VK_QUEUE_TRANSFER_BIT) && !(fam[i].queueFlags & kGc)) {
      *dedicated = true;
      return static_cast<int>(i);
    }
  *dedicated = false;
  for (uint32_t i = 0; i < n; i++)
    if (fam[i].queueCount && (fam[i].queueFlags & (kGc | VK_QUEUE_TRANSFER_BIT))) return static_cast<int>(i);
  return -1;
}

}  // namespace

Result<std::shared_ptr<Context>> Context::create(const std::string& selector) {
  std::shared_ptr<Context> c(new Context());
  const VkApplicationInfo app{.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                              .pApplicationName = "gpusvm-refgpu",
                              .apiVersion = VK_API_VERSION_1_2};
  const VkInstanceCreateInfo ici{.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &app};
  VkResult r = vkCreateInstance(&ici, nullptr, &c->instance_);
  if (r != VK_SUCCESS) {
    log::get().error("refgpu vulkan: vkCreateInstance: {} (no Vulkan driver?)", static_cast<int>(r));
    c->instance_ = VK_NULL_HANDLE;
    return Err{r == VK_ERROR_OUT_OF_HOST_MEMORY ? -ENOMEM : -ENODEV};
  }
  uint32_t n = 0;
  vkEnumeratePhysicalDevices(c->instance_, &n, nullptr);
  std::vector<VkPhysicalDevice> pds(n);
  vkEnumeratePhysicalDevices(c->instance_, &n, pds.data());
  pds.resize(n);
  const int idx = select_device(pds, selector);
  if (idx < 0) return Err{idx};
  c->phys_ = pds[static_cast<size_t>(idx)];
  vkGetPhysicalDeviceProperties(c->phys_, &c->props_);
  vkGetPhysicalDeviceMemoryProperties(c->phys_, &c->mem_props_);
  VkPhysicalDeviceExternalMemoryHostPropertiesEXT host{
      .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_MEMORY_HOST_PROPERTIES_EXT};
  VkPhysicalDeviceProperties2 p2{.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &host};
  vkGetPhysicalDeviceProperties2(c->phys_, &p2);
  c->import_alignment_ = host.minImportedHostPointerAlignment;

  bool dedicated = false;
  const int fam = select_family(c->phys_, &dedicated);
  if (fam < 0) {
    log::get().error("refgpu vulkan: {}: no queue family can copy", c->props_.deviceName);
    return Err{-EOPNOTSUPP};
  }
  c->family_ = static_cast<uint32_t>(fam);
  const float prio = 1.0f;
  const VkDeviceQueueCreateInfo qci{.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                    .queueFamilyIndex = c->family_,
                                    .queueCount = 1,
                                    .pQueuePriorities = &prio};
  VkPhysicalDeviceVulkan12Features f12{.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
                                       .timelineSemaphore = VK_TRUE};
  const char* exts[] = {VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME};
  const VkDeviceCreateInfo dci{.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                               .pNext = &f12,
                               .queueCreateInfoCount = 1,
                               .pQueueCreateInfos = &qci,
                               .enabledExtensionCount = 1,
                               .ppEnabledExtensionNames = exts};
  r = vkCreateDevice(c->phys_, &dci, nullptr, &c->device_);
  if (r != VK_SUCCESS) {
    log::get().error("refgpu vulkan: vkCreateDevice on {}: {}", c->props_.deviceName, static_cast<int>(r));
    c->device_ = VK_NULL_HANDLE;
    return Err{to_errno(r)};
  }
  vkGetDeviceQueue(c->device_, c->family_, 0, &c->queue_);
  c->get_host_ptr_props_ = reinterpret_cast<PFN_vkGetMemoryHostPointerPropertiesEXT>(
      vkGetDeviceProcAddr(c->device_, "vkGetMemoryHostPointerPropertiesEXT"));
  if (!c->get_host_ptr_props_) return Err{-EOPNOTSUPP};

  constexpr VkMemoryPropertyFlags kVram = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT |
                                          VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                          VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
  for (uint32_t i = 0; i < c->mem_props_.memoryTypeCount; i++)
    if ((c->mem_props_.memoryTypes[i].propertyFlags & kVram) == kVram) {
      c->vram_type_ = static_cast<int>(i);
      break;
    }
  c->description_ = std::string("vulkan:") + c->props_.deviceName + (dedicated ? " (transfer queue family " : " (queue family ") +
                    std::to_string(c->family_) + ")";
  log::get().info("refgpu: {}, import alignment {}", c->description_, c->import_alignment_);
  return c;
}

Context::~Context() {
  if (device_) {
    vkDeviceWaitIdle(device_);
    vkDestroyDevice(device_, nullptr);
  }
  if (instance_) vkDestroyInstance(instance_, nullptr);
}

int Context::first_type(uint32_t bits) {
  for (int i = 0; i < 32; i++)
    if (bits & (1u << i)) return i;
  return -1;
}

VkResult Context::host_pointer_props(const void* p, VkMemoryHostPointerPropertiesEXT* out) const {
  return get_host_ptr_props_(device_, VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT, p, out);
}

int64_t Context::submit(VkCommandBuffer cb, VkSemaphore sem, uint64_t* counter) {
  if (lost()) return -EIO;
  MutexLock g(&queue_lock_);
  const uint64_t value = *counter + 1;
  const VkTimelineSemaphoreSubmitInfo ts{.sType = VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                                         .signalSemaphoreValueCount = 1,
                                         .pSignalSemaphoreValues = &value};
  const VkSubmitInfo si{.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
                        .pNext = &ts,
                        .commandBufferCount = 1,
                        .pCommandBuffers = &cb,
                        .signalSemaphoreCount = 1,
                        .pSignalSemaphores = &sem};
  const VkResult r = vkQueueSubmit(queue_, 1, &si, VK_NULL_HANDLE);
  if (r != VK_SUCCESS) {
    if (r == VK_ERROR_DEVICE_LOST) mark_lost();
    return to_errno(r);
  }
  *counter = value;
  return static_cast<int64_t>(value);
}

void Context::add_vram(const Span& s) {
  MutexLock g(&spans_lock_);
  vram_[s.base] = s;
}

void Context::remove_vram(const std::byte* base) {
  MutexLock g(&spans_lock_);
  vram_.erase(base);
}

Span Context::find_vram(const std::byte* p) {
  MutexLock g(&spans_lock_);
  auto it = vram_.upper_bound(p);
  if (it == vram_.begin()) return {};
  --it;
  const Span& s = it->second;
  return p < s.base + s.size ? s : Span{};
}

}  // namespace gpusvm::refgpu::vk
