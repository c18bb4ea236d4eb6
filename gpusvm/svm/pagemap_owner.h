// Owner groups (drm_pagemap_util.c's drm_pagemap_owner_list / drm_pagemap_peer): devices whose
// memory is reachable from each other over a fast interconnect share one device-private
// owner, so hmm_range_fault reports each other's device pages VALID (each maps the other's
// pages in place) and a migration collects the peers' pages and has the source device copy
// them. Devices without a link get distinct owners: their pages are faulted back to system
// memory first, as for any foreign device page.
//
// A driver acquires an owner for each of its pagemaps (peers) before it creates the
// mm::DevPagemap, whose owner is then peer.owner(), and releases it after the pagemap is gone.
//
// Locking: the list's lock is a leaf spin lock (lock_order.h); has_interconnect runs under it
// and must not sleep or take locks.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"

namespace gpusvm::svm {

class PagemapPeer;

// One owner token: its address is the device_private_owner of every member's pages.
struct PagemapOwner {
  int members = 0;  // under the list's lock
};

class PagemapOwnerList {
 public:
  PagemapOwnerList() = default;
  ~PagemapOwnerList();  // panics when a peer is still on it
  PagemapOwnerList(const PagemapOwnerList&) = delete;
  PagemapOwnerList& operator=(const PagemapOwnerList&) = delete;

 private:
  friend class PagemapPeer;
  SpinLock lock_{&kPagemapOwnerListLockClass};
  // Peers, those of one owner adjacent (a new member is inserted after its group).
  std::vector<PagemapPeer*> peers_ GPUSVM_GUARDED_BY(lock_);
};

class PagemapPeer {
 public:
  using HasInterconnect = std::function<bool(const PagemapPeer& a, const PagemapPeer& b)>;

  explicit PagemapPeer(void* priv = nullptr) : priv_(priv) {}
  ~PagemapPeer();  // releases the owner if still held
  PagemapPeer(const PagemapPeer&) = delete;
  PagemapPeer& operator=(const PagemapPeer&) = delete;

  // drm_pagemap_acquire_owner: joins the first owner group of `list` every member of which
  // has an interconnect with this peer (has_interconnect(this, member)), or starts a new
  // one. Returns 0, -EINVAL (null list or function, already acquired), -ENOMEM.
  int acquire_owner(PagemapOwnerList* list, const HasInterconnect& has_interconnect);
  // drm_pagemap_release_owner: leaves the group; the owner token goes with its last member.
  void release_owner();
  // The device-private owner to give the peer's DevPagemap (null before acquire).
  const void* owner() const { return owner_.get(); }
  void* priv() const { return priv_; }

 private:
  void* const priv_;
  PagemapOwnerList* list_ = nullptr;
  std::shared_ptr<PagemapOwner> owner_;  // shared by the group's members
};

}  // namespace gpusvm::svm
