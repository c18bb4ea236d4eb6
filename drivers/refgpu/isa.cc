#include "drivers/refgpu/isa.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "uapi/refgpu.h"

namespace gpusvm::refgpu {

namespace {

// One job's view of memory: page-chunked, faulting, replaying accesses.
class MemPort {
 public:
  explicit MemPort(JobContext& ctx) : ctx_(ctx) {}

  // Calls fn(host, n, done) for consecutive chunks of [va, va + len), each within one leaf,
  // with the access lock held shared. Returns 0 or the job's error.
  template <typename Fn>
  int access(uint64_t va, uint64_t len, Access acc, Fn&& fn) {
    uint64_t done = 0;
    unsigned replays = 0;
    while (done < len) {
      FaultType type = FaultType::kNotPresent;
      int r;
      {
        ReadLock a(&ctx_.mmu->tlb().access_lock());
        Translation t;
        r = ctx_.mmu->translate(va + done, acc, &t, &type);
        if (r == 0) {
          const uint64_t n = std::min(len - done, t.len);
          fn(t.host, n, done);
          done += n;
          replays = 0;
          continue;
        }
      }
      if (r != -EFAULT) return r;
      // The fault: no lock held from here until the replay.
      if (!ctx_.faults || replays >= kMaxReplays) return -EFAULT;
      if (ctx_.stats) ctx_.stats->faults.add();
      GpuFault f;
      f.vm_id = ctx_.mmu->vm_id();
      f.exec_queue_id = ctx_.exec_queue_id;
      f.engine = ctx_.engine;
      f.address = va + done;
      f.access = acc;
      f.type = type;
      r = ctx_.faults->raise(f);
      if (r < 0) return r;
      replays++;
      if (ctx_.stats) ctx_.stats->replays.add();
    }
    return 0;
  }

  int read(uint64_t va, void* out, uint64_t len) {
    auto* o = static_cast<std::byte*>(out);
    return access(va, len, Access::kRead, [&](std::byte* p, uint64_t n, uint64_t done) {
      copy_out(o + done, p, n);
    });
  }

  // Aligned single-copy-atomic word load / store (the caller checked the alignment).
  // relaxed: a device access orders nothing by itself (FENCE_WRITE does); LOAD_COMPARE's
  // loads are acquire (a satisfied semaphore wait orders what the batch does after it).
  template <typename T>
  int load(uint64_t va, T* v, std::memory_order order = std::memory_order_relaxed) {
    return access(va, sizeof(T), Access::kRead, [&](std::byte* p, uint64_t, uint64_t) {
      *v = std::atomic_ref<T>(*reinterpret_cast<T*>(p)).load(order);
    });
  }
  template <typename T>
  int store(uint64_t va, T v, Access acc = Access::kWrite) {
    return access(va, sizeof(T), acc, [&](std::byte* p, uint64_t, uint64_t) {
      std::atomic_ref<T>(*reinterpret_cast<T*>(p)).store(v, std::memory_order_relaxed);  // see load
    });
  }

  static void copy_out(std::byte* dst, std::byte* src, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)  // relaxed byte loads: see load()
      dst[i] = std::atomic_ref<std::byte>(src[i]).load(std::memory_order_relaxed);
  }
  static void copy_in(std::byte* dst, const std::byte* src, uint64_t n) {
    uint64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 7); i++)
      std::atomic_ref<std::byte>(dst[i]).store(src[i], std::memory_order_relaxed);
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      std::memcpy(&w, src + i, 8);
      std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(dst + i)).store(w, std::memory_order_relaxed);
    }
    for (; i < n; i++) std::atomic_ref<std::byte>(dst[i]).store(src[i], std::memory_order_relaxed);
  }

 private:
  JobContext& ctx_;
};

