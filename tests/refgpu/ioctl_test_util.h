// A machine with one refgpu device and one process that has it open: the ioctl tests' rig.
// Everything goes through devfs::ioctl on the fd, as a program would; the rig also reaches the
// open file's tables (num_vms...) to check that a failed call changed nothing.
#pragma once

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "drivers/devfs/machine.h"
#include "drivers/devfs/process.h"
#include "drivers/refgpu/device.h"
#include "drivers/refgpu/file.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/gup.h"
#include "uapi/refgpu.h"

namespace gpusvm::refgpu::testing {

inline uint64_t uptr(const void* p) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)); }

class IoctlRig {
 public:
  explicit IoctlRig(DeviceConfig cfg = small_config()) {
    auto m = devfs::Machine::create({.ram_bytes = 64ull << 20});
    EXPECT_TRUE(m.ok());
    machine = std::move(*m);
    auto d = RefgpuDevice::create(&machine->mem(), cfg);
    EXPECT_TRUE(d.ok()) << d.error();
    dev = *d;
    EXPECT_EQ(machine->add_device("refgpu0", dev), 0);
    auto p = machine->create_process();
    EXPECT_TRUE(p.ok());
    proc = *p;
    auto fd_or = devfs::open("refgpu0", *proc);
    EXPECT_TRUE(fd_or.ok());
    fd = *fd_or;
    file = std::dynamic_pointer_cast<RefgpuFile>(proc->fd_get(fd));
    EXPECT_NE(file, nullptr);
  }
  ~IoctlRig() {
    for (mm::Folio* f : pinned) mm::unpin_user_page(f);
    file.reset();
    machine->shutdown();
  }
  static DeviceConfig small_config() {
    DeviceConfig c;
    c.vram_sizes = {8ull << 20};
    c.num_engines = 2;
    c.fault_threads = 1;
    return c;
  }

  int io(unsigned long req, void* arg) { return devfs::ioctl(*proc, fd, req, arg); }

