// svm-example: the driver-integration walk-through as a program (docs/driver-integration.md).
//
// A process maps 8 MiB (half THP, half 4 KiB pages) and writes it. A GPU with 16 MiB of VRAM
// (tools/gpusvm-bench/bench_svm_driver.h: the fault handler and the invalidate callback the
// document explains) mirrors the whole address space and:
//   1. faults the first half in system memory and writes every page through its PTEs;
//   2. faults the second half with the "devmem" policy (migrated to VRAM first) and writes it;
//   3. the CPU then reads every byte the GPU wrote (device pages come back by migrate_to_ram);
//   4. MADV_DONTNEED of one range: the GPU loses exactly that range, a new fault maps zeroes;
//   5. munmap: every range goes to the garbage collector, which the next fault runs.
// Prints what happens and "svm-example: ok" at the end; exits 1 on any mismatch.
#include <sys/mman.h>

#include <cstdio>
#include <cstdlib>

#include "gpusvm/base/errno.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/physmem.h"
#include "tools/gpusvm-bench/bench_svm_driver.h"

using gpusvm::Result;
using gpusvm::bench::BenchGpu;
using gpusvm::bench::BenchVram;
using gpusvm::mm::kPageSize;
using gpusvm::mm::kPmdSize;
using gpusvm::mm::Va;

namespace {

int failures = 0;

void check(bool ok, const char* what, Va va = 0) {
  if (ok) return;
  if (failures++ < 10) std::printf("MISMATCH: %s at %#llx\n", what, static_cast<unsigned long long>(va));
}

uint64_t gpu_value(Va va) { return va * 3 + 0x6770; }  // what the GPU writes at va

}  // namespace

int main() {
  namespace mm = gpusvm::mm;
  Result<std::unique_ptr<mm::PhysMem>> mem = mm::PhysMem::create({.ram_bytes = 64ULL << 20, .thp = mm::ThpMode::kMadvise});
  if (!mem) return 1;
  Result<std::unique_ptr<mm::AddressSpace>> as_r = mm::AddressSpace::create(mem->get());
  if (!as_r) return 1;
  mm::AddressSpace& as = **as_r;

  const uint64_t len = 8ULL << 20, half = len / 2;
  Result<Va> buf = as.mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS);
  if (!buf) return 1;
  const Va base = *buf;
  if (as.madvise(base, half, MADV_HUGEPAGE) || as.madvise(base + half, half, MADV_NOHUGEPAGE)) return 1;
  for (Va va = base; va < base + len; va += kPageSize) {
    if (mm::cpu::store<uint64_t>(as, va, 1)) return 1;  // populate: the CPU touched it first
  }

  {
    BenchVram vram(mem->get(), (16ULL << 20) / kPageSize, "vram0");
    int rc = 0;
    BenchGpu gpu(&as, {.name = "gpu0", .vram = &vram}, &rc);
    if (rc || !vram.ok()) {
      std::printf("init: %s\n", gpusvm::errno_describe(rc).c_str());
      return 1;
    }
    // 1 + 2: GPU faults (one per range: the handler maps the whole 2 MiB range), GPU writes.
    for (Va va = base; va < base + len; va += kPmdSize) {
      const auto placement = va < base + half ? BenchGpu::Placement::kSystem : BenchGpu::Placement::kDevmem;
      rc = gpu.fault(va, /*write=*/true, placement);
      check(rc == 0, "GPU fault", va);
    }
    for (Va va = base; va < base + len; va += kPageSize) {
      check(gpu.gpu_store(va, gpu_value(va)) == 0, "GPU store", va);
    }
    std::printf("gpu: %llu ranges, %llu commits, %llu migrations to vram, vram in use %llu KiB\n",
                static_cast<unsigned long long>(gpu.gpusvm()->nr_ranges()),
                static_cast<unsigned long long>(gpu.commits.load()),
                static_cast<unsigned long long>(gpu.migrations.load()),
                static_cast<unsigned long long>((vram.total_pages() - vram.free_pages()) * 4));
    check(gpu.migrations.load() == half / kPmdSize, "every devmem range migrated");
    // 3: the CPU reads every byte the GPU wrote (first word of each page, and the rest of
    // each page untouched by the GPU: still the CPU's).
    for (Va va = base; va < base + len; va += kPageSize) {
      Result<uint64_t> v = mm::cpu::load<uint64_t>(as, va);
      check(v && *v == gpu_value(va), "CPU read of a GPU write", va);
      Result<uint64_t> w = mm::cpu::load<uint64_t>(as, va + 8);
      check(w && *w == 0, "CPU read of an untouched word", va + 8);
    }
    std::printf("cpu: read back %llu pages the GPU wrote; vram in use after the CPU reads %llu KiB\n",
                static_cast<unsigned long long>(len / kPageSize),
                static_cast<unsigned long long>((vram.total_pages() - vram.free_pages()) * 4));
    // 4: an invalidation of one range.
    const Va one = base + kPmdSize;
    const uint64_t inv0 = gpu.invalidations.load();
    check(as.madvise(one, kPmdSize, MADV_DONTNEED) == 0, "MADV_DONTNEED");
    check(!gpu.gpu_load(one), "GPU PTE zapped by the invalidation", one);
    check(static_cast<bool>(gpu.gpu_load(base)), "other ranges keep their PTEs", base);
    check(gpu.fault(one, /*write=*/false) == 0, "GPU re-fault after MADV_DONTNEED", one);
    Result<uint64_t> z = gpu.gpu_load(one);
    check(z && *z == 0, "a re-faulted page reads zero", one);
    std::printf("invalidate: %llu notifier callback(s), %llu TLB flush(es); the range re-faulted reads zeroes\n",
                static_cast<unsigned long long>(gpu.invalidations.load() - inv0),
                static_cast<unsigned long long>(gpu.tlb_flushes.load()));
    // 5: munmap queues every range to the garbage collector; the next fault runs it.
    check(as.munmap(base, len) == 0, "munmap");
    const uint64_t before = gpu.gpusvm()->nr_ranges();
    check(gpu.fault(base, true) == -ENOENT, "a fault on unmapped memory is -ENOENT", base);
    std::printf("munmap: %llu ranges before the next fault, %llu after it (garbage collected %llu)\n",
                static_cast<unsigned long long>(before),
                static_cast<unsigned long long>(gpu.gpusvm()->nr_ranges()),
                static_cast<unsigned long long>(gpu.gc_removed.load()));
    check(gpu.gpusvm()->nr_ranges() == 0, "every range collected");
    check(vram.free_pages() == vram.total_pages(), "vram free after munmap");
  }
  const mm::CheckReport r = mm::check(**mem);
  check(r.ok(), "mm::check");
  if (!r.ok()) std::printf("%s\n", r.to_string().c_str());
  if (failures) {
    std::printf("svm-example: %d mismatches\n", failures);
    return 1;
  }
  std::printf("svm-example: ok\n");
  return 0;
}
