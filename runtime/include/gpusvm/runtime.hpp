// gpusvm runtime, C++ wrapper of runtime.h: RAII handles (move-only), spans for host buffers,
// Result<T> (gpusvm/base/result.h: a value or a negative errno, C++20's std::expected
// stand-in). Every call maps to one C call; nothing throws.
//
//   auto dev = rt::Device::open(*proc, 0);            // Result<rt::Device>
//   auto ctx = rt::Context::create(*dev);             // the mirrored fault-mode VM
//   auto buf = rt::Buffer<uint32_t>::create(*ctx, 1024);   // malloc in the process
//   rt::CmdBuf cb; cb.store_dword(buf->addr(), 42);
//   auto q = rt::Queue::create(*ctx, 0);
//   auto f = q->submit(cb);  f->wait(1'000'000'000);
//
// Destruction order: fences and queues before their context, contexts before their device
// (the C calls return -EBUSY otherwise; the destructors then leak rather than abort).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "drivers/devfs/process.h"
#include "gpusvm/base/result.h"
#include "gpusvm/runtime.h"

namespace gpusvm::rt {

using Va = gpusvm_rt_va;

inline gpusvm_rt_process* process(devfs::Process& p) { return reinterpret_cast<gpusvm_rt_process*>(&p); }

namespace detail {
template <typename H, int (*Destroy)(H*)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(H* h) : h_(h) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, nullptr);
    }
    return *this;
  }
  // The C destroy's result (0, or -EBUSY: the handle is kept).
  int reset() {
    if (!h_) return 0;
    const int rc = Destroy(h_);
    if (rc == 0 || rc != -EBUSY) h_ = nullptr;
    return rc;
  }
  H* get() const { return h_; }
  explicit operator bool() const { return h_ != nullptr; }

 private:
  H* h_ = nullptr;
};
inline int cmdbuf_destroy(gpusvm_rt_cmdbuf* cb) {
  gpusvm_rt_cmdbuf_destroy(cb);
  return 0;
}
}  // namespace detail

class Device : public detail::Handle<gpusvm_rt_device, gpusvm_rt_device_close> {
 public:
  using Handle::Handle;
  static Result<uint32_t> count(devfs::Process& p) {
    uint32_t n = 0;
    if (int rc = gpusvm_rt_device_count(process(p), &n)) return Err{rc};
    return n;
  }
  static Result<Device> open(devfs::Process& p, uint32_t index) {
    gpusvm_rt_device* d = nullptr;
    if (int rc = gpusvm_rt_device_open(process(p), index, &d)) return Err{rc};
    return Device(d);
  }
  Result<gpusvm_rt_device_info> info() const {
    gpusvm_rt_device_info i{};
    if (int rc = gpusvm_rt_device_get_info(get(), &i)) return Err{rc};
    return i;
  }
  Result<std::vector<uint64_t>> stats() const {
    std::vector<uint64_t> v(64);
    uint32_t n = 0;
    if (int rc = gpusvm_rt_device_stats(get(), v.data(), 64, &n)) return Err{rc};
    v.resize(n);
    return v;
  }
  // gpusvm_rt_device_stat_name: nullptr for an index the runtime does not know.
  static const char* stat_name(uint32_t index) { return gpusvm_rt_device_stat_name(index); }
};

class Fence : public detail::Handle<gpusvm_rt_fence, gpusvm_rt_fence_destroy> {
 public:
  using Handle::Handle;
  int wait(int64_t timeout_ns) const { return gpusvm_rt_fence_wait(get(), timeout_ns); }
  int status() const { return gpusvm_rt_fence_status(get()); }
  Result<gpusvm_rt_job_error> error() const {
    gpusvm_rt_job_error e{};
    if (int rc = gpusvm_rt_fence_error(get(), &e)) return Err{rc};
    return e;
  }
};

