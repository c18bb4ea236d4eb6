#include "gpusvm/mm/cpu_access.h"

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>

#include "gpusvm/base/log.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/fault.h"

namespace gpusvm::mm::cpu {
namespace {

// A fault normally resolves an access in one or two rounds, but an access can lose many
// races in a row against a device that keeps migrating the page (each round waits for the
// migration, then finds the page moved again). The budget is therefore time, not rounds:
// an access still faulting after hang_timeout() is a livelock or a bug and fails -EBUSY.
constexpr int kRoundsPerClockCheck = 64;

// Runs fn(bytes of the page at va) with the access permitted by the page table and the
// entry's lock held (see the exactness note in the header). Faults as a CPU would.
template <typename Fn>
int access_page(AddressSpace& mm, Va va, bool write, Fn&& fn) {
  PhysMem* mem = mm.mem();
  PageTable& pt = mm.page_table();
  ReadLock g(&mm.mmap_lock());
  // Started lazily at the first clock check: the common access (one or two rounds) never
  // reads the clock.
  std::chrono::steady_clock::time_point deadline{};
  uint64_t round = 0;
  for (;; round++) {
    if (round % kRoundsPerClockCheck == kRoundsPerClockCheck - 1) {
      const auto now = std::chrono::steady_clock::now();
      if (deadline == std::chrono::steady_clock::time_point{}) {
        deadline = now + hang_timeout();
      } else if (now > deadline) {
        break;
      }
    }
    // A present entry is not enough: PROT_NONE keeps entries but forbids access, and then the
    // fault handler reports SIGSEGV like the hardware fault would.
    Vma* vma = mm.vma_lookup(va);
    const bool allowed = vma && (vma->flags & VM_READ) && (!write || (vma->flags & VM_WRITE));
    PmdSlot slot = allowed ? pt.pmd_lookup(va) : PmdSlot{};
    if (slot) {
      if (slot.load_lockless().is_huge_present()) {
        SpinLockGuard pl(&slot.table->lock);
        const Pmd pmd = slot.table->get(slot.index);
        if (pmd.is_huge_present() && (!write || pmd.leaf().write())) {
          const Pte leaf = pmd.leaf();
          const Pte upd = write ? leaf.mkyoung().mkdirty() : leaf.mkyoung();
          if (upd != leaf) slot.table->set(slot.index, Pmd::make_leaf(upd));
          fn(mem->pfn_to_page(leaf.pfn() + pte_index(va))->data() + (va & (kPageSize - 1)));
          return 0;
        }
      } else if (PteTable* t = pt.pte_offset_map_lock(slot)) {
        const unsigned i = pte_index(va);
        const Pte pte = t->get(i);
        if (pte.present() && (!write || pte.write())) {
          const Pte upd = write ? pte.mkyoung().mkdirty() : pte.mkyoung();
          if (upd != pte && !pte.special()) t->set(i, upd);
          fn(mem->pfn_to_page(pte.pfn())->data() + (va & (kPageSize - 1)));
          PageTable::pte_unmap_unlock(t);
          return 0;
        }
        PageTable::pte_unmap_unlock(t);
      }
    }
    if (int rc = vm_fault_errno(handle_mm_fault(mm, va, write ? unsigned{kFaultWrite} : 0u))) return rc;
  }
  log::get().error("cpu access at {:#x} ({}) still faulting after {} rounds and {} ms", va,
                   write ? "write" : "read", round, hang_timeout().count());
  return -EBUSY;
}

int check_span(Va va, size_t len) {
  if (va + len < va || va + len > kTaskSize) return -EFAULT;
  return 0;
}

// Splits [va, va + len) at page boundaries and runs fn(bytes, offset in the range, length)
// on each piece through access_page.
template <typename Fn>
int access_range(AddressSpace& mm, Va va, size_t len, bool write, Fn&& fn) {
  if (int rc = check_span(va, len)) return rc;
  for (size_t off = 0; off < len;) {
    const size_t n = std::min<size_t>(len - off, kPageSize - ((va + off) & (kPageSize - 1)));
    int rc = access_page(mm, va + off, write, [&](std::byte* p) { fn(p, off, n); });
    if (rc) return rc;
    off += n;
  }
  return 0;
}

}  // namespace

int copy_out(AddressSpace& mm, Va va, void* dst, size_t len) {
  auto* out = static_cast<std::byte*>(dst);
  return access_range(mm, va, len, false,
                      [&](std::byte* p, size_t off, size_t n) { std::memcpy(out + off, p, n); });
}

int copy_in(AddressSpace& mm, Va va, const void* src, size_t len) {
  const auto* in = static_cast<const std::byte*>(src);
  return access_range(mm, va, len, true,
                      [&](std::byte* p, size_t off, size_t n) { std::memcpy(p, in + off, n); });
}

int memset(AddressSpace& mm, Va va, int c, size_t len) {
  return access_range(mm, va, len, true,
                      [&](std::byte* p, size_t, size_t n) { std::memset(p, c, n); });
}

namespace {
template <typename Op>
Result<uint64_t> atomic_op(AddressSpace& mm, Va va, Op&& op) {
  if (va % sizeof(uint64_t) != 0) return Err{-EINVAL};
  if (int rc = check_span(va, sizeof(uint64_t))) return Err{rc};
  uint64_t old = 0;
  int rc = access_page(mm, va, true, [&](std::byte* p) {
    // The frame is shared with every other accessor of the page (other CPUs, and devices in
    // later layers): a real atomic, not just the page-table lock, makes it a locked op.
    std::atomic_ref<uint64_t> word(*reinterpret_cast<uint64_t*>(p));
    old = op(word);
  });
  if (rc) return Err{rc};
  return old;
}
}  // namespace

Result<uint64_t> atomic_fetch_add(AddressSpace& mm, Va va, uint64_t delta) {
  return atomic_op(mm, va, [delta](std::atomic_ref<uint64_t>& w) { return w.fetch_add(delta); });
}

Result<uint64_t> atomic_cmpxchg(AddressSpace& mm, Va va, uint64_t expected, uint64_t desired) {
  return atomic_op(mm, va, [expected, desired](std::atomic_ref<uint64_t>& w) {
    uint64_t e = expected;
    w.compare_exchange_strong(e, desired);
    return e;
  });
}

Result<uint64_t> atomic_exchange(AddressSpace& mm, Va va, uint64_t value) {
  return atomic_op(mm, va, [value](std::atomic_ref<uint64_t>& w) { return w.exchange(value); });
}

}  // namespace gpusvm::mm::cpu
