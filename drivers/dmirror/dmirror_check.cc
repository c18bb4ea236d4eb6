// Dmirror::check_mirror: the device page table against the CPU page table.
//
// Why it is exact even though it takes only the mmap lock (read): it holds mutex_ while it
// reads the CPU entries, and every change to a CPU entry that the device may map (zap,
// migration, COW, protection change, exclusive restore, split of a huge mapping it
// replaces...) is preceded by an invalidation whose callback takes mutex_ and erases the
// device entries first. So an entry still present here is one the CPU side has not started
// to change - or one the mirror failed to erase, which is what this check exists to find.
// The exception is the file's own migration (its invalidation does not erase; it stores the
// destinations before finalize): hence "call at a quiescent point".
#include <cstdio>

#include "drivers/dmirror/dmirror.h"

namespace gpusvm::dmirror {

using mm::kPageShift;
using mm::Va;

namespace {

// The CPU entry that backs va: a PTE, or a PMD leaf narrowed to va's page.
struct CpuEntry {
  mm::Pte pte;       // none when there is no entry
  mm::Pfn pfn = 0;   // the frame of va's page (present, device-private or -exclusive)
  bool huge = false;
};

CpuEntry read_cpu_entry(mm::AddressSpace& mm, Va va) {
  mm.mmap_assert_locked();
  CpuEntry c;
  mm::PmdSlot slot = mm.page_table().pmd_lookup(va);
  if (!slot) return c;
  {
    SpinLockGuard g(&slot.table->lock);
    const mm::Pmd pmd = slot.table->get(slot.index);
    if (pmd.is_leaf()) {
      c.pte = pmd.leaf();
      c.pfn = c.pte.pfn() + ((va - mm::pmd_align_down(va)) >> kPageShift);
      c.huge = true;
      return c;
    }
    if (!pmd.is_table()) return c;
  }
  mm::PteTable* t = mm.page_table().pte_offset_map_lock(slot);
  if (!t) return c;  // changed to a leaf meanwhile: impossible at a quiescent point
  c.pte = t->get(mm::pte_index(va));
  c.pfn = c.pte.pfn();
  mm::PageTable::pte_unmap_unlock(t);
  return c;
}

const char* cpu_kind(const mm::Pte& e) {
  if (e.is_none()) return "none";
  if (e.present()) return e.special() ? "special" : "present";
  if (e.is_migration()) return "migration";
  if (e.is_device_private()) return "device-private";
  if (e.is_device_exclusive()) return "device-exclusive";
  return "unknown";
}

}  // namespace

std::string Dmirror::check_entry_locked(uint64_t vpn, const DptEntry& e) const {
  mutex_.assert_held();
  mm_->mmap_assert_locked();
  const Va va = vpn << kPageShift;
  const CpuEntry c = read_cpu_entry(*mm_, va);
  const mm::Pte& p = c.pte;
  const bool cpu_maps = p.present() || p.is_device_private() || p.is_device_exclusive();
  // What the CPU entry lets a mirror do: write through a writable present entry, a writable
  // device-private entry, or a device-exclusive one (made from a writable PTE).
  const bool cpu_write = p.present() ? p.write()
                         : p.is_device_private() ? p.soft_leaf_write()
                                                 : p.is_device_exclusive();
  const char* why = nullptr;
  if (!mm_->vma_lookup(va)) why = "no VMA";
  else if (!cpu_maps) why = "the CPU entry maps no frame";
  else if (c.pfn != e.pfn) why = "the CPU entry maps another frame";
  else if ((e.tags & kDptWrite) && !cpu_write) why = "device writable, CPU entry read-only";
  else if ((e.tags & kDptAtomic) && !p.is_device_exclusive()) why = "atomic, CPU entry not device-exclusive";
  if (!why) return "";
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "dmirror%d file %p: va %#llx -> pfn %#llx%s%s: %s (CPU entry: %s%s, pfn %#llx, %s)",
                dev_->id(), static_cast<const void*>(this), static_cast<unsigned long long>(va),
                static_cast<unsigned long long>(e.pfn), (e.tags & kDptWrite) ? " write" : " read",
                (e.tags & kDptAtomic) ? " atomic" : "", why, cpu_kind(p), c.huge ? " PMD" : "",
                static_cast<unsigned long long>(cpu_maps ? c.pfn : 0),
                cpu_write ? "writable" : "read-only");
  return buf;
}

std::vector<std::string> Dmirror::check_mirror() const {
  std::vector<std::string> problems;
  if (mm_->exited()) {
    // The address space is gone: its notifier's release must have erased everything.
    MutexLock g(&mutex_);
    if (pt_.size() != 0) {
      problems.push_back("dmirror" + std::to_string(dev_->id()) + ": " + std::to_string(pt_.size()) +
                         " device entries left after the address space exited");
    }
    return problems;
  }
  ReadLock g(&mm_->mmap_lock());
  MutexLock m(&mutex_);
  for (const auto& [vpn, e] : pt_.entries()) {
    std::string p = check_entry_locked(vpn, e);
    if (!p.empty()) problems.push_back(std::move(p));
  }
  return problems;
}

void Dmirror::TEST_pt_store(Va va, DptEntry e) {
  MutexLock g(&mutex_);
  pt_.store(va >> kPageShift, e);
}

void Dmirror::TEST_pt_erase(Va va) {
  MutexLock g(&mutex_);
  pt_.erase(va >> kPageShift);
}

}  // namespace gpusvm::dmirror
