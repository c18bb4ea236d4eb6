/*
 * gpusvm runtime: the allocator runtime a program of the simulated process links (DESIGN.md §7).
 *
 * C API. A program opens a refgpu device, creates a context (a fault-mode VM that mirrors the
 * whole CPU address space with one CPU_ADDR_MIRROR bind), allocates with gpusvm_rt_malloc /
 * mmap, advises and prefetches ranges, and submits command buffers whose data lives in that
 * memory. docs/runtime.md is the reference; runtime.hpp is the C++ wrapper.
 *
 * Conventions:
 *  - every call returns 0 or a negative errno (gpusvm_rt_strerror names it) and validates its
 *    arguments first; on failure nothing changed and no out-parameter was written;
 *  - nothing aborts the process: driver errors are returned as they are;
 *  - addresses (gpusvm_rt_va) are addresses of the simulated process, the same for the CPU
 *    and the GPU (the context mirrors the address space); host pointers (void *) are buffers
 *    of the calling program;
 *  - the runtime reaches the driver only through ioctl(2) on the device file, restarting a
 *    call interrupted with -EINTR or -EAGAIN as libdrm's drmIoctl does;
 *  - thread safety: devices, contexts, queues and fences may be used from many threads; a
 *    command buffer belongs to one thread at a time.
 */
