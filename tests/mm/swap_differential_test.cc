// Differential tests of MADV_PAGEOUT against this machine's kernel (docs/reclaim.md). The host
// has no swap by default: the fixture adds a swap file (fallocate, mkswap, swapon) when it is
// root and no swap is active, and removes it afterwards; otherwise the test skips with the
// reason. Each scenario runs on the host (pages observed through /proc/self/pagemap: bit 63
// present, bit 62 swapped) and on the model (query_page), and the states and bytes must agree.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "tests/mm/mm_test_util.h"

namespace gpusvm::mm::testing {
namespace {

constexpr uint64_t kPages = 16;
constexpr uint64_t kLen = kPages * kPageSize;

// What one page is after a scenario, on either side.
enum class State { kNone, kPresent, kSwapped };
const char* state_name(State s) {
  return s == State::kNone ? "none" : s == State::kPresent ? "present" : "swapped";
}

// A swap file for the duration of a test, when none is active.
class HostSwap {
 public:
  HostSwap() {
    if (::geteuid() != 0) {
      why_ = "not root: cannot swapon";
      return;
    }
    if (active_swap()) {
      usable_ = true;  // someone's swap is on already: use it, leave it
      return;
    }
    path_ = "/tmp/gpusvm_swap_diff." + std::to_string(::getpid());
    const std::string cmd = "fallocate -l 64M " + path_ + " && chmod 600 " + path_ + " && mkswap " + path_ +
                            " >/dev/null 2>&1 && swapon " + path_ + " 2>/dev/null";
    if (std::system(cmd.c_str()) != 0) {
      why_ = "this kernel cannot swap to a file here (swapon failed)";
      cleanup();
      return;
    }
    usable_ = true;
  }
  ~HostSwap() { cleanup(); }
  bool usable() const { return usable_; }
  const std::string& why() const { return why_; }

 private:
  static bool active_swap() {
    std::ifstream f("/proc/swaps");
    std::string line;
    int n = 0;
    while (std::getline(f, line)) n++;
    return n > 1;
  }
  void cleanup() {
    if (path_.empty()) return;
    (void)std::system(("swapoff " + path_ + " 2>/dev/null; rm -f " + path_).c_str());
    path_.clear();
  }
  bool usable_ = false;
  std::string why_;
  std::string path_;
};

uint64_t pagemap(const void* addr) {
  const int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  uint64_t e = 0;
  if (fd >= 0) {
    (void)::pread(fd, &e, sizeof(e), static_cast<off_t>(reinterpret_cast<uintptr_t>(addr) / kPageSize * 8));
    ::close(fd);
  }
  return e;
}

State host_state(const void* addr) {
  const uint64_t e = pagemap(addr);
  if (e & (1ULL << 63)) return State::kPresent;
  if (e & (1ULL << 62)) return State::kSwapped;
  return State::kNone;
}

State model_state(AddressSpace& as, Va va) {
  const PageState st = query_page(as, va);
  if (st.kind == PageKind::kNone) return State::kNone;
  if (st.kind == PageKind::kSoftLeaf && st.leaf == SoftLeafType::kSwap) return State::kSwapped;
  return State::kPresent;
}

uint64_t word(uint64_t page, uint64_t w, uint64_t gen) { return pattern(page * kPageSize + w * 8, gen); }

enum class Scenario { kPrivate, kForkShared, kLazyfree, kLazyfreeRedirtied };

// The host run: states after MADV_PAGEOUT and the bytes read back afterwards (0 = right).
struct Outcome {
  std::vector<State> states;
  int bad_bytes = 0;
};

void host_fill(uint64_t* p, uint64_t gen, uint64_t pages) {
  for (uint64_t i = 0; i < pages; i++) {
    for (uint64_t w = 0; w < kPageSize / 8; w++) p[i * kPageSize / 8 + w] = word(i, w, gen);
  }
}

Outcome run_host(Scenario s) {
  Outcome o;
  void* m = ::mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return o;
  (void)::madvise(m, kLen, MADV_NOHUGEPAGE);
  auto* p = static_cast<uint64_t*>(m);
  host_fill(p, 1, kPages);
  pid_t child = -1;
  int pipefd[2] = {-1, -1};
  if (s == Scenario::kForkShared) {
    if (::pipe(pipefd) != 0) return o;
    child = ::fork();
    if (child == 0) {
      char c;
      (void)::read(pipefd[0], &c, 1);  // keeps the pages shared until the parent is done
      ::_exit(0);
    }
  }
  if (s == Scenario::kLazyfree || s == Scenario::kLazyfreeRedirtied) (void)::madvise(m, kLen, MADV_FREE);
  if (s == Scenario::kLazyfreeRedirtied) p[0] = word(0, 0, 2);
  (void)::madvise(m, kLen, MADV_PAGEOUT);
  for (uint64_t i = 0; i < kPages; i++) o.states.push_back(host_state(p + i * kPageSize / 8));
  for (uint64_t i = 0; i < kPages; i++) {
    for (uint64_t w = 0; w < kPageSize / 8; w++) {
      uint64_t want = word(i, w, 1);
      if (s == Scenario::kLazyfree || s == Scenario::kLazyfreeRedirtied) want = 0;
      if (s == Scenario::kLazyfreeRedirtied && i == 0) want = w == 0 ? word(0, 0, 2) : word(0, w, 1);
      if (p[i * kPageSize / 8 + w] != want) o.bad_bytes++;
    }
  }
  if (child > 0) {
    (void)::write(pipefd[1], "x", 1);
    (void)::waitpid(child, nullptr, 0);
    ::close(pipefd[0]);
    ::close(pipefd[1]);
  }
  ::munmap(m, kLen);
  return o;
}

class SwapDifferentialTest : public MmTest {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<PhysMem>> m = PhysMem::create({.ram_bytes = 64ULL << 20, .swap_slots = 1024});
    ASSERT_TRUE(m);
    mem = std::move(*m);
    as = make_as(mem.get());
    ASSERT_NE(as, nullptr);
    initial_free = mem->free_pages();
  }

