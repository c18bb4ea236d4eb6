// Command buffers, exec queues, submission and fences (runtime_internal.h's fence protocol).
#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "gpusvm/mm/cpu_access.h"
#include "runtime/runtime_internal.h"

using namespace gpusvm;

namespace gpusvm::rt {

uint64_t now_ns();
int page_span(uint64_t addr, uint64_t len, uint64_t* start, uint64_t* range);

namespace {

template <typename T>
int emit(gpusvm_rt_cmdbuf* cb, const T& cmd) {
  static_assert(sizeof(T) % 8 == 0);
  if (cb->dw.size() * 4 + sizeof(T) + 64 > REFGPU_MAX_BATCH_BYTES) return -E2BIG;
  const size_t at = cb->dw.size();
  cb->dw.resize(at + sizeof(T) / 4);
  std::memcpy(&cb->dw[at], &cmd, sizeof(T));
  return 0;
}

bool user_va(uint64_t a, uint64_t len) { return a + len >= a && a + len <= mm::kTaskSize; }

gpusvm_rt_fence* new_fence(gpusvm_rt_context* ctx, uint32_t queue_id, bool is_job, uint64_t extra_bytes) {
  auto* f = new (std::nothrow) gpusvm_rt_fence;
  if (!f) return nullptr;
  Result<mm::Va> slots = ctx->internal->alloc(16 + extra_bytes, 16);
  if (!slots) {
    delete f;
    return nullptr;
  }
  f->ctx = ctx;
  f->queue_id = queue_id;
  f->is_job = is_job;
  f->slots = *slots;
  f->seqno = ctx->seqno.fetch_add(1) + 1;
  const uint64_t zero[2] = {0, 0};
  if (mm::cpu::copy_in(ctx->mm(), f->slots, zero, sizeof(zero))) {
    (void)ctx->internal->free(f->slots);
    delete f;
    return nullptr;
  }
  ctx->fences.fetch_add(1);
  return f;
}

void drop_fence(gpusvm_rt_fence* f) {
  (void)f->ctx->internal->free(f->slots);
  f->ctx->fences.fetch_sub(1);
  delete f;
}

drm_refgpu_sync ufence_sync(const gpusvm_rt_fence* f) {
  drm_refgpu_sync s{};
  s.type = REFGPU_SYNC_TYPE_USER_FENCE;
  s.flags = REFGPU_SYNC_FLAG_SIGNAL;
  s.addr = f->slots;
  s.timeline_value = f->seqno;
  return s;
}

// The job's error from the VM's fault records: the newest failed fault of its queue taken
// after it was submitted. No such record: the job failed without a fault (-EIO).
gpusvm_rt_job_error job_error(gpusvm_rt_fence* f) {
  gpusvm_rt_job_error e{};
  e.error = -EIO;
  std::vector<drm_refgpu_fault_record> recs(256);
  drm_refgpu_fault_query q{};
  q.vm_id = f->ctx->vm_id;
  q.num_faults = static_cast<uint32_t>(recs.size());
  q.faults = uptr(recs.data());
  if (f->ctx->io(DRM_IOCTL_REFGPU_FAULT_QUERY, &q)) return e;
  for (uint32_t i = q.num_faults; i-- > 0;) {
    const drm_refgpu_fault_record& r = recs[i];
    if (r.exec_queue_id != f->queue_id || r.status == 0 || r.timestamp_ns < f->submit_ns) continue;
    e.error = r.status;
    e.has_fault = 1;
    e.address = r.address;
    e.access = r.access;
    e.fault_type = r.fault_type;
    break;
  }
  return e;
}

// Reads the fence's slots; once done, settles its status (one thread writes err).
int settle(gpusvm_rt_fence* f) {
  const int st = f->status.load(std::memory_order_acquire);
  if (st != 1) return st;
  // `done` first: the driver writes it (a CPU store, under the page's PTE lock, as this read
  // is) after the job ended, so once it holds the seqno the device's FENCE_WRITE of `ok` is
  // complete and visible. Reading `ok` before that would race with the device's store.
  Result<uint64_t> done = mm::cpu::load<uint64_t>(f->ctx->mm(), f->slots);
  if (!done) return done.error();
  if (*done != f->seqno) return 1;
  gpusvm_rt_job_error e{};
  if (f->is_job) {
    Result<uint64_t> ok = mm::cpu::load<uint64_t>(f->ctx->mm(), f->slots + 8);
    if (!ok) return ok.error();
    if (*ok != f->seqno) e = job_error(f);
  }
  // Concurrent settlers compute the same answer; the first publishes it.
  static Mutex settle_lock(&kRtFenceLockClass);
  MutexLock l(&settle_lock);
  if (f->status.load(std::memory_order_relaxed) == 1) {
    f->err = e;
    f->status.store(e.error, std::memory_order_release);
  }
  return f->status.load(std::memory_order_relaxed);
}

}  // namespace
}  // namespace gpusvm::rt

