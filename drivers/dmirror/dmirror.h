// Dmirror: one open dmirror file - a device mirror of the opener's address space, and the
// ioctls of uapi/dmirror.h (the file half of lib/test_hmm.c).
//
// Design notes
//  - Opening inserts one interval notifier over the whole user address space. Its callback
//    advances the notifier sequence (set_seq) and erases the device page-table entries of
//    the range, with the one exception below.
//  - READ / WRITE copy through the device page table. A missing entry (for WRITE: or one not
//    tagged writable) triggers a device fault pass: hmm_range_fault over [that page, end) in
//    32-page chunks with the read_begin / read_retry protocol, entries stored under the mutex.
//    `faults` counts the passes, `cpages` the pages copied.
//  - MIGRATE_TO_DEV / MIGRATE_TO_SYS run migrate_vma per VMA and per 512-page chunk, with
//    MIGRATE_VMA_SELECT_COMPOUND (2 MiB folios move whole when memory allows, migrate_copy.h).
//  - Own-migration invalidations (the owner-skip decision, docs/dmirror.md): test_hmm returns
//    early for a MIGRATE invalidation tagged with its own device, without set_seq, because it
//    rewrites the entries of the pages it migrates itself. Here:
//      * the callback always calls set_seq, so a mirror fault of this file that sampled the
//        sequence before the migration retries instead of storing the page that moves;
//      * it skips erasing only for the migration this very file runs, in this thread (the
//        callback runs synchronously in the migrating thread; a thread-local marks it). Every
//        other file - of this device or another, in any thread - erases as usual;
//      * the migrating file erases the entries of the pages it collected before copying them
//        (the device unmaps its own MMU before the copy) and stores the destinations after
//        migrate_vma_pages, unless an invalidation its own migrate_vma calls did not raise
//        (another thread's munmap, mprotect, fault...) hit the chunk meanwhile (then it stores
//        nothing and the next access faults). Invalidations its own calls raise (the MIGRATE
//        ones, a PMD split during collection) are part of the migration. An invalidation
//        that called the file before the migration began may still be running (a migration
//        in another thread invalidates its range, then collects - it could take the page the
//        file is about to store): MIGRATE_TO_DEV waits it out with read_begin() first.
//    Pages of the range that were not collected keep their entries: they did not move.
//  - EXCLUSIVE programs each page under the notifier protocol, as a real driver must
//    (nouveau_atomic_range_fault): read_begin, make_device_exclusive tagged with the device
//    as owner, then under the mutex read_retry before the ATOMIC entry is stored, retried
//    within 1 s. Any invalidation after read_begin (a MADV_DONTNEED zapping the new entry
//    under the mmap read lock, the CPU taking the page back) makes it retry, else the device
//    would keep an entry to a frame that is freed and reused. The one invalidation it must
//    not count is its own EXCLUSIVE one (raised inside make_device_exclusive, in this thread,
//    before the entry is installed): the callback erases the page for it but does not set
//    the sequence. Every other file, and every other event, sets it as usual.
//
// Locking: mutex_ (gpusvm/base/lock_order.h) guards the device page table and the list of migrations in
// flight. It is never held across a call into gpusvm/mm. flags_ is atomic (FLAGS may race
// with a migration consuming FAIL_ALLOC).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "drivers/devfs/device.h"
#include "drivers/dmirror/device_pt.h"
#include "drivers/dmirror/dmirror_device.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/lock.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "uapi/dmirror.h"

namespace gpusvm::dmirror {

class Dmirror final : public devfs::File, private mm::MmuIntervalNotifierOps {
 public:
  // Errors: -EINVAL (the address space has exited), -ENOMEM.
  static Result<std::shared_ptr<Dmirror>> create(std::shared_ptr<DmirrorDevice> dev,
                                                 std::shared_ptr<mm::AddressSpace> mm);
  // release: removes the notifier (no callback runs after it) and frees the page table.
  ~Dmirror() override;
  Dmirror(const Dmirror&) = delete;
  Dmirror& operator=(const Dmirror&) = delete;