class CmdBuf : public detail::Handle<gpusvm_rt_cmdbuf, detail::cmdbuf_destroy> {
 public:
  CmdBuf() {
    gpusvm_rt_cmdbuf* cb = nullptr;
    if (gpusvm_rt_cmdbuf_create(&cb) == 0) *this = CmdBuf(cb);
  }
  explicit CmdBuf(gpusvm_rt_cmdbuf* cb) : Handle(cb) {}
  void reset_commands() { gpusvm_rt_cmdbuf_reset(get()); }
  size_t bytes() const { return gpusvm_rt_cmdbuf_bytes(get()); }
  int store_dword(Va a, uint32_t v) { return gpusvm_rt_cmd_store_dword(get(), a, v); }
  int store_qword(Va a, uint64_t v) { return gpusvm_rt_cmd_store_qword(get(), a, v); }
  int load_compare(Va a, uint16_t op, uint64_t v, uint64_t mask, uint16_t flags) {
    return gpusvm_rt_cmd_load_compare(get(), a, op, v, mask, flags);
  }
  int atomic(uint16_t aop, uint16_t flags, Va a, uint64_t operand = 0, uint64_t compare = 0, Va ret = 0) {
    return gpusvm_rt_cmd_atomic(get(), aop, flags, a, operand, compare, ret);
  }
  int memset(Va a, uint8_t v, uint64_t size) { return gpusvm_rt_cmd_memset(get(), a, v, size); }
  int copy(Va dst, Va src, uint64_t size) { return gpusvm_rt_cmd_copy(get(), dst, src, size); }
  int store_strided(uint32_t flags, Va a, uint64_t stride, uint64_t count, uint64_t v, uint64_t inc) {
    return gpusvm_rt_cmd_store_strided(get(), flags, a, stride, count, v, inc);
  }
  int load_strided(uint32_t flags, Va a, uint64_t stride, uint64_t count, uint64_t v, uint64_t inc, Va sum = 0) {
    return gpusvm_rt_cmd_load_strided(get(), flags, a, stride, count, v, inc, sum);
  }
  int fence_write(Va a, uint64_t v) { return gpusvm_rt_cmd_fence_write(get(), a, v); }
};

// A temporary file (page-cache backed) to pread/pwrite and map with Context::mmap_file.
class File : public detail::Handle<gpusvm_rt_file, gpusvm_rt_file_destroy> {
 public:
  using Handle::Handle;
  int64_t pwrite(std::span<const std::byte> b, uint64_t off) const { return gpusvm_rt_file_pwrite(get(), b.data(), b.size(), off); }
  int64_t pread(std::span<std::byte> b, uint64_t off) const { return gpusvm_rt_file_pread(get(), b.data(), b.size(), off); }
};

