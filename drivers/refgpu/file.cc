// RefgpuFile: id tables and release (see file.h).
#include "drivers/refgpu/file.h"

#include <cerrno>

namespace gpusvm::refgpu {

FileVm::~FileVm() {
  // Out of the fault service's reach first: a fault that finds nothing fails with -EFAULT.
  dev->unregister_vm(asid);
  if (vm) dev->retire_vm_stats(vm->stats());
}

RefgpuFile::~RefgpuFile() {
  // Queues before VMs: a queue's jobs translate through its VM's MMU.
  IdTable<FileExecQueue>::Map queues;
  IdTable<FileVm>::Map vms;
  IdTable<Syncobj>::Map syncobjs;
  IdTable<FileBo>::Map bos;
  std::map<uint64_t, std::shared_ptr<FileBo>> bo_offsets;
  {
    MutexLock g(&lock_);
    queues = queues_.take_all();
    vms = vms_.take_all();
    syncobjs = syncobjs_.take_all();
    bos = bos_.take_all();
    bo_offsets.swap(bo_offsets_);
  }
  for (auto& [id, q] : queues) {
    // -ENOENT when the engine already dropped it (device removal): nothing runs then.
    (void)q->engine->destroy_queue(q->q);
    q->vm->queues.fetch_sub(1);
  }
  // Deferred binds: cancelled, which drops their references to the VMs.
  for (auto& [id, vm] : vms) {
    if (vm->bind_queue) (void)dev_->bind_engine()->destroy_queue(vm->bind_queue);
  }
}

uint32_t RefgpuFile::add_bo(BoRef bo, uint32_t vm_id) {
  auto fb = std::make_shared<FileBo>();
  fb->bo = std::move(bo);
  fb->vm_id = vm_id;
  MutexLock g(&lock_);
  // Spent ids: fb, declared before the lock, drops the BO after it.
  fb->handle = bos_.add(fb);
  if (fb->handle) bo_offsets_.emplace(fb->bo->mmap_offset(), fb);
  return fb->handle;
}

std::shared_ptr<FileBo> RefgpuFile::find_bo(uint32_t handle) {
  MutexLock g(&lock_);
  return bos_.find(handle);
}

std::shared_ptr<FileBo> RefgpuFile::remove_bo(uint32_t handle) {
  MutexLock g(&lock_);
  std::shared_ptr<FileBo> fb = bos_.remove(handle);
  if (fb) bo_offsets_.erase(fb->bo->mmap_offset());
  return fb;  // the caller drops the reference, with no lock held
}

std::shared_ptr<FileBo> RefgpuFile::find_bo_by_offset(uint64_t offset) {
  MutexLock g(&lock_);
  auto it = bo_offsets_.upper_bound(offset);
  if (it == bo_offsets_.begin()) return nullptr;
  --it;
  if (offset - it->first >= it->second->bo->size()) return nullptr;
  return it->second;
}

size_t RefgpuFile::num_bos() {
  MutexLock g(&lock_);
  return bos_.size();
}

uint32_t RefgpuFile::reserve_vm_id() {
  MutexLock g(&lock_);
  return vms_.reserve();
}

void RefgpuFile::insert_vm(std::shared_ptr<FileVm> vm) {
  MutexLock g(&lock_);
  const uint32_t id = vm->id;
  vms_.insert(id, std::move(vm));
}

std::shared_ptr<FileVm> RefgpuFile::find_vm(uint32_t id) {
  MutexLock g(&lock_);
  return vms_.find(id);
}

int RefgpuFile::remove_vm(uint32_t id) {
  std::shared_ptr<FileVm> vm;  // dropped after the lock
  MutexLock g(&lock_);
  vm = vms_.find(id);
  if (!vm) return -ENOENT;
  // Queues are inserted and removed under lock_, with the count changed under it too, so
  // no queue can appear on a VM between this check and the removal.
  if (vm->queues.load() > 0) return -EBUSY;
  (void)vms_.remove(id);  // vm still holds a reference: the last one goes after the lock
  return 0;
}

uint32_t RefgpuFile::reserve_exec_queue_id() {
  MutexLock g(&lock_);
  return queues_.reserve();
}

void RefgpuFile::insert_exec_queue(std::shared_ptr<FileExecQueue> q) {
  MutexLock g(&lock_);
  q->vm->queues.fetch_add(1);
  const uint32_t id = q->id;
  queues_.insert(id, std::move(q));
}

std::shared_ptr<FileExecQueue> RefgpuFile::find_exec_queue(uint32_t id) {
  MutexLock g(&lock_);
  return queues_.find(id);
}

std::shared_ptr<FileExecQueue> RefgpuFile::remove_exec_queue(uint32_t id) {
  MutexLock g(&lock_);
  // The VM's count drops once the queue's jobs are done (the caller's destroy_queue), so
  // vm_destroy cannot free the MMU under a running job.
  return queues_.remove(id);
}

uint32_t RefgpuFile::add_syncobj(std::shared_ptr<Syncobj> s) {
  MutexLock g(&lock_);
  return syncobjs_.add(s);  // spent ids: the caller's s goes after the lock
}

std::shared_ptr<Syncobj> RefgpuFile::find_syncobj(uint32_t id) {
  MutexLock g(&lock_);
  return syncobjs_.find(id);
}

bool RefgpuFile::remove_syncobj(uint32_t id) {
  std::shared_ptr<Syncobj> s;  // dropped after the lock
  MutexLock g(&lock_);
  s = syncobjs_.remove(id);
  return s != nullptr;
}

std::shared_ptr<Fence> RefgpuFile::syncobj_fence(const Syncobj& s) {
  MutexLock g(&lock_);
  return s.fence;
}

void RefgpuFile::syncobj_replace_fence(Syncobj& s, std::shared_ptr<Fence> f) {
  std::shared_ptr<Fence> old;  // dropped after the lock
  MutexLock g(&lock_);
  old = std::move(s.fence);
  s.fence = std::move(f);
}

size_t RefgpuFile::num_vms() {
  MutexLock g(&lock_);
  return vms_.size();
}

size_t RefgpuFile::num_exec_queues() {
  MutexLock g(&lock_);
  return queues_.size();
}

size_t RefgpuFile::num_syncobjs() {
  MutexLock g(&lock_);
  return syncobjs_.size();
}

}  // namespace gpusvm::refgpu
