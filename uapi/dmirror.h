/*
 * dmirror: the test device's ioctl interface (the shape of the kernel's lib/test_hmm_uapi.h).
 *
 * C only: C and C++ programs both include this header. Request numbers are built with
 * libdrm's drm.h macros (DRM_IOWR(DRM_COMMAND_BASE + n, ...)) so the ABI reads and versions
 * like a DRM uapi. Every request takes a struct hmm_dmirror_cmd and returns 0 or a negative
 * errno; on failure the struct is not written back.
 *
 * Device files: HMM_DMIRROR_DEVICE_NAME followed by the unit number ("hmm_dmirror0",
 * "hmm_dmirror1"); each unit is a device with its own device memory (its own page owner).
 * An open file mirrors the address space of the process that opened it.
 */
#ifndef GPUSVM_UAPI_DMIRROR_H
#define GPUSVM_UAPI_DMIRROR_H

#include <drm.h>

#if defined(__cplusplus)
extern "C" {
#endif

#define HMM_DMIRROR_DEVICE_NAME "hmm_dmirror"

/*
 * struct hmm_dmirror_cmd - argument of every dmirror request.
 * @addr:   in: page-aligned address in the mirrored address space.
 * @ptr:    in: the caller's buffer: data source (WRITE), data sink (READ, MIGRATE_TO_DEV,
 *          EXCLUSIVE read-back), one byte per page (SNAPSHOT). In the model it is a pointer in
 *          the calling program, copied like copy_to_user/copy_from_user would.
 * @npages: in: pages in the range; FLAGS: the flag word (HMM_DMIRROR_FLAG_*).
 * @cpages: out: pages processed (see each request).
 * @faults: out: READ/WRITE: device fault passes needed.
 */
struct hmm_dmirror_cmd {
	__u64 addr;
	__u64 ptr;
	__u64 npages;
	__u64 cpages;
	__u64 faults;
};

#define DRM_DMIRROR_READ		0x00
#define DRM_DMIRROR_WRITE		0x01
#define DRM_DMIRROR_MIGRATE_TO_DEV	0x02
#define DRM_DMIRROR_MIGRATE_TO_SYS	0x03
#define DRM_DMIRROR_SNAPSHOT		0x04
#define DRM_DMIRROR_EXCLUSIVE		0x05
#define DRM_DMIRROR_CHECK_EXCLUSIVE	0x06
#define DRM_DMIRROR_RELEASE		0x07
#define DRM_DMIRROR_FLAGS		0x08

/* Copy the range from the device page table into ptr, faulting (read) what is missing. */
#define HMM_DMIRROR_READ \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_READ, struct hmm_dmirror_cmd)
/* Copy ptr into the range through the device page table, faulting (write) what is missing. */
#define HMM_DMIRROR_WRITE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_WRITE, struct hmm_dmirror_cmd)
/* Migrate system memory to device memory, then read the range back into ptr. */
#define HMM_DMIRROR_MIGRATE_TO_DEV \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_MIGRATE_TO_DEV, struct hmm_dmirror_cmd)
/* Migrate this device's pages in the range back to system memory. */
#define HMM_DMIRROR_MIGRATE_TO_SYS \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_MIGRATE_TO_SYS, struct hmm_dmirror_cmd)
/* One HMM_DMIRROR_PROT_* byte per page into ptr, faulting nothing. */
#define HMM_DMIRROR_SNAPSHOT \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_SNAPSHOT, struct hmm_dmirror_cmd)
/* Make every page device-exclusive (atomic access), then read the range back into ptr. */
#define HMM_DMIRROR_EXCLUSIVE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_EXCLUSIVE, struct hmm_dmirror_cmd)
/* -EPERM if any page of the range is still mapped for atomic access, else 0. */
#define HMM_DMIRROR_CHECK_EXCLUSIVE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_CHECK_EXCLUSIVE, struct hmm_dmirror_cmd)
/* Evict every device page of the device (all files) to system memory; drop device memory. */
#define HMM_DMIRROR_RELEASE \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_RELEASE, struct hmm_dmirror_cmd)
/* Replace this file's flags with npages. */
#define HMM_DMIRROR_FLAGS \
	DRM_IOWR(DRM_COMMAND_BASE + DRM_DMIRROR_FLAGS, struct hmm_dmirror_cmd)

/* FLAGS: the next large device or system allocation of a migration fails (one shot). */
#define HMM_DMIRROR_FLAG_FAIL_ALLOC (1ULL << 0)

/*
 * SNAPSHOT encoding, one byte per page. Bits 0-1: R/W; bits 2-3: mapped by a PMD / PUD;
 * bits 4-6: an enumerated page type (values, not independent bits). ERROR is exclusive.
 */
enum {
	HMM_DMIRROR_PROT_ERROR			= 0xFF,
	HMM_DMIRROR_PROT_NONE			= 0x00,
	HMM_DMIRROR_PROT_READ			= 0x01,
	HMM_DMIRROR_PROT_WRITE			= 0x02,
	HMM_DMIRROR_PROT_PMD			= 0x04,
	HMM_DMIRROR_PROT_PUD			= 0x08,
	HMM_DMIRROR_PROT_ZERO			= 0x10,
	HMM_DMIRROR_PROT_DEV_PRIVATE_LOCAL	= 0x20,
	HMM_DMIRROR_PROT_DEV_PRIVATE_REMOTE	= 0x30,
	HMM_DMIRROR_PROT_DEV_COHERENT_LOCAL	= 0x40,
	HMM_DMIRROR_PROT_DEV_COHERENT_REMOTE	= 0x50,
};

/* Device memory types (0 is reserved). */
enum {
	HMM_DMIRROR_MEMORY_DEVICE_PRIVATE = 1,
	HMM_DMIRROR_MEMORY_DEVICE_COHERENT = 2,
};

#if defined(__cplusplus)
}
#endif

#endif /* GPUSVM_UAPI_DMIRROR_H */
