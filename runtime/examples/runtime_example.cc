// The complete example program of docs/runtime.md: a simulated machine with one refgpu
// device, a process that opens it through the runtime, mallocs a buffer, initialises it on
// the CPU, runs a GPU job that faults the pages in and rewrites them, prefetches the buffer
// to VRAM and back, and checks every byte on the CPU. Prints "runtime-example: ok".
#include <cinttypes>
#include <cstdio>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/refgpu/device.h"
#include "gpusvm/runtime.hpp"

using namespace gpusvm;

namespace {

int fail(const char* what, int rc) {
  std::fprintf(stderr, "runtime-example: %s: %s\n", what, gpusvm_rt_strerror(rc));
  return 1;
}

int run(devfs::Process& proc) {
  Result<rt::Device> dev = rt::Device::open(proc, 0);
  if (!dev) return fail("open refgpu0", dev.error());
  Result<rt::Context> ctx = rt::Context::create(*dev);  // fault-mode VM mirroring the process
  if (!ctx) return fail("context", ctx.error());
  {
    constexpr size_t kN = 16384;  // 64 KiB of dwords
    Result<rt::Buffer<uint32_t>> buf = rt::Buffer<uint32_t>::create(*ctx, kN);
    if (!buf) return fail("malloc", buf.error());
    std::vector<uint32_t> init(kN);
    for (size_t i = 0; i < kN; ++i) init[i] = static_cast<uint32_t>(i);
    if (int rc = buf->write(init)) return fail("CPU init", rc);

    // The job checks the CPU's values, then overwrites them with 1000 + 3 * i.
    rt::CmdBuf cb;
    if (int rc = cb.load_strided(REFGPU_LOAD_STRIDED_FLAG_CHECK, buf->addr(), 4, kN, 0, 1)) return fail("cmd", rc);
    if (int rc = cb.store_strided(0, buf->addr(), 4, kN, 1000, 3)) return fail("cmd", rc);
    Result<rt::Queue> q = rt::Queue::create(*ctx, 0);
    if (!q) return fail("queue", q.error());
    Result<rt::Fence> f = q->submit(cb);
    if (!f) return fail("submit", f.error());
    if (int rc = f->wait(5'000'000'000)) return fail("job", rc);

    // Prefetch to VRAM (region 1) and back to system memory (region 0), each with a fence.
    for (uint32_t region : {1u, 0u}) {
      Result<rt::Fence> pf = ctx->prefetch(buf->addr(), buf->bytes(), region);
      if (!pf) return fail("prefetch", pf.error());
      if (int rc = pf->wait(5'000'000'000)) return fail("prefetch wait", rc);
    }
    Result<std::vector<uint32_t>> out = buf->read_all();
    if (!out) return fail("CPU read", out.error());
    for (size_t i = 0; i < kN; ++i) {
      if ((*out)[i] != 1000 + 3 * i) {
        std::fprintf(stderr, "runtime-example: MISMATCH at %zu: %u\n", i, (*out)[i]);
        return 1;
      }
    }
    Result<std::vector<uint64_t>> st = dev->stats();
    if (!st) return fail("stats", st.error());
    std::printf("faults 4K/64K/2M: %" PRIu64 "/%" PRIu64 "/%" PRIu64 ", migrations to VRAM %" PRIu64
                ", to system %" PRIu64 ", jobs %" PRIu64 "\n",
                (*st)[REFGPU_STAT_FAULTS_4K], (*st)[REFGPU_STAT_FAULTS_64K], (*st)[REFGPU_STAT_FAULTS_2M],
                (*st)[REFGPU_STAT_MIGRATIONS_TO_VRAM], (*st)[REFGPU_STAT_MIGRATIONS_TO_SMEM], (*st)[REFGPU_STAT_JOBS]);
  }  // the buffer, queue and fence go before the context, the context before the device
  std::printf("runtime-example: ok\n");
  return 0;
}

}  // namespace

int main() {
  Result<std::unique_ptr<devfs::Machine>> m = devfs::Machine::create({.ram_bytes = 128ull << 20});
  if (!m) return fail("machine", m.error());
  refgpu::DeviceConfig cfg;
  cfg.vram_sizes = {32ull << 20};
  Result<std::shared_ptr<refgpu::RefgpuDevice>> d = refgpu::RefgpuDevice::create(&(*m)->mem(), cfg);
  if (!d) return fail("device", d.error());
  if (int rc = (*m)->add_device("refgpu0", *d)) return fail("add device", rc);
  Result<devfs::Process*> p = (*m)->create_process();
  if (!p) return fail("process", p.error());
  const int rc = run(**p);
  (*m)->shutdown();
  return rc;
}
