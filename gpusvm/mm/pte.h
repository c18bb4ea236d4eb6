// Encoded page-table entries (DESIGN.md §3.3).
//
// A PTE or a leaf PMD is one 64-bit word:
//
//   present:      bit 0 = 1   | bit 1 write | bit 2 dirty | bit 3 young | bit 4 soft-dirty
//                             | bit 5 special (zero page) | bit 7 huge (PMD leaf) | pfn << 12
//   non-present:  bit 0 = 0, word != 0: a "soft leaf" (the kernel's swap-entry encoding)
//                 bits 1..4 type | bit 7 huge | bit 8 young | bit 9 dirty | bit 10 soft-dirty
//                 | pfn << 12
//   none:         0
//
// A PMD that points to a PTE table is present, not huge, and holds the table's address
// shifted left by 8 bits (user-space addresses fit in 56 bits).
//
// Values are plain data; which lock guards the word that holds them is page_table.h's business.
#pragma once

#include <cstdint>

#include "gpusvm/mm/types.h"

namespace gpusvm::mm {

struct PteTable;

enum class SoftLeafType : uint8_t {
  kNone = 0,
  kMigrationRead = 1,           // a migration in flight; the page was mapped read-only
  kMigrationReadExclusive = 2,  // ... read-only but anon-exclusive (may be made writable)
  kMigrationWrite = 3,          // ... writable
  kDevicePrivateRead = 4,       // the page lives in device-private memory, read-only mapping
  kDevicePrivateWrite = 5,      // ... writable mapping
  kDeviceExclusive = 6,         // a device holds exclusive (atomic) access to the page
  kSwap = 7,                    // the page was swapped out: the pfn field holds the swap slot
};

namespace pte_bits {
inline constexpr uint64_t kPresent = 1ULL << 0;
inline constexpr uint64_t kWrite = 1ULL << 1;
inline constexpr uint64_t kDirty = 1ULL << 2;
inline constexpr uint64_t kYoung = 1ULL << 3;
inline constexpr uint64_t kSoftDirty = 1ULL << 4;
inline constexpr uint64_t kSpecial = 1ULL << 5;
inline constexpr uint64_t kHuge = 1ULL << 7;
inline constexpr unsigned kTypeShift = 1;
inline constexpr uint64_t kTypeMask = 0xfULL << kTypeShift;
inline constexpr uint64_t kSwpYoung = 1ULL << 8;
inline constexpr uint64_t kSwpDirty = 1ULL << 9;
inline constexpr uint64_t kSwpSoftDirty = 1ULL << 10;
inline constexpr unsigned kPfnShift = 12;
inline constexpr uint64_t kPfnMask = ((1ULL << 40) - 1) << kPfnShift;
inline constexpr unsigned kTableShift = 8;
}  // namespace pte_bits

// A PTE or leaf-PMD value.
class Pte {
 public:
  constexpr Pte() = default;
  constexpr explicit Pte(uint64_t raw) : v_(raw) {}

  static constexpr Pte none() { return Pte(); }
  static constexpr Pte make_present(Pfn pfn, bool write, bool huge = false) {
    return Pte(pte_bits::kPresent | (write ? pte_bits::kWrite : 0) |
               (huge ? pte_bits::kHuge : 0) | (pfn << pte_bits::kPfnShift));
  }
  // The zero page: present, read-only, special.
  static constexpr Pte make_zero(Pfn zero_pfn, bool huge = false) {
    return Pte(make_present(zero_pfn, false, huge).raw() | pte_bits::kSpecial);
  }
  static constexpr Pte make_soft_leaf(SoftLeafType type, Pfn pfn, bool huge = false) {
    return Pte((static_cast<uint64_t>(type) << pte_bits::kTypeShift) |
               (huge ? pte_bits::kHuge : 0) | (pfn << pte_bits::kPfnShift));
  }

  constexpr uint64_t raw() const { return v_; }
  constexpr bool is_none() const { return v_ == 0; }
  constexpr bool present() const { return v_ & pte_bits::kPresent; }
  constexpr bool huge() const { return v_ & pte_bits::kHuge; }
  constexpr Pfn pfn() const { return (v_ & pte_bits::kPfnMask) >> pte_bits::kPfnShift; }

  // Present-entry bits.
  constexpr bool write() const { return present() && (v_ & pte_bits::kWrite); }
  constexpr bool dirty() const { return present() && (v_ & pte_bits::kDirty); }
  constexpr bool young() const { return present() && (v_ & pte_bits::kYoung); }
  constexpr bool soft_dirty() const {
    return v_ & (present() ? pte_bits::kSoftDirty : pte_bits::kSwpSoftDirty);
  }
  constexpr bool special() const { return present() && (v_ & pte_bits::kSpecial); }
  constexpr Pte mkwrite() const { return Pte(v_ | pte_bits::kWrite); }
  constexpr Pte wrprotect() const { return Pte(v_ & ~pte_bits::kWrite); }
  constexpr Pte mkdirty() const { return Pte(v_ | pte_bits::kDirty | pte_bits::kSoftDirty); }
  constexpr Pte mkclean() const { return Pte(v_ & ~pte_bits::kDirty); }
  constexpr Pte mkyoung() const { return Pte(v_ | pte_bits::kYoung); }
  constexpr Pte mkold() const { return Pte(v_ & ~pte_bits::kYoung); }
  constexpr Pte with_pfn(Pfn pfn) const {
    return Pte((v_ & ~pte_bits::kPfnMask) | (pfn << pte_bits::kPfnShift));
  }

