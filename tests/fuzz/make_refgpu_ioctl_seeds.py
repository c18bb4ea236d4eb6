#!/usr/bin/env python3
"""Writes the seed corpus of refgpu_ioctl_fuzz (tests/fuzz/refgpu_ioctl/): small valid ioctl
sequences in the target's input format (see refgpu_ioctl_fuzz.cc). Run from this folder:
    python3 make_refgpu_ioctl_seeds.py
Struct layouts follow uapi/refgpu.h (little-endian, sizes pinned by uapi/refgpu_c_check.c)."""
import os
import struct

# Table indices (nr - DRM_COMMAND_BASE).
QUERY, GEM_CREATE, GEM_MMAP, GEM_CLOSE, VM_CREATE, VM_DESTROY, VM_BIND, QC, QD, EXEC, WAIT, \
    MADVISE, ATTRS, SO_CREATE, SO_DESTROY, SO_WAIT, FAULTQ = range(17)
RAW, USERW, MMAP = 17, 18, 19
LR, FAULT = 1, 2
USER = lambda off: off * 2  # an even value: offset into the user region
BAD = 2 * 8 + 1             # an odd value: a bad pointer


def rec(sel, body, mode=0):
    return bytes([sel, mode]) + body


def userw(off, data):
    return bytes([USERW]) + struct.pack('<H', off) + data.ljust(64, b'\0')[:64]


def query(q, size, data=USER(0)):
    return rec(QUERY, struct.pack('<QIIQ2Q', 0, q, size, data, 0, 0))


def vm_create(flags):
    return rec(VM_CREATE, struct.pack('<QII2Q', 0, flags, 0, 0, 0))


def vm_destroy(vm):
    return rec(VM_DESTROY, struct.pack('<II2Q', vm, 0, 0, 0))


def instance(engine):  # drm_refgpu_engine_class_instance, written at user offset 0
    return userw(0, struct.pack('<HHHH', 0, engine, 0, 0))


def qc(vm, inst=USER(0)):
    return rec(QC, struct.pack('<QHHIIIQ2Q', 0, 1, 1, vm, 0, 0, inst, 0, 0))


def qd(q):
    return rec(QD, struct.pack('<II2Q', q, 0, 0, 0))


def sync(typ, flags, handle_or_addr, value=0):
    return struct.pack('<QIIQQ2Q', 0, typ, flags, handle_or_addr, value, 0, 0)


def syncs_at(off, entries):
    out = b''
    data = b''.join(entries)
    for i in range(0, len(data), 64):
        out += userw(off + i, data[i:i + 64])
    return out


def exec_(q, addr, nsyncs=0, syncs=USER(1024), mode=0):
    return rec(EXEC, struct.pack('<QIIQQH3H2Q', 0, q, nsyncs, syncs, addr, 1, 0, 0, 0, 0, 0), mode)


def wait(addr, op, value, mask, timeout, q=0, flags=0, mode=1):
    return rec(WAIT, struct.pack('<QQHHIQQqII2Q', 0, addr, op, flags, 0, value, mask, timeout, q, 0, 0, 0), mode)


def so_create(flags=0):
    return rec(SO_CREATE, struct.pack('<II2Q', 0, flags, 0, 0))


def so_destroy(h):
    return rec(SO_DESTROY, struct.pack('<II2Q', h, 0, 0, 0))


def so_wait(count, flags=0, handles=USER(2048)):
    return rec(SO_WAIT, struct.pack('<QQqIIIi2Q', 0, handles, 500000, count, flags, 0, 0, 0, 0))


def faultq(vm, n, flags=0, faults=USER(4096)):
    return rec(FAULTQ, struct.pack('<QIIIIQ2Q', 0, vm, n, flags, 0, faults, 0, 0))


def bind_op(op, flags, addr, rng, obj=0, prefetch=0, obj_offset=0):
    return struct.pack('<QIIQQQIIII3Q', 0, obj, 0, obj_offset, rng, addr, op, flags, prefetch, 0, 0, 0, 0)


def gem_create(size, placement, flags=0, vm=0, handle=0, ext=0, reserved=0):
    return rec(GEM_CREATE, struct.pack('<QQIIII2Q', ext, size, placement, flags, vm, handle, reserved, 0))