  // devfs::File. arg is a struct hmm_dmirror_cmd. Errors common to every request: -EFAULT
  // (null arg), -EINVAL (unaligned addr, npages 0 or overflowing, unknown request), then the
  // request's own (see dmirror.cc).
  int ioctl(devfs::Process& caller, unsigned long request, void* arg) override;
  // devfs::File mmap (dmirror_fops_mmap): a zeroed system page per address of the new
  // mapping, inserted with vm_insert_page (the VMA becomes VM_MIXEDMAP); the mapping owns the
  // pages. Errors: -ENOMEM (allocation, injectable as "mm.alloc_folio"), vm_insert_page's.
  int mmap(devfs::Process& caller, mm::Vma& vma) override;

  DmirrorDevice& device() const { return *dev_; }
  // The device page table, for tests: number of entries, and the entry of va's page.
  size_t pt_entries() const GPUSVM_EXCLUDES(mutex_);
  std::optional<DptEntry> pt_lookup(mm::Va va) const GPUSVM_EXCLUDES(mutex_);

  // The device page table against the CPU page table (the driver's half of mm::check): every
  // entry must point at exactly the frame that backs its address in the CPU page table now -
  // the present page (a PMD leaf's page at that offset), or the device page of a
  // device-private or device-exclusive entry - with no more access than that entry grants
  // (kDptWrite only over a writable entry, kDptAtomic only over a device-exclusive one). A
  // mismatch is a stale device mapping: an invalidation the mirror missed or ignored, and the
  // device reads or writes a frame that no longer holds its address's data.
  // Returns the problems, one line each (empty: consistent). Call at a quiescent point (no
  // migration or device fault of this file in flight: a migration stores its destinations
  // before finalize removes the migration entries). Takes the mmap lock (read), mutex_ and
  // page-table locks; no gpusvm lock may be held.
  std::vector<std::string> check_mirror() const GPUSVM_EXCLUDES(mutex_);
  // Test hook: stores `e` for va's page as a buggy driver would, bypassing the notifier
  // protocol (to prove that check_mirror() sees it).
  void TEST_pt_store(mm::Va va, DptEntry e) GPUSVM_EXCLUDES(mutex_);
  void TEST_pt_erase(mm::Va va) GPUSVM_EXCLUDES(mutex_);

 private:
  class SnapshotInterval;
  // The driver's copy of the caller's buffer (copy_to_user happens only on success).
  struct Bounce {
    mm::Va addr;                 // first page of the request
    std::vector<std::byte> buf;  // npages * kPageSize
    uint64_t cpages = 0;         // pages copied so far, from addr
  };
  // A migration of [start, end) by this file in flight; `hit` is set by a foreign
  // invalidation of the range whose callback runs after the record was published (earlier
  // ones are waited out before the migration collects, see migrate_chunk_to_dev).
  struct MigrationRecord {
    mm::Va start;
    mm::Va end;
    bool hit;
  };

  Dmirror(std::shared_ptr<DmirrorDevice> dev, std::shared_ptr<mm::AddressSpace> mm)
      : dev_(std::move(dev)), mm_(std::move(mm)) {}

  // MmuIntervalNotifierOps.
  bool invalidate(mm::MmuIntervalNotifier* n, const mm::MmuNotifierRange& range,
                  uint64_t cur_seq) override;
  // Takes mutex_ for an invalidation: sleeps when the range is blockable, else trylock.
  bool lock_for_invalidation(const mm::MmuNotifierRange& range) GPUSVM_TRY_ACQUIRE(true, mutex_);

