// DRM_IOCTL_REFGPU_DEVICE_QUERY (xe_query.c): the two-call size protocol over four answers.
#include <cerrno>
#include <cstring>

#include "drivers/refgpu/ioctl.h"

namespace gpusvm::refgpu {

namespace {

void fill_config(RefgpuDevice& dev, drm_refgpu_query_config* c) {
  std::memset(c, 0, sizeof(*c));
  c->rev = 1;
  c->va_bits = dev.config().va_bits;
  // CPU_ADDR_MIRROR binds need the VM layer's fault service; the capability is the
  // device's (Xe reports it from the platform), the bind itself answers whether it works.
  c->flags = REFGPU_CONFIG_FLAG_HAS_CPU_ADDR_MIRROR;
  if (dev.config().smem_atomics) c->flags |= REFGPU_CONFIG_FLAG_HAS_SMEM_ATOMICS;
  if (dev.num_vram_regions()) c->flags |= REFGPU_CONFIG_FLAG_HAS_VRAM;
  c->min_alignment = 4096;
  c->num_engines = static_cast<uint32_t>(dev.num_engines());
  c->num_mem_regions = static_cast<uint32_t>(1 + dev.num_vram_regions());
  c->backend = dev.backend().kind() == BackendKind::kVulkan ? REFGPU_BACKEND_VULKAN : REFGPU_BACKEND_HOST;
}

void fill_mem_regions(RefgpuDevice& dev, drm_refgpu_query_mem_regions* m) {
  std::memset(m, 0, sizeof(*m));
  m->num_mem_regions = static_cast<uint32_t>(1 + dev.num_vram_regions());
  m->regions[0].mem_class = REFGPU_MEM_REGION_CLASS_SYSMEM;
  m->regions[0].instance = 0;
  m->regions[0].min_page_size = 4096;
  m->regions[0].total_size = dev.mem().ram_pages() * 4096;
  m->regions[0].used = (dev.mem().ram_pages() - dev.mem().free_pages()) * 4096;
  for (size_t i = 0; i < dev.num_vram_regions(); i++) {
    drm_refgpu_mem_region& r = m->regions[i + 1];
    r.mem_class = REFGPU_MEM_REGION_CLASS_VRAM;
    r.instance = static_cast<uint16_t>(i + 1);
    r.min_page_size = 4096;
    r.total_size = dev.vram_region(i).total_size();
    r.used = dev.vram_region(i).used();
  }
}

void fill_engines(RefgpuDevice& dev, drm_refgpu_query_engines* e) {
  std::memset(e, 0, sizeof(*e));
  e->num_engines = static_cast<uint32_t>(dev.num_engines());
  for (size_t i = 0; i < dev.num_engines(); i++) {
    e->engines[i].engine_class = REFGPU_ENGINE_CLASS_COMPUTE;
    e->engines[i].engine_instance = dev.engine(i)->instance();
  }
}

void fill_stats(RefgpuDevice& dev, drm_refgpu_query_stats* s) {
  std::memset(s, 0, sizeof(*s));
  s->num_stats = REFGPU_STAT_COUNT;
  dev.read_stats(s->values);
}

template <typename T, void (*Fill)(RefgpuDevice&, T*)>
int answer(RefgpuDevice& dev, drm_refgpu_device_query* q) {
  if (q->size == 0) {
    q->size = sizeof(T);
    return 0;
  }
  if (q->size < sizeof(T)) return -EINVAL;
  T out;
  Fill(dev, &out);
  if (copy_to_user(q->data, &out, sizeof(T))) return -EFAULT;
  q->size = sizeof(T);
  return 0;
}

}  // namespace

int ioctl_device_query(RefgpuFile& f, devfs::Process& caller, drm_refgpu_device_query* q) {
  (void)caller;
  if (q->extensions || !all_zero(q->reserved)) return -EINVAL;
  switch (q->query) {
    case REFGPU_DEVICE_QUERY_CONFIG:
      return answer<drm_refgpu_query_config, fill_config>(f.dev(), q);
    case REFGPU_DEVICE_QUERY_MEM_REGIONS:
      return answer<drm_refgpu_query_mem_regions, fill_mem_regions>(f.dev(), q);
    case REFGPU_DEVICE_QUERY_ENGINES:
      return answer<drm_refgpu_query_engines, fill_engines>(f.dev(), q);
    case REFGPU_DEVICE_QUERY_STATS:
      return answer<drm_refgpu_query_stats, fill_stats>(f.dev(), q);
    default:
      return -EINVAL;
  }
}

}  // namespace gpusvm::refgpu
