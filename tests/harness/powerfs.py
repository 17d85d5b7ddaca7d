"""A FUSE filesystem that loses, at a power cut, everything that was not fsynced.

What a process writes is visible at once (reads see it), but it reaches the
*durable* state only when the file is fsynced (``fsync``/``fdatasync``), and a
name (create, unlink, rename, mkdir, rmdir) only when its directory is fsynced.
At the cut everything else is thrown away, the way a disk with a volatile
write cache and a filesystem without ordering promises may lose it:

* ``drop``: every unsynced block and every unsynced name change is lost;
* ``reorder``: some of it survives anyway, chosen at random (seeded): for each
  file a random subset of its unsynced 4 KiB blocks, and its size either the
  synced one or the one written (an extended file whose new blocks were lost
  reads as zeros there); of the unsynced name changes a random prefix in the
  order they were made (a journal that committed some of them).

Neither mode ever loses what was synced, and both keep writes block-atomic
(a 4 KiB block is either old or new, never torn), which is what SQLite
assumes of a disk (WAL with ``synchronous=FULL``: every commit fsyncs the
WAL, a new WAL gets its directory fsynced, a checkpoint fsyncs the database
before the WAL is reused).

Layout of the backing directory (the "disk"): ``data/<inode>`` holds each
file's synced bytes, ``state.json`` the synced directory tree. Run it as

    python -m tests.harness.powerfs BACKING MOUNTPOINT --seed N

It prints ``mounted`` when the mount is up. SIGUSR1 is the power cut in
``drop`` mode, SIGUSR2 in ``reorder`` mode: the unsynced state is discarded
(per the mode), the durable state is written, a
one-line JSON report is printed (``{"cut": ...}``) and from then on every
operation fails with EIO, as on a dead disk, until the mount is taken away
(``fusermount3 -u``) and the process exits. Mounting the same backing
directory again is the reboot. :class:`PowerFS` drives this from a test.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 4096
ROOT = 1

# -- the model (pure Python, no FUSE) ------------------------------------------


@dataclass
class Node:
    ino: int
    kind: str  # "file" | "dir" | "link"
    mode: int
    target: bytes = b""  # symlink target
    # live (volatile) state of a file
    size: int = 0
    durable_size: int = 0
    dirty: dict[int, bytearray] = field(default_factory=dict)  # block -> full block image
    trunc_floor: int | None = None  # backing bytes at or past this read as zeros
    mtime_ns: int = 0
    ctime_ns: int = 0

    def unsynced(self) -> bool:
        return bool(self.dirty) or self.trunc_floor is not None or self.size != self.durable_size


@dataclass(frozen=True)
class NameOp:
    """One change of the directory tree, kept until its directory is fsynced."""

    kind: str  # "link" (name -> inode) | "unlink"
    parent: int
    name: bytes
    ino: int = 0
    moved_from: tuple[int, bytes] | None = None  # rename: the old name, removed with it

    def dirs(self) -> set[int]:
        return {self.parent} | ({self.moved_from[0]} if self.moved_from else set())


class DiskError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class Model:
    """Files and directories with a volatile and a durable state.

    ``backing``/data/<ino> holds each file's synced bytes; the durable tree
    (directories and the attributes of the inodes in it) is kept in memory and
    written to ``backing``/state.json whenever it changes.
    """

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.data_dir = backing / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = backing / "state.json"
        self.nodes: dict[int, Node] = {}
        self.live: dict[int, dict[bytes, int]] = {}  # dir inode -> entries
        self.durable: dict[int, dict[bytes, int]] = {}
        self.attrs: dict[int, tuple[str, int, bytes]] = {}  # durable kind, mode, target
        self.pending: list[NameOp] = []
        self.next_ino = ROOT + 1
        self.fds: dict[int, int] = {}
        self.dead = False
        self.fsyncs = 0
        self._load()

    # -- durable state on the backing directory --------------------------------

    def _load(self) -> None:
        if self.state_path.exists():
            doc = json.loads(self.state_path.read_text())
            self.next_ino = int(doc["next_ino"])
            self.durable = {
                int(d): {bytes.fromhex(n): int(i) for n, i in ents.items()}
                for d, ents in doc["dirs"].items()
            }
            self.attrs = {int(i): (a[0], int(a[1]), bytes.fromhex(a[2])) for i, a in doc["attrs"].items()}
        else:
            self.durable = {ROOT: {}}
            self.attrs = {ROOT: ("dir", 0o755, b"")}
            self._save()
        reachable = self._reachable(self.durable)
        now = time.time_ns()
        for ino in reachable:
            kind, mode, target = self.attrs[ino]
            node = Node(ino, kind, mode, target, mtime_ns=now, ctime_ns=now)
            if kind == "file":
                path = self.data_dir / str(ino)
                if not path.exists():
                    path.touch()
                node.size = node.durable_size = path.stat().st_size
            self.nodes[ino] = node
            if kind == "dir":
                self.live[ino] = dict(self.durable.get(ino, {}))
        # what no durable name reaches is garbage of an earlier life
        for f in self.data_dir.iterdir():
            if int(f.name) not in reachable:
                f.unlink()
        self.durable = {d: e for d, e in self.durable.items() if d in reachable}
        self.attrs = {i: a for i, a in self.attrs.items() if i in reachable}

    def _reachable(self, dirs: dict[int, dict[bytes, int]]) -> set[int]:
        seen = {ROOT}
        todo = [ROOT]
        while todo:
            d = todo.pop()
            for ino in dirs.get(d, {}).values():
                if ino not in seen and ino in self.attrs:
                    seen.add(ino)
                    if self.attrs[ino][0] == "dir":
                        todo.append(ino)
        return seen

    def _save(self) -> None:
        doc = {
            "next_ino": self.next_ino,
            "dirs": {str(d): {n.hex(): i for n, i in e.items()} for d, e in self.durable.items()},
            "attrs": {str(i): [a[0], a[1], a[2].hex()] for i, a in self.attrs.items()},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_path)

    def _fd(self, ino: int) -> int:
        fd = self.fds.get(ino)
        if fd is None:
            fd = self.fds[ino] = os.open(self.data_dir / str(ino), os.O_RDWR | os.O_CREAT, 0o600)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- checks ------------------------------------------------------------------

    def alive(self) -> None:
        if self.dead:
            raise DiskError(errno.EIO)

    def node(self, ino: int) -> Node:
        self.alive()
        n = self.nodes.get(ino)
        if n is None:
            raise DiskError(errno.ENOENT)
        return n

    def dir(self, ino: int) -> dict[bytes, int]:
        if self.node(ino).kind != "dir":
            raise DiskError(errno.ENOTDIR)
        return self.live[ino]

    def lookup(self, parent: int, name: bytes) -> Node:
        entries = self.dir(parent)
        if name == b".":
            return self.node(parent)
        if name == b"..":
            return self.node(self.parent_of(parent))
        ino = entries.get(name)
        if ino is None:
            raise DiskError(errno.ENOENT)
        return self.node(ino)

    def parent_of(self, d: int) -> int:
        for p, ents in self.live.items():
            if d in ents.values():
                return p
        return ROOT

    # -- names -------------------------------------------------------------------

    def _new(self, parent: int, name: bytes, kind: str, mode: int, target: bytes = b"") -> Node:
        entries = self.dir(parent)
        if name in entries:
            raise DiskError(errno.EEXIST)
        now = time.time_ns()
        node = Node(self.next_ino, kind, mode & 0o7777, target, mtime_ns=now, ctime_ns=now)
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.attrs[node.ino] = (kind, node.mode, target)  # harmless until a name reaches it
        if kind == "dir":
            self.live[node.ino] = {}
        if kind == "file":
            self._fd(node.ino)  # the inode's (empty) synced data
        entries[name] = node.ino
        self.pending.append(NameOp("link", parent, name, node.ino))
        self._save()  # next_ino and attrs (no name of the durable tree changes)
        return node

    def create(self, parent: int, name: bytes, mode: int) -> Node:
        return self._new(parent, name, "file", mode)

    def mkdir(self, parent: int, name: bytes, mode: int) -> Node:
        return self._new(parent, name, "dir", mode)

    def symlink(self, parent: int, name: bytes, target: bytes) -> Node:
        return self._new(parent, name, "link", 0o777, target)

    def unlink(self, parent: int, name: bytes, *, want_dir: bool = False) -> None:
        node = self.lookup(parent, name)
        if want_dir:
            if node.kind != "dir":
                raise DiskError(errno.ENOTDIR)
            if self.live[node.ino]:
                raise DiskError(errno.ENOTEMPTY)
        elif node.kind == "dir":
            raise DiskError(errno.EISDIR)
        del self.live[parent][name]
        self.pending.append(NameOp("unlink", parent, name))

    def link(self, ino: int, parent: int, name: bytes) -> Node:
        node = self.node(ino)
        if node.kind == "dir":
            raise DiskError(errno.EPERM)
        entries = self.dir(parent)
        if name in entries:
            raise DiskError(errno.EEXIST)
        entries[name] = ino
        self.pending.append(NameOp("link", parent, name, ino))
        return node

    def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, noreplace: bool) -> None:
        node = self.lookup(p_old, n_old)
        target = self.dir(p_new).get(n_new)
        if target is not None:
            if noreplace:
                raise DiskError(errno.EEXIST)
            t = self.node(target)
            if t.kind == "dir" and (node.kind != "dir" or self.live[t.ino]):
                raise DiskError(errno.ENOTEMPTY if node.kind == "dir" else errno.EISDIR)
            if t.kind != "dir" and node.kind == "dir":
                raise DiskError(errno.ENOTDIR)
        del self.live[p_old][n_old]
        self.live[p_new][n_new] = node.ino
        self.pending.append(NameOp("link", p_new, n_new, node.ino, moved_from=(p_old, n_old)))

    def _apply(self, op: NameOp) -> None:
        if op.kind == "unlink":
            self.durable.setdefault(op.parent, {}).pop(op.name, None)
            return
        if op.moved_from is not None:
            old = self.durable.setdefault(op.moved_from[0], {})
            if old.get(op.moved_from[1]) == op.ino:
                del old[op.moved_from[1]]
        self.durable.setdefault(op.parent, {})[op.name] = op.ino

    def fsync_dir(self, ino: int) -> None:
        self.dir(ino)
        keep = []
        for op in self.pending:
            if ino in op.dirs():
                self._apply(op)
            else:
                keep.append(op)
        self.pending = keep
        self.fsyncs += 1
        self._save()

    # -- data --------------------------------------------------------------------

    def _backing(self, node: Node, off: int, n: int) -> bytes:
        """Synced bytes at [off, off+n), zero where the live file does not keep them."""
        limit = node.durable_size if node.trunc_floor is None else min(node.durable_size, node.trunc_floor)
        if off >= limit:
            return bytes(n)
        data = os.pread(self._fd(node.ino), min(n, limit - off), off)
        return data + bytes(n - len(data))

    def read(self, ino: int, off: int, size: int) -> bytes:
        node = self.node(ino)
        end = min(off + size, node.size)
        out = bytearray()
        pos = off
        while pos < end:
            b, boff = divmod(pos, BLOCK)
            n = min(BLOCK - boff, end - pos)
            blk = node.dirty.get(b)
            out += blk[boff : boff + n] if blk is not None else self._backing(node, pos, n)
            pos += n
        return bytes(out)

    def write(self, ino: int, off: int, buf: bytes) -> int:
        node = self.node(ino)
        pos, i = off, 0
        while i < len(buf):
            b, boff = divmod(pos, BLOCK)
            n = min(BLOCK - boff, len(buf) - i)
            blk = node.dirty.get(b)
            if blk is None:
                blk = node.dirty[b] = bytearray(self._block_image(node, b))
            blk[boff : boff + n] = buf[i : i + n]
            pos += n
            i += n
        node.size = max(node.size, off + len(buf))
        node.mtime_ns = time.time_ns()
        return len(buf)

    def _block_image(self, node: Node, b: int) -> bytes:
        start = b * BLOCK
        if start >= node.size:
            return bytes(BLOCK)
        data = self._backing(node, start, min(BLOCK, node.size - start))
        return data + bytes(BLOCK - len(data))

    def truncate(self, ino: int, size: int) -> None:
        node = self.node(ino)
        if size < node.size:
            node.trunc_floor = size if node.trunc_floor is None else min(node.trunc_floor, size)
            for b in [b for b in node.dirty if b * BLOCK >= size]:
                del node.dirty[b]
            last = node.dirty.get(size // BLOCK)
            if last is not None:
                cut = size % BLOCK
                last[cut:] = bytes(BLOCK - cut)
        node.size = size
        node.mtime_ns = time.time_ns()

    def fsync(self, ino: int) -> None:
        node = self.node(ino)
        if node.kind == "file":
            self._persist(node, keep=set(node.dirty), size=node.size)
        self.fsyncs += 1

    def _persist(self, node: Node, *, keep: set[int], size: int) -> None:
        fd = self._fd(node.ino)
        if node.trunc_floor is not None and node.trunc_floor < node.durable_size:
            os.ftruncate(fd, node.trunc_floor)
        for b in sorted(keep):
            start = b * BLOCK
            if start < size:
                os.pwrite(fd, bytes(node.dirty[b][: min(BLOCK, size - start)]), start)
        os.ftruncate(fd, size)
        node.durable_size = size
        node.dirty.clear()
        node.trunc_floor = None

    # -- the power cut -------------------------------------------------------------

    def cut(self, mode: str, rng: random.Random) -> dict[str, Any]:
        """Lose what was not synced (``mode``: drop | reorder); returns what happened."""
        report: dict[str, Any] = {
            "mode": mode,
            "fsyncs": self.fsyncs,
            "unsynced_files": 0,
            "unsynced_blocks": 0,
            "kept_blocks": 0,
            "unsynced_names": len(self.pending),
            "kept_names": 0,
            "names": sorted({op.name.decode(errors="replace") for op in self.pending})[:10],
        }
        for node in self.nodes.values():
            if node.kind != "file" or not node.unsynced():
                continue
            report["unsynced_files"] += 1
            report["unsynced_blocks"] += len(node.dirty)
            if mode == "reorder":
                keep = {b for b in node.dirty if rng.random() < 0.5}
                size = node.size if rng.random() < 0.5 else node.durable_size
                if node.trunc_floor is not None and rng.random() < 0.5:
                    node.trunc_floor = None  # the truncation did not reach the disk
                report["kept_blocks"] += len([b for b in keep if b * BLOCK < size])
                self._persist(node, keep=keep, size=size)
        if mode == "reorder" and self.pending:
            n = rng.randrange(len(self.pending) + 1)
            for op in self.pending[:n]:
                self._apply(op)
            report["kept_names"] = n
        self.pending = []
        self._save()
        self.dead = True
        return report


# -- the FUSE shell --------------------------------------------------------------


def serve(backing: Path, mountpoint: Path, seed: int) -> int:  # pragma: no cover - runs in its own process
    import pyfuse3
    import trio

    model = Model(backing)
    rng = random.Random(seed)
    handles: dict[int, int] = {}
    next_fh = iter(range(1, 1 << 62))

    def fuse(fn: Callable[..., Any]) -> Callable[..., Any]:
        """Map model errors to FUSE errors."""

        async def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except DiskError as exc:
                raise pyfuse3.FUSEError(exc.errno) from None
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

        return wrapper

    def attrs(node: Node) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = 1.0
        a.attr_timeout = 1.0
        fmt = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "link": stat.S_IFLNK}[node.kind]
        a.st_mode = fmt | node.mode
        a.st_nlink = 2 if node.kind == "dir" else 1
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_rdev = 0
        size = node.size if node.kind == "file" else len(node.target) if node.kind == "link" else 4096
        a.st_size = size
        a.st_blksize = BLOCK
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def handle_ino(fh: int) -> int:
        model.alive()
        ino = handles.get(fh)
        if ino is None:
            raise DiskError(errno.EBADF)
        return ino

    def new_handle(ino: int) -> int:
        fh = next(next_fh)
        handles[fh] = ino
        return fh

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        enable_writeback_cache = False

        @fuse
        def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            return attrs(model.lookup(parent, name))

        @fuse
        def getattr(self, ino: int, ctx: Any = None) -> Any:
            return attrs(model.node(ino))

        @fuse
        def setattr(self, ino: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
            node = model.node(ino)
            if fields.update_size:
                model.truncate(ino, attr.st_size)
            if fields.update_mode:
                node.mode = attr.st_mode & 0o7777
            if fields.update_mtime:
                node.mtime_ns = attr.st_mtime_ns
            node.ctime_ns = time.time_ns()
            return attrs(node)

        @fuse
        def readlink(self, ino: int, ctx: Any) -> bytes:
            return model.node(ino).target

        @fuse
        def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
            return attrs(model.mkdir(parent, name, mode))

        @fuse
        def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any) -> Any:
            return attrs(model.symlink(parent, name, target))

        @fuse
        def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            model.unlink(parent, name)

        @fuse
        def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
            model.unlink(parent, name, want_dir=True)

        @fuse
        def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ctx: Any) -> None:
            if flags & pyfuse3.RENAME_EXCHANGE:
                raise DiskError(errno.EINVAL)
            model.rename(p_old, n_old, p_new, n_new, bool(flags & pyfuse3.RENAME_NOREPLACE))

        @fuse
        def link(self, ino: int, parent: int, name: bytes, ctx: Any) -> Any:
            return attrs(model.link(ino, parent, name))

        @fuse
        def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
            if not stat.S_ISREG(mode):
                raise DiskError(errno.EPERM)
            return attrs(model.create(parent, name, mode))

        @fuse
        def open(self, ino: int, flags: int, ctx: Any) -> Any:
            node = model.node(ino)
            if node.kind != "file":
                raise DiskError(errno.EISDIR if node.kind == "dir" else errno.EINVAL)
            if flags & os.O_TRUNC:
                model.truncate(ino, 0)
            return pyfuse3.FileInfo(fh=new_handle(ino))

        @fuse
        def create(self, parent: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
            node = model.create(parent, name, mode)
            return pyfuse3.FileInfo(fh=new_handle(node.ino)), attrs(node)

        @fuse
        def read(self, fh: int, off: int, size: int) -> bytes:
            return model.read(handle_ino(fh), off, size)

        @fuse
        def write(self, fh: int, off: int, buf: bytes) -> int:
            return model.write(handle_ino(fh), off, buf)

        @fuse
        def flush(self, fh: int) -> None:
            handle_ino(fh)  # close() is not a durability point

        @fuse
        def release(self, fh: int) -> None:
            handles.pop(fh, None)

        @fuse
        def fsync(self, fh: int, datasync: bool) -> None:
            model.fsync(handle_ino(fh))

        @fuse
        def opendir(self, ino: int, ctx: Any) -> int:
            model.dir(ino)
            return new_handle(ino)

        @fuse
        def readdir(self, fh: int, start_id: int, token: Any) -> None:
            ino = handle_ino(fh)
            names = sorted(model.dir(ino).items())
            for i, (name, child) in enumerate(names[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, attrs(model.node(child)), i):
                    break

        @fuse
        def releasedir(self, fh: int) -> None:
            handles.pop(fh, None)

        @fuse
        def fsyncdir(self, fh: int, datasync: bool) -> None:
            model.fsync_dir(handle_ino(fh))

        @fuse
        def statfs(self, ctx: Any) -> Any:
            model.alive()
            st = os.statvfs(backing)
            s = pyfuse3.StatvfsData()
            s.f_bsize = BLOCK
            s.f_frsize = st.f_frsize
            s.f_blocks = st.f_blocks
            s.f_bfree = st.f_bfree
            s.f_bavail = st.f_bavail
            s.f_files = 1 << 20
            s.f_ffree = (1 << 20) - len(model.nodes)
            s.f_favail = s.f_ffree
            s.f_namemax = 255
            return s

        @fuse
        def access(self, ino: int, mode: int, ctx: Any) -> bool:
            model.node(ino)
            return True

        async def forget(self, inode_list: Any) -> None:
            return None

        async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

        async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
            return []

        async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
            raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def power_switch() -> None:
                with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGUSR2) as signals:
                    async for signum in signals:
                        if not model.dead:
                            report = model.cut("reorder" if signum == signal.SIGUSR2 else "drop", rng)
                            print(json.dumps({"cut": report}), flush=True)

            nursery.start_soon(power_switch)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    options = set(pyfuse3.default_options) | {"fsname=powerfs", "subtype=powerfs"}
    pyfuse3.init(Ops(), str(mountpoint), options)
    print("mounted", flush=True)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
        model.close()
    return 0


# -- the test's side -----------------------------------------------------------------


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot be made here (None: it can)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE is needed to simulate power loss)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (Debian package fuse3; ./dev installs it)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not installed ({exc}; ./dev installs it)"
    return None


class PowerFS:
    """A mounted :mod:`powerfs` in its own process: cut the power, reboot, repeat.

    ``backing`` is the disk, ``mountpoint`` where programs see it. Every
    :meth:`reboot` mounts the durable state left by the last cut.
    """

    def __init__(self, backing: Path, mountpoint: Path, *, seed: int, mode: str = "drop") -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self.seed = seed
        self.mode = mode
        self.proc: subprocess.Popen[str] | None = None
        self.boots = 0
        self.reports: list[dict[str, Any]] = []
        self.log = backing.with_name(backing.name + ".log")

    def mount(self) -> None:
        assert self.proc is None, "already mounted"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[2]
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.harness.powerfs", str(self.backing), str(self.mountpoint),
                 "--seed", str(self.seed + self.boots)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=root,
                env={**os.environ, "PYTHONPATH": str(root)},
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "mounted":
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            raise RuntimeError(f"powerfs did not mount: {line!r}; see {self.log}")
        self.boots += 1

    def __enter__(self) -> PowerFS:
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def cut(self, mode: str | None = None) -> dict[str, Any]:
        """The power goes: unsynced writes are lost (``mode``: drop | reorder, default
        the one given at construction); the disk answers EIO until :meth:`reboot`.

        Stop (SIGSTOP) the programs using the mount first, so that nothing
        they do after this instant counts; kill them after."""
        assert self.proc is not None and self.proc.stdout is not None
        mode = mode or self.mode
        assert mode in ("drop", "reorder"), mode
        self.proc.send_signal(signal.SIGUSR2 if mode == "reorder" else signal.SIGUSR1)
        line = self.proc.stdout.readline()
        report: dict[str, Any] = json.loads(line)["cut"]
        self.reports.append(report)
        return report

    def unmount(self) -> None:
        if self.proc is None:
            return
        for args in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"]):
            r = subprocess.run([*args, str(self.mountpoint)], capture_output=True, text=True, check=False)
            if r.returncode == 0:
                break
            time.sleep(0.2)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def reboot(self) -> None:
        """Power back on: unmount what is left and mount the durable state."""
        self.unmount()
        self.mount()

    def power_cycle(self) -> dict[str, Any]:
        report = self.cut()
        self.reboot()
        return report


def fsync_tree(root: Path) -> None:
    """Make a tree written through the mount durable (what an installer does)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - runs in its own process
    p = argparse.ArgumentParser(prog="powerfs", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("backing", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return serve(a.backing, a.mountpoint, a.seed)


if __name__ == "__main__":
    sys.exit(main())
