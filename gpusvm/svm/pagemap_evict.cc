// Device memory back to system memory: evict_to_ram (drm_pagemap_evict_to_ram, by device
// pfn) and the CPU-fault migrate_to_ram (__drm_pagemap_migrate_to_ram, by address, honouring
// the residency timeslice).
#include <atomic>
#include <cerrno>
#include <thread>
#include <vector>

#include "gpusvm/base/sched_point.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/migrate.h"
#include "gpusvm/mm/vma.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap_migrate.h"
#include "gpusvm/svm/pagemap_zdd.h"

namespace gpusvm::svm {

using mm::kPageShift;
using mm::kPageSize;

namespace {
// evict_to_ram: migrate_device_pfns collected the allocation's pages (migration entries
// everywhere), nothing copied. Held: the collected device folios' locks.
GPUSVM_SCHED_POINT(g_sp_evict_collected, "svm.evict_to_ram.collected");
// evict_to_ram: the allocation was not detached yet; its pfns are about to be asked for.
// Nothing held but the caller's reference on the allocation.
GPUSVM_SCHED_POINT(g_sp_evict_populate, "svm.evict_to_ram.populate");
// migrate_to_ram (CPU fault): migrate_vma_setup collected the window. Held: the mmap lock
// (read), the fault page's lock (the fault handler's) and the collected folios' locks.
GPUSVM_SCHED_POINT(g_sp_fault_collected, "svm.migrate_to_ram.collected");
// migrate_to_ram (CPU fault) left the pages alone: the timeslice had not expired (counted in
// timeslice_deferred). Held: the mmap lock (read) and the fault page's lock.
GPUSVM_SCHED_POINT(g_sp_timeslice_deferred, "svm.migrate_to_ram.timeslice_deferred");

// The installed timeslice clock (nullptr: steady_clock). relaxed: a test installs it before
// it starts the migration under test (a happens-before edge through the lock or the thread
// start that follows), and only the pointer is read.
std::atomic<TimesliceClock> g_timeslice_clock{nullptr};

}  // namespace

std::chrono::steady_clock::time_point timeslice_now() {
  TimesliceClock clock = g_timeslice_clock.load(std::memory_order_relaxed);
  return clock ? clock() : std::chrono::steady_clock::now();
}

TimesliceClock set_timeslice_clock(TimesliceClock clock) {
  return g_timeslice_clock.exchange(clock, std::memory_order_relaxed);
}

namespace {

// pages[i] = the device page of each collected source page (nullptr elsewhere).
void source_pages(mm::PhysMem* mem, const uint64_t* src, const uint64_t* dst, std::vector<mm::Folio*>& pages) {
  for (uint64_t i = 0; i < pages.size();) {
    mm::Folio* s = mpfn_folio(mem, src[i]);
    const uint64_t n = s ? s->head()->nr_pages() : 1;
    for (uint64_t j = 0; j < n && i + j < pages.size(); j++) {
      pages[i + j] = (s && (dst[i] & mm::MIGRATE_PFN_VALID)) ? s->page(j) : nullptr;
    }
    i += n;
  }
}

// Copies the collected pages that got a system destination. Returns 0 or the copy's error.
int copy_back(mm::PhysMem* mem, Devmem* devmem, const uint64_t* src, const uint64_t* dst, uint64_t npages) {
  std::vector<PagemapAddr> addrs(npages);
  std::vector<mm::Folio*> pages(npages, nullptr);
  int err = map_pages(mem, devmem->device(), nullptr, addrs.data(), dst, npages, DmaDirection::kFromDevice);
  if (!err) {
    source_pages(mem, src, dst, pages);
    err = devmem->ops()->copy_to_ram(pages.data(), addrs.data(), npages, nullptr);
  }
  unmap_pages(mem, devmem->device(), addrs.data(), dst, npages);
  return err;
}

}  // namespace

int evict_to_ram(Devmem* devmem) {
  if (!devmem || !devmem->mm() || !devmem->pagemap()) return -EINVAL;
  const uint64_t npages = devmem->npages();
  mm::PhysMem* mem = devmem->pagemap()->dev_pagemap()->mem();
  int err = 0;
  for (int attempt = 0; attempt < 3; attempt++) {
    if (devmem->detached().signaled()) return 0;
    if (devmem->mm()->exited()) return -EFAULT;  // mmget_not_zero
    std::vector<uint64_t> src(npages), dst(npages);
    g_sp_evict_populate.reach();
    err = devmem->ops()->populate_devmem_pfn(devmem, npages, src.data());
    if (err) break;
    err = mm::migrate_device_pfns(mem, src.data(), npages);
    if (err) break;
    g_sp_evict_collected.reach();
    uint64_t mpages = 0;
    err = populate_ram_pfn(mem, devmem, src.data(), dst.data(), npages, &mpages);
    if (!err && mpages) err = copy_back(mem, devmem, src.data(), dst.data(), npages);
    if (err) unlock_put_pages(mem, dst.data(), npages);
    mm::migrate_device_pages(mem, src.data(), dst.data(), npages);
    mm::migrate_device_finalize(mem, src.data(), dst.data(), npages);
    if (devmem->detached().signaled()) return 0;
    std::this_thread::yield();  // cond_resched: let the holder of a busy page finish
  }
  return err ? err : -EBUSY;
}

mm::VmFault pagemap_migrate_to_ram(const mm::VmFaultInfo& vmf) {
  mm::AddressSpace* as = vmf.mm;
  as->mmap_assert_locked();
  pagemap_stats().cpu_faults.fetch_add(1, std::memory_order_relaxed);
  mm::Folio* folio = vmf.page->head();
  PagemapZdd* zdd = page_zdd(folio);
  if (!zdd) return mm::VmFault::kSigbus;
  Devmem* devmem = zdd->devmem;
  // The residency timeslice (upstream returns 0 without migrating: the access is retried and
  // faults again until the time is up). The yield stands for the time a CPU takes to return
  // to the faulting instruction.
  if (timeslice_now() < devmem->timeslice_expiration()) {
    pagemap_stats().timeslice_deferred.fetch_add(1, std::memory_order_relaxed);
    g_sp_timeslice_deferred.reach();
    std::this_thread::yield();
    return mm::VmFault::kOk;
  }
  // The whole allocation comes back (its size-aligned window around the fault), clipped to
  // the VMA for a partly unmapped one.
  const uint64_t size = std::max<uint64_t>(devmem->size(), folio->nr_pages() << kPageShift);
  const mm::Vma* vma = as->vma_lookup(vmf.address);
  if (!vma) return mm::VmFault::kSigbus;
  mm::Va start = vmf.address - vmf.address % size;
  mm::Va end = start + size;
  start = std::max(start, vma->start);
  end = std::min(end, vma->end);
  const uint64_t npages = (end - start) >> kPageShift;
  std::vector<uint64_t> src(npages), dst(npages);
  mm::MigrateVma m{.mm = as, .start = start, .end = end, .src = src.data(), .dst = dst.data(),
                   .pgmap_owner = folio->pagemap()->owner(),
                   .flags = mm::MIGRATE_VMA_SELECT_DEVICE_PRIVATE | mm::MIGRATE_VMA_SELECT_COMPOUND,
                   .fault_page = folio};
  if (mm::migrate_vma_setup(&m) != 0) return mm::VmFault::kSigbus;
  if (m.cpages == 0) return mm::VmFault::kOk;  // raced with another CPU fault
  g_sp_fault_collected.reach();
  mm::PhysMem* mem = as->mem();
  uint64_t mpages = 0;
  // Only this allocation's pages move (the window may hold a peer's pages of our owner).
  int err = populate_ram_pfn(mem, devmem, src.data(), dst.data(), npages, &mpages);
  if (!err) err = copy_back(mem, devmem, src.data(), dst.data(), npages);
  if (err) unlock_put_pages(mem, dst.data(), npages);
  m.mm->mmap_assert_locked();
  mm::migrate_vma_pages(&m);
  mm::migrate_vma_finalize(&m);
  return err ? mm::VmFault::kSigbus : mm::VmFault::kOk;
}

}  // namespace gpusvm::svm
