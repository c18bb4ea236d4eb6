/*
 * refgpu: the reference GPU's ioctl interface and device command stream (ISA).
 *
 * C only: C and C++ programs both include this header. The calls follow the shapes and
 * semantics of Intel Xe's include/uapi/drm/xe_drm.h (device query, vm_create/destroy,
 * vm_bind with an op array, madvise, the range-attribute query, exec queues, exec with syncs,
 * wait on a user fence), so a reader of xe_drm.h recognises each of them. Request numbers
 * are built with libdrm's drm.h macros (DRM_IOW/DRM_IOWR(DRM_COMMAND_BASE + n, ...)).
 *
 * Conventions of every struct:
 *  - explicit sizes only (__u8.. __u64, __s32, __s64), no implicit padding: every struct is a
 *    multiple of 8 bytes and every pad is named;
 *  - @extensions: the first field of every top-level argument; a user pointer to a chain of
 *    extension structs. No extension is defined yet: it must be 0 (-EINVAL otherwise);
 *  - @pad and @reserved fields must be zero on input (-EINVAL otherwise) and are written as
 *    zero on output;
 *  - unknown flag bits, unknown enum values and unknown ids return -EINVAL (ids: -ENOENT);
 *  - on failure a call changes nothing and writes nothing back, unless its documentation
 *    says what it wrote (the two-call queries);
 *  - user pointers (__u64) are addresses in the caller's program for arrays of argument
 *    structs (copied like copy_from_user/copy_to_user). Everything the *device* reads or
 *    writes (batch buffers, user fences, data) is process memory reached through the GPU MMU.
 *
 * docs/uapi.md documents every call, field and error, and which parts the driver implements
 * now.
 */
#ifndef GPUSVM_UAPI_REFGPU_H
#define GPUSVM_UAPI_REFGPU_H

#include <drm.h>

#if defined(__cplusplus)
extern "C" {
#endif

#define REFGPU_DEVICE_NAME "refgpu"

/* ---------------------------------------------------------------------------------------
 * Request numbers
 */
#define DRM_REFGPU_DEVICE_QUERY		0x00
#define DRM_REFGPU_GEM_CREATE		0x01
#define DRM_REFGPU_GEM_MMAP_OFFSET	0x02
#define DRM_REFGPU_GEM_CLOSE		0x03
#define DRM_REFGPU_VM_CREATE		0x04
#define DRM_REFGPU_VM_DESTROY		0x05
#define DRM_REFGPU_VM_BIND		0x06
#define DRM_REFGPU_EXEC_QUEUE_CREATE	0x07
#define DRM_REFGPU_EXEC_QUEUE_DESTROY	0x08
#define DRM_REFGPU_EXEC			0x09
#define DRM_REFGPU_WAIT_USER_FENCE	0x0a
#define DRM_REFGPU_MADVISE		0x0b
#define DRM_REFGPU_VM_QUERY_MEM_RANGE_ATTRS 0x0c
#define DRM_REFGPU_SYNCOBJ_CREATE	0x0d
#define DRM_REFGPU_SYNCOBJ_DESTROY	0x0e
#define DRM_REFGPU_SYNCOBJ_WAIT		0x0f
#define DRM_REFGPU_FAULT_QUERY		0x10

#define DRM_IOCTL_REFGPU_DEVICE_QUERY \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_DEVICE_QUERY, struct drm_refgpu_device_query)
#define DRM_IOCTL_REFGPU_GEM_CREATE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_GEM_CREATE, struct drm_refgpu_gem_create)
#define DRM_IOCTL_REFGPU_GEM_MMAP_OFFSET \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_GEM_MMAP_OFFSET, struct drm_refgpu_gem_mmap_offset)
#define DRM_IOCTL_REFGPU_GEM_CLOSE \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_GEM_CLOSE, struct drm_refgpu_gem_close)
#define DRM_IOCTL_REFGPU_VM_CREATE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_VM_CREATE, struct drm_refgpu_vm_create)
#define DRM_IOCTL_REFGPU_VM_DESTROY \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_VM_DESTROY, struct drm_refgpu_vm_destroy)
#define DRM_IOCTL_REFGPU_VM_BIND \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_VM_BIND, struct drm_refgpu_vm_bind)
#define DRM_IOCTL_REFGPU_EXEC_QUEUE_CREATE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_EXEC_QUEUE_CREATE, struct drm_refgpu_exec_queue_create)
#define DRM_IOCTL_REFGPU_EXEC_QUEUE_DESTROY \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_EXEC_QUEUE_DESTROY, struct drm_refgpu_exec_queue_destroy)
#define DRM_IOCTL_REFGPU_EXEC \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_EXEC, struct drm_refgpu_exec)
#define DRM_IOCTL_REFGPU_WAIT_USER_FENCE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_WAIT_USER_FENCE, struct drm_refgpu_wait_user_fence)
#define DRM_IOCTL_REFGPU_MADVISE \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_MADVISE, struct drm_refgpu_madvise)
#define DRM_IOCTL_REFGPU_VM_QUERY_MEM_RANGE_ATTRS \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_VM_QUERY_MEM_RANGE_ATTRS, \
		 struct drm_refgpu_vm_query_mem_range_attr)
