// CPU page faults (handle_mm_fault).
#pragma once

#include <cstdint>

#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

class AddressSpace;
class Folio;
struct Vma;

enum class VmFault {
  kOk,       // the entry now allows the access
  kRetry,    // something changed under us (a racing fault, a migration that finished): retry
  kSigsegv,  // no VMA or no permission
  kSigbus,   // the backing object cannot provide the page
  kOom,      // memory allocation failed
  // A wait of the fault (for a migration to end, for a folio lock held by another thread)
  // lasted hang_timeout(): a leaked folio lock, a deadlock or a holder stuck. Logged with the
  // address, the folio and its holder. Not a Linux VM_FAULT code: Linux would wait forever.
  kTimeout,
};

const char* vm_fault_name(VmFault f);

// What a fault on behalf of a kernel-side access (GUP, the CPU-access API) means for its
// caller: 0 to retry the access (kOk, kRetry), -EFAULT (SIGSEGV, SIGBUS), -ENOMEM (OOM) or
// -ETIMEDOUT (kTimeout: give up, the page stays busy).
int vm_fault_errno(VmFault f);

enum FaultFlags : unsigned {
  kFaultWrite = 1u << 0,   // FAULT_FLAG_WRITE (stores and atomics)
  kFaultRemote = 1u << 1,  // a fault on behalf of a device (hmm_range_fault)
  // FAULT_FLAG_RETRY_NOWAIT: do not wait for a migration in flight, return kRetry at once.
  // A caller that holds folio locks of its own migration (the unified walk) must not sleep on
  // another migration's: the two could wait on each other.
  kFaultRetryNowait = 1u << 2,
};

// What a device-memory provider learns about a CPU fault on one of its pages (struct
// vm_fault): the faulting address space and address, the fault flags, and the device page,
// which the fault handler has locked and holds a reference on for the call.
struct VmFaultInfo {
  AddressSpace* mm;
  Va address;
  unsigned flags;
  Folio* page;
  // The fault came through a device-private PMD (vmf->pte == NULL in the kernel): page is the
  // head of a 2 MiB folio and the driver migrates the whole folio.
  bool pmd = false;
};

// Resolves one fault at va. Caller holds the mmap lock (read or write) and no other gpusvm
// lock; may sleep (waits on folio locks / migrations, each bounded by hang_timeout(); on
// expiry the fault returns kTimeout, logged naming the address, the folio and its holder).
// VMA permission checks are done here: a write to a VMA without VM_WRITE, or any access to a
// VMA without VM_READ, is kSigsegv.
VmFault handle_mm_fault(AddressSpace& mm, Va va, unsigned flags) GPUSVM_REQUIRES_SHARED(mm.mmap_lock());

}  // namespace gpusvm::mm
