// The lock order of all of gpusvm: every lock class of every layer, outermost first, in one
// table. lockdep-lite (lock.h) checks it at every blocking acquisition in the test builds; the
// ranks below are the order. A layer adds its locks here, not in its own headers, so that a
// new rank cannot silently reorder another layer's locks; tests/base/lock_order_test.cc checks
// that the table is strictly ordered and that lockdep enforces each step of it.
//
//   runtime heap (5, mutex: one per malloc heap of the userspace runtime; held across the
//    mmap/munmap of an arena or large block and across the MADVISE ioctl that resets the
//    advice of freed pages, so it ranks before every driver and mm lock those take)
//   runtime buffer object (6, mutex: one per runtime BO; held across the VM_BIND and
//    GEM_MMAP_OFFSET ioctls and the mmap/munmap of its CPU view; never nested with a heap lock)
//   [reserved 10-90: driver VM and range locks of the middle layer and its drivers, which are
//    taken before the mmap lock: driver VM lock -> range lock -> mmap lock]
//   gpusvm driver lock (50: a driver's VM/range lock that Gpusvm asserts held; drivers
//    without a class of their own, and the svm test driver, use it)
//     -> refgpu buffer object (60, mutex: a BO's backing; eviction, CPU map and binding
//        queries hold it, binding observers zap GPU PTEs under it; the VRAM evictor only
//        try-locks it, so a fault that holds a VM lock never waits for it)
//   mmap_lock (AddressSpace, rw, sleeping)
//     -> hugetlb fault mutex (hashed by (mm, 2 MiB slot); held across one hugetlb fault)
//     -> shmem object lock (ShmemObject, mutex)            page-cache lookups in faults
//       -> folio lock (sleeping bit lock; several only in pfn order, as subclasses)
//         -> rmap walk lock (PhysMem, rw: the anon_vma lock of cross-mm rmap walks)
//           -> dmirror devmem lock (one per device: adding/removing device-memory chunks)
//           -> dmirror mutex (one per open file: its device page table)
//              [reserved 270-295: notifier locks of drivers and of the middle layer, which
//               interval-notifier callbacks take under the mmap lock, folio locks and the
//               rmap walk lock]
//           -> gpusvm notifier lock (290, rw: Gpusvm's invalidation, get_pages publish
//              and the driver's commit; nothing allocates or sleeps under it)
//              -> refgpu TLB access fence (one per device TLB, rw: engines hold it shared
//                 from a translation to the end of the access; an invalidation takes it
//                 exclusive after clearing entries, under the notifier lock, to wait out
//                 accesses in flight through the old translation)
//                -> refgpu GPU page table (one per VM, rw: walks shared, commits and zaps
//                   exclusive; commits run under the notifier lock and never allocate)
//                  -> refgpu TLB entries (one per device TLB: fills happen under the page
//                     table lock so an invalidation cannot be overtaken by a stale fill)
//         -> notifier subscriptions lock (spin; never held across callbacks)
//         -> page_table_lock (AddressSpace, spin: PGD/PUD/PMD table allocation)
//           -> PMD lock (one per PMD table, spin)
//             -> PTE lock (one per PTE table, spin; two only as src/dst subclasses 0/1
//                in fork and mremap)
//               -> folio rmap lock (spin)
//               -> swap lock (PhysMem's swap area: slots, counts, swap cache; a zap frees
//                  slots under the PTE lock)
//                 -> LRU lock (PhysMem's LRU lists: the first mapping of a folio adds it
//                    under the PTE lock, freeing removes it)
//                 -> zone lock (PhysMem allocator, spin)
//                   -> registry lock (PhysMem: pagemaps, address spaces, deferred split)
//                   -> dmirror free-list lock (taken by folio_free, which may run under
//                      page-table locks: the last reference can go in a zap)
//                   -> svm test VRAM allocator (tests/svm's device-memory double) and
//                      refgpu VRAM buddy (one per VRAM region): allocation under folio locks
//                      in a migration, free with an allocation's last reference
//                      (VramAllocation::destroy: from folio_free under page-table locks, or
//                      touch_pages under the notifier lock)
//                   -> refgpu VRAM LRU (876, spin: one per VRAM region; bumped under the
//                      notifier lock by get_pages' devmem_fn, unlinked by devmem_release
//                      under page-table locks; never nested with the buddy lock)
//                   -> svm DMA record (Device: the DMA mappings of one device; get_pages
//                      maps under the notifier lock, invalidate unmaps under it)
//                   -> svm pagemap destroy queue (a last Pagemap put from folio_free
//                      queues the destroy for the worker)
//                   -> svm pagemap owner list (owner groups; has_interconnect runs under
//                      it and must not sleep or lock)
//                     -> refgpu copy-engine pool; the Vulkan backend's context registry
//                        (held while a VkDevice is created), queue (one vkQueueSubmit) and
//                        VRAM span table (a lookup): leaves, nothing nested in them
//                     -> refgpu engine (its list of exec queues) -> exec
//                        queue (its jobs), fence callback list, fault-chain table, fault
//                        queue, open-file id tables, device VM table (leaves of the device: engines, fault handlers and ioctls
//                        hold nothing else when they take them, and call nothing under them)
//                     -> devfs machine (its list of processes), device registry, fd table,
//                        process exit status (leaves: nothing is called under them)
//                     -> runtime fence settle lock (970: publishes a fence's settled status
//                        and fault, two stores; a leaf: nothing is called or locked under it)
//
// Unordered (rank 0, held-tracking only): the plain-notifier list lock, whose release()
// callbacks may take driver locks of any rank and which no invalidation ever takes.
//
// Rules that ranks cannot express:
//  - MMU notifier callbacks run with the mmap lock (and for migration, folio locks and the
//    rmap walk lock) held but never with a page-table lock, so a driver may sleep in them.
//  - Sleeping (folio_lock, waiting for a migration, allocating a THP that may fail) never
//    happens under a page-table lock.
//  - The mmap lock is taken only inside gpusvm/mm (and later gpusvm/svm), never held across
//    device work.
#pragma once

