// libFuzzer target over the refgpu ioctl entry point (devfs::ioctl on an open refgpu file).
//
// Each input runs on a fresh machine, device and process (no state leaks between inputs) and
// is decoded into at most kMaxRecords records:
//   sel (u8) % 20:
//     0..16  an ioctl of the table (DRM_IOCTL_REFGPU_*, index = nr - DRM_COMMAND_BASE):
//            mode (u8), then the argument struct's bytes (sizeof, zero-padded at the end of
//            the input). The struct goes in a heap buffer of exactly its size (ASan sees any
//            access past it). Its user-pointer fields are redirected: an odd value becomes a
//            bad pointer below kUserMinAddr (-EFAULT paths), an even one an address in the
//            fuzzer's user region (kUserRegion bytes, the caller's memory: syncs, handles,
//            engine instances, answers, records) with room for the largest array a request
//            reads or writes. With mode bit 0, the process addresses (exec batch, user-fence
//            addresses of wait_user_fence) are moved into an anonymous mapping of the process;
//            with bit 1, the user-fence addresses of exec's syncs too.
//            Timeouts are clamped to 1 ms so that no input sleeps.
//     17     a raw request: u32 request word, then 64 bytes of argument (anything: the
//            dispatch must reject what is not in the table before it reads the struct).
//     18     user-region write: u16 offset, then 64 bytes stored there (array contents).
//     19     mmap of the device fd: u8 d, u8 n: n % 32 + 1 pages at the offset the last
//            successful GEM_MMAP_OFFSET returned plus (d % 32) pages, MAP_SHARED read-write;
//            if it maps, a byte is written and read back through the CPU (it must come
//            back), then the range is unmapped.
// No input may crash, hang, leak or trip a sanitizer.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <sys/mman.h>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "drivers/refgpu/device.h"
#include "drivers/refgpu/ioctl.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/mm/cpu_access.h"
#include "uapi/refgpu.h"

using namespace gpusvm;

namespace {

constexpr size_t kMaxRecords = 48;
constexpr size_t kUserRegion = 160 * 1024;
// The largest array a request touches: 1024 bind ops of 80 bytes.
constexpr size_t kPtrWindow = kUserRegion - 1024 * sizeof(drm_refgpu_vm_bind_op) - 4096;
constexpr uint64_t kAnonLen = 16 * 4096;

struct Reader {
  const uint8_t* p;
  size_t n;
  size_t take(void* dst, size_t len) {
    const size_t k = len < n ? len : n;
    std::memcpy(dst, p, k);
    std::memset(static_cast<uint8_t*>(dst) + k, 0, len - k);
    p += k;
    n -= k;
    return k;
  }
  uint8_t u8() {
    uint8_t v = 0;
    take(&v, 1);
    return v;
  }
};

struct Ctx {
  std::vector<uint8_t> user = std::vector<uint8_t>(kUserRegion);
  mm::Va anon = 0;
  uint64_t mmap_offset = 0;  // the last GEM_MMAP_OFFSET's answer
  uint64_t ptr(uint64_t raw) const {
    if (raw & 1) return (raw >> 1) % refgpu::kUserMinAddr;
    return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(user.data())) + ((raw >> 1) % kPtrWindow);
  }
  uint64_t proc_addr(uint64_t raw) const { return anon + (raw % kAnonLen); }
};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

constexpr int64_t kMs = 1'000'000;

