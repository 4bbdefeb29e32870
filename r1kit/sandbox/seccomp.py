"""A seccomp-BPF deny list for the sandbox, compiled to the raw bytes bubblewrap's `--seccomp FD` loads.

Namespaces do the isolation; this filter narrows the kernel surface inside them, in the spirit of Docker's
default profile: no nested namespaces (and so no nested user namespace), no mounts, ptrace, BPF, perf,
io_uring, keyrings, module loading, System V IPC or POSIX message queues, and sockets of no family but AF_UNIX
(with the empty network namespace this makes even loopback fail at `socket()`). Syscalls of another ABI (i386 or
x32 on x86_64) kill the process, so the deny list cannot be walked around by number.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (the low 32 bits of args[0] sit at offset 16)
_NR, _ARCH, _ARG0 = 0, 4, 16
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
_ALLOW, _KILL = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
_CLONE_NEW = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_AF_UNIX = 1

# name -> (x86_64, aarch64) syscall numbers, from the kernel's unistd headers
_DENIED = {
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_by_handle_at": (304, 265), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442), "swapon": (167, 224), "swapoff": (168, 225),
    "reboot": (169, 142), "acct": (163, 89), "quotactl": (179, 60),
    # System V IPC and POSIX message queues outlive their creator, uncounted by RLIMIT_AS and unseen by a wipe of
    # files: one candidate could leave memory or messages for the next of its batch (POSIX shm is /dev/shm files)
    "shmget": (29, 194), "semget": (64, 190), "msgget": (68, 186), "mq_open": (240, 180),
}
_CLONE, _CLONE3, _SOCKET = (56, 220), (435, 435), (41, 198)
_ARCHES = {"x86_64": (0, 0xC000003E), "amd64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7), "arm64": (1, 0xC00000B7)}


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _errno(code: int) -> int:
    return 0x00050000 | code  # SECCOMP_RET_ERRNO


def filter_bytes(machine: str | None = None) -> bytes | None:
    """The compiled filter for this CPU (or `machine`), or None on an architecture without a syscall table here."""
    arch = _ARCHES.get((machine or platform.machine()).lower())
    if arch is None:
        return None
    col, audit_arch = arch
    prog = [_op(_LD, _ARCH), _op(_JEQ, audit_arch, 1, 0), _op(_RET, _KILL), _op(_LD, _NR)]
    if col == 0:  # x32 syscalls carry bit 30 and would bypass the numbers below
        prog += [_op(_JGE, 0x40000000, 0, 1), _op(_RET, _KILL)]
    for numbers in _DENIED.values():
        prog += [_op(_JEQ, numbers[col], 0, 1), _op(_RET, _errno(errno.EPERM))]
    # clone3 passes its flags in memory, out of the filter's sight: ENOSYS makes libc fall back to clone
    prog += [_op(_JEQ, _CLONE3[col], 0, 1), _op(_RET, _errno(errno.ENOSYS))]
    # clone: threads and fork are fine, new namespaces are not
    prog += [_op(_JEQ, _CLONE[col], 0, 4), _op(_LD, _ARG0), _op(_JSET, _CLONE_NEW, 0, 1),
             _op(_RET, _errno(errno.EPERM)), _op(_RET, _ALLOW)]
    # socket: AF_UNIX only (multiprocessing and asyncio need socketpairs)
    prog += [_op(_JEQ, _SOCKET[col], 0, 4), _op(_LD, _ARG0), _op(_JEQ, _AF_UNIX, 1, 0),
             _op(_RET, _errno(errno.EAFNOSUPPORT)), _op(_RET, _ALLOW)]
    prog.append(_op(_RET, _ALLOW))
    return b"".join(prog)
