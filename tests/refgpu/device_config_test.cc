// DeviceConfig knobs checked at device creation: the copy engine's host backend threads.
#include <gtest/gtest.h>

#include "drivers/refgpu/copy_engine.h"
#include "drivers/refgpu/device.h"
#include "gpusvm/mm/physmem.h"

namespace gpusvm::refgpu {
namespace {

std::unique_ptr<mm::PhysMem> small_mem() { return std::move(mm::PhysMem::create({.ram_bytes = 32ull << 20}).value()); }

// copy_threads / copy_threshold_bytes build the host backend the migrations copy with.
TEST(RefgpuDeviceConfig, CopyThreadsConfigureTheHostBackend) {
  auto mem = small_mem();
  for (unsigned threads : {0u, 3u}) {
    DeviceConfig cfg;
    cfg.vram_sizes = {4ull << 20};
    cfg.copy_threads = threads;
    cfg.copy_threshold_bytes = 256 << 10;
    cfg.backend.kind = BackendKind::kHost;  // the tuning is the host backend's (also under the vulkan run)
    auto d = RefgpuDevice::create(mem.get(), cfg);
    ASSERT_TRUE(d.ok()) << d.error();
    auto* host = dynamic_cast<HostCopyBackend*>(&(*d)->copy_engine().backend());
    ASSERT_NE(host, nullptr);
    EXPECT_EQ(host->threads(), threads);
    EXPECT_EQ(host->threshold_bytes(), 256u << 10);
  }
}

TEST(RefgpuDeviceConfig, TooManyCopyThreadsIsRefused) {
  auto mem = small_mem();
  DeviceConfig cfg;
  cfg.vram_sizes = {4ull << 20};
  cfg.copy_threads = kMaxCopyThreads + 1;
  auto d = RefgpuDevice::create(mem.get(), cfg);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error(), -EINVAL);
  cfg.copy_threads = kMaxCopyThreads;
  EXPECT_TRUE(RefgpuDevice::create(mem.get(), cfg).ok());
}

}  // namespace
}  // namespace gpusvm::refgpu