  Outcome run_model(Scenario s) {
    Outcome o;
    const Va va = map_anon(*as, kLen);
    std::vector<uint64_t> buf(kLen / 8);
    host_fill(buf.data(), 1, kPages);
    EXPECT_EQ(cpu::copy_in(*as, va, buf.data(), kLen), 0);
    std::unique_ptr<AddressSpace> child;
    if (s == Scenario::kForkShared) {
      Result<std::unique_ptr<AddressSpace>> c = as->fork();
      EXPECT_TRUE(c);
      if (c) child = std::move(*c);
    }
    if (s == Scenario::kLazyfree || s == Scenario::kLazyfreeRedirtied) EXPECT_EQ(as->madvise(va, kLen, MADV_FREE), 0);
    if (s == Scenario::kLazyfreeRedirtied) EXPECT_EQ(cpu::store<uint64_t>(*as, va, word(0, 0, 2)), 0);
    EXPECT_EQ(as->madvise(va, kLen, MADV_PAGEOUT), 0);
    for (uint64_t i = 0; i < kPages; i++) o.states.push_back(model_state(*as, va + i * kPageSize));
    EXPECT_MM_CHECK_OK(*mem);
    EXPECT_EQ(cpu::copy_out(*as, va, buf.data(), kLen), 0);
    for (uint64_t i = 0; i < kPages; i++) {
      for (uint64_t w = 0; w < kPageSize / 8; w++) {
        uint64_t want = word(i, w, 1);
        if (s == Scenario::kLazyfree || s == Scenario::kLazyfreeRedirtied) want = 0;
        if (s == Scenario::kLazyfreeRedirtied && i == 0) want = w == 0 ? word(0, 0, 2) : word(0, w, 1);
        if (buf[i * kPageSize / 8 + w] != want) o.bad_bytes++;
      }
    }
    return o;
  }

  void compare(Scenario s) {
    HostSwap swap;
    if (!swap.usable()) GTEST_SKIP() << swap.why();
    const Outcome host = run_host(s);
    ASSERT_EQ(host.states.size(), kPages) << "host mmap failed";
    const Outcome model = run_model(s);
    EXPECT_EQ(host.bad_bytes, 0);
    EXPECT_EQ(model.bad_bytes, 0);
    for (uint64_t i = 0; i < kPages; i++) {
      EXPECT_EQ(state_name(model.states[i]), std::string(state_name(host.states[i]))) << "page " << i;
    }
  }
};

// Private pages only this process maps: all swapped out.
TEST_F(SwapDifferentialTest, Pageout_PrivatePages_Swapped) { compare(Scenario::kPrivate); }
// Pages a fork child shares: MADV_PAGEOUT leaves them.
TEST_F(SwapDifferentialTest, Pageout_ForkSharedPages_Skipped) { compare(Scenario::kForkShared); }
// MADV_FREE'd clean pages: discarded (no entry, read as zero), not swapped.
TEST_F(SwapDifferentialTest, Pageout_LazyfreePages_Discarded) { compare(Scenario::kLazyfree); }
// A page written after MADV_FREE is live again: not discarded by the first PAGEOUT.
TEST_F(SwapDifferentialTest, Pageout_LazyfreeRedirtied_Kept) { compare(Scenario::kLazyfreeRedirtied); }

}  // namespace
}  // namespace gpusvm::mm::testing