extern "C" {

int gpusvm_rt_cmdbuf_create(gpusvm_rt_cmdbuf** out) {
  if (!out) return -EINVAL;
  auto* cb = new (std::nothrow) gpusvm_rt_cmdbuf;
  if (!cb) return -ENOMEM;
  *out = cb;
  return 0;
}

void gpusvm_rt_cmdbuf_destroy(gpusvm_rt_cmdbuf* cb) { delete cb; }
void gpusvm_rt_cmdbuf_reset(gpusvm_rt_cmdbuf* cb) {
  if (cb) cb->dw.clear();
}
size_t gpusvm_rt_cmdbuf_bytes(const gpusvm_rt_cmdbuf* cb) { return cb ? cb->dw.size() * 4 : 0; }

int gpusvm_rt_cmd_store_dword(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va addr, uint32_t value) {
  if (!cb || addr % 4 || !rt::user_va(addr, 4)) return -EINVAL;
  refgpu_cmd_store_dword c{REFGPU_CMD_HEADER(REFGPU_OP_STORE_DWORD, 4), value, addr};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_store_qword(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va addr, uint64_t value) {
  if (!cb || addr % 8 || !rt::user_va(addr, 8)) return -EINVAL;
  refgpu_cmd_store_qword c{REFGPU_CMD_HEADER(REFGPU_OP_STORE_QWORD, 6), 0, addr, value};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_load_compare(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va addr, uint16_t op, uint64_t value, uint64_t mask,
                               uint16_t flags) {
  const bool q = flags & REFGPU_CMD_FLAG_QWORD;
  if (!cb || op > REFGPU_UFENCE_WAIT_OP_LTE || (flags & ~(REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT)) ||
      addr % (q ? 8 : 4) || !rt::user_va(addr, q ? 8 : 4))
    return -EINVAL;
  refgpu_cmd_load_compare c{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_COMPARE, 10), op, flags, addr, value, mask, 0};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_atomic(gpusvm_rt_cmdbuf* cb, uint16_t aop, uint16_t flags, gpusvm_rt_va addr, uint64_t operand,
                         uint64_t compare, gpusvm_rt_va return_addr) {
  const bool q = flags & REFGPU_CMD_FLAG_QWORD;
  const unsigned sz = q ? 8 : 4;
  const bool ret = flags & REFGPU_ATOMIC_FLAG_RETURN;
  if (!cb || aop > REFGPU_ATOMIC_OP_CMPXCHG || (flags & ~(REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN)) ||
      addr % sz || !rt::user_va(addr, sz) ||
      (ret ? (!return_addr || return_addr % sz || !rt::user_va(return_addr, sz)) : return_addr))
    return -EINVAL;
  refgpu_cmd_atomic c{REFGPU_CMD_HEADER(REFGPU_OP_ATOMIC, 10), aop, flags, addr, operand, compare, return_addr};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_memset(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va addr, uint8_t value, uint64_t size) {
  if (!cb || !size || !rt::user_va(addr, size)) return -EINVAL;
  refgpu_cmd_memset c{REFGPU_CMD_HEADER(REFGPU_OP_MEMSET, 6), value, addr, size};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_copy(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va dst, gpusvm_rt_va src, uint64_t size) {
  if (!cb || !size || !rt::user_va(dst, size) || !rt::user_va(src, size)) return -EINVAL;
  if (dst < src + size && src < dst + size) return -EINVAL;  // the device refuses overlap
  refgpu_cmd_copy c{REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8), 0, dst, src, size};
  return rt::emit(cb, c);
}

namespace {
int strided_check(gpusvm_rt_cmdbuf* cb, uint32_t flags, uint32_t allowed, gpusvm_rt_va addr, uint64_t stride,
                  uint64_t count) {
  const unsigned sz = (flags & REFGPU_CMD_FLAG_QWORD) ? 8 : 4;
  if (!cb || (flags & ~allowed) || !count || stride % sz || addr % sz) return -EINVAL;
  const uint64_t span = stride * (count - 1);
  if (stride && span / stride != count - 1) return -EINVAL;
  if (!rt::user_va(addr, span) || !rt::user_va(addr + span, sz)) return -EINVAL;
  return 0;
}
}  // namespace

int gpusvm_rt_cmd_store_strided(gpusvm_rt_cmdbuf* cb, uint32_t flags, gpusvm_rt_va addr, uint64_t stride,
                                uint64_t count, uint64_t value, uint64_t increment) {
  if (int rc = strided_check(cb, flags, REFGPU_CMD_FLAG_QWORD, addr, stride, count)) return rc;
  refgpu_cmd_store_strided c{REFGPU_CMD_HEADER(REFGPU_OP_STORE_STRIDED, 12), flags, addr, stride, count, value,
                             increment};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_load_strided(gpusvm_rt_cmdbuf* cb, uint32_t flags, gpusvm_rt_va addr, uint64_t stride,
                               uint64_t count, uint64_t value, uint64_t increment, gpusvm_rt_va sum_addr) {
  const uint32_t allowed = REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM;
  if (int rc = strided_check(cb, flags, allowed, addr, stride, count)) return rc;
  const bool sum = flags & REFGPU_LOAD_STRIDED_FLAG_SUM;
  if (sum ? (!sum_addr || sum_addr % 8 || !rt::user_va(sum_addr, 8)) : sum_addr != 0) return -EINVAL;
  refgpu_cmd_load_strided c{REFGPU_CMD_HEADER(REFGPU_OP_LOAD_STRIDED, 14), flags, addr, stride, count, value,
                            increment, sum_addr};
  return rt::emit(cb, c);
}

int gpusvm_rt_cmd_fence_write(gpusvm_rt_cmdbuf* cb, gpusvm_rt_va addr, uint64_t value) {
  if (!cb || addr % 8 || !rt::user_va(addr, 8)) return -EINVAL;
  refgpu_cmd_fence_write c{REFGPU_CMD_HEADER(REFGPU_OP_FENCE_WRITE, 6), 0, addr, value};
  return rt::emit(cb, c);
}

int gpusvm_rt_queue_create(gpusvm_rt_context* ctx, uint32_t engine, gpusvm_rt_queue** out) {
  if (!ctx || !out) return -EINVAL;
  drm_refgpu_engine_class_instance inst{REFGPU_ENGINE_CLASS_COMPUTE, static_cast<uint16_t>(engine), 0, 0};
  if (engine > 0xffff) return -EINVAL;
  drm_refgpu_exec_queue_create c{};
  c.width = 1;
  c.num_placements = 1;
  c.vm_id = ctx->vm_id;
  c.instances = rt::uptr(&inst);
  auto* q = new (std::nothrow) gpusvm_rt_queue;
  if (!q) return -ENOMEM;
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE, &c)) {
    delete q;
    return rc;
  }
  q->ctx = ctx;
  q->id = c.exec_queue_id;
  ctx->queues.fetch_add(1);
  *out = q;
  return 0;
}

int gpusvm_rt_queue_destroy(gpusvm_rt_queue* q) {
  if (!q) return -EINVAL;
  drm_refgpu_exec_queue_destroy d{};
  d.exec_queue_id = q->id;
  const int rc = q->ctx->io(DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY, &d);
  // -EINVAL/-ENOENT would be a runtime bug; anything else (-EBADF, -ENODEV: the file or the
  // device is gone with its queues) still ends the handle.
  q->ctx->queues.fetch_sub(1);
  delete q;
  return rc;
}

int gpusvm_rt_submit(gpusvm_rt_queue* q, const gpusvm_rt_cmdbuf* cb, gpusvm_rt_fence** out) {
  if (!q || !cb || !out) return -EINVAL;
  gpusvm_rt_context* ctx = q->ctx;
  // The batch: the caller's commands, then FENCE_WRITE of the ok slot and BATCH_END.
  std::vector<uint32_t> dw = cb->dw;
  gpusvm_rt_fence* f = rt::new_fence(ctx, q->id, true, dw.size() * 4 + sizeof(refgpu_cmd_fence_write) +
                                                           sizeof(refgpu_cmd_batch_end));
  if (!f) return -ENOMEM;
  refgpu_cmd_fence_write fw{REFGPU_CMD_HEADER(REFGPU_OP_FENCE_WRITE, 6), 0, f->slots + 8, f->seqno};
  refgpu_cmd_batch_end end{REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2), 0};
  const size_t at = dw.size();
  dw.resize(at + (sizeof(fw) + sizeof(end)) / 4);
  std::memcpy(&dw[at], &fw, sizeof(fw));
  std::memcpy(&dw[at + sizeof(fw) / 4], &end, sizeof(end));
  const mm::Va batch = f->slots + 16;
  if (int rc = mm::cpu::copy_in(ctx->mm(), batch, dw.data(), dw.size() * 4)) {
    rt::drop_fence(f);
    return rc;
  }
  drm_refgpu_sync sync = rt::ufence_sync(f);
  drm_refgpu_exec e{};
  e.exec_queue_id = q->id;
  e.num_syncs = 1;
  e.syncs = rt::uptr(&sync);
  e.address = batch;
  e.num_batch_buffer = 1;
  f->submit_ns = rt::now_ns();
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_EXEC, &e)) {
    rt::drop_fence(f);
    return rc;
  }
  *out = f;
  return 0;
}