#include <array>

#include "gpusvm/base/lock.h"

namespace gpusvm {

namespace rt {
// A runtime malloc heap's lock (runtime/heap.cc): taken by the program's threads with no
// gpusvm lock held, and held across mmap, munmap and the MADVISE ioctl: outermost.
inline constexpr LockClass kRtHeapLockClass{"gpusvm_rt_heap", 5};
// A runtime buffer object's lock (runtime/bo.cc): guards its bindings and CPU view; taken with
// no gpusvm lock held (never with a heap lock) and held across the VM_BIND / GEM_MMAP_OFFSET
// ioctls and the mmap/munmap that change them.
inline constexpr LockClass kRtBoLockClass{"gpusvm_rt_bo", 6};
}  // namespace rt

namespace refgpu {
// A refgpu VM's lock: the Gpusvm driver lock of its mirror (faults, binds, madvise, GC).
inline constexpr LockClass kRefgpuVmLockClass{"refgpu_vm", 45};
}  // namespace refgpu
namespace svm {
inline constexpr LockClass kGpusvmDriverLockClass{"gpusvm_driver_lock", 50};
}  // namespace svm

namespace refgpu {
inline constexpr LockClass kBoLockClass{"refgpu_bo", 60};
}  // namespace refgpu

namespace mm {
inline constexpr LockClass kMmapLockClass{"mmap_lock", 100};
inline constexpr LockClass kHugetlbFaultMutexClass{"hugetlb_fault_mutex", 120};
inline constexpr LockClass kShmemLockClass{"shmem_lock", 150};
inline constexpr LockClass kFolioLockClass{"folio_lock", 200};
inline constexpr LockClass kRmapWalkLockClass{"rmap_walk", 250};
}  // namespace mm

namespace dmirror {
inline constexpr LockClass kDmirrorDevmemLockClass{"dmirror_devmem_lock", 260};
inline constexpr LockClass kDmirrorMutexClass{"dmirror_mutex", 280};
}  // namespace dmirror

namespace svm {
inline constexpr LockClass kGpusvmNotifierLockClass{"gpusvm_notifier_lock", 290};
}  // namespace svm
namespace refgpu {
inline constexpr LockClass kTlbAccessLockClass{"refgpu_tlb_access", 296};
inline constexpr LockClass kGpuPtLockClass{"refgpu_gpu_pt", 297};
inline constexpr LockClass kTlbLockClass{"refgpu_tlb", 298};
}  // namespace refgpu

namespace mm {
inline constexpr LockClass kNotifierSubsLockClass{"mmu_notifier_subscriptions", 300};
inline constexpr LockClass kPageTableLockClass{"page_table_lock", 400};
inline constexpr LockClass kPmdLockClass{"pmd_lock", 500};
inline constexpr LockClass kPteLockClass{"pte_lock", 600};
inline constexpr LockClass kRmapLockClass{"folio_rmap_lock", 700};
inline constexpr LockClass kSwapLockClass{"swap_lock", 740};
inline constexpr LockClass kLruLockClass{"lru_lock", 750};
inline constexpr LockClass kZoneLockClass{"zone_lock", 800};
inline constexpr LockClass kRegistryLockClass{"physmem_registry", 850};
}  // namespace mm

namespace dmirror {
inline constexpr LockClass kDmirrorFreeLockClass{"dmirror_free_list", 870};
}  // namespace dmirror
namespace refgpu {
inline constexpr LockClass kBuddyLockClass{"refgpu_buddy", 875};
inline constexpr LockClass kVramLruLockClass{"refgpu_vram_lru", 876};
}  // namespace refgpu
namespace svm {
inline constexpr LockClass kTestVramLockClass{"svm_test_vram", 873};
inline constexpr LockClass kDmaRecordLockClass{"svm_dma_record", 880};
inline constexpr LockClass kPagemapDestroyLockClass{"svm_pagemap_destroy_queue", 890};
inline constexpr LockClass kPagemapOwnerListLockClass{"svm_pagemap_owner_list", 895};
}  // namespace svm
namespace refgpu {
inline constexpr LockClass kCopyPoolLockClass{"refgpu_copy_pool", 900};
// The Vulkan backend (drivers/refgpu/vulkan/): the process-wide table of contexts (held while
// one is created), a context's queue (one vkQueueSubmit: queues are externally synchronised)
// and its table of VRAM buffers (a lookup). Leaves: copies take them under folio locks.
inline constexpr LockClass kVulkanRegistryLockClass{"refgpu_vulkan_registry", 901};
inline constexpr LockClass kVulkanQueueLockClass{"refgpu_vulkan_queue", 902};
inline constexpr LockClass kVulkanSpansLockClass{"refgpu_vulkan_spans", 903};
inline constexpr LockClass kEngineLockClass{"refgpu_engine", 905};
inline constexpr LockClass kExecQueueLockClass{"refgpu_exec_queue", 910};
// A fence's callback list (signal takes it, callbacks run after it is dropped): a leaf.
inline constexpr LockClass kFenceCbLockClass{"refgpu_fence_cb", 912};
// The fault service's table of services in flight (duplicate-fault chaining): a leaf.
inline constexpr LockClass kRefgpuFaultChainLockClass{"refgpu_fault_chain", 915};
inline constexpr LockClass kFaultQueueLockClass{"refgpu_fault_queue", 920};
// An open file's id tables (VMs, exec queues, syncobjs): a leaf.
inline constexpr LockClass kRefgpuFileLockClass{"refgpu_file", 925};
// The device's VM table (address-space id -> VM, for the fault service): a leaf.
inline constexpr LockClass kRefgpuDeviceVmsLockClass{"refgpu_device_vms", 926};
}  // namespace refgpu

namespace devfs {
inline constexpr LockClass kMachineLockClass{"devfs_machine", 940};
inline constexpr LockClass kDeviceRegistryLockClass{"devfs_registry", 950};
inline constexpr LockClass kFdTableLockClass{"devfs_fd_table", 960};
inline constexpr LockClass kProcessStatusLockClass{"devfs_process_status", 965};
}  // namespace devfs

namespace rt {
// The runtime's fence settle lock (runtime/submit.cc): a leaf.
inline constexpr LockClass kRtFenceLockClass{"gpusvm_rt_fence", 970};
}  // namespace rt

namespace mm {
inline constexpr LockClass kMmuNotifierListLockClass{"mmu_notifier_list", 0};
}  // namespace mm

// Every ordered class, in table order (the order test walks it).
inline constexpr std::array<const LockClass*, 48> kLockOrder{
    &rt::kRtHeapLockClass,       &rt::kRtBoLockClass,
    &refgpu::kRefgpuVmLockClass,  &svm::kGpusvmDriverLockClass, &refgpu::kBoLockClass,
    &mm::kMmapLockClass,          &mm::kHugetlbFaultMutexClass,   &mm::kShmemLockClass,
    &mm::kFolioLockClass,         &mm::kRmapWalkLockClass,        &dmirror::kDmirrorDevmemLockClass,
    &dmirror::kDmirrorMutexClass, &svm::kGpusvmNotifierLockClass, &refgpu::kTlbAccessLockClass,
    &refgpu::kGpuPtLockClass,     &refgpu::kTlbLockClass,         &mm::kNotifierSubsLockClass,
    &mm::kPageTableLockClass,
    &mm::kPmdLockClass,           &mm::kPteLockClass,             &mm::kRmapLockClass,
    &mm::kSwapLockClass,          &mm::kLruLockClass,
    &mm::kZoneLockClass,          &mm::kRegistryLockClass,        &dmirror::kDmirrorFreeLockClass,
    &svm::kTestVramLockClass,     &refgpu::kBuddyLockClass,       &refgpu::kVramLruLockClass,
    &svm::kDmaRecordLockClass,
    &svm::kPagemapDestroyLockClass, &svm::kPagemapOwnerListLockClass, &refgpu::kCopyPoolLockClass,
    &refgpu::kVulkanRegistryLockClass, &refgpu::kVulkanQueueLockClass, &refgpu::kVulkanSpansLockClass,
    &refgpu::kEngineLockClass,    &refgpu::kExecQueueLockClass,   &refgpu::kFenceCbLockClass,
    &refgpu::kRefgpuFaultChainLockClass, &refgpu::kFaultQueueLockClass, &refgpu::kRefgpuFileLockClass,
    &refgpu::kRefgpuDeviceVmsLockClass,
    &devfs::kMachineLockClass,    &devfs::kDeviceRegistryLockClass, &devfs::kFdTableLockClass,
    &devfs::kProcessStatusLockClass, &rt::kRtFenceLockClass,
};

}  // namespace gpusvm