  uint32_t vm_create(uint32_t flags = REFGPU_VM_CREATE_FLAG_LR_MODE | REFGPU_VM_CREATE_FLAG_FAULT_MODE) {
    drm_refgpu_vm_create c{};
    c.flags = flags;
    EXPECT_EQ(io(DRM_IOCTL_REFGPU_VM_CREATE, &c), 0);
    return c.vm_id;
  }
  uint32_t queue_create(uint32_t vm, uint16_t engine = 0) {
    drm_refgpu_engine_class_instance inst{REFGPU_ENGINE_CLASS_COMPUTE, engine, 0, 0};
    drm_refgpu_exec_queue_create c{};
    c.width = 1;
    c.num_placements = 1;
    c.vm_id = vm;
    c.instances = uptr(&inst);
    EXPECT_EQ(io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &c), 0);
    return c.exec_queue_id;
  }
  uint32_t syncobj_create(uint32_t flags = 0) {
    drm_refgpu_syncobj_create c{};
    c.flags = flags;
    EXPECT_EQ(io(DRM_IOCTL_REFGPU_SYNCOBJ_CREATE, &c), 0);
    return c.handle;
  }
  // GEM_CREATE (0 on failure, with a test failure).
  uint32_t gem_create(uint64_t size, uint32_t placement, uint32_t flags = 0) {
    drm_refgpu_gem_create c{};
    c.size = size;
    c.placement = placement;
    c.flags = flags;
    EXPECT_EQ(io(DRM_IOCTL_REFGPU_GEM_CREATE, &c), 0);
    return c.handle;
  }
  Bo* bo(uint32_t handle) {
    std::shared_ptr<FileBo> fb = file->find_bo(handle);
    EXPECT_NE(fb, nullptr);
    return fb ? fb->bo.get() : nullptr;
  }
  // VM_BIND of one op with syncs.
  int bind(uint32_t vm, uint32_t op, uint64_t addr, uint64_t range, uint32_t obj = 0, uint32_t flags = 0,
           std::vector<drm_refgpu_sync> syncs = {}) {
    drm_refgpu_vm_bind b{};
    b.vm_id = vm;
    b.num_binds = 1;
    b.bind.op = op;
    b.bind.flags = flags;
    b.bind.addr = addr;
    b.bind.range = range;
    b.bind.obj = obj;
    b.num_syncs = static_cast<uint32_t>(syncs.size());
    b.syncs = uptr(syncs.data());
    return io(DRM_IOCTL_REFGPU_VM_BIND, &b);
  }
  // Exec and its waits, for tests that are not about these structs (ioctl_exec_test.cc's
  // contract tests fill and check every field by hand). The sync entries: the job signals
  // syncobj `handle`, or writes `value` to the qword at `addr`, when it ends (whatever its
  // status); syncobj_in: the job runs after the fence syncobj `handle` holds.
  static drm_refgpu_sync syncobj_signal(uint32_t handle) {
    drm_refgpu_sync s = syncobj_in(handle);
    s.flags = REFGPU_SYNC_FLAG_SIGNAL;
    return s;
  }
  static drm_refgpu_sync syncobj_in(uint32_t handle) {
    drm_refgpu_sync s{};
    s.type = REFGPU_SYNC_TYPE_SYNCOBJ;
    s.handle = handle;
    return s;
  }
  static drm_refgpu_sync ufence_signal(mm::Va addr, uint64_t value) {
    drm_refgpu_sync s{};
    s.type = REFGPU_SYNC_TYPE_USER_FENCE;
    s.flags = REFGPU_SYNC_FLAG_SIGNAL;
    s.addr = addr;
    s.timeline_value = value;
    return s;
  }
  // The syncobj's current fence (null: none yet).
  std::shared_ptr<Fence> fence_of(uint32_t so) { return file->syncobj_fence(*file->find_syncobj(so)); }
  // SYNCOBJ_WAIT on one syncobj for at most 10 s: the ioctl's result; *error gets the fence's
  // status (drm_refgpu_syncobj_wait.error).
  int syncobj_wait(uint32_t so, int32_t* error = nullptr) {
    drm_refgpu_syncobj_wait w{};
    w.handles = uptr(&so);
    w.count_handles = 1;
    w.timeout_nsec = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         (std::chrono::steady_clock::now() + std::chrono::seconds(10)).time_since_epoch())
                         .count();
    const int rc = io(DRM_IOCTL_REFGPU_SYNCOBJ_WAIT, &w);
    if (error) *error = w.error;
    return rc;
  }
  // DRM_IOCTL_REFGPU_EXEC of the one batch at GPU VA `batch` on `queue`, with `syncs`: its rc.
  int exec(uint32_t queue, uint64_t batch, std::vector<drm_refgpu_sync> syncs = {}) {
    drm_refgpu_exec e{};
    e.exec_queue_id = queue;
    e.num_syncs = static_cast<uint32_t>(syncs.size());
    e.syncs = syncs.empty() ? 0 : uptr(syncs.data());
    e.address = batch;
    e.num_batch_buffer = 1;
    return io(DRM_IOCTL_REFGPU_EXEC, &e);
  }
  // DRM_IOCTL_REFGPU_WAIT_USER_FENCE until the qword at `addr` equals `value`: its rc (0;
  // -ETIME after timeout_ns; -EIO once `queue`, when not 0, was banned by a failed job).
  int wait_ufence(mm::Va addr, uint64_t value, uint32_t queue = 0, int64_t timeout_ns = 20'000'000'000) {
    drm_refgpu_wait_user_fence w{};
    w.addr = addr;
    w.op = REFGPU_UFENCE_WAIT_OP_EQ;
    w.value = value;
    w.mask = ~0ull;
    w.timeout = timeout_ns;
    w.exec_queue_id = queue;
    return io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &w);
  }
  // exec with a user-fence signal of `value` at `fence`, then the wait for it (ending early
  // if the queue is banned): 0, or the first failing ioctl's rc.
  int exec_and_wait(uint32_t queue, uint64_t batch, mm::Va fence, uint64_t value) {
    if (int rc = exec(queue, batch, {ufence_signal(fence, value)})) return rc;
    return wait_ufence(fence, value, queue);
  }

  // Anonymous read-write memory of the process (malloc'd memory, as a program has it).
  mm::Va anon(uint64_t len) {
    auto va = proc->mm().mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
    EXPECT_TRUE(va.ok());
    return *va;
  }
  // For VMs without fault mode (no mirror): pins the process's pages of [va, va + len) and
  // maps each at the same GPU VA of `vm`, writable, onto its frame, as a userptr bind would.
  // The device then reads and writes process memory.
  void mirror_pin(uint32_t vm_id, mm::Va va, uint64_t len) {
    std::shared_ptr<FileVm> vm = file->find_vm(vm_id);
    ASSERT_NE(vm, nullptr);
    for (uint64_t off = 0; off < len; off += 4096) {
      mm::Folio* page = nullptr;
      ASSERT_EQ(mm::pin_user_pages_fast(proc->mm(), va + off, 1, mm::FOLL_WRITE, &page), 1);
      pinned.push_back(page);
      auto res = vm->vm->page_table().reserve(va + off, va + off + 4096, 4096);
      ASSERT_TRUE(res.ok());
      ASSERT_TRUE(vm->vm->page_table().map(&*res, va + off, va + off + 4096, 4096, Target::kSystem, page->pfn() << 12,
                             kPermWrite | kPermAtomic)
                      .ok());
      vm->vm->tlb().invalidate(va + off, va + off + 4096);
    }
  }
  void put_bytes(mm::Va va, const std::vector<std::byte>& b) {
    ASSERT_EQ(mm::cpu::copy_in(proc->mm(), va, b.data(), b.size()), 0);
  }
  uint64_t load64(mm::Va va) {
    auto v = mm::cpu::load<uint64_t>(proc->mm(), va);
    EXPECT_TRUE(v.ok());
    return v.ok() ? *v : ~0ull;
  }
  uint64_t stat(int idx) {
    __u64 v[REFGPU_STAT_COUNT];
    dev->read_stats(v);
    return v[idx];
  }

  std::unique_ptr<devfs::Machine> machine;
  std::shared_ptr<RefgpuDevice> dev;
  devfs::Process* proc = nullptr;
  int fd = -1;
  std::shared_ptr<RefgpuFile> file;
  std::vector<mm::Folio*> pinned;
};

}  // namespace gpusvm::refgpu::testing
