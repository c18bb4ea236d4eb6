// Backend selection and the Vulkan backend's error paths (backend.h, vulkan_backend.h):
// kinds and the environment override, an explicit kind beats the environment, an unknown
// value or a device that does not exist fails device creation with a clear errno (never a
// fallback), the query reports the backend, fresh VRAM reads zero, a copy of memory the
// device cannot reach is refused, and a lost device fails every later copy and allocation.
#include "drivers/refgpu/backend.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/device.h"
#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/physmem.h"
#include "tests/refgpu/ioctl_test_util.h"
#ifdef GPUSVM_HAVE_VULKAN
#include "drivers/refgpu/vulkan/vulkan_backend.h"
#endif

namespace gpusvm::refgpu {
namespace {

using testing::IoctlRig;
using testing::uptr;

// Sets an environment variable for one scope, restoring the old value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(RefgpuBackend, KindsParseAndUnknownIsEinval) {
  EXPECT_EQ(*parse_backend_kind(""), BackendKind::kAuto);
  EXPECT_EQ(*parse_backend_kind("auto"), BackendKind::kAuto);
  EXPECT_EQ(*parse_backend_kind("host"), BackendKind::kHost);
  EXPECT_EQ(*parse_backend_kind("vulkan"), BackendKind::kVulkan);
  EXPECT_EQ(parse_backend_kind("Vulkan").error(), -EINVAL);
  EXPECT_EQ(parse_backend_kind("cuda").error(), -EINVAL);
}

TEST(RefgpuBackend, UnknownEnvValueFailsDeviceCreation) {
  ScopedEnv env("GPUSVM_REFGPU_BACKEND", "gpu");
  auto mem = mm::PhysMem::create({.ram_bytes = 16ull << 20});
  ASSERT_TRUE(mem.ok());
  auto d = RefgpuDevice::create(mem->get(), IoctlRig::small_config());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error(), -EINVAL);
}

TEST(RefgpuBackend, ExplicitHostWinsOverTheEnvironment) {
  ScopedEnv env("GPUSVM_REFGPU_BACKEND", "vulkan");
  DeviceConfig cfg = IoctlRig::small_config();
  cfg.backend.kind = BackendKind::kHost;
  IoctlRig r(cfg);
  EXPECT_EQ(r.dev->backend().kind(), BackendKind::kHost);
  drm_refgpu_query_config c{};
  drm_refgpu_device_query dq{.query = REFGPU_DEVICE_QUERY_CONFIG, .size = sizeof(c), .data = uptr(&c)};
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  EXPECT_EQ(c.backend, __u32{REFGPU_BACKEND_HOST});
}

#ifdef GPUSVM_HAVE_VULKAN

DeviceConfig vulkan_config(const char* device = "") {
  DeviceConfig cfg = IoctlRig::small_config();
  cfg.backend = {.kind = BackendKind::kVulkan, .vulkan_device = device};
  return cfg;
}

// No device of that name, or an index past the last device: -ENODEV from device creation
// (and from the open ioctl's caller, which never gets a device), not a host device.
TEST(RefgpuVulkanBackend, NoSuchDeviceIsEnodevThroughDeviceCreation) {
  auto mem = mm::PhysMem::create({.ram_bytes = 16ull << 20});
  ASSERT_TRUE(mem.ok());
  for (const char* name : {"no-such-gpu-anywhere", "4096"}) {
    auto d = RefgpuDevice::create(mem->get(), vulkan_config(name));
    ASSERT_FALSE(d.ok()) << name;
    EXPECT_EQ(d.error(), -ENODEV) << name;
  }
  ScopedEnv env("GPUSVM_VULKAN_DEVICE", "no-such-gpu-anywhere");
  auto d = RefgpuDevice::create(mem->get(), vulkan_config());
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error(), -ENODEV) << "GPUSVM_VULKAN_DEVICE is the default selector";
}

TEST(RefgpuVulkanBackend, QueryReportsVulkanAndVramReadsZero) {
  IoctlRig r(vulkan_config());
  ASSERT_EQ(r.dev->backend().kind(), BackendKind::kVulkan);
  EXPECT_EQ(r.dev->backend().description().rfind("vulkan:", 0), 0u) << r.dev->backend().description();
  drm_refgpu_query_config c{};
  drm_refgpu_device_query dq{.query = REFGPU_DEVICE_QUERY_CONFIG, .size = sizeof(c), .data = uptr(&c)};
  ASSERT_EQ(r.io(DRM_IOCTL_REFGPU_DEVICE_QUERY, &dq), 0);
  EXPECT_EQ(c.backend, __u32{REFGPU_BACKEND_VULKAN});
  VramArena& a = r.dev->vram_region(0).arena();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data(0)) % 4096, 0u);
  for (uint64_t k = 0; k < a.size(); k++) ASSERT_EQ(a.data(0)[k], std::byte{0}) << "byte " << k;
}

