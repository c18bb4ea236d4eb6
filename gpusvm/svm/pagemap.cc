// Pagemap: refcounting, the deferred destroy worker, page_to_pagemap, and the Devmem record's
// detach (drm_pagemap.c's drm_pagemap_put / drm_pagemap_release / the zdd destroy).
#include "gpusvm/svm/pagemap.h"

#include <cerrno>
#include <mutex>
#include <thread>
#include <vector>

#include "gpusvm/base/lock.h"
#include "gpusvm/base/lock_order.h"
#include "gpusvm/base/log.h"
#include "gpusvm/base/waitqueue.h"
#include "gpusvm/mm/address_space.h"
#include "gpusvm/svm/devmem.h"
#include "gpusvm/svm/pagemap_zdd.h"

namespace gpusvm::svm {

// The kernel's drm_pagemap_work: one worker for every pagemap whose last reference went in a
// context that must not sleep. The queue lock is a leaf spin lock (taken from folio_free);
// the worker thread starts with the first deferred destroy and is joined at exit.
class PagemapDestroyWorker {
 public:
  static PagemapDestroyWorker& get() {
    static PagemapDestroyWorker w;
    return w;
  }
  ~PagemapDestroyWorker() {
    flush();
    stop_.store(true, std::memory_order_release);
    wq_.wake_all();
    if (thread_.joinable()) thread_.join();
  }

  // Never sleeps: callable under page-table locks.
  void queue(Pagemap* p) {
    {
      SpinLockGuard g(&lock_);
      queue_.push_back(p);
      queued_++;
    }
    wq_.wake_all();
  }

  void flush() {
    uint64_t target;
    {
      SpinLockGuard g(&lock_);
      target = queued_;
    }
    if (!done_wq_.wait_for([&] { return done_.load(std::memory_order_acquire) >= target; },
                           hang_timeout())) {
      log::get().error("svm: pagemap destroy worker did not drain its queue in {} ms",
                       hang_timeout().count());
    }
  }

  // Starts the thread (once). Creating a thread allocates and may sleep, so it is done by
  // Pagemap::create, never by a put under page-table locks.
  void start() {
    std::call_once(started_, [this] { thread_ = std::thread([this] { run(); }); });
  }

 private:
  PagemapDestroyWorker() = default;

  void run() {
    for (;;) {
      std::vector<Pagemap*> batch;
      {
        SpinLockGuard g(&lock_);
        batch.swap(queue_);
      }
      for (Pagemap* p : batch) p->release();
      if (!batch.empty()) {
        done_.fetch_add(batch.size(), std::memory_order_acq_rel);
        done_wq_.wake_all();
        continue;
      }
      if (stop_.load(std::memory_order_acquire)) return;
      (void)wq_.wait_for(
          [this] {
            SpinLockGuard g(&lock_);
            return !queue_.empty() || stop_.load(std::memory_order_acquire);
          },
          std::chrono::milliseconds(100));
    }
  }

  SpinLock lock_{&kPagemapDestroyLockClass};
  std::vector<Pagemap*> queue_ GPUSVM_GUARDED_BY(lock_);
  uint64_t queued_ GPUSVM_GUARDED_BY(lock_) = 0;
  std::once_flag started_;
  std::atomic<uint64_t> done_{0};
  std::atomic<bool> stop_{false};
  WaitQueue wq_;
  WaitQueue done_wq_;
  std::thread thread_;  // created once by start(), joined at exit
};

Result<Pagemap*> Pagemap::create(Device* dev, mm::DevPagemap* dev_pagemap, PagemapOps* ops) {
  if (!dev || !dev_pagemap || !ops || dev_pagemap->ops() != pagemap_dev_pagemap_ops()) {
    return Err{-EINVAL};
  }
  auto* p = new (std::nothrow) Pagemap(dev, dev_pagemap, ops);
  if (!p) return Err{-ENOMEM};
  PagemapDestroyWorker::get().start();
  return p;
}

void Pagemap::get() {
  // relaxed: the caller holds a reference, so the count cannot reach zero meanwhile.
  const int64_t old = refcount_.fetch_add(1, std::memory_order_relaxed);
  if (old <= 0) panic("svm: Pagemap::get on a pagemap with no reference");
}

void Pagemap::put(bool from_reclaim) {
  const int64_t old = refcount_.fetch_sub(1, std::memory_order_acq_rel);
  if (old <= 0) panic("svm: Pagemap::put without a reference");
  if (old != 1) return;
  if (from_reclaim) {
    PagemapDestroyWorker::get().queue(this);
    return;
  }
  release();  // a sleepable context (drm_pagemap_put from a driver): destroy inline
}

void Pagemap::release() {
  ops_->destroy(this);
  delete this;
}

PagemapAddr Pagemap::device_map(Device* dev, mm::Folio* page, unsigned order, DmaDirection dir) {
  return ops_->device_map(this, dev, page, order, dir);
}

void Pagemap::device_unmap(Device* dev, const PagemapAddr& addr) { ops_->device_unmap(this, dev, addr); }

int Pagemap::populate_mm(mm::Va start, mm::Va end, mm::AddressSpace* as, unsigned timeslice_ms) {
  if (!as) return -EINVAL;
  if (!mm::page_aligned(start) || !mm::page_aligned(end) || start >= end) return -EINVAL;
  if (as->exited()) return -EFAULT;  // mmget_not_zero
  return ops_->populate_mm(this, start, end, as, timeslice_ms);
}

void pagemap_flush_destroy_work() { PagemapDestroyWorker::get().flush(); }

PagemapZdd* page_zdd(mm::Folio* page) {
  if (!page || !page->pagemap() || page->pagemap()->ops() != pagemap_dev_pagemap_ops()) return nullptr;
  return static_cast<PagemapZdd*>(page->head()->zone_device_data);
}

Pagemap* page_to_pagemap(mm::Folio* page) {
  PagemapZdd* zdd = page_zdd(page);
  return zdd ? zdd->devmem->pagemap() : nullptr;
}

Devmem::Devmem(Device* dev, mm::AddressSpace* as, DevmemOps* ops, Pagemap* pagemap, uint64_t size,
               std::shared_ptr<Fence> pre_migrate_fence)
    : dev_(dev), mm_(as), ops_(ops), pagemap_(pagemap), size_(size),
      pre_migrate_fence_(std::move(pre_migrate_fence)) {
  if (pagemap_) pagemap_->get();
}

void devmem_detach(Devmem* devmem, bool from_reclaim) {
  Pagemap* p = devmem->pagemap();
  devmem->detached().signal();
  devmem->ops()->devmem_release(devmem);  // the driver may free or reuse devmem from here on
  if (p) p->put(from_reclaim);
}

PagemapStats& pagemap_stats() {
  static PagemapStats s;
  return s;
}

}  // namespace gpusvm::svm