// Rewrites the pointer, process-address and timeout fields of request `idx`'s struct.
void redirect(unsigned idx, void* a, uint8_t mode, Ctx& c) {
  switch (idx + DRM_COMMAND_BASE) {
    case DRM_COMMAND_BASE + DRM_REFGPU_DEVICE_QUERY: {
      auto* q = static_cast<drm_refgpu_device_query*>(a);
      q->data = c.ptr(q->data);
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_VM_BIND: {
      auto* b = static_cast<drm_refgpu_vm_bind*>(a);
      if (b->num_binds > 1) b->vector_of_binds = c.ptr(b->vector_of_binds);
      b->syncs = c.ptr(b->syncs);
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_VM_QUERY_MEM_RANGE_ATTRS: {
      auto* q = static_cast<drm_refgpu_vm_query_mem_range_attr*>(a);
      q->vector_of_mem_attr = c.ptr(q->vector_of_mem_attr);
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_EXEC_QUEUE_CREATE: {
      auto* q = static_cast<drm_refgpu_exec_queue_create*>(a);
      q->instances = c.ptr(q->instances);
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_EXEC: {
      auto* e = static_cast<drm_refgpu_exec*>(a);
      e->syncs = c.ptr(e->syncs);
      if (mode & 1) e->address = c.proc_addr(e->address) & ~7ull;
      if ((mode & 2) && !(e->syncs < refgpu::kUserMinAddr)) {
        // The user-fence addresses of the syncs (the caller's array) into the process.
        // (any alignment: the array is the fuzzer's bytes)
        auto* base = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(e->syncs));
        for (uint32_t i = 0; i < e->num_syncs && i < refgpu::kMaxSyncs; i++) {
          drm_refgpu_sync s;
          std::memcpy(&s, base + i * sizeof(s), sizeof(s));
          if (s.type != REFGPU_SYNC_TYPE_USER_FENCE) continue;
          s.addr = c.proc_addr(s.addr) & ~7ull;
          std::memcpy(base + i * sizeof(s), &s, sizeof(s));
        }
      }
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_WAIT_USER_FENCE: {
      auto* w = static_cast<drm_refgpu_wait_user_fence*>(a);
      if (mode & 1) w->addr = c.proc_addr(w->addr) & ~7ull;
      const int64_t t = static_cast<int64_t>(static_cast<uint64_t>(w->timeout) % kMs);
      w->timeout = (w->flags & REFGPU_UFENCE_WAIT_FLAG_ABSTIME) ? now_ns() + t : t;
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_SYNCOBJ_WAIT: {
      auto* w = static_cast<drm_refgpu_syncobj_wait*>(a);
      w->handles = c.ptr(w->handles);
      w->timeout_nsec = now_ns() + static_cast<int64_t>(static_cast<uint64_t>(w->timeout_nsec) % kMs);
      break;
    }
    case DRM_COMMAND_BASE + DRM_REFGPU_FAULT_QUERY: {
      auto* q = static_cast<drm_refgpu_fault_query*>(a);
      q->faults = c.ptr(q->faults);
      break;
    }
    default:
      break;
  }
}

constexpr unsigned long kRequests[17] = {
    DRM_IOCTL_REFGPU_DEVICE_QUERY,      DRM_IOCTL_REFGPU_GEM_CREATE,         DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET,
    DRM_IOCTL_REFGPU_GEM_CLOSE,         DRM_IOCTL_REFGPU_VM_CREATE,          DRM_IOCTL_REFGPU_VM_DESTROY,
    DRM_IOCTL_REFGPU_VM_BIND,           DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE,  DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY,
    DRM_IOCTL_REFGPU_EXEC,              DRM_IOCTL_REFGPU_WAIT_USER_FENCE,    DRM_IOCTL_REFGPU_MADVISE,
    DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY,
    DRM_IOCTL_REFGPU_SYNCOBJ_WAIT,      DRM_IOCTL_REFGPU_FAULT_QUERY,
};

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // A job or a wait that the clamps above did not bound ends within a second, not 30.
  set_hang_timeout(std::chrono::milliseconds(2000));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto m = devfs::Machine::create({.ram_bytes = 16ull << 20});
  if (!m) __builtin_trap();
  refgpu::DeviceConfig cfg;
  cfg.vram_sizes = {2ull << 20};
  cfg.num_engines = 2;
  cfg.fault_threads = 1;
  auto dev = refgpu::RefgpuDevice::create(&(*m)->mem(), cfg);
  if (!dev || (*m)->add_device("refgpu0", *dev) != 0) __builtin_trap();
  auto p = (*m)->create_process();
  if (!p) __builtin_trap();
  auto fd = devfs::open("refgpu0", **p);
  if (!fd) __builtin_trap();
  Ctx c;
  auto anon = (*p)->mm().mmap(0, kAnonLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!anon) __builtin_trap();
  c.anon = *anon;

  Reader r{data, size};
  for (size_t rec = 0; rec < kMaxRecords && r.n; rec++) {
    const unsigned sel = r.u8() % 20;
    if (sel == 19) {
      const uint8_t d = r.u8(), n = r.u8();
      const uint64_t len = (uint64_t{n} % 32 + 1) * 4096;
      auto va = devfs::mmap(**p, 0, len, PROT_READ | PROT_WRITE, MAP_SHARED, *fd,
                            c.mmap_offset + (uint64_t{d} % 32) * 4096);
      if (va.ok()) {
        const uint8_t b = static_cast<uint8_t>(0xa5 ^ d);
        uint8_t got = 0;
        if (mm::cpu::copy_in((*p)->mm(), *va + len - 1, &b, 1) == 0) {
          if (mm::cpu::copy_out((*p)->mm(), *va + len - 1, &got, 1) != 0 || got != b) __builtin_trap();
        }
        if ((*p)->mm().munmap(*va, len) != 0) __builtin_trap();
      }
      continue;
    }
    if (sel == 18) {
      uint16_t off = 0;
      r.take(&off, 2);
      r.take(c.user.data() + off % (kUserRegion - 64), 64);
      continue;
    }
    if (sel == 17) {
      uint32_t req = 0;
      r.take(&req, 4);
      std::vector<uint8_t> arg(256);  // the largest size a request word can name is checked first
      r.take(arg.data(), 64);
      const int rc = devfs::ioctl(**p, *fd, req, arg.data());
      if (rc > 0) __builtin_trap();
      continue;
    }
    const uint8_t mode = r.u8();
    const unsigned long req = kRequests[sel];
    const size_t len = _IOC_SIZE(req);
    std::unique_ptr<uint8_t[]> arg(new uint8_t[len]);
    r.take(arg.get(), len);
    redirect(sel, arg.get(), mode, c);
    const int rc = devfs::ioctl(**p, *fd, req, arg.get());
    if (rc > 0) __builtin_trap();  // 0 or a negative errno
    if (rc == 0 && req == DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET)
      c.mmap_offset = reinterpret_cast<drm_refgpu_gem_mmap_offset*>(arg.get())->offset;
  }
  // Teardown: close, remove the device with whatever is in flight, end the machine.
  if (devfs::close(**p, *fd) != 0) __builtin_trap();
  (*dev)->unplug();
  (*m)->shutdown();
  return 0;
}