bool compare(uint32_t op, uint64_t a, uint64_t b, bool* ok) {
  *ok = true;
  switch (op) {
    case REFGPU_UFENCE_WAIT_OP_EQ: return a == b;
    case REFGPU_UFENCE_WAIT_OP_NEQ: return a != b;
    case REFGPU_UFENCE_WAIT_OP_GT: return a > b;
    case REFGPU_UFENCE_WAIT_OP_GTE: return a >= b;
    case REFGPU_UFENCE_WAIT_OP_LT: return a < b;
    case REFGPU_UFENCE_WAIT_OP_LTE: return a <= b;
  }
  *ok = false;
  return false;
}

int aborted(const JobContext& ctx) {
  // relaxed: a best-effort stop request, checked between instructions.
  return ctx.abort ? std::min(0, ctx.abort->load(std::memory_order_relaxed)) : 0;
}

// Loads a dword or qword (flags & REFGPU_CMD_FLAG_QWORD) at an aligned va.
int load_word(MemPort& m, uint64_t va, bool qword, uint64_t* v,
              std::memory_order order = std::memory_order_relaxed) {
  if (va % (qword ? 8 : 4)) return -EINVAL;
  if (qword) return m.load<uint64_t>(va, v, order);
  uint32_t d = 0;
  const int r = m.load<uint32_t>(va, &d, order);
  *v = d;
  return r;
}

int store_word(MemPort& m, uint64_t va, bool qword, uint64_t v) {
  if (va % (qword ? 8 : 4)) return -EINVAL;
  return qword ? m.store<uint64_t>(va, v) : m.store<uint32_t>(va, static_cast<uint32_t>(v));
}

class Interpreter {
 public:
  Interpreter(JobContext& ctx) : ctx_(ctx), m_(ctx) {}

  int run(uint64_t pc) {
    if (pc % 8) return -EINVAL;
    const uint64_t start = pc;
    for (;;) {
      if (int a = aborted(ctx_)) return a;
      if (pc - start >= REFGPU_MAX_BATCH_BYTES) return -E2BIG;
      uint32_t hdr = 0;
      if (int r = m_.read(pc, &hdr, sizeof(hdr))) return r;
      const uint32_t op = REFGPU_CMD_OPCODE(hdr);
      const uint32_t ndw = REFGPU_CMD_LENGTH(hdr);
      const uint32_t want = expected_length(op);
      if (want == 0 || ndw != want) return -ENOEXEC;
      alignas(8) std::byte buf[64] = {};
      if (int r = m_.read(pc, buf, ndw * 4u)) return r;
      if (ctx_.stats) ctx_.stats->instructions.add();
      if (op == REFGPU_OP_BATCH_END) return 0;
      if (int r = exec(op, buf)) return r;
      pc += ndw * 4u;
    }
  }

 private:
  static uint32_t expected_length(uint32_t op) {
    switch (op) {
      case REFGPU_OP_BATCH_END: return sizeof(refgpu_cmd_batch_end) / 4;
      case REFGPU_OP_STORE_DWORD: return sizeof(refgpu_cmd_store_dword) / 4;
      case REFGPU_OP_STORE_QWORD: return sizeof(refgpu_cmd_store_qword) / 4;
      case REFGPU_OP_LOAD_COMPARE: return sizeof(refgpu_cmd_load_compare) / 4;
      case REFGPU_OP_ATOMIC: return sizeof(refgpu_cmd_atomic) / 4;
      case REFGPU_OP_MEMSET: return sizeof(refgpu_cmd_memset) / 4;
      case REFGPU_OP_COPY: return sizeof(refgpu_cmd_copy) / 4;
      case REFGPU_OP_STORE_STRIDED: return sizeof(refgpu_cmd_store_strided) / 4;
      case REFGPU_OP_LOAD_STRIDED: return sizeof(refgpu_cmd_load_strided) / 4;
      case REFGPU_OP_FENCE_WRITE: return sizeof(refgpu_cmd_fence_write) / 4;
    }
    return 0;
  }

  template <typename T>
  static T as(const std::byte* buf) {
    T c;
    std::memcpy(&c, buf, sizeof(c));
    return c;
  }