class Context : public detail::Handle<gpusvm_rt_context, gpusvm_rt_context_destroy> {
 public:
  using Handle::Handle;
  static Result<Context> create(const Device& dev) {
    gpusvm_rt_context* c = nullptr;
    if (int rc = gpusvm_rt_context_create(dev.get(), 0, &c)) return Err{rc};
    return Context(c);
  }
  uint32_t vm_id() const { return gpusvm_rt_context_vm_id(get()); }
  Result<Va> malloc(size_t size) const { return out([&](Va* o) { return gpusvm_rt_malloc(get(), size, o); }); }
  Result<Va> calloc(size_t n, size_t size) const {
    return out([&](Va* o) { return gpusvm_rt_calloc(get(), n, size, o); });
  }
  Result<Va> aligned_alloc(size_t align, size_t size) const {
    return out([&](Va* o) { return gpusvm_rt_aligned_alloc(get(), align, size, o); });
  }
  Result<Va> realloc(Va p, size_t size) const {
    return out([&](Va* o) { return gpusvm_rt_realloc(get(), p, size, o); });
  }
  int free(Va p) const { return gpusvm_rt_free(get(), p); }
  Result<Va> mmap(size_t len, int prot, int flags, Va hint = 0) const {
    return out([&](Va* o) { return gpusvm_rt_mmap(get(), hint, len, prot, flags, o); });
  }
  Result<File> file_create(uint64_t size) const {
    gpusvm_rt_file* f = nullptr;
    if (int rc = gpusvm_rt_file_create(get(), size, &f)) return Err{rc};
    return File(f);
  }
  Result<Va> mmap_file(size_t len, int prot, int flags, const File& f, uint64_t offset = 0, Va hint = 0) const {
    return out([&](Va* o) { return gpusvm_rt_mmap_file(get(), hint, len, prot, flags, f.get(), offset, o); });
  }
  int munmap(Va a, size_t len) const { return gpusvm_rt_munmap(get(), a, len); }
  int mprotect(Va a, size_t len, int prot) const { return gpusvm_rt_mprotect(get(), a, len, prot); }
  int madvise_host(Va a, size_t len, int advice) const { return gpusvm_rt_madvise_host(get(), a, len, advice); }
  Result<Va> mremap(Va old, size_t old_len, size_t new_len, int flags, Va new_addr = 0) const {
    return out([&](Va* o) { return gpusvm_rt_mremap(get(), old, old_len, new_len, flags, new_addr, o); });
  }
  int write(Va dst, std::span<const std::byte> src) const { return gpusvm_rt_write(get(), dst, src.data(), src.size()); }
  int read(Va src, std::span<std::byte> dst) const { return gpusvm_rt_read(get(), src, dst.data(), dst.size()); }
  template <typename T>
  int write(Va dst, std::span<const T> v) const { return gpusvm_rt_write(get(), dst, v.data(), v.size_bytes()); }
  template <typename T>
  int read(Va src, std::span<T> v) const { return gpusvm_rt_read(get(), src, v.data(), v.size_bytes()); }
  template <typename T>
  Result<T> load(Va a) const {
    T v{};
    if (int rc = gpusvm_rt_read(get(), a, &v, sizeof(T))) return Err{rc};
    return v;
  }
  template <typename T>
  int store(Va a, T v) const { return gpusvm_rt_write(get(), a, &v, sizeof(T)); }
  int memset(Va a, int c, size_t len) const { return gpusvm_rt_memset(get(), a, c, len); }
  Result<uint64_t> atomic_fetch_add(Va a, uint64_t delta) const {
    uint64_t old = 0;
    if (int rc = gpusvm_rt_atomic_fetch_add(get(), a, delta, &old)) return Err{rc};
    return old;
  }
  Result<uint64_t> atomic_exchange(Va a, uint64_t v) const {
    uint64_t old = 0;
    if (int rc = gpusvm_rt_atomic_exchange(get(), a, v, &old)) return Err{rc};
    return old;
  }
  Result<uint64_t> atomic_cmpxchg(Va a, uint64_t expected, uint64_t desired) const {
    uint64_t old = 0;
    if (int rc = gpusvm_rt_atomic_cmpxchg(get(), a, expected, desired, &old)) return Err{rc};
    return old;
  }
  // Waits inside the call when `async` is false (then the returned Fence is empty).
  Result<Fence> prefetch(Va a, size_t len, uint32_t region, bool async = true) const {
    gpusvm_rt_fence* f = nullptr;
    if (int rc = gpusvm_rt_prefetch(get(), a, len, region, async ? &f : nullptr)) return Err{rc};
    return Fence(f);
  }
  int advise_preferred(Va a, size_t len, int32_t loc, uint16_t policy = 0) const {
    return gpusvm_rt_advise_preferred_location(get(), a, len, loc, policy);
  }
  int advise_atomic(Va a, size_t len, uint32_t policy) const { return gpusvm_rt_advise_atomic(get(), a, len, policy); }
  int advise_reset(Va a, size_t len) const { return gpusvm_rt_advise_reset(get(), a, len); }
  Result<std::vector<gpusvm_rt_range_attr>> attrs(Va a, size_t len) const {
    for (int attempt = 0; attempt < 16; ++attempt) {
      uint32_t n = 0;
      if (int rc = gpusvm_rt_query_attrs(get(), a, len, nullptr, 0, &n)) return Err{rc};
      std::vector<gpusvm_rt_range_attr> v(n);
      const int rc = gpusvm_rt_query_attrs(get(), a, len, v.data(), n, &n);
      if (rc == -ENOSPC) continue;
      if (rc) return Err{rc};
      v.resize(n);
      return v;
    }
    return Err{-EAGAIN};
  }
  Result<gpusvm_rt_residency> residency(Va a, size_t len) const {
    gpusvm_rt_residency r{};
    if (int rc = gpusvm_rt_query_residency(get(), a, len, &r)) return Err{rc};
    return r;
  }

 private:
  template <typename F>
  static Result<Va> out(F&& f) {
    Va v = 0;
    if (int rc = f(&v)) return Err{rc};
    return v;
  }
};

// A buffer object of a context's VM (runtime.h, "Buffer objects"). The destructor (reset())
// unbinds every binding, unmaps the CPU view and closes the GEM handle.
class Bo : public detail::Handle<gpusvm_rt_bo, gpusvm_rt_bo_destroy> {
 public:
  using Handle::Handle;
  static Result<Bo> create(const Context& ctx, uint64_t size,
                           uint32_t placement = GPUSVM_RT_BO_PLACEMENT_SYSTEM | GPUSVM_RT_BO_PLACEMENT_VRAM) {
    gpusvm_rt_bo* b = nullptr;
    if (int rc = gpusvm_rt_bo_create(ctx.get(), size, placement, &b)) return Err{rc};
    return Bo(b);
  }
  uint64_t size() const { return gpusvm_rt_bo_size(get()); }
  // len 0: the BO from bo_offset to its end.
  int bind(Va addr, uint64_t len = 0, uint64_t bo_offset = 0, uint32_t flags = 0) const {
    if (len == 0 && bo_offset <= size()) len = size() - bo_offset;
    return gpusvm_rt_bo_bind(get(), addr, bo_offset, len, flags);
  }
  int unbind(Va addr) const { return gpusvm_rt_bo_unbind(get(), addr); }
  Result<Va> mmap(int prot = PROT_READ | PROT_WRITE) const {
    Va v = 0;
    if (int rc = gpusvm_rt_bo_mmap(get(), prot, &v)) return Err{rc};
    return v;
  }
  int munmap() const { return gpusvm_rt_bo_munmap(get()); }
};