int gpusvm_rt_prefetch(gpusvm_rt_context* ctx, gpusvm_rt_va addr, size_t len, uint32_t region, gpusvm_rt_fence** out) {
  if (!ctx) return -EINVAL;
  uint64_t s, r;
  if (int rc = rt::page_span(addr, len, &s, &r)) return rc;
  if (region != GPUSVM_RT_REGION_PREFERRED && region > ctx->dev->config.num_mem_regions) return -EINVAL;
  gpusvm_rt_fence* f = rt::new_fence(ctx, 0, false, 0);
  if (!f) return -ENOMEM;
  drm_refgpu_sync sync = rt::ufence_sync(f);
  drm_refgpu_vm_bind b{};
  b.vm_id = ctx->vm_id;
  b.num_binds = 1;
  b.num_syncs = 1;
  b.syncs = rt::uptr(&sync);
  b.bind.op = REFGPU_VM_BIND_OP_PREFETCH;
  b.bind.addr = s;
  b.bind.range = r;
  b.bind.prefetch_mem_region_instance = region == GPUSVM_RT_REGION_PREFERRED ? REFGPU_CONSULT_MEM_ADVISE_PREF_LOC : region;
  f->submit_ns = rt::now_ns();
  if (int rc = ctx->io(DRM_IOCTL_REFGPU_VM_BIND, &b)) {
    rt::drop_fence(f);
    return rc;
  }
  if (out) {
    *out = f;
    return 0;
  }
  const int rc = gpusvm_rt_fence_wait(f, -1);
  rt::drop_fence(f);
  return rc;
}