  int exec(uint32_t op, const std::byte* buf) {
    switch (op) {
      case REFGPU_OP_STORE_DWORD: {
        auto c = as<refgpu_cmd_store_dword>(buf);
        return store_word(m_, c.addr, false, c.value);
      }
      case REFGPU_OP_STORE_QWORD: {
        auto c = as<refgpu_cmd_store_qword>(buf);
        if (c.pad) return -EINVAL;
        return store_word(m_, c.addr, true, c.value);
      }
      case REFGPU_OP_LOAD_COMPARE: return load_compare(as<refgpu_cmd_load_compare>(buf));
      case REFGPU_OP_ATOMIC: return atomic(as<refgpu_cmd_atomic>(buf));
      case REFGPU_OP_MEMSET: return memset(as<refgpu_cmd_memset>(buf));
      case REFGPU_OP_COPY: return copy(as<refgpu_cmd_copy>(buf));
      case REFGPU_OP_STORE_STRIDED: return store_strided(as<refgpu_cmd_store_strided>(buf));
      case REFGPU_OP_LOAD_STRIDED: return load_strided(as<refgpu_cmd_load_strided>(buf));
      case REFGPU_OP_FENCE_WRITE: return fence_write(as<refgpu_cmd_fence_write>(buf));
    }
    return -ENOEXEC;
  }