class Queue : public detail::Handle<gpusvm_rt_queue, gpusvm_rt_queue_destroy> {
 public:
  using Handle::Handle;
  static Result<Queue> create(const Context& ctx, uint32_t engine = 0) {
    gpusvm_rt_queue* q = nullptr;
    if (int rc = gpusvm_rt_queue_create(ctx.get(), engine, &q)) return Err{rc};
    return Queue(q);
  }
  Result<Fence> submit(const CmdBuf& cb) const {
    gpusvm_rt_fence* f = nullptr;
    if (int rc = gpusvm_rt_submit(get(), cb.get(), &f)) return Err{rc};
    return Fence(f);
  }
};

// A typed array in process memory (C++ new[]/delete[] of the process: malloc'd, freed by the
// destructor), read and written through host spans.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  static Result<Buffer> create(const Context& ctx, size_t n, size_t align = alignof(T) < 16 ? 16 : alignof(T)) {
    Result<Va> a = ctx.aligned_alloc(align, n * sizeof(T));
    if (!a) return Err{a.error()};
    return Buffer(ctx.get(), *a, n);
  }
  ~Buffer() {
    if (ctx_ && addr_) (void)gpusvm_rt_free(ctx_, addr_);
  }
  Buffer(Buffer&& o) noexcept
      : ctx_(std::exchange(o.ctx_, nullptr)), addr_(std::exchange(o.addr_, 0)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(ctx_, o.ctx_);
    std::swap(addr_, o.addr_);
    std::swap(n_, o.n_);
    return *this;
  }
  Va addr() const { return addr_; }
  Va addr(size_t i) const { return addr_ + i * sizeof(T); }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  int write(std::span<const T> v, size_t first = 0) const {
    return gpusvm_rt_write(ctx_, addr(first), v.data(), v.size_bytes());
  }
  int read(std::span<T> v, size_t first = 0) const { return gpusvm_rt_read(ctx_, addr(first), v.data(), v.size_bytes()); }
  Result<std::vector<T>> read_all() const {
    std::vector<T> v(n_);
    if (int rc = read(v)) return Err{rc};
    return v;
  }

 private:
  Buffer(gpusvm_rt_context* c, Va a, size_t n) : ctx_(c), addr_(a), n_(n) {}
  gpusvm_rt_context* ctx_ = nullptr;
  Va addr_ = 0;
  size_t n_ = 0;
};

// An allocator of process memory for containers whose elements live in the process (their
// pointer type is a process address, Ptr<T>; a host container cannot dereference it). It
// meets the allocator shape: allocate(n) / deallocate(p, n), equality by context.
template <typename T>
struct Ptr {
  Va addr = 0;
  Ptr operator+(size_t i) const { return Ptr{addr + i * sizeof(T)}; }
  bool operator==(const Ptr&) const = default;
};

template <typename T>
class Allocator {
 public:
  using value_type = T;
  using pointer = Ptr<T>;
  explicit Allocator(const Context& ctx) : ctx_(ctx.get()) {}
  template <typename U>
  Allocator(const Allocator<U>& o) : ctx_(o.context()) {}  // NOLINT: rebinding
  Result<pointer> allocate(size_t n) const {
    if (n > SIZE_MAX / sizeof(T)) return Err{-ENOMEM};
    Va a = 0;
    const size_t align = alignof(T) < 16 ? 16 : alignof(T);
    if (int rc = gpusvm_rt_aligned_alloc(ctx_, align, n * sizeof(T), &a)) return Err{rc};
    return pointer{a};
  }
  int deallocate(pointer p, size_t) const { return gpusvm_rt_free(ctx_, p.addr); }
  gpusvm_rt_context* context() const { return ctx_; }
  template <typename U>
  bool operator==(const Allocator<U>& o) const { return ctx_ == o.context(); }

 private:
  gpusvm_rt_context* ctx_;
};

}  // namespace gpusvm::rt
