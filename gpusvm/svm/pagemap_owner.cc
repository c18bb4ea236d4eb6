// Owner groups: drm_pagemap_acquire_owner / drm_pagemap_release_owner.
#include "gpusvm/svm/pagemap_owner.h"

#include <algorithm>
#include <cerrno>

#include "gpusvm/base/log.h"

namespace gpusvm::svm {

PagemapOwnerList::~PagemapOwnerList() {
  SpinLockGuard g(&lock_);
  if (!peers_.empty()) panic("svm: pagemap owner list destroyed with peers on it");
}

PagemapPeer::~PagemapPeer() { release_owner(); }

int PagemapPeer::acquire_owner(PagemapOwnerList* list, const HasInterconnect& has_interconnect) {
  if (!list || !has_interconnect || list_) return -EINVAL;
  std::shared_ptr<PagemapOwner> fresh = std::make_shared<PagemapOwner>();  // before the spin lock
  SpinLockGuard g(&list->lock_);
  std::shared_ptr<PagemapOwner> chosen;
  size_t insert_at = list->peers_.size();
  // Walk the groups in order; the first whose members all reach us wins.
  for (size_t i = 0; i < list->peers_.size() && !chosen;) {
    const std::shared_ptr<PagemapOwner>& group = list->peers_[i]->owner_;
    bool all = true;
    size_t j = i;
    for (; j < list->peers_.size() && list->peers_[j]->owner_ == group; j++) {
      if (all && !has_interconnect(*this, *list->peers_[j])) all = false;
    }
    if (all) {
      chosen = group;
      insert_at = j;
    }
    i = j;
  }
  if (!chosen) chosen = std::move(fresh);
  chosen->members++;
  owner_ = std::move(chosen);
  list->peers_.insert(list->peers_.begin() + static_cast<std::ptrdiff_t>(insert_at), this);
  list_ = list;
  return 0;
}

void PagemapPeer::release_owner() {
  PagemapOwnerList* list = list_;
  if (!list) return;
  std::shared_ptr<PagemapOwner> owner;
  {
    SpinLockGuard g(&list->lock_);
    list->peers_.erase(std::find(list->peers_.begin(), list->peers_.end(), this));
    owner_->members--;
    owner = std::move(owner_);  // freed outside the spin lock when it was the last member
    list_ = nullptr;
  }
}

}  // namespace gpusvm::svm