// One selector, one VkDevice: two devices share it (peer copies are within one device).
TEST(RefgpuVulkanBackend, SameSelectorSharesOneContext) {
  auto a = open_vulkan_backend("");
  auto b = open_vulkan_backend("");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->get(), b->get());
}

// Memory that is neither this device's system memory nor VRAM on its VkDevice: -EXDEV, and
// nothing is written.
TEST(RefgpuVulkanBackend, CopyOfUnreachableMemoryIsExdev) {
  auto mem = mm::PhysMem::create({.ram_bytes = 16ull << 20});
  ASSERT_TRUE(mem.ok());
  auto be = open_vulkan_backend("");
  ASSERT_TRUE(be.ok()) << be.error();
  auto vram = VramArena::create(**be, 2ull << 20);
  ASSERT_TRUE(vram.ok());
  auto copy = (*be)->make_copy(mem->get(), 0, 1 << 20);
  ASSERT_TRUE(copy.ok()) << copy.error();
  std::vector<std::byte> outside(4096, std::byte{0x77});
  const CopyRegion r{(*vram)->data(0), outside.data(), outside.size()};
  EXPECT_EQ((*copy)->copy({&r, 1}), -EXDEV);
  for (uint64_t k = 0; k < 4096; k++) ASSERT_EQ((*vram)->data(0)[k], std::byte{0});
  const CopyRegion ok{(*vram)->data(0), (*mem)->ram_data(1), 4096};
  std::memset((*mem)->ram_data(1), 0x5a, 4096);
  ASSERT_EQ((*copy)->copy({&ok, 1}), 0);
  for (uint64_t k = 0; k < 4096; k++) ASSERT_EQ((*vram)->data(0)[k], std::byte{0x5a});
}

// A lost device (injected at the copy's completion): that copy and every later one fail
// with -EIO, VRAM allocation too; the next open gets a fresh device that works.
TEST(RefgpuVulkanBackend, LostDeviceFailsEveryLaterCopyAndAllocation) {
  auto mem = mm::PhysMem::create({.ram_bytes = 16ull << 20});
  ASSERT_TRUE(mem.ok());
  auto be = open_vulkan_backend("");
  ASSERT_TRUE(be.ok()) << be.error();
  auto vram = VramArena::create(**be, 2ull << 20);
  ASSERT_TRUE(vram.ok());
  auto copy = (*be)->make_copy(mem->get(), 0, 1 << 20);
  ASSERT_TRUE(copy.ok());
  const CopyRegion r{(*vram)->data(0), (*mem)->ram_data(1), 4096};
  {
    fault_inject::ScopedArm arm("refgpu.vulkan.device_lost", {});
    ASSERT_EQ(arm.status(), 0);
    EXPECT_EQ((*copy)->copy({&r, 1}), -EIO);
  }
  EXPECT_EQ((*copy)->copy({&r, 1}), -EIO) << "lost stays lost";
  EXPECT_EQ(VramArena::create(**be, 2ull << 20).error(), -EIO);
  auto fresh = open_vulkan_backend("");
  ASSERT_TRUE(fresh.ok());
  EXPECT_NE(fresh->get(), be->get());
  auto v2 = VramArena::create(**fresh, 2ull << 20);
  ASSERT_TRUE(v2.ok());
  auto c2 = (*fresh)->make_copy(mem->get(), 0, 1 << 20);
  ASSERT_TRUE(c2.ok());
  std::memset((*mem)->ram_data(2), 0x3c, 4096);
  const CopyRegion r2{(*v2)->data(4096), (*mem)->ram_data(2), 4096};
  ASSERT_EQ((*c2)->copy({&r2, 1}), 0);
  for (uint64_t k = 0; k < 4096; k++) ASSERT_EQ((*v2)->data(4096)[k], std::byte{0x3c});
}

#else

TEST(RefgpuBackend, VulkanNotBuiltIsEnodev) {
  auto b = open_backend({.kind = BackendKind::kVulkan});
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error(), -ENODEV);
}

#endif

}  // namespace
}  // namespace gpusvm::refgpu