#define DRM_IOCTL_REFGPU_SYNCOBJ_CREATE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_SYNCOBJ_CREATE, struct drm_refgpu_syncobj_create)
#define DRM_IOCTL_REFGPU_SYNCOBJ_DESTROY \
	DRM_IOW(DRM_COMMAND_BASE + DRM_REFGPU_SYNCOBJ_DESTROY, struct drm_refgpu_syncobj_destroy)
#define DRM_IOCTL_REFGPU_SYNCOBJ_WAIT \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_SYNCOBJ_WAIT, struct drm_refgpu_syncobj_wait)
#define DRM_IOCTL_REFGPU_FAULT_QUERY \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_REFGPU_FAULT_QUERY, struct drm_refgpu_fault_query)

/* ---------------------------------------------------------------------------------------
 * Device query (xe's DRM_IOCTL_XE_DEVICE_QUERY): two-call protocol. With @size 0 the call
 * writes the size the answer needs into @size and returns 0; with @size at least that, it
 * fills @data and writes the size used. A @size below the needed one (and not 0) is -EINVAL.
 */
#define REFGPU_DEVICE_QUERY_CONFIG	0
#define REFGPU_DEVICE_QUERY_MEM_REGIONS	1
#define REFGPU_DEVICE_QUERY_ENGINES	2
#define REFGPU_DEVICE_QUERY_STATS	3

struct drm_refgpu_device_query {
	__u64 extensions;
	__u32 query;		/* REFGPU_DEVICE_QUERY_* */
	__u32 size;		/* in/out: bytes of @data */
	__u64 data;		/* user pointer to the answer (one of the structs below) */
	__u64 reserved[2];
};

/* Config flags. */
#define REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR	(1ull << 0) /* MAP with CPU_ADDR_MIRROR works */
#define REFGPU_CONFIG_FLAG_HAS_SMEM_ATOMICS	(1ull << 1) /* device atomics on system memory */
#define REFGPU_CONFIG_FLAG_HAS_VRAM		(1ull << 2)

struct drm_refgpu_query_config {
	__u32 rev;		/* uapi revision, 1 */
	__u32 va_bits;		/* GPU virtual address bits (48) */
	__u64 flags;		/* REFGPU_CONFIG_FLAG_* */
	__u64 min_alignment;	/* bind alignment in bytes (4096) */
	__u32 num_engines;
	__u32 num_mem_regions;
	__u32 backend;		/* REFGPU_BACKEND_*: where VRAM lives and what copies */
	__u32 pad;
	__u64 reserved[3];
};

/* drm_refgpu_query_config::backend */
#define REFGPU_BACKEND_HOST	0	/* VRAM is host memory, copies are memcpy */
#define REFGPU_BACKEND_VULKAN	1	/* VRAM is Vulkan device memory, copies are vkCmdCopyBuffer */

#define REFGPU_MEM_REGION_CLASS_SYSMEM	0
#define REFGPU_MEM_REGION_CLASS_VRAM	1

/* Instance 0 is always system memory; VRAM regions are instances 1.. */
struct drm_refgpu_mem_region {
	__u16 mem_class;	/* REFGPU_MEM_REGION_CLASS_* */
	__u16 instance;
	__u32 min_page_size;	/* smallest allocation (4096) */
	__u64 total_size;
	__u64 used;		/* bytes allocated now */
	__u64 reserved[4];
};

struct drm_refgpu_query_mem_regions {
	__u32 num_mem_regions;
	__u32 pad;
	struct drm_refgpu_mem_region regions[8];	/* the first @num_mem_regions are valid */
};