def gem_mmap(handle, flags=0):
    return rec(GEM_MMAP, struct.pack('<QIIQ2Q', 0, handle, flags, 0, 0, 0))


def gem_close(handle, pad=0):
    return rec(GEM_CLOSE, struct.pack('<II2Q', handle, pad, 0, 0))


def mmap_fd(delta_pages, pages):
    return bytes([MMAP, delta_pages, pages - 1])


def vm_bind(vm, ops, nsyncs=0, syncs=USER(1024), vec=USER(8192)):
    if len(ops) == 1:
        union = ops[0]
    else:
        union = struct.pack('<Q', vec).ljust(80, b'\0')
    return rec(VM_BIND, struct.pack('<QIIII', 0, vm, 0, len(ops), nsyncs) + union + struct.pack('<Q2Q', syncs, 0, 0))


def ops_at(off, ops):
    data = b''.join(ops)
    return b''.join(userw(off + i, data[i:i + 64]) for i in range(0, len(data), 64))


def madvise(vm, start, rng, typ, a, b=0, c=0):
    if typ == 0:
        union = struct.pack('<iHHQ', a, b, c, 0)
    else:
        union = struct.pack('<IIQ', a, 0, 0)
    return rec(MADVISE, struct.pack('<QQQII', 0, start, rng, vm, typ) + union + struct.pack('<2Q', 0, 0))


def attrs(vm, start, rng, n, vec=USER(4096)):
    return rec(ATTRS, struct.pack('<QIIQQQQ2Q', 0, vm, n, start, rng, 0, vec, 0, 0))


def raw(req, data=b''):
    return bytes([RAW]) + struct.pack('<I', req) + data.ljust(64, b'\0')[:64]


