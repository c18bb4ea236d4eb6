/* Compile check: uapi/refgpu.h is C (built as C11 with -Wpedantic in every configuration),
 * and its struct sizes are the ABI: a change of any of them is an ABI break. */
#include "uapi/refgpu.h"

#define REFGPU_SIZE(s, n) _Static_assert(sizeof(struct s) == (n), #s " is " #n " bytes")

REFGPU_SIZE(drm_refgpu_device_query, 40);
REFGPU_SIZE(drm_refgpu_query_config, 64);
REFGPU_SIZE(drm_refgpu_mem_region, 56);
REFGPU_SIZE(drm_refgpu_query_mem_regions, 456);
REFGPU_SIZE(drm_refgpu_engine_class_instance, 8);
REFGPU_SIZE(drm_refgpu_query_engines, 136);
REFGPU_SIZE(drm_refgpu_query_stats, 520);
REFGPU_SIZE(drm_refgpu_gem_create, 48);
REFGPU_SIZE(drm_refgpu_gem_mmap_offset, 40);
REFGPU_SIZE(drm_refgpu_gem_close, 24);
REFGPU_SIZE(drm_refgpu_vm_create, 32);
REFGPU_SIZE(drm_refgpu_vm_destroy, 24);
REFGPU_SIZE(drm_refgpu_sync, 48);
REFGPU_SIZE(drm_refgpu_vm_bind_op, 80);
REFGPU_SIZE(drm_refgpu_vm_bind, 128);
REFGPU_SIZE(drm_refgpu_madvise, 64);
REFGPU_SIZE(drm_refgpu_mem_range_attr, 56);
REFGPU_SIZE(drm_refgpu_vm_query_mem_range_attr, 64);
REFGPU_SIZE(drm_refgpu_exec_queue_create, 48);
REFGPU_SIZE(drm_refgpu_exec_queue_destroy, 24);
REFGPU_SIZE(drm_refgpu_exec, 56);
REFGPU_SIZE(drm_refgpu_wait_user_fence, 72);
REFGPU_SIZE(drm_refgpu_syncobj_create, 24);
REFGPU_SIZE(drm_refgpu_syncobj_destroy, 24);
REFGPU_SIZE(drm_refgpu_syncobj_wait, 56);
REFGPU_SIZE(drm_refgpu_fault_record, 48);
REFGPU_SIZE(drm_refgpu_fault_query, 48);

/* Instruction sizes: the header's length field counts dwords. */
REFGPU_SIZE(refgpu_cmd_batch_end, 2 * 4);
REFGPU_SIZE(refgpu_cmd_store_dword, 4 * 4);
REFGPU_SIZE(refgpu_cmd_store_qword, 6 * 4);
REFGPU_SIZE(refgpu_cmd_load_compare, 10 * 4);
REFGPU_SIZE(refgpu_cmd_atomic, 10 * 4);
REFGPU_SIZE(refgpu_cmd_memset, 6 * 4);
REFGPU_SIZE(refgpu_cmd_copy, 8 * 4);
REFGPU_SIZE(refgpu_cmd_store_strided, 12 * 4);
REFGPU_SIZE(refgpu_cmd_load_strided, 14 * 4);
REFGPU_SIZE(refgpu_cmd_fence_write, 6 * 4);

_Static_assert(REFGPU_STAT_COUNT <= 64, "drm_refgpu_query_stats holds every statistic");
_Static_assert(DRM_IOCTL_REFGPU_EXEC != DRM_IOCTL_REFGPU_VM_BIND, "distinct requests");
_Static_assert(REFGPU_CMD_OPCODE(REFGPU_CMD_HEADER(REFGPU_OP_COPY, 8)) == REFGPU_OP_COPY,
	       "header round trip");

/* A C program emits a batch. */
int gpusvm_refgpu_uapi_c_check(void);
int gpusvm_refgpu_uapi_c_check(void)
{
	struct refgpu_cmd_store_dword st = { REFGPU_CMD_HEADER(REFGPU_OP_STORE_DWORD, 4), 7, 0x1000 };
	struct refgpu_cmd_batch_end end = { REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2), 0 };
	struct drm_refgpu_vm_bind bind = { 0 };
	bind.bind.op = REFGPU_VM_BIND_OP_MAP;
	bind.bind.flags = REFGPU_VM_BIND_FLAG_CPU_ADDR_MIRROR;
	return (int)(st.value + end.pad + bind.num_binds);
}
