// IdTable (drivers/refgpu/id_table.h): the id rule of every table of an open file - ids from
// 1, never reused after a removal (a stale id never names a newer object) - and the
// references it hands back. The ioctl tests check the same rule through the uapi.
#include "drivers/refgpu/id_table.h"

#include <gtest/gtest.h>

#include <memory>

namespace gpusvm::refgpu {
namespace {

struct Obj {
  int value;
};

TEST(RefgpuIdTable, IdsStartAtOneAndAreNeverReused) {
  IdTable<Obj> t;
  auto a = std::make_shared<Obj>(Obj{10});
  auto b = std::make_shared<Obj>(Obj{20});
  EXPECT_EQ(t.add(a), 1u);
  const uint32_t rb = t.reserve();  // reserved, then published (a VM's id is known first)
  EXPECT_EQ(rb, 2u);
  EXPECT_EQ(t.find(rb), nullptr) << "a reserved id names nothing until inserted";
  t.insert(rb, b);
  EXPECT_EQ(t.size(), 2u);
  EXPECT_EQ(t.find(1)->value, 10);
  EXPECT_EQ(t.find(2)->value, 20);
  EXPECT_EQ(t.find(0), nullptr);
  EXPECT_EQ(t.find(3), nullptr);

  // Removal hands the table's reference back and frees no id for reuse.
  std::shared_ptr<Obj> out = t.remove(1);
  ASSERT_EQ(out, a);
  EXPECT_EQ(a.use_count(), 2);  // a and out: the table let go
  EXPECT_EQ(t.remove(1), nullptr);
  EXPECT_EQ(t.find(1), nullptr);
  EXPECT_EQ(t.add(a), 3u);
  EXPECT_EQ(t.find(1), nullptr) << "the stale id 1 must not name the re-added object";
  EXPECT_EQ(t.find(3), a);

  // take_all empties the table; the cursor stays.
  IdTable<Obj>::Map all = t.take_all();
  EXPECT_EQ(all.size(), 2u);
  EXPECT_EQ(all.at(2), b);
  EXPECT_EQ(all.at(3), a);
  EXPECT_EQ(t.size(), 0u);
  EXPECT_EQ(t.find(2), nullptr);
  EXPECT_EQ(t.reserve(), 4u);
}

}  // namespace
}  // namespace gpusvm::refgpu