#ifndef GPUSVM_RUNTIME_H
#define GPUSVM_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#if defined(__cplusplus)
extern "C" {
#endif

typedef uint64_t gpusvm_rt_va;

/* A simulated process (a gpusvm::devfs::Process; see runtime.hpp's rt::process()). */
typedef struct gpusvm_rt_process gpusvm_rt_process;
typedef struct gpusvm_rt_device gpusvm_rt_device;
typedef struct gpusvm_rt_context gpusvm_rt_context;
typedef struct gpusvm_rt_queue gpusvm_rt_queue;
typedef struct gpusvm_rt_fence gpusvm_rt_fence;
typedef struct gpusvm_rt_cmdbuf gpusvm_rt_cmdbuf;
typedef struct gpusvm_rt_file gpusvm_rt_file;
typedef struct gpusvm_rt_bo gpusvm_rt_bo;

/* "EINVAL: invalid argument"-style text for a negative errno returned by the runtime. */
const char *gpusvm_rt_strerror(int err);

/* ---------------------------------------------------------------------------------------
 * Devices: "/dev/refgpu<index>", found by opening the names in order (as a program scans
 * /dev/dri/renderD*).
 */
#define GPUSVM_RT_MAX_DEVICES 16

/* The number of refgpu devices the process can open (indices 0..count-1). */
int gpusvm_rt_device_count(gpusvm_rt_process *proc, uint32_t *count);
/* Opens device `index` and reads its configuration. -ENOENT: no such device. */
int gpusvm_rt_device_open(gpusvm_rt_process *proc, uint32_t index, gpusvm_rt_device **out);
/* Closes the device file. Every context of the device must be destroyed first (-EBUSY). */
int gpusvm_rt_device_close(gpusvm_rt_device *dev);

struct gpusvm_rt_device_info {
	uint32_t index;
	uint32_t va_bits;		/* GPU virtual address bits */
	uint64_t flags;			/* REFGPU_CONFIG_FLAG_* */
	uint64_t min_alignment;
	uint32_t num_engines;		/* compute engines: instances 0..num_engines-1 */
	uint32_t num_vram_regions;	/* VRAM region instances 1..num_vram_regions */
	uint64_t vram_size;		/* bytes of VRAM instance 1 (0 without VRAM) */
	uint64_t vram_used;		/* bytes allocated in it now */
	uint64_t sysmem_size;
	int32_t fd;			/* the device file (a devmem_fd for advice) */
	uint32_t pad;
};
int gpusvm_rt_device_get_info(gpusvm_rt_device *dev, struct gpusvm_rt_device_info *info);

/* Device statistics (REFGPU_DEVICE_QUERY_STATS, indices enum drm_refgpu_stat): fills up to
 * `capacity` values and writes the driver's count to *num_stats. */
int gpusvm_rt_device_stats(gpusvm_rt_device *dev, uint64_t *values, uint32_t capacity,
			   uint32_t *num_stats);
/* The name of statistic `index` ("faults_4k", "copy_bytes_to_vram"...: the enum's name in
 * lower case without REFGPU_STAT_; a "_us" suffix is microseconds, "_bytes" bytes), or NULL
 * for an index this runtime does not know (a newer driver's). */
const char *gpusvm_rt_device_stat_name(uint32_t index);

/* ---------------------------------------------------------------------------------------
 * Contexts: one fault-mode VM mirroring [0, CPU TASK_SIZE) with CPU_ADDR_MIRROR |
 * MADVISE_AUTORESET (what Intel's compute-runtime does for shared system allocations).
 * -EOPNOTSUPP: the device's VA bits cannot cover the CPU's address space, or it cannot
 * mirror (no REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR).
 */
int gpusvm_rt_context_create(gpusvm_rt_device *dev, uint32_t flags, gpusvm_rt_context **out);
/* Destroys the context: its heaps are unmapped, the VM is destroyed. Its queues, fences
 * and buffer objects must be destroyed first (-EBUSY). */
int gpusvm_rt_context_destroy(gpusvm_rt_context *ctx);
uint32_t gpusvm_rt_context_vm_id(const gpusvm_rt_context *ctx);

/* ---------------------------------------------------------------------------------------
 * Allocation in the process (the C library's malloc family on the process's mmap). Blocks
 * below GPUSVM_RT_MMAP_THRESHOLD come from 2 MiB arenas (first fit with coalescing), larger
 * ones are mappings of their own. free() of an arena block resets the advice of every page
 * the coalesced free space covers (madvise back to the defaults), since free need not unmap.
 * Alignment: 16 bytes (malloc), or `align` (a power of two).
 */
#define GPUSVM_RT_MMAP_THRESHOLD (256u << 10)

int gpusvm_rt_malloc(gpusvm_rt_context *ctx, size_t size, gpusvm_rt_va *out);
int gpusvm_rt_calloc(gpusvm_rt_context *ctx, size_t n, size_t size, gpusvm_rt_va *out);
int gpusvm_rt_aligned_alloc(gpusvm_rt_context *ctx, size_t align, size_t size, gpusvm_rt_va *out);
/* realloc(NULL) is malloc; realloc(p, 0) frees p and writes 0. On failure p is unchanged. */
int gpusvm_rt_realloc(gpusvm_rt_context *ctx, gpusvm_rt_va p, size_t size, gpusvm_rt_va *out);
/* free(0) is 0; a pointer the heap did not return is -EINVAL (a double free too). */
int gpusvm_rt_free(gpusvm_rt_context *ctx, gpusvm_rt_va p);
/* The usable size of an allocation (malloc_usable_size). */
int gpusvm_rt_alloc_size(gpusvm_rt_context *ctx, gpusvm_rt_va p, size_t *size);

/* mmap(2)-style mappings: prot PROT_*, flags MAP_PRIVATE/MAP_SHARED | MAP_ANONYMOUS (+
 * MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_POPULATE). Anonymous only. */
int gpusvm_rt_mmap(gpusvm_rt_context *ctx, gpusvm_rt_va hint, size_t len, int prot, int flags,
		   gpusvm_rt_va *out);
int gpusvm_rt_munmap(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len);
/* mremap(2): MREMAP_MAYMOVE, MREMAP_FIXED (new_addr), MREMAP_DONTUNMAP. */
int gpusvm_rt_mremap(gpusvm_rt_context *ctx, gpusvm_rt_va old_addr, size_t old_len, size_t new_len,
		     int flags, gpusvm_rt_va new_addr, gpusvm_rt_va *out);
/* Files: a temporary file of `size` bytes (open(O_TMPFILE) + ftruncate; page-cache backed),
 * read and written with pread/pwrite, mapped with gpusvm_rt_mmap_file (MAP_SHARED writes go
 * to the file, MAP_PRIVATE copies on write). The file lives until destroyed and unmapped. */
int gpusvm_rt_file_create(gpusvm_rt_context *ctx, uint64_t size, gpusvm_rt_file **out);
int gpusvm_rt_file_destroy(gpusvm_rt_file *file);
/* Return the bytes moved (>= 0) or a negative errno. */
int64_t gpusvm_rt_file_pwrite(gpusvm_rt_file *file, const void *buf, uint64_t len, uint64_t off);
int64_t gpusvm_rt_file_pread(gpusvm_rt_file *file, void *buf, uint64_t len, uint64_t off);
/* mmap(2) of a file: flags MAP_PRIVATE or MAP_SHARED (+ MAP_FIXED...), offset page aligned. */
int gpusvm_rt_mmap_file(gpusvm_rt_context *ctx, gpusvm_rt_va hint, size_t len, int prot, int flags,
			gpusvm_rt_file *file, uint64_t offset, gpusvm_rt_va *out);
/* mprotect(2). */
int gpusvm_rt_mprotect(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len, int prot);
/* madvise(2) of the host mm (MADV_HUGEPAGE, MADV_DONTNEED...), not the GPU advice below. */
int gpusvm_rt_madvise_host(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len, int advice);

/* CPU accesses of the process's memory (the program's loads and stores). */
int gpusvm_rt_write(gpusvm_rt_context *ctx, gpusvm_rt_va dst, const void *src, size_t len);
int gpusvm_rt_read(gpusvm_rt_context *ctx, gpusvm_rt_va src, void *dst, size_t len);
int gpusvm_rt_memset(gpusvm_rt_context *ctx, gpusvm_rt_va dst, int c, size_t len);

/* CPU atomics on a naturally aligned qword of process memory (a locked instruction: they
 * fault for write). Memory a running job reads or writes concurrently must be accessed with
 * these, not with gpusvm_rt_read/_write (plain accesses race with the device's). *old may be
 * NULL. */
int gpusvm_rt_atomic_fetch_add(gpusvm_rt_context *ctx, gpusvm_rt_va addr, uint64_t delta, uint64_t *old);
int gpusvm_rt_atomic_exchange(gpusvm_rt_context *ctx, gpusvm_rt_va addr, uint64_t value, uint64_t *old);
int gpusvm_rt_atomic_cmpxchg(gpusvm_rt_context *ctx, gpusvm_rt_va addr, uint64_t expected, uint64_t desired,
			     uint64_t *old);

/* ---------------------------------------------------------------------------------------
 * Placement. Ranges are [addr, addr + len); advice and prefetch work on the pages the range
 * touches (addr rounded down, the end rounded up to 4 KiB).
 */
#define GPUSVM_RT_REGION_SYSTEM		0u
#define GPUSVM_RT_REGION_PREFERRED	(~0u)	/* the madvised preferred location */

/* Migrates the range to memory region `region` (0 system memory, 1.. a VRAM instance, or
 * GPUSVM_RT_REGION_PREFERRED) and binds it (vm_bind PREFETCH). The fence signals when it
 * is done; *out may be NULL to wait inside the call. */
int gpusvm_rt_prefetch(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len, uint32_t region,
		       gpusvm_rt_fence **out);

#define GPUSVM_RT_LOCATION_DEVICE	0	/* this device's VRAM */
#define GPUSVM_RT_LOCATION_SYSTEM	(-1)	/* system memory */

/* Preferred location: GPUSVM_RT_LOCATION_* or the fd of another refgpu device;
 * migration_policy REFGPU_MIGRATE_ALL_PAGES / REFGPU_MIGRATE_ONLY_SYSTEM_PAGES. */
int gpusvm_rt_advise_preferred_location(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len,
					int32_t location, uint16_t migration_policy);
/* Atomic policy: REFGPU_ATOMIC_UNDEFINED / DEVICE / GLOBAL / CPU. */
int gpusvm_rt_advise_atomic(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len, uint32_t policy);
/* Both attributes back to the defaults (device, all pages, atomics undefined). */
int gpusvm_rt_advise_reset(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len);

struct gpusvm_rt_range_attr {
	gpusvm_rt_va start;
	gpusvm_rt_va end;
	int32_t preferred_location;	/* GPUSVM_RT_LOCATION_* or a device fd */
	uint32_t migration_policy;
	uint32_t atomic;
	uint32_t pad;
};
/* The attribute pieces the range overlaps (VM_QUERY_MEM_RANGE_ATTRS, retried while they
 * change): writes up to `capacity` of them and their number to *count; -ENOSPC (with *count
 * set) when capacity is too small. capacity 0 only counts. */
int gpusvm_rt_query_attrs(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len,
			  struct gpusvm_rt_range_attr *attrs, uint32_t capacity, uint32_t *count);

/* Where the pages of a range are, read from the process's page table (the
 * /proc/self/pagemap view: a device-private entry is a page in device memory). */
struct gpusvm_rt_residency {
	uint64_t pages;		/* pages in the range */
	uint64_t system;	/* present in system memory */
	uint64_t device;	/* in device memory (device-private entries) */
	uint64_t exclusive;	/* system pages a device holds for atomics */
	uint64_t none;		/* not populated (or swapped out) */
};
int gpusvm_rt_query_residency(gpusvm_rt_context *ctx, gpusvm_rt_va addr, size_t len,
			      struct gpusvm_rt_residency *out);

/* ---------------------------------------------------------------------------------------
 * Buffer objects (GEM): device memory objects of the context's VM, bound at GPU addresses
 * inside the mirror. A binding takes its window out of the mirror: jobs there see the BO's
 * bytes, the CPU keeps seeing the process's own memory (the CPU page table is untouched).
 * Unbinding gives the window back to the mirror: the GPU faults the process's memory there
 * again. Bind over memory the process owns (an overlay of malloc'd memory) or over an address
 * range it reserved (mmap PROT_NONE), so that no later mmap lands under the binding.
 */
#define GPUSVM_RT_BO_PLACEMENT_SYSTEM	(1u << 0)	/* system memory */
#define GPUSVM_RT_BO_PLACEMENT_VRAM	(1u << 1)	/* the device's VRAM (instance 1) */
#define GPUSVM_RT_BO_BIND_READONLY	(1u << 0)	/* GPU writes fault (the job fails) */

/* A BO of `size` bytes (a non-zero multiple of 4096) placed in `placement` (a non-empty set of
 * GPUSVM_RT_BO_PLACEMENT_*; VRAM needs a device with VRAM). It starts in VRAM when VRAM is
 * allowed (evicting other memory; with SYSTEM too it falls back to system memory when VRAM
 * stays full, else -ENOSPC), and may be evicted to system memory under pressure. Its bytes
 * start zero. */
int gpusvm_rt_bo_create(gpusvm_rt_context *ctx, uint64_t size, uint32_t placement, gpusvm_rt_bo **out);
/* Unbinds every binding (their windows go back to the mirror), unmaps the CPU view, closes
 * the GEM handle and frees the handle. The first error is returned (after the process or the
 * device went away: -EBADF, -ENODEV), the handle is freed in any case. */
int gpusvm_rt_bo_destroy(gpusvm_rt_bo *bo);
uint64_t gpusvm_rt_bo_size(const gpusvm_rt_bo *bo);
/* Binds BO bytes [bo_offset, bo_offset + len) at GPU address addr (all page aligned, len > 0,
 * inside the BO and below the CPU's TASK_SIZE; flags GPUSVM_RT_BO_BIND_*): -EINVAL otherwise,
 * or when the window overlaps another binding. -EBUSY: the GPU has mirrored pages in the
 * window now (it faulted or prefetched there; xe refuses the same way): bind before the GPU
 * touches the window. The binding is in place when the call returns. */
int gpusvm_rt_bo_bind(gpusvm_rt_bo *bo, gpusvm_rt_va addr, uint64_t bo_offset, uint64_t len, uint32_t flags);
/* Removes the binding that starts at addr (-EINVAL: no binding of this BO starts there); the
 * window goes back to the mirror (with the mirror's advice defaults). */
int gpusvm_rt_bo_unbind(gpusvm_rt_bo *bo, gpusvm_rt_va addr);
/* The CPU view: maps the whole BO MAP_SHARED into the process (GEM_MMAP_OFFSET, then mmap
 * of the device file), prot PROT_READ and/or PROT_WRITE. The model has no CPU-visible VRAM:
 * the BO moves to system memory and stays there from then on, so a BO without
 * GPUSVM_RT_BO_PLACEMENT_SYSTEM is -EINVAL. One mapping per BO (-EBUSY for a second). Read
 * and write it with gpusvm_rt_read/_write. */
int gpusvm_rt_bo_mmap(gpusvm_rt_bo *bo, int prot, gpusvm_rt_va *out);
/* Unmaps the CPU view (-EINVAL when not mapped). */
int gpusvm_rt_bo_munmap(gpusvm_rt_bo *bo);

/* ---------------------------------------------------------------------------------------
 * Command buffers: a host-side builder of the uapi ISA (uapi/refgpu.h). Each call checks its
 * arguments the way the device will (alignment, non-zero sizes, flag bits): -EINVAL, nothing
 * appended. gpusvm_rt_submit copies the commands into process memory and ends the batch.
 */
int gpusvm_rt_cmdbuf_create(gpusvm_rt_cmdbuf **out);
void gpusvm_rt_cmdbuf_destroy(gpusvm_rt_cmdbuf *cb);
void gpusvm_rt_cmdbuf_reset(gpusvm_rt_cmdbuf *cb);
size_t gpusvm_rt_cmdbuf_bytes(const gpusvm_rt_cmdbuf *cb);

int gpusvm_rt_cmd_store_dword(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va addr, uint32_t value);
int gpusvm_rt_cmd_store_qword(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va addr, uint64_t value);
/* flags: REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT; op REFGPU_UFENCE_WAIT_OP_*. */
int gpusvm_rt_cmd_load_compare(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va addr, uint16_t op, uint64_t value,
			       uint64_t mask, uint16_t flags);
/* aop REFGPU_ATOMIC_OP_*; flags REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN. */
int gpusvm_rt_cmd_atomic(gpusvm_rt_cmdbuf *cb, uint16_t aop, uint16_t flags, gpusvm_rt_va addr,
			 uint64_t operand, uint64_t compare, gpusvm_rt_va return_addr);
int gpusvm_rt_cmd_memset(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va addr, uint8_t value, uint64_t size);
int gpusvm_rt_cmd_copy(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va dst, gpusvm_rt_va src, uint64_t size);
int gpusvm_rt_cmd_store_strided(gpusvm_rt_cmdbuf *cb, uint32_t flags, gpusvm_rt_va addr,
				uint64_t stride, uint64_t count, uint64_t value, uint64_t increment);
/* flags REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_STRIDED_FLAG_CHECK | REFGPU_LOAD_STRIDED_FLAG_SUM. */
int gpusvm_rt_cmd_load_strided(gpusvm_rt_cmdbuf *cb, uint32_t flags, gpusvm_rt_va addr,
			       uint64_t stride, uint64_t count, uint64_t value, uint64_t increment,
			       gpusvm_rt_va sum_addr);
int gpusvm_rt_cmd_fence_write(gpusvm_rt_cmdbuf *cb, gpusvm_rt_va addr, uint64_t value);

/* ---------------------------------------------------------------------------------------
 * Exec queues, submission, fences.
 */
int gpusvm_rt_queue_create(gpusvm_rt_context *ctx, uint32_t engine, gpusvm_rt_queue **out);
/* Jobs still queued end with -ECANCELED; their fences stay valid. */
int gpusvm_rt_queue_destroy(gpusvm_rt_queue *q);

/* Runs `cb` (BATCH_END appended) on q. The fence signals when the job ended. */
int gpusvm_rt_submit(gpusvm_rt_queue *q, const gpusvm_rt_cmdbuf *cb, gpusvm_rt_fence **out);

/* Waits up to timeout_ns (relative; < 0 is the driver's bound). Returns 0 (the job
 * completed), -ETIME (still running), or the job's error: the negative errno of its GPU
 * fault (-EFAULT...) when the fault records name one, else -EIO (an ISA error or a failed
 * check; the record has no fault then). */
int gpusvm_rt_fence_wait(gpusvm_rt_fence *f, int64_t timeout_ns);
/* 1 while pending, else what gpusvm_rt_fence_wait returns. */
int gpusvm_rt_fence_status(gpusvm_rt_fence *f);

struct gpusvm_rt_job_error {
	int32_t error;		/* 0: the job completed */
	uint32_t has_fault;	/* 1: the fields below are the fault that failed it */
	gpusvm_rt_va address;	/* the faulting GPU VA */
	uint32_t access;	/* REFGPU_ACCESS_READ / WRITE / ATOMIC */
	uint32_t fault_type;	/* REFGPU_FAULT_TYPE_* */
};
/* The failure of a job whose fence signalled (-EBUSY while pending). */
int gpusvm_rt_fence_error(gpusvm_rt_fence *f, struct gpusvm_rt_job_error *out);
/* Waits (bounded) for the fence if still pending, then frees it and its batch. */
int gpusvm_rt_fence_destroy(gpusvm_rt_fence *f);

#if defined(__cplusplus)
}
#endif

#endif /* GPUSVM_RUNTIME_H */