  int load_compare(const refgpu_cmd_load_compare& c) {
    if (c.pad || (c.flags & ~(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT))) return -EINVAL;
    const bool qword = c.flags & REFGPU_CMD_FLAG_QWORD;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(REFGPU_LOAD_COMPARE_WAIT_MS);
    for (;;) {
      uint64_t v = 0;
      // acquire: like a GPU semaphore wait, a satisfied compare orders the batch's later
      // accesses after the write it saw (a CPU or another job releasing the flag).
      if (int r = load_word(m_, c.addr, qword, &v, std::memory_order_acquire)) return r;
      bool ok_op = false;
      const bool holds = compare(c.op, v & c.mask, c.value & c.mask, &ok_op);
      if (!ok_op) return -EINVAL;
      if (holds) return 0;
      if (!(c.flags & REFGPU_LOAD_COMPARE_FLAG_WAIT)) return -EBADMSG;
      if (int a = aborted(ctx_)) return a;
      if (std::chrono::steady_clock::now() > deadline) return -ETIME;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  int atomic(const refgpu_cmd_atomic& c) {
    if (c.flags & ~(REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN)) return -EINVAL;
    if (c.aop > REFGPU_ATOMIC_OP_CMPXCHG) return -EINVAL;
    const bool qword = c.flags & REFGPU_CMD_FLAG_QWORD;
    const bool ret = c.flags & REFGPU_ATOMIC_FLAG_RETURN;
    if (c.addr % (qword ? 8 : 4) || (!ret && c.return_addr)) return -EINVAL;
    if (ret && c.return_addr % (qword ? 8 : 4)) return -EINVAL;
    uint64_t old = 0;
    const int r = m_.access(c.addr, qword ? 8 : 4, Access::kAtomic, [&](std::byte* p, uint64_t, uint64_t) {
      old = qword ? rmw<uint64_t>(p, c) : rmw<uint32_t>(p, c);
    });
    if (r) return r;
    return ret ? store_word(m_, c.return_addr, qword, old) : 0;
  }

  template <typename T>
  static uint64_t rmw(std::byte* p, const refgpu_cmd_atomic& c) {
    std::atomic_ref<T> a(*reinterpret_cast<T*>(p));
    // seq_cst: device atomics are the synchronisation points programs build on.
    switch (c.aop) {
      case REFGPU_ATOMIC_OP_INC: return a.fetch_add(1);
      case REFGPU_ATOMIC_OP_ADD: return a.fetch_add(static_cast<T>(c.operand));
      default: {
        T expected = static_cast<T>(c.compare);
        a.compare_exchange_strong(expected, static_cast<T>(c.operand));
        return expected;
      }
    }
  }

  int memset(const refgpu_cmd_memset& c) {
    if (c.value & ~0xffu || c.size == 0) return -EINVAL;
    if (c.addr + c.size < c.addr) return -EINVAL;
    std::byte chunk[4096];
    std::memset(chunk, static_cast<int>(c.value), sizeof(chunk));
    return m_.access(c.addr, c.size, Access::kWrite, [&](std::byte* p, uint64_t n, uint64_t) {
      for (uint64_t off = 0; off < n; off += sizeof(chunk))
        MemPort::copy_in(p + off, chunk, std::min<uint64_t>(sizeof(chunk), n - off));
    });
  }

  int copy(const refgpu_cmd_copy& c) {
    if (c.pad || c.size == 0 || c.src + c.size < c.src || c.dst + c.size < c.dst) return -EINVAL;
    if (c.src < c.dst + c.size && c.dst < c.src + c.size) return -EINVAL;
    std::byte bounce[4096];
    for (uint64_t off = 0; off < c.size; off += sizeof(bounce)) {
      const uint64_t n = std::min<uint64_t>(sizeof(bounce), c.size - off);
      if (int r = m_.read(c.src + off, bounce, n)) return r;
      const int r = m_.access(c.dst + off, n, Access::kWrite, [&](std::byte* p, uint64_t k, uint64_t done) {
        MemPort::copy_in(p, bounce + done, k);
      });
      if (r) return r;
      if (ctx_.stats) {
        ctx_.stats->bytes_read.add(n);
        ctx_.stats->bytes_written.add(n);
      }
    }
    return 0;
  }

  int store_strided(const refgpu_cmd_store_strided& c) {
    if (c.flags & ~REFGPU_CMD_FLAG_QWORD) return -EINVAL;
    const bool qword = c.flags & REFGPU_CMD_FLAG_QWORD;
    if (c.count == 0 || c.stride % (qword ? 8 : 4)) return -EINVAL;
    for (uint64_t i = 0; i < c.count; i++) {
      if (int a = aborted(ctx_)) return a;
      if (int r = store_word(m_, c.addr + i * c.stride, qword, c.value + i * c.increment)) return r;
    }
    return 0;
  }

  int load_strided(const refgpu_cmd_load_strided& c) {
    const uint32_t known = REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM;
    if (c.flags & ~known) return -EINVAL;
    const bool qword = c.flags & REFGPU_CMD_FLAG_QWORD;
    const bool sum = c.flags & REFGPU_LOAD_STRIDED_FLAG_SUM;
    if (c.count == 0 || c.stride % (qword ? 8 : 4) || (!sum && c.sum_addr) || (sum && c.sum_addr % 8))
      return -EINVAL;
    const uint64_t mask = qword ? ~0ull : 0xffffffffull;
    uint64_t total = 0;
    for (uint64_t i = 0; i < c.count; i++) {
      if (int a = aborted(ctx_)) return a;
      uint64_t v = 0;
      if (int r = load_word(m_, c.addr + i * c.stride, qword, &v)) return r;
      if ((c.flags & REFGPU_LOAD_STRIDED_FLAG_CHECK) && v != ((c.value + i * c.increment) & mask))
        return -EBADMSG;
      total += v;
    }
    return sum ? store_word(m_, c.sum_addr, true, total) : 0;
  }

  int fence_write(const refgpu_cmd_fence_write& c) {
    if (c.pad || c.addr % 8) return -EINVAL;
    // Everything the batch wrote before is visible to whoever sees the fence value: the
    // release fence orders the earlier relaxed stores before the release store.
    std::atomic_thread_fence(std::memory_order_release);
    const int r = m_.access(c.addr, 8, Access::kWrite, [&](std::byte* p, uint64_t, uint64_t) {
      std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(p)).store(c.value, std::memory_order_release);
    });
    if (r == 0 && ctx_.on_fence_write) ctx_.on_fence_write();
    return r;
  }

  JobContext& ctx_;
  MemPort m_;
};

}  // namespace

int execute_batch(JobContext& ctx, uint64_t batch_va) {
  Interpreter it(ctx);
  return it.run(batch_va);
}

}  // namespace gpusvm::refgpu