SEEDS = {
    'query_config': query(0, 0) + query(0, 64),
    'query_all': query(1, 456) + query(2, 136) + query(3, 520) + query(0, 63),
    'query_bad_ptr': query(3, 520, BAD),
    'vm_create_destroy': vm_create(LR | FAULT) + vm_create(0) + vm_destroy(1) + vm_destroy(1) + vm_destroy(2),
    'vm_bad_flags': vm_create(FAULT) + vm_create(8) + vm_create(LR | 4),
    'queue_create': vm_create(LR | FAULT) + instance(1) + qc(1) + qc(1) + qd(1) + vm_destroy(1),
    'queue_bad_instance': vm_create(0) + userw(0, struct.pack('<HHHH', 0, 9, 0, 0)) + qc(1) + qc(1, BAD),
    'exec_unmapped': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100000),
    'exec_anon': vm_create(LR | FAULT) + instance(0) + qc(1) + exec_(1, 0, mode=1),
    'exec_syncobj': vm_create(0) + instance(0) + qc(1) + so_create() +
                    syncs_at(1024, [sync(0, 1, 1)]) + exec_(1, 0x200000, 1) +
                    userw(2048, struct.pack('<I', 1)) + so_wait(1),
    'exec_ufence': vm_create(LR | FAULT) + instance(1) + qc(1) +
                   syncs_at(1024, [sync(1, 1, 0, 0x42)]) + exec_(1, 0x200000, 1, mode=2) +
                   wait(0, 0, 0x42, 0xffffffffffffffff, 900000),
    'exec_in_out': vm_create(0) + instance(0) + qc(1) + so_create(1) + so_create() +
                   syncs_at(1024, [sync(0, 0, 1), sync(0, 1, 2)]) + exec_(1, 0x300000, 2) +
                   userw(2048, struct.pack('<II', 1, 2)) + so_wait(2, 1),
    'exec_lr_syncobj': vm_create(LR) + instance(0) + qc(1) + so_create() +
                       syncs_at(1024, [sync(0, 1, 1)]) + exec_(1, 0x100000, 1),
    'exec_then_destroy': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100000) + exec_(1, 0x100000) +
                         qd(1) + vm_destroy(1),
    'wait_ops': b''.join(wait(0, op, 0, 0xff, 1000) for op in range(6)) + wait(0, 7, 0, 1, 1),
    'wait_abstime': wait(0, 1, 0, 1, 1000, flags=1) + wait(8, 0, 0, 1, 1000, mode=0),
    'wait_queue': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100000) + wait(0, 0, 1, 1, 900000, q=1),
    'syncobj': so_create() + so_create(1) + so_destroy(1) + so_destroy(1) + so_destroy(3) +
               userw(2048, struct.pack('<I', 2)) + so_wait(1) + so_wait(0) + so_wait(65),
    'syncobj_bad_ptr': so_create(1) + so_wait(1, 0, BAD),
    'fault_query': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100000) + faultq(1, 0) + faultq(1, 4) +
                   faultq(1, 4, 1) + faultq(1, 0),
    'fault_query_bad': vm_create(0) + faultq(1, 4, 1, BAD) + faultq(2, 0) + faultq(1, 257),
    'zeroed_structs': rec(GEM_CREATE, bytes(48)) + rec(VM_BIND, bytes(128)) + rec(MADVISE, bytes(64)) +
                      rec(ATTRS, bytes(64)) + rec(GEM_MMAP, bytes(40)) + rec(GEM_CLOSE, bytes(24)),
    'gem_create_close': gem_create(4096, 1) + gem_create(1 << 16, 2) + gem_create(8192, 3) + gem_close(1) +
                        gem_close(1) + gem_close(9) + gem_create(4096, 1),
    'gem_bad_fields': gem_create(0, 1) + gem_create(4095, 1) + gem_create(4096, 0) + gem_create(4096, 4) +
                      gem_create(4096, 1, flags=1) + gem_create(4096, 1, flags=2) + gem_create(4096, 1, vm=5) +
                      gem_create(4096, 1, handle=1) + gem_create(4096, 1, ext=1) + gem_create(4096, 1, reserved=1) +
                      gem_create(1 << 40, 1) + gem_create(1 << 30, 2) + gem_close(1, pad=1) + gem_mmap(1, flags=1),
    'gem_mmap': gem_create(1 << 16, 1) + gem_mmap(1) + mmap_fd(0, 16) + mmap_fd(0, 17) + mmap_fd(15, 1) +
                gem_create(8192, 2) + gem_mmap(2) + gem_create(8192, 3) + gem_mmap(3) + mmap_fd(1, 1) + gem_close(3) +
                mmap_fd(0, 2),
    'gem_bind': vm_create(LR | FAULT) + gem_create(1 << 16, 2) + gem_create(1 << 16, 1, vm=1) +
                vm_bind(1, [bind_op(0, 0, 1 << 32, 1 << 16, obj=1)]) +
                vm_bind(1, [bind_op(0, 0, 1 << 33, 1 << 12, obj=2, obj_offset=1 << 12)]) +
                vm_bind(1, [bind_op(0, 0, 1 << 34, 1 << 17, obj=1)]) +
                vm_bind(1, [bind_op(0, 0, 1 << 34, 1 << 12, obj=9)]) + gem_close(1) +
                vm_bind(1, [bind_op(1, 0, 1 << 32, 1 << 16)]) + vm_destroy(1),
    'gem_bind_mirror_exec': vm_create(LR | FAULT) + vm_bind(1, [bind_op(0, 4, 1 << 16, (1 << 47) - (1 << 16))]) +
                            gem_create(1 << 16, 2) + vm_bind(1, [bind_op(0, 0, 1 << 32, 1 << 16, obj=1)]) +
                            instance(0) + qc(1) + exec_(1, 0, mode=1) + vm_bind(1, [bind_op(1, 0, 1 << 32, 1 << 16)]) +
                            gem_create(8 << 20, 2) + gem_close(2) + gem_close(1),
    'bind_mirror': vm_create(LR | FAULT) + vm_bind(1, [bind_op(0, 4, 1 << 32, 1 << 21)]) +
                   vm_bind(1, [bind_op(1, 0, 1 << 32, 1 << 21)]),
    'bind_mirror_exec': vm_create(LR | FAULT) + vm_bind(1, [bind_op(0, 4 | 8, 1 << 16, (1 << 47) - (1 << 16))]) +
                        instance(0) + qc(1) + syncs_at(1024, [sync(1, 1, 0x100, 9)]) +
                        exec_(1, 0, 1, mode=3) + wait(0x100, 0, 9, 0xffffffffffffffff, 900000),
    'bind_vector': vm_create(LR | FAULT) +
                   ops_at(8192, [bind_op(0, 4, 1 << 32, 1 << 20), bind_op(0, 4, (1 << 32) + (2 << 20), 1 << 20)]) +
                   vm_bind(1, [b'', b'']) + vm_bind(1, [bind_op(1, 16, 1 << 32, 4 << 20)]),
    'bind_prefetch': vm_create(LR | FAULT) + vm_bind(1, [bind_op(0, 4, 1 << 32, 1 << 21)]) +
                     vm_bind(1, [bind_op(2, 0, 1 << 32, 1 << 16, prefetch=1)]) +
                     vm_bind(1, [bind_op(2, 0, 1 << 32, 1 << 16, prefetch=0xffffffff)]) +
                     vm_bind(1, [bind_op(1, 16, 1 << 32, 1 << 21)]),
    'bind_bad': vm_create(0) + vm_bind(1, [bind_op(0, 4, 1 << 32, 1 << 21)]) +
                vm_bind(1, [bind_op(0, 0, 1 << 32, 1 << 21, obj=3)]) + vm_bind(1, [bind_op(3, 0, 0, 0)]) +
                vm_bind(2, [bind_op(0, 4, 4096, 4096)]),
    'madvise_attrs': vm_create(LR | FAULT) + vm_bind(1, [bind_op(0, 4, 1 << 32, 4 << 20)]) +
                     madvise(1, (1 << 32) + (1 << 20), 1 << 20, 1, 2) +
                     madvise(1, 1 << 32, 1 << 20, 0, -1) + madvise(1, 1 << 32, 1 << 20, 0, 0, 1, 1) +
                     madvise(1, 1 << 32, 1 << 20, 0, 5) + attrs(1, 1 << 32, 4 << 20, 0) +
                     attrs(1, 1 << 32, 4 << 20, 3) + attrs(1, 1 << 32, 4 << 20, 1),
    'raw_bad_requests': raw(0xc0206444) + raw(0x40206444) + raw(0xc0207844) + raw(0xc0206451) +
                        raw(0) + raw(0xffffffff),
    'two_vms_two_queues': vm_create(0) + vm_create(LR | FAULT) + instance(0) + qc(1) + instance(1) + qc(2) +
                          exec_(1, 0x100000) + exec_(2, 0x100000) + qd(2) + qd(1) + vm_destroy(2) + vm_destroy(1),
    'many_syncs': vm_create(0) + instance(0) + qc(1) + so_create() + so_create() + so_create() +
                  syncs_at(1024, [sync(0, 1, 1), sync(0, 1, 2), sync(0, 1, 3), sync(1, 1, 0x4000, 1)]) +
                  exec_(1, 0x100000, 4, mode=2) + userw(2048, struct.pack('<III', 1, 2, 3)) + so_wait(3, 1),
    'sync_bad_fields': vm_create(0) + instance(0) + qc(1) + so_create() +
                       syncs_at(1024, [sync(0, 1, (1 << 32) | 1)]) + exec_(1, 0x100000, 1) +
                       syncs_at(1024, [sync(1, 0, 0x1000)]) + exec_(1, 0x100000, 1) +
                       syncs_at(1024, [sync(3, 1, 0x1000)]) + exec_(1, 0x100000, 1) +
                       exec_(1, 0x100000, 65) + exec_(1, 0x100000, 1, BAD),
    'exec_misaligned': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100004) + exec_(1, 1 << 48),
    'destroy_busy_vm': vm_create(0) + instance(0) + qc(1) + vm_destroy(1) + qd(1) + vm_destroy(1),
    'stats_after_jobs': vm_create(0) + instance(0) + qc(1) + exec_(1, 0x100000) + exec_(1, 0x100000) +
                        query(3, 520),
}

if __name__ == '__main__':
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'refgpu_ioctl')
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), 'wb') as f:
            f.write(data)
    print(f'{len(SEEDS)} seeds in {out}')
