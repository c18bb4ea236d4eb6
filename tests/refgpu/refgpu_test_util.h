// A small reference-GPU rig for the tests: system memory (PhysMem), a VRAM arena, one VM's
// page table, TLB and MMU, and helpers that map GPU VAs onto system pages or VRAM and read
// and write the bytes behind them directly (the test's view, not the GPU's).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "drivers/refgpu/gpu_mmu.h"
#include "drivers/refgpu/gpu_page_table.h"
#include "drivers/refgpu/tlb.h"
#include "drivers/refgpu/vram.h"
#include "gpusvm/mm/physmem.h"
#include "uapi/refgpu.h"

namespace gpusvm::refgpu::testing {

inline constexpr uint64_t kVa = 0x7f0000000000ull;

class Rig {
 public:
  Rig() {
    auto m = mm::PhysMem::create({.ram_bytes = 64ull << 20});
    EXPECT_TRUE(m.ok());
    mem = std::move(*m);
    auto v = VramArena::create(16ull << 20);
    EXPECT_TRUE(v.ok());
    vram = std::move(*v);
    resolver = std::make_unique<HostMemoryResolver>(mem.get(), vram.get());
    mmu = std::make_unique<GpuMmu>(1, &pt, &tlb, resolver.get());
  }
  ~Rig() {
    for (mm::Folio* f : folios) f->put();
  }

  // Maps [va, va + size) onto fresh zeroed system pages (4 KiB leaves). Returns the pfns.
  std::vector<mm::Pfn> map_system(uint64_t va, uint64_t size, uint8_t perms = kPermWrite | kPermAtomic) {
    std::vector<mm::Pfn> pfns;
    for (uint64_t off = 0; off < size; off += kSZ4K) {
      mm::Folio* f = mem->folio_alloc(0, true);
      EXPECT_NE(f, nullptr);
      {
        std::lock_guard<std::mutex> g(folios_mu);  // fault handlers map from their threads
        folios.push_back(f);
      }
      pfns.push_back(f->pfn());
      map_page(va + off, f->pfn(), perms);
    }
    return pfns;
  }
  void map_page(uint64_t va, mm::Pfn pfn, uint8_t perms) {
    auto res = pt.reserve(va, va + kSZ4K, kSZ4K);
    ASSERT_TRUE(res.ok());
    ASSERT_TRUE(pt.map(&*res, va, va + kSZ4K, kSZ4K, Target::kSystem, pfn << mm::kPageShift, perms).ok());
    tlb.invalidate(va, va + kSZ4K);
  }
  // Maps [va, va + size) onto VRAM at vram_off with leaves of `leaf`.
  void map_vram(uint64_t va, uint64_t size, uint64_t vram_off, uint64_t leaf, uint8_t perms = kPermWrite | kPermAtomic) {
    auto res = pt.reserve(va, va + size, leaf);
    ASSERT_TRUE(res.ok());
    ASSERT_TRUE(pt.map(&*res, va, va + size, leaf, Target::kVram, vram_off, perms).ok());
    tlb.invalidate(va, va + size);
  }
  // The host bytes behind a mapped GPU VA (the test's direct view).
  std::byte* host(uint64_t va) {
    auto l = pt.lookup(va);
    EXPECT_TRUE(l) << std::hex << va;
    if (!l) return nullptr;
    return resolver->resolve(l->target, l->addr + (va - l->va), 1);
  }
  void write(uint64_t va, const void* data, size_t len) {
    const auto* p = static_cast<const std::byte*>(data);
    for (size_t i = 0; i < len; i++) *host(va + i) = p[i];
  }
  template <typename T>
  T read(uint64_t va) {
    T v;
    std::byte buf[sizeof(T)];
    for (size_t i = 0; i < sizeof(T); i++) buf[i] = *host(va + i);
    std::memcpy(&v, buf, sizeof(T));
    return v;
  }

  std::unique_ptr<mm::PhysMem> mem;
  std::unique_ptr<VramArena> vram;
  GpuPageTable pt;
  Tlb tlb;
  std::unique_ptr<HostMemoryResolver> resolver;
  std::unique_ptr<GpuMmu> mmu;
  std::mutex folios_mu;
  std::vector<mm::Folio*> folios;  // under folios_mu
};

// Builds a batch instruction by instruction (what a C program would emit).
class Batch {
 public:
  template <typename Cmd>
  Batch& add(const Cmd& c) {
    const auto* p = reinterpret_cast<const std::byte*>(&c);
    bytes.insert(bytes.end(), p, p + sizeof(c));
    return *this;
  }
  Batch& store_dword(uint64_t addr, uint32_t v) {
    return add(refgpu_cmd_store_dword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_DWORD, 4), v, addr});
  }
  Batch& store_qword(uint64_t addr, uint64_t v) {
    return add(refgpu_cmd_store_qword{REFGPU_CMD_HEADER(REFGPU_OP_STORE_QWORD, 6), 0, addr, v});
  }
  Batch& atomic(uint16_t aop, uint64_t addr, uint64_t operand, uint64_t compare = 0, uint16_t flags = 0,
                uint64_t ret = 0) {
    return add(refgpu_cmd_atomic{REFGPU_CMD_HEADER(REFGPU_OP_ATOMIC, 10), aop, flags, addr, operand, compare, ret});
  }
  Batch& fence(uint64_t addr, uint64_t v) {
    return add(refgpu_cmd_fence_write{REFGPU_CMD_HEADER(REFGPU_OP_FENCE_WRITE, 6), 0, addr, v});
  }
  Batch& end() { return add(refgpu_cmd_batch_end{REFGPU_CMD_HEADER(REFGPU_OP_BATCH_END, 2), 0}); }
  std::vector<std::byte> bytes;
};

}  // namespace gpusvm::refgpu::testing