  // The requests (cmd already validated; cpages/faults zeroed).
  int read(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int write(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int migrate_to_dev(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int migrate_to_sys(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int snapshot(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int exclusive(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  int check_exclusive(hmm_dmirror_cmd& cmd) GPUSVM_EXCLUDES(mutex_);
  // One page of EXCLUSIVE: makes va exclusive to the device and stores its ATOMIC entry
  // under the notifier protocol. Returns 0, make_device_exclusive's errors, hmm_range_fault's
  // (a retry faults the page in writable first), -EBUSY (1 s budget spent retrying).
  // Context: mmap lock held (read), nothing else.
  int exclusive_page(mm::Va va) GPUSVM_EXCLUDES(mutex_) GPUSVM_REQUIRES_SHARED(mm_->mmap_lock());
  // Faults va in writable with hmm_range_fault (REQ_FAULT | REQ_WRITE), so that a following
  // make_device_exclusive finds a writable PTE and raises no invalidation but its own.
  int fault_in_writable(mm::Va va) GPUSVM_EXCLUDES(mutex_);
  // Marks, for the calling thread, that this file runs make_device_exclusive, so the
  // callback can tell its own EXCLUSIVE invalidation (see the design notes). RAII.
  class ExclusiveScope;
  bool exclusive_in_this_thread() const;

  // Device fault over [start, end): hmm_range_fault in chunks, entries stored. A write that
  // finds one of this device's own pages mapped read-only (mprotect made its entry read-only;
  // hmm reports the caller's own pages as they are, without faulting) migrates that page back
  // to system memory first, where the write fault can make it writable. Returns 0, -EFAULT /
  // -EPERM (hmm_range_fault), -EBUSY (1 s budget spent retrying), -ENOMEM.
  int fault(mm::Va start, mm::Va end, bool write) GPUSVM_EXCLUDES(mutex_);
  // The first page of range whose result is this device's own page without WRITE, or 0.
  mm::Va own_read_only_page(const mm::HmmRange& range) const;
  // One chunk: the read_begin / hmm_range_fault / read_retry loop; returns with mutex_ held
  // on success (the caller stores the result), without it on error.
  int range_fault(mm::HmmRange* range) GPUSVM_TRY_ACQUIRE(0, mutex_);
  void store_range_locked(const mm::HmmRange& range) GPUSVM_REQUIRES(mutex_);
  // Copies between the device page table and the bounce buffer, from b->done onwards.
  // -ENOENT at the first page without a (writable) entry.
  int do_read_locked(mm::Va end, Bounce* b) GPUSVM_REQUIRES(mutex_);
  // READ / WRITE repeat a fault pass only when an invalidation erased entries between the
  // fault and the copy: true (logged, naming the range) once kMaxFaultPasses passes or
  // hang_timeout() are spent, and the request fails -EBUSY.
  bool fault_passes_exhausted(int pass, std::chrono::steady_clock::time_point deadline, mm::Va at,
                              mm::Va end, const char* what) const;
  int do_write_locked(mm::Va end, Bounce* b) GPUSVM_REQUIRES(mutex_);
  uint8_t snapshot_entry(uint64_t hmm_pfn) const;
  // check_mirror's test of one entry; "" when it matches the CPU page table. mmap lock
  // (read) and mutex_ held.
  std::string check_entry_locked(uint64_t vpn, const DptEntry& e) const GPUSVM_REQUIRES(mutex_);

  // Migration helpers (dmirror_migrate.cc).
  // One migrate_vma chunk system -> device: collect, copy, commit, map.
  int migrate_chunk_to_dev(mm::MigrateVma* args) GPUSVM_EXCLUDES(mutex_);
  // One migrate_vma chunk device -> system. Adds the pages moved to *moved. -ENOMEM when a
  // system page could not be allocated (nothing of the chunk moved then).
  int migrate_chunk_to_sys(mm::MigrateVma* args, uint64_t* moved) GPUSVM_EXCLUDES(mutex_);
  // Erases the entries of the pages args collected (before their bytes are copied).
  void unmap_collected(const mm::MigrateVma& args) GPUSVM_EXCLUDES(mutex_);
  // Stores the migrated pages' destinations, unless `rec` was hit.
  void map_migrated(const mm::MigrateVma& args, const MigrationRecord& rec) GPUSVM_REQUIRES(mutex_);
  // One-shot FAIL_ALLOC: true (and the flag cleared) if it was set.
  bool consume_fail_alloc();
  // Marks, for the calling thread, that this file runs a migration: migrate_vma_setup and
  // migrate_vma_pages call our notifier synchronously from this thread, and the callback
  // recognises its own migration by this mark (see the design notes). RAII, nests.
  class MigratorScope;
  bool migrating_in_this_thread() const;

  const std::shared_ptr<DmirrorDevice> dev_;
  const std::shared_ptr<mm::AddressSpace> mm_;
  mm::MmuIntervalNotifier notifier_;
  std::atomic<uint64_t> flags_{0};  // HMM_DMIRROR_FLAG_*; FLAGS replaces, allocation consumes

  mutable Mutex mutex_{&kDmirrorMutexClass};
  DevicePt pt_ GPUSVM_GUARDED_BY(mutex_);
  std::vector<MigrationRecord*> migrations_ GPUSVM_GUARDED_BY(mutex_);
};

}  // namespace gpusvm::dmirror
