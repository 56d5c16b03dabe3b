"""Another tool's ``sock_ops`` program on the test cgroup: what sockops must coexist with.

A tiny bcc program that counts established TCP connections (both ends' callbacks) in its own
array map, attached the way other tools do: with ``BPF_F_ALLOW_MULTI``, through its own BPF link
(held by an fd, as a running tool holds it), or exclusively (no flags). It uses bcc and libbpf
directly, never sockops' own modules, so it behaves the same against any sockops version.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

OTHER_SOCK_OPS = r"""
BPF_ARRAY(established, u64, 1);

int other_count(struct bpf_sock_ops *skops)
{
	int zero = 0;
	u64 *n;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
		skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	n = established.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 1;
}
"""

NAME = "other_count"
BPF_CGROUP_SOCK_OPS = 3
BPF_F_ALLOW_MULTI = 2
HOW = ("multi", "link", "exclusive")


class OtherTool:
    """Loaded and attached on construction; ``close()`` detaches and unloads (idempotent)."""

    def __init__(self, cgroup: Path, how: str) -> None:
        from bcc import BPF

        assert how in HOW, how
        self.cgroup = cgroup
        self.how = how
        self.link_fd: int | None = None
        self.attached = False
        self.bpf = BPF(text=OTHER_SOCK_OPS)
        try:
            self.fn = self.bpf.load_func(NAME, BPF.SOCK_OPS)
            self._attach()
        except BaseException:
            self.bpf.cleanup()
            raise

    def _cg_fd(self) -> int:
        return os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)

    def _attach(self) -> None:
        from bcc import BPF, BPFAttachType

        fd = self._cg_fd()
        try:
            if self.how == "link":
                libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
                libbpf.bpf_link_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
                ret = libbpf.bpf_link_create(self.fn.fd, fd, BPF_CGROUP_SOCK_OPS, None)
                if ret < 0:
                    raise OSError(-ret, f"the other tool's bpf_link_create: {os.strerror(-ret)}")
                self.link_fd = ret
            else:
                flags = BPF_F_ALLOW_MULTI if self.how == "multi" else 0
                BPF.attach_func(self.fn, fd, BPFAttachType.CGROUP_SOCK_OPS, flags)
            self.attached = True
        finally:
            os.close(fd)

    @property
    def prog_id(self) -> int:
        info = (ctypes.c_uint8 * 8)()
        size = ctypes.c_uint32(len(info))
        libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        assert libbpf.bpf_obj_get_info_by_fd(self.fn.fd, info, ctypes.byref(size)) == 0
        return ctypes.c_uint32.from_buffer(info, 4).value  # struct bpf_prog_info: type, id

    def established(self) -> int:
        """Established-connection callbacks the program has seen (two per connection)."""
        return int(self.bpf["established"][ctypes.c_int(0)].value)

    def close(self) -> None:
        from bcc import BPF, BPFAttachType

        if self.attached:
            if self.link_fd is not None:
                os.close(self.link_fd)  # an unpinned link goes with its last fd
                self.link_fd = None
            else:
                fd = self._cg_fd()
                try:
                    with contextlib.suppress(Exception):
                        BPF.detach_func(self.fn, fd, BPFAttachType.CGROUP_SOCK_OPS)
                finally:
                    os.close(fd)
            self.attached = False
        self.bpf.cleanup()
