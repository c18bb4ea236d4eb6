// DRM_IOCTL_REFGPU_GEM_CREATE / GEM_MMAP_OFFSET / GEM_CLOSE (xe_gem_create_ioctl,
// xe_gem_mmap_offset_ioctl, drm_gem_close_ioctl) and the mmap of the device file that a
// GEM_MMAP_OFFSET's fake offset names (drm_gem_mmap).
//
// Size: a non-zero multiple of 4 KiB, at most kBoMaxSize and at most what an allowed
// placement holds (system RAM, or the VRAM region): -EINVAL otherwise.
//
// Placement: bit n of drm_refgpu_gem_create.placement is memory region instance n (the
// device query's numbering). A BO can live in system memory (bit 0) and in the first VRAM
// region (bit 1: the region the engines resolve and the svm pagemap owns); any other bit,
// including one naming a further VRAM region, is -EINVAL. The BO starts in VRAM when it may
// (Bo::create: evicting under pressure; a BO that may also live in system memory falls back
// there when VRAM stays full).
//
// CPU mapping: the model has no CPU-visible VRAM BAR. GEM_MMAP_OFFSET moves the BO to system
// memory and keeps it there (Bo::prepare_cpu_map; TTM moves a BO to a mappable placement on
// its first CPU fault): a VRAM-only BO has no offset (-EINVAL). The move happens at the ioctl,
// not in the mmap hook, because the hook runs under the mmap lock, which ranks after the BO
// lock.
#include <algorithm>
#include <cerrno>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

namespace {
constexpr uint32_t kGemPlacements = (1u << 0) | (1u << 1);  // system, VRAM region 1
}  // namespace

int ioctl_gem_create(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_create* a) {
  (void)caller;
  if (a->extensions || !all_zero(a->reserved) || a->handle) return -EINVAL;
  // DEFER_BACKING is defined by the uapi but not implemented: a BO allocates its VRAM at
  // creation (system pages are allocated on first touch in any case).
  if (a->flags & REFGPU_GEM_CREATE_FLAG_DEFER_BACKING) return -EOPNOTSUPP;
  if (a->flags) return -EINVAL;
  if (a->size == 0 || a->size % 4096 || a->size > kBoMaxSize) return -EINVAL;
  if (a->placement == 0 || (a->placement & ~kGemPlacements)) return -EINVAL;
  const bool vram = a->placement & (1u << 1);
  if (vram && f.dev().num_vram_regions() == 0) return -EINVAL;  // no VRAM region
  // A BO no allowed placement could ever hold is refused up front (its page arrays would be
  // sized for it: a 64 GiB BO on a small machine is memory the caller can never use).
  uint64_t limit = 0;
  if (a->placement & 1u) limit = f.dev().mem().ram_pages() << mm::kPageShift;
  if (vram) limit = std::max(limit, f.dev().vram_region(0).total_size());
  if (a->size > limit) return -EINVAL;
  if (a->vm_id && !f.find_vm(a->vm_id)) return -ENOENT;
  BoCreateInfo info{.mem = &f.dev().mem(),
                    .vram = vram ? f.dev().vram_pagemaps()[0] : nullptr,
                    .size = a->size,
                    .placement = (a->placement & 1u ? kBoPlacementSystem : 0u) |
                                 (vram ? kBoPlacementVram : 0u),
                    .flags = 0,
                    .name = "gem"};
  Result<BoRef> bo = Bo::create(info);
  if (!bo) return bo.error();
  const uint32_t handle = f.add_bo(std::move(*bo), a->vm_id);
  if (handle == 0) return -ENOSPC;  // 2^32 - 1 handles spent (the BO is gone again)
  a->handle = handle;
  return 0;
}

int ioctl_gem_mmap_offset(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_mmap_offset* a) {
  (void)caller;
  if (a->extensions || a->flags || !all_zero(a->reserved)) return -EINVAL;
  std::shared_ptr<FileBo> fb = f.find_bo(a->handle);
  if (!fb) return -ENOENT;
  if (int rc = fb->bo->prepare_cpu_map()) return rc;
  a->offset = fb->bo->mmap_offset();
  return 0;
}

int ioctl_gem_close(RefgpuFile& f, devfs::Process& caller, drm_refgpu_gem_close* a) {
  (void)caller;
  if (a->pad || !all_zero(a->reserved)) return -EINVAL;
  std::shared_ptr<FileBo> fb = f.remove_bo(a->handle);
  if (!fb) return -ENOENT;
  return 0;  // the handle's reference goes with fb; bindings hold their own
}

int RefgpuFile::mmap(devfs::Process& caller, mm::Vma& vma) {
  (void)caller;
  const uint64_t offset = vma.pgoff << mm::kPageShift;
  std::shared_ptr<FileBo> fb = find_bo_by_offset(offset);
  if (!fb) return -EINVAL;
  Bo* bo = fb->bo.get();
  const uint64_t in_bo = offset - bo->mmap_offset();
  if (vma.size() > bo->size() - in_bo) return -EINVAL;  // past the BO's end
  if (!bo->cpu_mapped()) return -EINVAL;  // a guessed offset: GEM_MMAP_OFFSET not asked
  // A shared mapping of the BO's shmem object: the mm faults its pages in, and the CPU and a
  // system-placed BO see the same folios (prepare_cpu_map keeps the BO there).
  vma.file = bo->shmem();
  vma.pgoff = in_bo >> mm::kPageShift;
  return 0;
}

}  // namespace gpusvm::refgpu