  // Soft-leaf (non-present) entries.
  constexpr bool is_soft_leaf() const { return !present() && v_ != 0; }
  constexpr SoftLeafType soft_leaf_type() const {
    return is_soft_leaf() ? static_cast<SoftLeafType>((v_ & pte_bits::kTypeMask) >> pte_bits::kTypeShift)
                          : SoftLeafType::kNone;
  }
  constexpr bool is_migration() const {
    SoftLeafType t = soft_leaf_type();
    return t == SoftLeafType::kMigrationRead || t == SoftLeafType::kMigrationReadExclusive ||
           t == SoftLeafType::kMigrationWrite;
  }
  constexpr bool is_device_private() const {
    SoftLeafType t = soft_leaf_type();
    return t == SoftLeafType::kDevicePrivateRead || t == SoftLeafType::kDevicePrivateWrite;
  }
  constexpr bool is_device_exclusive() const {
    return soft_leaf_type() == SoftLeafType::kDeviceExclusive;
  }
  // A swap entry (swap.h): no page behind it, the pfn field is the slot of the swap area.
  // Only PTEs hold them (a PMD-mapped THP is split before it is swapped out).
  static constexpr Pte make_swap(uint64_t slot) { return make_soft_leaf(SoftLeafType::kSwap, slot); }
  constexpr bool is_swap() const { return soft_leaf_type() == SoftLeafType::kSwap; }
  constexpr uint64_t swap_slot() const { return pfn(); }
  // Write permission a soft leaf carries (migration write, device-private write).
  constexpr bool soft_leaf_write() const {
    SoftLeafType t = soft_leaf_type();
    return t == SoftLeafType::kMigrationWrite || t == SoftLeafType::kDevicePrivateWrite;
  }
  // The same soft leaf (pfn, huge, young/dirty/soft-dirty bits) with another type.
  constexpr Pte with_soft_leaf_type(SoftLeafType t) const {
    return Pte((v_ & ~pte_bits::kTypeMask) | (static_cast<uint64_t>(t) << pte_bits::kTypeShift));
  }
  constexpr bool swp_young() const { return is_soft_leaf() && (v_ & pte_bits::kSwpYoung); }
  constexpr bool swp_dirty() const { return is_soft_leaf() && (v_ & pte_bits::kSwpDirty); }
  constexpr Pte swp_mkyoung() const { return Pte(v_ | pte_bits::kSwpYoung); }
  constexpr Pte swp_mkdirty() const { return Pte(v_ | pte_bits::kSwpDirty); }
  constexpr Pte swp_mksoft_dirty() const { return Pte(v_ | pte_bits::kSwpSoftDirty); }

  constexpr bool operator==(const Pte&) const = default;

 private:
  uint64_t v_ = 0;
};

// A PMD value: none, a pointer to a PTE table, or a leaf (present huge or non-present huge).
class Pmd {
 public:
  constexpr Pmd() = default;
  constexpr explicit Pmd(uint64_t raw) : v_(raw) {}
  static Pmd make_table(PteTable* table) {
    return Pmd((reinterpret_cast<uint64_t>(table) << pte_bits::kTableShift) | pte_bits::kPresent);
  }
  static constexpr Pmd make_leaf(Pte leaf) { return Pmd(leaf.raw() | pte_bits::kHuge); }

  constexpr uint64_t raw() const { return v_; }
  constexpr bool is_none() const { return v_ == 0; }
  constexpr bool is_table() const { return (v_ & pte_bits::kPresent) && !(v_ & pte_bits::kHuge); }
  // A present huge mapping (THP or huge zero folio).
  constexpr bool is_huge_present() const {
    return (v_ & pte_bits::kPresent) && (v_ & pte_bits::kHuge);
  }
  // A non-present huge entry (PMD migration entry, device-private PMD entry).
  constexpr bool is_huge_soft_leaf() const {
    return !(v_ & pte_bits::kPresent) && (v_ & pte_bits::kHuge);
  }
  constexpr bool is_leaf() const { return is_huge_present() || is_huge_soft_leaf(); }
  PteTable* table() const {
    return reinterpret_cast<PteTable*>(v_ >> pte_bits::kTableShift);
  }
  // The leaf as a Pte value (huge bit set): decode with Pte's accessors.
  constexpr Pte leaf() const { return Pte(v_); }

  constexpr bool operator==(const Pmd&) const = default;

 private:
  uint64_t v_ = 0;
};

}  // namespace gpusvm::mm