#define REFGPU_ENGINE_CLASS_COMPUTE	0
#define REFGPU_ENGINE_CLASS_COPY	1

struct drm_refgpu_engine_class_instance {
	__u16 engine_class;	/* REFGPU_ENGINE_CLASS_* */
	__u16 engine_instance;
	__u16 gt_id;		/* 0 */
	__u16 pad;
};

struct drm_refgpu_query_engines {
	__u32 num_engines;
	__u32 pad;
	struct drm_refgpu_engine_class_instance engines[16];	/* first @num_engines valid */
};

/* Statistics (in the spirit of xe's GT stats), indices into values[]. */
enum drm_refgpu_stat {
	REFGPU_STAT_FAULTS_4K = 0,
	REFGPU_STAT_FAULTS_64K,
	REFGPU_STAT_FAULTS_2M,
	REFGPU_STAT_VALID_FAULTS,	/* faults that found the range already bound */
	REFGPU_STAT_FAULT_ERRORS,	/* faults that failed their job */
	REFGPU_STAT_FAULT_US,		/* fault service time */
	REFGPU_STAT_MIGRATIONS_TO_VRAM,
	REFGPU_STAT_MIGRATIONS_TO_SMEM,
	REFGPU_STAT_MIGRATE_US,
	REFGPU_STAT_GET_PAGES_US,
	REFGPU_STAT_BIND_US,
	REFGPU_STAT_COPY_BYTES_TO_VRAM,
	REFGPU_STAT_COPY_BYTES_TO_SMEM,
	REFGPU_STAT_COPY_US,
	REFGPU_STAT_TLB_INVALIDATIONS,
	REFGPU_STAT_TLB_INVALIDATED_PAGES,
	REFGPU_STAT_EVICTIONS,
	REFGPU_STAT_JOBS,
	REFGPU_STAT_JOB_ERRORS,
	/* Migration copies of VRAM region 1 each way, whatever started them (GPU faults,
	 * prefetches, CPU faults on device pages, LRU eviction): one per copy run. */
	REFGPU_STAT_MIGRATE_COPIES_TO_VRAM,
	REFGPU_STAT_MIGRATE_COPIES_TO_SMEM,
	REFGPU_STAT_COUNT
};

struct drm_refgpu_query_stats {
	__u32 num_stats;	/* REFGPU_STAT_COUNT of this driver */
	__u32 pad;
	__u64 values[64];	/* the first @num_stats are valid */
};

/* ---------------------------------------------------------------------------------------
 * Buffer objects (GEM)
 */
/* @placement: bit n = memory region instance n (bit 0 system memory). */
#define REFGPU_GEM_CREATE_FLAG_DEFER_BACKING	(1u << 0)	/* allocate on first use */

struct drm_refgpu_gem_create {
	__u64 extensions;
	__u64 size;		/* multiple of 4096, > 0 */
	__u32 placement;	/* non-zero mask of valid region instances */
	__u32 flags;		/* REFGPU_GEM_CREATE_FLAG_* */
	__u32 vm_id;		/* 0: shareable; else private to that VM */
	__u32 handle;		/* out */
	__u64 reserved[2];
};

struct drm_refgpu_gem_mmap_offset {
	__u64 extensions;
	__u32 handle;
	__u32 flags;		/* 0 */
	__u64 offset;		/* out: fake offset for mmap() of the device file */
	__u64 reserved[2];
};