int gpusvm_rt_fence_wait(gpusvm_rt_fence* f, int64_t timeout_ns) {
  if (!f) return -EINVAL;
  int st = rt::settle(f);
  if (st != 1) return st;
  drm_refgpu_wait_user_fence w{};
  w.addr = f->slots;
  w.op = REFGPU_UFENCE_WAIT_OP_EQ;
  w.value = f->seqno;
  w.mask = ~0ull;
  w.timeout = timeout_ns;
  // exec_queue_id 0: the driver writes the user fence whatever the job's status, and the
  // fence's own slots tell a failure apart (a queue's ban would end waits of later jobs too).
  const int rc = f->ctx->io(DRM_IOCTL_REFGPU_WAIT_USER_FENCE, &w);
  if (rc && rc != -ETIME) return rc;
  st = rt::settle(f);
  return st == 1 ? -ETIME : st;
}

int gpusvm_rt_fence_status(gpusvm_rt_fence* f) {
  if (!f) return -EINVAL;
  return rt::settle(f);
}

int gpusvm_rt_fence_error(gpusvm_rt_fence* f, gpusvm_rt_job_error* out) {
  if (!f || !out) return -EINVAL;
  if (rt::settle(f) == 1) return -EBUSY;
  *out = f->err;
  return 0;
}

int gpusvm_rt_fence_destroy(gpusvm_rt_fence* f) {
  if (!f) return -EINVAL;
  int st = gpusvm_rt_fence_wait(f, -1);
  if (st == -ETIME) return -EBUSY;  // the job never ended: keep its memory (and the fence)
  rt::drop_fence(f);
  return 0;
}

}  // extern "C"
