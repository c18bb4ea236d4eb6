// Shared fixture for the gpusvm/mm tests: a small machine, an address space, data patterns
// and the invariant check that every scenario ends with.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "gpusvm/base/fault_inject.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/mm/check.h"
#include "gpusvm/mm/cpu_access.h"
#include "gpusvm/mm/hmm.h"
#include "gpusvm/mm/mmu_notifier.h"
#include "gpusvm/mm/page_state.h"
#include "gpusvm/mm/physmem.h"
#include "gpusvm/mm/shmem.h"

namespace gpusvm::mm::testing {

inline std::unique_ptr<PhysMem> make_mem(uint64_t bytes = 64ULL << 20,
                                         ThpMode thp = ThpMode::kMadvise) {
  Result<std::unique_ptr<PhysMem>> mem = PhysMem::create({.ram_bytes = bytes, .thp = thp});
  if (!mem) return nullptr;
  return std::move(*mem);
}

inline std::unique_ptr<AddressSpace> make_as(PhysMem* mem) {
  Result<std::unique_ptr<AddressSpace>> as = AddressSpace::create(mem);
  if (!as) return nullptr;
  return std::move(*as);
}

// A word that says who wrote it where: "unwritten" (0) and "stale" values are told apart.
inline uint64_t pattern(Va va, uint64_t gen) { return (va * 0x9E3779B97F4A7C15ULL) ^ (gen << 56) ^ gen; }

// Writes pattern(va, gen) into the first word of every page of [start, start + len).
inline void fill_pages(AddressSpace& as, Va start, uint64_t len, uint64_t gen) {
  for (Va va = start; va < start + len; va += kPageSize) {
    ASSERT_EQ(cpu::store<uint64_t>(as, va, pattern(va, gen)), 0) << std::hex << va;
  }
}

// Checks the first word of every page; returns the number of mismatches (and reports the
// first few). `written_at`: where the data was written when it has moved since (mremap).
inline int verify_pages(AddressSpace& as, Va start, uint64_t len, uint64_t gen,
                        Va written_at = 0) {
  int bad = 0;
  const Va origin = written_at ? written_at : start;
  for (Va va = start; va < start + len; va += kPageSize) {
    const uint64_t want = pattern(origin + (va - start), gen);
    Result<uint64_t> v = cpu::load<uint64_t>(as, va);
    if (!v || *v != want) {
      if (bad++ < 5) {
        ADD_FAILURE() << "page " << std::hex << va << ": got " << (v ? *v : 0xdeadULL)
                      << " want " << want;
      }
    }
  }
  return bad;
}

inline Va map_anon(AddressSpace& as, uint64_t len, int prot = PROT_READ | PROT_WRITE,
                   bool huge = false, int extra_flags = 0) {
  Result<Va> va = as.mmap(0, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags);
  if (!va) return 0;
  if (huge && as.madvise(*va, len, MADV_HUGEPAGE) != 0) return 0;
  return *va;
}

// Every test ends with this: the invariant checker over the whole machine.
#define EXPECT_MM_CHECK_OK(mem)                                 \
  do {                                                          \
    ::gpusvm::mm::CheckReport r_ = ::gpusvm::mm::check(mem);    \
    EXPECT_TRUE(r_.ok()) << r_.to_string();                     \
  } while (0)

// A mirror's interval notifier: the invalidate callback takes the driver lock and bumps the
// sequence, as the protocol in mmu_notifier.h requires.
class TestMirror : public MmuIntervalNotifierOps {
 public:
  bool invalidate(MmuIntervalNotifier* n, const MmuNotifierRange& range, uint64_t cur_seq) override {
    std::lock_guard<std::mutex> g(lock);
    n->set_seq(cur_seq);
    invalidations++;
    events.push_back(range.event);
    return true;
  }
  bool saw(MmuNotifyEvent e) {
    std::lock_guard<std::mutex> g(lock);
    return std::find(events.begin(), events.end(), e) != events.end();
  }
  std::mutex lock;
  int invalidations = 0;
  std::vector<MmuNotifyEvent> events;
};

// Runs hmm_range_fault on [start, end) with the full protocol (read_begin, mmap read lock,
// retry on -EBUSY). Returns the result and fills pfns.
inline int mirror_range(AddressSpace& as, MmuIntervalNotifier& n, Va start, Va end,
                        uint64_t default_flags, std::vector<uint64_t>& pfns,
                        const void* owner = nullptr, uint64_t pfn_flags_mask = 0) {
  pfns.assign((end - start) / kPageSize, 0);
  for (int tries = 0; tries < 100; tries++) {
    HmmRange r{.notifier = &n, .notifier_seq = n.read_begin(), .start = start, .end = end,
               .hmm_pfns = pfns.data(), .default_flags = default_flags,
               .pfn_flags_mask = pfn_flags_mask, .dev_private_owner = owner};
    int rc;
    {
      ReadLock g(&as.mmap_lock());
      rc = hmm_range_fault(&r);
    }
    if (rc != -EBUSY) return rc;
  }
  return -EBUSY;
}

class MmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    mem = make_mem();
    ASSERT_NE(mem, nullptr);
    as = make_as(mem.get());
    ASSERT_NE(as, nullptr);
    initial_free = mem->free_pages();
  }
  void TearDown() override {
    fault_inject::disarm_all();
    EXPECT_MM_CHECK_OK(*mem);
    as.reset();
    // Exit returned every page: nothing leaked.
    EXPECT_EQ(mem->free_pages(), initial_free);
  }
  std::unique_ptr<PhysMem> mem;
  std::unique_ptr<AddressSpace> as;
  uint64_t initial_free = 0;
};

}  // namespace gpusvm::mm::testing