struct drm_refgpu_gem_close {
	__u32 handle;
	__u32 pad;
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * VMs
 */
#define REFGPU_VM_CREATE_FLAG_LR_MODE		(1u << 0)	/* long-running: user fences only */
#define REFGPU_VM_CREATE_FLAG_FAULT_MODE	(1u << 1)	/* replayable faults; needs LR_MODE */
#define REFGPU_VM_CREATE_FLAG_NO_VM_OVERCOMMIT	(1u << 2)	/* VRAM is reserved at bind, not faulted in */

struct drm_refgpu_vm_create {
	__u64 extensions;
	__u32 flags;		/* REFGPU_VM_CREATE_FLAG_* */
	__u32 vm_id;		/* out, never 0 */
	__u64 reserved[2];
};

struct drm_refgpu_vm_destroy {
	__u32 vm_id;
	__u32 pad;
	__u64 reserved[2];
};

/* Syncs, as xe's struct drm_xe_sync. */
#define REFGPU_SYNC_TYPE_SYNCOBJ	0
#define REFGPU_SYNC_TYPE_USER_FENCE	1

#define REFGPU_SYNC_FLAG_SIGNAL		(1u << 0)	/* signal when done (else: wait before) */

struct drm_refgpu_sync {
	__u64 extensions;
	__u32 type;		/* REFGPU_SYNC_TYPE_* */
	__u32 flags;		/* REFGPU_SYNC_FLAG_*; a USER_FENCE must have SIGNAL */
	union {
		__u32 handle;	/* SYNCOBJ */
		__u64 addr;	/* USER_FENCE: 8-byte aligned process address */
	};
	__u64 timeline_value;	/* USER_FENCE: the value written; SYNCOBJ: 0 */
	__u64 reserved[2];
};

/* Bind ops. */
#define REFGPU_VM_BIND_OP_MAP		0x0
#define REFGPU_VM_BIND_OP_UNMAP		0x1
#define REFGPU_VM_BIND_OP_PREFETCH	0x2

#define REFGPU_VM_BIND_FLAG_READONLY		(1u << 0)
#define REFGPU_VM_BIND_FLAG_IMMEDIATE		(1u << 1)
#define REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR	(1u << 2)	/* MAP: mirror the CPU address space; obj 0 */
#define REFGPU_VM_BIND_FLAG_MADVISE_AUTORESET	(1u << 3)	/* with CPU_ADDR_MIRROR: reset advice on munmap */
#define REFGPU_VM_BIND_FLAG_EVICT		(1u << 4)	/* UNMAP of a mirror with ranges: evict them */

/* @prefetch_mem_region_instance: a region instance, or this for the madvised location. */
#define REFGPU_CONSULT_MEM_ADVISE_PREF_LOC	(~0u)

struct drm_refgpu_vm_bind_op {
	__u64 extensions;
	__u32 obj;		/* MAP of a BO: its handle; else 0 */
	__u32 pad;
	__u64 obj_offset;	/* MAP of a BO: page-aligned offset into it; else 0 */
	__u64 range;		/* bytes, page aligned, > 0 */
	__u64 addr;		/* GPU VA, page aligned; addr + range within va_bits */
	__u32 op;		/* REFGPU_VM_BIND_OP_* */
	__u32 flags;		/* REFGPU_VM_BIND_FLAG_* */
	__u32 prefetch_mem_region_instance;	/* PREFETCH only */
	__u32 pad2;
	__u64 reserved[3];
};

struct drm_refgpu_vm_bind {
	__u64 extensions;
	__u32 vm_id;
	__u32 exec_queue_id;	/* 0: the VM's bind queue */
	__u32 num_binds;	/* 1..1024 */
	__u32 num_syncs;	/* 0..64 */
	union {
		struct drm_refgpu_vm_bind_op bind;	/* num_binds == 1 */
		__u64 vector_of_binds;	/* num_binds > 1: user pointer to the ops */
	};
	__u64 syncs;		/* user pointer to num_syncs struct drm_refgpu_sync */
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * madvise and the range-attribute query (xe's DRM_IOCTL_XE_MADVISE and
 * DRM_IOCTL_XE_VM_QUERY_MEM_RANGE_ATTRS) on CPU_ADDR_MIRROR ranges.
 */
#define REFGPU_MEM_RANGE_ATTR_PREFERRED_LOC	0
#define REFGPU_MEM_RANGE_ATTR_ATOMIC		1

/* preferred_mem_loc.devmem_fd: a refgpu device file, or one of these. */
#define REFGPU_PREFERRED_LOC_DEFAULT_DEVICE	0
#define REFGPU_PREFERRED_LOC_DEFAULT_SYSTEM	(-1)

#define REFGPU_MIGRATE_ALL_PAGES	0
#define REFGPU_MIGRATE_ONLY_SYSTEM_PAGES 1

#define REFGPU_ATOMIC_UNDEFINED	0
#define REFGPU_ATOMIC_DEVICE	1
#define REFGPU_ATOMIC_GLOBAL	2
#define REFGPU_ATOMIC_CPU	3

struct drm_refgpu_madvise {
	__u64 extensions;
	__u64 start;		/* page aligned */
	__u64 range;		/* page aligned, > 0 */
	__u32 vm_id;
	__u32 type;		/* REFGPU_MEM_RANGE_ATTR_* */
	union {
		struct {
			__s32 devmem_fd;	/* see REFGPU_PREFERRED_LOC_* */
			__u16 migration_policy;	/* REFGPU_MIGRATE_* */
			__u16 region_instance;	/* VRAM instance of that device, 0: its first */
			__u64 reserved;
		} preferred_mem_loc;
		struct {
			__u32 val;	/* REFGPU_ATOMIC_* */
			__u32 pad;
			__u64 reserved;
		} atomic;
	};
	__u64 reserved[2];
};

struct drm_refgpu_mem_range_attr {
	__u64 extensions;
	__u64 start;
	__u64 end;
	struct {
		__s32 devmem_fd;
		__u32 migration_policy;
	} preferred_mem_loc;
	struct {
		__u32 val;
		__u32 reserved;
	} atomic;
	__u64 reserved[2];
};

/*
 * Two calls: with @num_mem_ranges 0 the driver writes the number of attribute ranges in
 * [start, start + range) and @sizeof_mem_range_attr; the caller allocates that many and
 * calls again with the count, and the driver fills @vector_of_mem_attr. -ENOSPC when the
 * ranges changed so that more are needed than @num_mem_ranges (call again).
 */
struct drm_refgpu_vm_query_mem_range_attr {
	__u64 extensions;
	__u32 vm_id;
	__u32 num_mem_ranges;		/* in/out */
	__u64 start;
	__u64 range;
	__u64 sizeof_mem_range_attr;	/* out */
	__u64 vector_of_mem_attr;	/* user pointer to num_mem_ranges attributes */
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * Exec queues and exec
 */
struct drm_refgpu_exec_queue_create {
	__u64 extensions;
	__u16 width;		/* 1 */
	__u16 num_placements;	/* 1 */
	__u32 vm_id;
	__u32 flags;		/* 0 */
	__u32 exec_queue_id;	/* out, never 0 */
	__u64 instances;	/* user pointer to num_placements engine_class_instance */
	__u64 reserved[2];
};

struct drm_refgpu_exec_queue_destroy {
	__u32 exec_queue_id;
	__u32 pad;
	__u64 reserved[2];
};

struct drm_refgpu_exec {
	__u64 extensions;
	__u32 exec_queue_id;
	__u32 num_syncs;	/* 0..64 */
	__u64 syncs;		/* user pointer to struct drm_refgpu_sync */
	__u64 address;		/* GPU VA of the batch, 8-byte aligned */
	__u16 num_batch_buffer;	/* 1 */
	__u16 pad[3];
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * Wait on a user fence: sleeps until (*addr & mask) <op> (value & mask), reading process
 * memory as a CPU would. Relative @timeout (ns) is updated with the time left when the call
 * is interrupted, so a restart waits only the rest; with ABSTIME it is CLOCK_MONOTONIC ns.
 * -ETIME when it expires, -EIO when the exec queue was banned (a job failed), -EFAULT when
 * addr is not readable.
 */
#define REFGPU_UFENCE_WAIT_OP_EQ	0x0
#define REFGPU_UFENCE_WAIT_OP_NEQ	0x1
#define REFGPU_UFENCE_WAIT_OP_GT	0x2
#define REFGPU_UFENCE_WAIT_OP_GTE	0x3
#define REFGPU_UFENCE_WAIT_OP_LT	0x4
#define REFGPU_UFENCE_WAIT_OP_LTE	0x5

#define REFGPU_UFENCE_WAIT_FLAG_ABSTIME	(1u << 0)

struct drm_refgpu_wait_user_fence {
	__u64 extensions;
	__u64 addr;		/* 8-byte aligned */
	__u16 op;		/* REFGPU_UFENCE_WAIT_OP_* */
	__u16 flags;		/* REFGPU_UFENCE_WAIT_FLAG_* */
	__u32 pad;
	__u64 value;
	__u64 mask;		/* non-zero */
	__s64 timeout;		/* in/out, see above; < 0: wait forever (bounded by the driver) */
	__u32 exec_queue_id;	/* 0 or the queue whose failure ends the wait */
	__u32 pad2;
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * Syncobj-style fences (the driver's own; a DRM port would use drm_syncobj)
 */
#define REFGPU_SYNCOBJ_CREATE_SIGNALED	(1u << 0)

struct drm_refgpu_syncobj_create {
	__u32 handle;		/* out */
	__u32 flags;
	__u64 reserved[2];
};

struct drm_refgpu_syncobj_destroy {
	__u32 handle;
	__u32 pad;
	__u64 reserved[2];
};

#define REFGPU_SYNCOBJ_WAIT_FLAG_WAIT_ALL	(1u << 0)

struct drm_refgpu_syncobj_wait {
	__u64 extensions;
	__u64 handles;		/* user pointer to count_handles __u32 */
	__s64 timeout_nsec;	/* absolute CLOCK_MONOTONIC */
	__u32 count_handles;	/* 1..64 */
	__u32 flags;
	__u32 first_signaled;	/* out: index of the first signaled fence */
	__s32 error;		/* out: 0, or the negative errno the (first failed) job ended with */
	__u64 reserved[2];
};

/* ---------------------------------------------------------------------------------------
 * Fault records: the last faults the fault unit took on a VM (a ring), oldest first.
 */
#define REFGPU_ACCESS_READ	0
#define REFGPU_ACCESS_WRITE	1
#define REFGPU_ACCESS_ATOMIC	2

#define REFGPU_FAULT_TYPE_NOT_PRESENT	0
#define REFGPU_FAULT_TYPE_PERMISSION	1

struct drm_refgpu_fault_record {
	__u64 address;		/* the faulting GPU VA */
	__u32 vm_id;
	__u32 exec_queue_id;
	__u8 access;		/* REFGPU_ACCESS_* */
	__u8 fault_type;	/* REFGPU_FAULT_TYPE_* */
	__u16 engine_instance;
	__s32 status;		/* 0: serviced and replayed; else the job's negative errno */
	__u64 timestamp_ns;
	__u64 reserved[2];
};

#define REFGPU_FAULT_QUERY_FLAG_CLEAR	(1u << 0)	/* drop the records returned */

struct drm_refgpu_fault_query {
	__u64 extensions;
	__u32 vm_id;
	__u32 num_faults;	/* in: capacity (0: count only); out: records */
	__u32 flags;
	__u32 pad;
	__u64 faults;		/* user pointer to num_faults records */
	__u64 reserved[2];
};

/* =======================================================================================
 * The device ISA (command stream)
 *
 * A batch is a sequence of instructions in process memory, fetched through the GPU MMU from
 * the exec address. Every instruction starts with a __u32 header: bits 31..16 the opcode,
 * bits 15..0 the instruction length in dwords (header included). Every instruction is a
 * multiple of 8 bytes and starts 8-byte aligned. Data accesses are naturally aligned
 * (dword: 4, qword: 8); MEMSET and COPY take any byte address and length.
 *
 * The job ends at BATCH_END (fence 0), or with an error fence:
 *  -ENOEXEC  unknown opcode or a length that does not match the opcode;
 *  -EINVAL   a misaligned access, reserved bits set, a zero count/size where one is needed;
 *  -EBADMSG  a LOAD_COMPARE or LOAD_STRIDED check failed;
 *  -EFAULT   a GPU fault that the fault unit could not service (or no fault mode);
 *  -E2BIG    the batch ran past REFGPU_MAX_BATCH_BYTES without BATCH_END;
 *  -ENODEV   the device was removed before the job finished.
 */
#define REFGPU_MAX_BATCH_BYTES	(1u << 20)

#define REFGPU_CMD_HEADER(op, ndw)	((((__u32)(op)) << 16) | ((__u32)(ndw) & 0xffffu))
#define REFGPU_CMD_OPCODE(hdr)		((__u32)(hdr) >> 16)
#define REFGPU_CMD_LENGTH(hdr)		((__u32)(hdr) & 0xffffu)

#define REFGPU_OP_BATCH_END	0x0001
#define REFGPU_OP_STORE_DWORD	0x0002
#define REFGPU_OP_STORE_QWORD	0x0003
#define REFGPU_OP_LOAD_COMPARE	0x0004
#define REFGPU_OP_ATOMIC	0x0005
#define REFGPU_OP_MEMSET	0x0006
#define REFGPU_OP_COPY		0x0007
#define REFGPU_OP_STORE_STRIDED	0x0008
#define REFGPU_OP_LOAD_STRIDED	0x0009
#define REFGPU_OP_FENCE_WRITE	0x000a

/* Flags shared by several instructions. */
#define REFGPU_CMD_FLAG_QWORD	(1u << 0)	/* 64-bit data (else 32-bit) */

struct refgpu_cmd_batch_end {
	__u32 header;		/* REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2) */
	__u32 pad;
};

struct refgpu_cmd_store_dword {
	__u32 header;		/* (STORE_DWORD, 4) */
	__u32 value;
	__u64 addr;		/* 4-byte aligned */
};

struct refgpu_cmd_store_qword {
	__u32 header;		/* (STORE_QWORD, 6) */
	__u32 pad;
	__u64 addr;		/* 8-byte aligned */
	__u64 value;
};

/* LOAD_COMPARE: ((*addr & mask) <op> (value & mask)), ops as REFGPU_UFENCE_WAIT_OP_*.
 * Without WAIT a false result fails the job (-EBADMSG); with WAIT the engine polls until it
 * holds (each poll a fresh read through the MMU), failing with -ETIME after
 * REFGPU_LOAD_COMPARE_WAIT_MS. */
#define REFGPU_LOAD_COMPARE_FLAG_WAIT	(1u << 1)
#define REFGPU_LOAD_COMPARE_WAIT_MS	10000u

struct refgpu_cmd_load_compare {
	__u32 header;		/* (LOAD_COMPARE, 10) */
	__u16 op;
	__u16 flags;		/* REFGPU_CMD_FLAG_QWORD | REFGPU_LOAD_COMPARE_FLAG_WAIT */
	__u64 addr;
	__u64 value;
	__u64 mask;
	__u64 pad;
};

/* ATOMIC: a real atomic read-modify-write of the target bytes (an ATOMIC access in the GPU
 * MMU). INC adds 1, ADD adds operand, CMPXCHG stores operand if the old value equals compare.
 * With RETURN the old value is stored (same width) at return_addr (a WRITE access). */
#define REFGPU_ATOMIC_OP_INC		0
#define REFGPU_ATOMIC_OP_ADD		1
#define REFGPU_ATOMIC_OP_CMPXCHG	2

#define REFGPU_ATOMIC_FLAG_RETURN	(1u << 1)

struct refgpu_cmd_atomic {
	__u32 header;		/* (ATOMIC, 10) */
	__u16 aop;		/* REFGPU_ATOMIC_OP_* */
	__u16 flags;		/* REFGPU_CMD_FLAG_QWORD | REFGPU_ATOMIC_FLAG_RETURN */
	__u64 addr;
	__u64 operand;
	__u64 compare;
	__u64 return_addr;	/* 0 unless RETURN */
};

struct refgpu_cmd_memset {
	__u32 header;		/* (MEMSET, 6) */
	__u32 value;		/* byte value in bits 7..0, other bits 0 */
	__u64 addr;
	__u64 size;		/* bytes, > 0 */
};

struct refgpu_cmd_copy {
	__u32 header;		/* (COPY, 8) */
	__u32 pad;
	__u64 dst;
	__u64 src;
	__u64 size;		/* bytes, > 0; the ranges must not overlap (-EINVAL) */
};

/* STORE_STRIDED: for i in [0, count): store value + i * increment at addr + i * stride. */
struct refgpu_cmd_store_strided {
	__u32 header;		/* (STORE_STRIDED, 12) */
	__u32 flags;		/* REFGPU_CMD_FLAG_QWORD */
	__u64 addr;
	__u64 stride;		/* bytes, a multiple of the data size */
	__u64 count;		/* > 0 */
	__u64 value;
	__u64 increment;
};

/* LOAD_STRIDED: for i in [0, count): load addr + i * stride; with CHECK each value must equal
 * value + i * increment (-EBADMSG otherwise); with SUM the sum of the loads is stored (qword)
 * at sum_addr. Without either, the loads only touch the memory (a read-fault generator). */
#define REFGPU_LOAD_STRIDED_FLAG_CHECK	(1u << 1)
#define REFGPU_LOAD_STRIDED_FLAG_SUM	(1u << 2)

struct refgpu_cmd_load_strided {
	__u32 header;		/* (LOAD_STRIDED, 14) */
	__u32 flags;
	__u64 addr;
	__u64 stride;
	__u64 count;
	__u64 value;
	__u64 increment;
	__u64 sum_addr;		/* 0 unless SUM */
};

/* FENCE_WRITE: after every earlier access of the batch is complete and visible, store the
 * qword value at addr with release ordering, and wake user-fence waiters of the device. */
struct refgpu_cmd_fence_write {
	__u32 header;		/* (FENCE_WRITE, 6) */
	__u32 pad;
	__u64 addr;		/* 8-byte aligned */
	__u64 value;
};

#if defined(__cplusplus)
}
#endif

#endif /* GPUSVM_UAPI_REFGPU_H */
