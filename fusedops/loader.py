"""Overlapped safetensors loading: `load_safetensors(model_or_path, device)`.

Every file is memory-mapped and its header parsed and validated here (8-byte little-endian length, JSON,
then per tensor dtype / shape / data_offsets), all files before any byte is copied, so a bad checkpoint
raises `CheckpointError` naming the file and the tensor and leaves a model untouched. On CUDA the bytes go
through pinned staging buffers: worker threads fill chunk i+1 into one buffer while the side stream's
host-to-device copy of chunk i reads another; an event per buffer tells the workers when they may refill
it, and the caller's stream waits for the side stream at the end. Two ways to fill a buffer (`fill`):
"mmap" maps the chunk's pages in one madvise(MADV_POPULATE_READ) call, then memcpys it out of the
memory-mapped file (torch's copy_, parallel inside); "read" splits the chunk over `copy_threads` threads,
each an os.preadv of its slice straight from the file into the buffer (the kernel copies from the page
cache; the GIL is released in the call). On the CPU, "mmap" copies straight from the populated mapping
into the tensors and "read" runs the staging pipeline with plain buffers and no streams (so CI covers it).
A file that shrinks after its header was read raises CheckpointError naming file and tensor: "read" sees
the short read; "mmap" checks the file's size after each chunk's populate (a shrink during the memcpy itself
still reads zeros or dies of SIGBUS, as with any mapped file).

Zero-copy (zero_copy=True): no staging buffer and no host memcpy. The mapped file range itself is page-locked
read-only (cuMemHostRegister with CU_MEMHOSTREGISTER_READ_ONLY), one page-aligned window at a time on a worker
thread, while the side stream DMAs the previous window straight out of the page cache; a window is unpinned
once its copies' event has completed. Host memory then carries each loaded byte once (the DMA's read) instead
of three or four times (memcpy read + write + the DMA's read). If the driver refuses to pin a window (not
supported for file-backed maps, locked-memory limit) the rest goes through the staging path, with the reason
in a debug log (logger "fusedops.loader").
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import mmap
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

# Pinned staging, 32 MiB x 8 filled by 4 threads (H200 host, 2026-12-03, perf/notes/loader.md): 36.2 GB/s vs 28.3
# for 64 MiB x 4 / 2 threads (the H100 hosts' choice: 27.6 vs 23.3 for x 2 / 1 thread) and 32.6 for 64 MiB x 8 /
# 4 threads in the same run. Buffer count and size alone bought nothing (16/64/256 MiB x 2-4, H100 rounds 1, 3).
STAGING_BYTES = 32 << 20
STAGING_BUFFERS = 8
# fill="mmap" memcpy threads (each fills its own buffer), page-locking threads of the zero-copy path (8 of them
# pinned no faster than 2 on the H200 host: 18.7 vs 18.8 GB/s).
COPY_THREADS = 4
# fill="read": threads reading slices of one chunk at a time. preadv -> pinned alone moved 4.8 GB/s with 1 thread,
# 27.0 with 8, 30.2 with 16 (H100 host, 2026-11-25); loads with 12 threads 29.7 and 17.9 GB/s, below "mmap".
READ_THREADS = 12
# How staging buffers are filled: "mmap" (populate + memcpy from the mapping) or "read" (os.preadv, slower in both
# H100 runs). Page faults were the mmap memcpy's cost: 34.8 GB/s from a fresh mapping, 78.5 once MADV_POPULATE_READ
# (803 GB/s) had mapped it (one host); 17.5 vs 19.6 on a slower one, where the load went 18.4 -> 23.3 GB/s.
FILL = "mmap"
FILLS = ("mmap", "read")
MADV_POPULATE_READ = 22  # linux/mman.h, Linux >= 5.14; older kernels refuse it (EINVAL) and the memcpy faults
# Staging by default: warm, zero-copy loaded at 14.9-20.9 GB/s vs staging's 32.1 (H100, 2026-11-25): page-locking
# runs at 29.7 GB/s and does not overlap the DMA (pin + copy times add up). Cold (disk-bound) it won, 1.7 vs 1.2 GB/s.
ZERO_COPY = False

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_LISTED = 5  # names shown in a missing / unexpected tensors error
_PAGE = mmap.PAGESIZE
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


class IncompatibleKeys(NamedTuple):
    """What a model load skipped (both empty unless strict=False): model tensors the checkpoint lacks,
    checkpoint tensors the model lacks."""
    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; start/end are absolute byte offsets in the file."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: str | Path) -> list[TensorEntry]:
    """Parse and validate one file's header: offsets inside the file, dtype known, shape x itemsize equal
    to the byte span, no two tensors overlapping."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated: {size} bytes, fewer than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{file}: truncated: header of {header_len} bytes, file of {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise CheckpointError(f"{file}: header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + header_len
    entries = [_entry(file, name, spec, data_start, size - data_start)
               for name, spec in header.items() if name != "__metadata__"]
    _check_disjoint(file, entries)
    return entries


def _entry(file: Path, name: str, spec, data_start: int, data_size: int) -> TensorEntry:
    where = f"{file}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{where}: needs dtype, shape and data_offsets, got {spec!r}")
    dtype = DTYPES.get(spec["dtype"])
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {spec['dtype']!r} (known: {', '.join(DTYPES)})")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets {offsets} outside the {data_size}-byte data section"
                              " (truncated file?)")
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - begin:
        raise CheckpointError(f"{where}: shape {shape} of {spec['dtype']} is {numel * dtype.itemsize} bytes,"
                              f" data_offsets {offsets} span {end - begin}")
    return TensorEntry(name, file, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_disjoint(file: Path, entries: list[TensorEntry]) -> None:
    spans = sorted((e for e in entries if e.end > e.start), key=lambda e: e.start)
    for prev, cur in zip(spans, spans[1:]):
        if cur.start < prev.end:
            raise CheckpointError(f"{file}: tensor {cur.name!r} overlaps tensor {prev.name!r}")


def read_checkpoint(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint: one .safetensors file, or a directory with an index json (its
    weight_map decides the files) or with *.safetensors files."""
    path = Path(path)
    if path.is_file():
        return {e.name: e for e in read_header(path)}
    if not path.is_dir():
        raise ValueError(f"path: {path} does not exist")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"path: {path} has several index files: {', '.join(i.name for i in indexes)}")
    weight_map = _weight_map(indexes[0]) if indexes else None
    files = sorted({path / f for f in weight_map.values()}) if indexes else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"path: no *.safetensors files in {path}")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{indexes[0]}: names {file.name}, which does not exist")
        for e in read_header(file):
            if e.name in entries:
                raise CheckpointError(f"{file}: tensor {e.name!r} is also in {entries[e.name].file}")
            entries[e.name] = e
    for name, f in (weight_map or {}).items():
        if name not in entries or entries[name].file != path / f:
            raise CheckpointError(f"{path / f}: tensor {name!r} is missing (the index puts it in this file)")
    return entries


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not an index json with a weight_map ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is not an object")
    folder = index.parent.resolve()
    for name, file in weight_map.items():
        if not isinstance(file, str) or (folder / file).resolve().parent != folder:
            raise CheckpointError(f"{index}: tensor {name!r} maps to {file!r}, not a file name in {folder}")
    return weight_map


# ---- chunk plan: which file bytes travel together through one staging buffer ----

class Piece(NamedTuple):
    """Bytes [chunk_offset, +nbytes) of a chunk are bytes [job_offset, +nbytes) of tensor job `job`."""
    job: int
    job_offset: int
    chunk_offset: int
    nbytes: int


@dataclass
class Chunk:
    """A contiguous byte range of one file, at most one staging buffer long."""
    file: int
    start: int
    nbytes: int = 0
    pieces: list[Piece] = field(default_factory=list)


def plan_chunks(spans: list[tuple[int, int, int]], chunk_bytes: int, aligned: bool = False) -> list[Chunk]:
    """Cut the (file, start, end) byte spans of the tensors into chunks of at most chunk_bytes: small
    adjacent tensors share a chunk, large ones split over several; a gap (a skipped tensor) starts a
    new chunk, so skipped bytes are never read. aligned=True also cuts at every multiple of chunk_bytes
    in the file, so each chunk lies inside one window [k * chunk_bytes, (k + 1) * chunk_bytes)."""
    chunks: list[Chunk] = []
    for job in sorted(range(len(spans)), key=lambda j: spans[j][:2]):
        file, start, end = spans[job]
        pos = start
        while pos < end:
            last = chunks[-1] if chunks else None
            full = pos % chunk_bytes == 0 if aligned else last is not None and last.nbytes == chunk_bytes
            if last is None or last.file != file or last.start + last.nbytes != pos or full:
                last = Chunk(file, pos)
                chunks.append(last)
            room = chunk_bytes - pos % chunk_bytes if aligned else chunk_bytes - last.nbytes
            n = min(end - pos, room)
            last.pieces.append(Piece(job, pos - start, last.nbytes, n))
            last.nbytes += n
            pos += n
    return chunks


class Window(NamedTuple):
    """File bytes [begin, end), page-aligned, page-locked together for the chunks inside them."""
    file: int
    begin: int
    end: int
    chunks: list[Chunk]


def plan_windows(chunks: list[Chunk], window_bytes: int, page: int = _PAGE) -> list[Window]:
    """Group chunks planned with plan_chunks(..., window_bytes, aligned=True) by window, each window's
    range widened to whole pages. window_bytes is a multiple of the page, so two windows never share a
    page (the driver refuses to pin a page twice)."""
    if window_bytes % page:
        raise ValueError(f"window_bytes: {window_bytes} is not a multiple of the {page}-byte page")
    windows: list[Window] = []
    for c in chunks:
        last = windows[-1] if windows else None
        if last is None or last.file != c.file or last.begin // window_bytes != c.start // window_bytes:
            last = Window(c.file, c.start // page * page, 0, [])
            windows.append(last)
        last.chunks.append(c)
        windows[-1] = last._replace(end=-(-(c.start + c.nbytes) // page) * page)
    return windows


@dataclass(eq=False)
class _Job:
    """One tensor to fill. Its bytes land in `dest` directly when dtype and layout allow, else in a
    staged buffer of the checkpoint's dtype that is cast into dest once the last piece is in."""
    entry: TensorEntry
    dest: torch.Tensor
    staged: torch.Tensor | None = None
    remaining: int = field(init=False)

    def __post_init__(self):
        self.remaining = self.entry.end - self.entry.start

    def write(self, offset: int, data: torch.Tensor, non_blocking: bool) -> None:
        if self.dest.dtype == self.entry.dtype and self.dest.is_contiguous():
            target = self.dest.reshape(-1).view(torch.uint8)
        else:
            if self.staged is None:  # allocated on the copying stream, freed on it after the cast
                self.staged = torch.empty(self.entry.end - self.entry.start, dtype=torch.uint8,
                                          device=self.dest.device)
            target = self.staged
        target[offset:offset + data.numel()].copy_(data, non_blocking=non_blocking)
        self.remaining -= data.numel()
        if self.remaining == 0 and self.staged is not None:
            self.dest.copy_(self.staged.view(self.entry.dtype).view(self.entry.shape))
            self.staged = None


def _apply(chunk: Chunk, data: torch.Tensor, jobs: list[_Job], non_blocking: bool) -> None:
    """Hand a chunk's bytes (`data`, on the host) to the tensors they belong to."""
    for p in chunk.pieces:
        jobs[p.job].write(p.job_offset, data[p.chunk_offset:p.chunk_offset + p.nbytes], non_blocking)


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


class _FileMap:
    """A file mapped read-only and shared (PROT_READ, MAP_SHARED): its pages are the page cache's own, so
    reading or pinning them copies nothing (a private writable map would copy each page a read-only
    long-term pin touches). `data` is the file as a uint8 tensor, never written."""

    def __init__(self, file: Path):
        self.file = file
        self.size = file.stat().st_size
        fd = os.open(file, os.O_RDONLY)
        try:
            address = _libc().mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {file} failed: {os.strerror(ctypes.get_errno())}")
        self.address = address
        self.data = torch.frombuffer((ctypes.c_ubyte * self.size).from_address(address), dtype=torch.uint8)

    def close(self) -> None:
        del self.data
        _libc().munmap(self.address, self.size)


class _ShortRead(Exception):
    """The file ended (args: the file offset) before the bytes its header promised."""


def _populate(m: _FileMap, begin: int, end: int) -> None:
    """Map the pages holding file bytes [begin, end) in one call (MADV_POPULATE_READ) instead of one page
    fault each during the memcpy. Raises _ShortRead if the file no longer has them: past its end a mapping
    reads zeros up to the page boundary, then raises SIGBUS (a shrink during the memcpy itself still can)."""
    start = begin // _PAGE * _PAGE
    if _libc().madvise(m.address + start, end - start, MADV_POPULATE_READ):
        err = ctypes.get_errno()
        if err != errno.EFAULT:  # EFAULT: a page past the end of the file, caught by the size check below
            _populate_refused(err)
    size = m.file.stat().st_size
    if size < end:
        raise _ShortRead(max(size, begin))


@functools.lru_cache(maxsize=None)
def _populate_refused(err: int) -> None:
    log.debug("madvise(MADV_POPULATE_READ) refused (%s): the memcpy faults the pages in", os.strerror(err))


@contextmanager
def _naming_the_tensor(file: Path, chunk: Chunk, jobs: list[_Job]):
    """Turn a _ShortRead inside `chunk` into a CheckpointError naming the file and the tensor cut short."""
    try:
        yield
    except _ShortRead as e:
        offset = e.args[0]
        piece = next(p for p in chunk.pieces if chunk.start + p.chunk_offset + p.nbytes > offset)
        entry = jobs[piece.job].entry
        raise CheckpointError(f"{file}: tensor {entry.name!r}: short read, no bytes at offset {offset}, inside "
                              f"the tensor's data [{entry.start}, {entry.end}): the file shrank after its header "
                              "was read") from None


class RegistrationError(RuntimeError):
    """The driver refused to page-lock a mapped file range."""


def _pin(address: int, nbytes: int) -> int:
    from .runtime.driver import _driver, error_string
    driver = _driver()
    result = driver.cuMemHostRegister(address, nbytes, driver.CU_MEMHOSTREGISTER_READ_ONLY)
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RegistrationError(f"cuMemHostRegister(READ_ONLY) of {nbytes} bytes: {error_string(err)}")
    return address


def _unpin(address: int, after: torch.cuda.Event | None = None) -> None:
    from .runtime.driver import _driver, check
    if after is not None:
        after.synchronize()
    check(_driver().cuMemHostUnregister(address), "cuMemHostUnregister")


def _bind_context(context) -> None:
    from .runtime.driver import _driver, check
    check(_driver().cuCtxSetCurrent(context), "cuCtxSetCurrent")


def _copy(jobs: list[_Job], device: torch.device, chunk_bytes: int, in_flight: int, threads: int,
          zero_copy: bool, fill: str) -> None:
    files = sorted({j.entry.file for j in jobs})
    index = {f: i for i, f in enumerate(files)}
    spans = [(index[j.entry.file], j.entry.start, j.entry.end) for j in jobs]
    with torch.no_grad(), ExitStack() as stack:
        maps = []
        if zero_copy or fill == "mmap":
            for f in files:
                maps.append(_FileMap(f))
                stack.callback(maps[-1].close)
        source = stack.enter_context(_ReadSource(files)) if fill == "read" else _MappedSource(maps)
        if device.type != "cuda":
            if fill == "mmap":
                for c in plan_chunks(spans, chunk_bytes):
                    with _naming_the_tensor(files[c.file], c, jobs):
                        _populate(maps[c.file], c.start, c.start + c.nbytes)
                    _apply(c, maps[c.file].data[c.start:c.start + c.nbytes], jobs, non_blocking=False)
            else:
                _copy_staged(plan_chunks(spans, chunk_bytes), source, files, jobs, in_flight, threads, None)
            return
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)  # destinations were allocated (and maybe last used) on the caller's stream
        with torch.cuda.stream(side):
            if zero_copy:
                window = -(-chunk_bytes // _PAGE) * _PAGE
                windows = plan_windows(plan_chunks(spans, window, aligned=True), window)
                done = _copy_pinned(windows, maps, files, jobs, in_flight, threads, side)
                rest = [c for w in windows[done:] for c in w.chunks]
            else:
                rest = plan_chunks(spans, chunk_bytes)
            _copy_staged(rest, source, files, jobs, in_flight, threads, side)
        caller.wait_stream(side)


def _copy_pinned(windows: list[Window], maps: list[_FileMap], files: list[Path], jobs: list[_Job], ahead: int,
                 threads: int, side: torch.cuda.Stream) -> int:
    """DMA window after window straight from the page-locked mapping while worker threads pin the next
    `ahead` windows and unpin each copied one once its event completes. Returns how many windows it
    copied: all, unless the driver refused to pin one (the caller stages the rest). Returns only after
    every copy it queued has completed (a page is unpinned after its DMA, the maps unmapped after that)."""
    from .runtime.driver import _driver, _ensure_context, check
    if not windows:
        return 0
    # Pinning needs torch's context current on the pinning thread; a fresh thread has none (and
    # torch.cuda.set_device there skips binding one when the index already matches), so hand it over.
    _ensure_context(side.device.index)
    context = check(_driver().cuCtxGetCurrent(), "cuCtxGetCurrent")

    def pin(w: Window) -> int:
        return _pin(maps[w.file].address + w.begin, w.end - w.begin)

    unpinned: list[Future] = []
    with ThreadPoolExecutor(threads, thread_name_prefix="fusedops-pin", initializer=_bind_context,
                            initargs=(context,)) as pinner:
        pinned = deque(pinner.submit(pin, w) for w in windows[:ahead])
        done = 0
        try:
            for i, w in enumerate(windows):
                try:
                    address = pinned.popleft().result()
                except RegistrationError as e:
                    log.debug("zero-copy: pinning %s bytes [%d, %d) failed (%s); staging the remaining %d of %d "
                              "windows", files[w.file], w.begin, w.end, e, len(windows) - i, len(windows))
                    break
                for c in w.chunks:
                    _apply(c, maps[c.file].data[c.start:c.start + c.nbytes], jobs, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
                done += 1
                if i + ahead < len(windows):  # queued before the unpin, which waits for this window's DMA
                    pinned.append(pinner.submit(pin, windows[i + ahead]))
                unpinned.append(pinner.submit(_unpin, address, copied))
        finally:
            for f in pinned:  # pinned ahead, never copied from
                if f.exception() is None:
                    _unpin(f.result())
    for f in unpinned:
        f.result()
    return done


class _MappedSource:
    """fill="mmap": a chunk is one populate and one memcpy out of the mapped file (torch's copy_ spreads it
    over its own intra-op threads), so each worker thread fills a whole chunk."""

    def __init__(self, maps: list[_FileMap]):
        self.maps = maps

    def parts(self, nbytes: int, threads: int) -> list[tuple[int, int]]:
        return [(0, nbytes)]

    def read(self, chunk: Chunk, lo: int, hi: int, buffer: torch.Tensor) -> None:
        m = self.maps[chunk.file]
        _populate(m, chunk.start + lo, chunk.start + hi)
        buffer[lo:hi].copy_(m.data[chunk.start + lo:chunk.start + hi])


class _ReadSource:
    """fill="read": os.preadv from the files straight into the buffer, one slice of the chunk per thread.
    The kernel copies out of the page cache; no mapping, so no page faults or page-table work here."""

    def __init__(self, files: list[Path]):
        self.fds: list[int] = []
        try:
            for f in files:
                self.fds.append(os.open(f, os.O_RDONLY))
        except OSError:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def parts(self, nbytes: int, threads: int) -> list[tuple[int, int]]:
        return split_range(nbytes, threads)

    def read(self, chunk: Chunk, lo: int, hi: int, buffer: torch.Tensor) -> None:
        fd, base = self.fds[chunk.file], buffer.data_ptr()
        while lo < hi:  # preadv may return fewer bytes than asked (at most 2 GiB - 4 KiB per call on Linux)
            got = os.preadv(fd, [(ctypes.c_char * (hi - lo)).from_address(base + lo)], chunk.start + lo)
            if got == 0:
                raise _ShortRead(chunk.start + lo)
            lo += got


def split_range(nbytes: int, parts: int, page: int = _PAGE) -> list[tuple[int, int]]:
    """[0, nbytes) cut into at most `parts` consecutive slices of near-equal size; slices longer than a page
    are rounded up to whole pages, so each one's destination starts at a page offset of the buffer."""
    step = max(1, -(-nbytes // parts))
    if step > page:
        step = -(-step // page) * page
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def _copy_staged(chunks: list[Chunk], source, files: list[Path], jobs: list[_Job], buffers: int, threads: int,
                 side: torch.cuda.Stream | None) -> None:
    """Worker threads fill chunk i + 1 into one staging buffer (pinned on CUDA) while the side stream's H2D
    copy of chunk i reads another; an event per buffer gates its refill. Without a side stream (CPU) the
    buffers are plain memory and each chunk's copies finish before its buffer is handed out again."""
    if not chunks:
        return
    size = max(c.nbytes for c in chunks)
    staging = [torch.empty(size, dtype=torch.uint8, pin_memory=side is not None)
               for _ in range(min(buffers, len(chunks)))]
    reusable = [torch.cuda.Event() for _ in staging] if side is not None else []  # recorded after each H2D

    def fill(i: int, lo: int, hi: int) -> None:
        c, k = chunks[i], i % len(staging)
        if reusable:
            reusable[k].synchronize()
        with _naming_the_tensor(files[c.file], c, jobs):
            source.read(c, lo, hi, staging[k])

    with ThreadPoolExecutor(threads, thread_name_prefix="fusedops-load") as reader:
        def submit(i: int) -> list[Future]:
            return [reader.submit(fill, i, lo, hi) for lo, hi in source.parts(chunks[i].nbytes, threads)]

        filled = deque(submit(i) for i in range(len(staging)))
        try:
            for i, c in enumerate(chunks):
                for part in filled.popleft():
                    part.result()
                k = i % len(staging)
                _apply(c, staging[k], jobs, non_blocking=side is not None)
                if reusable:
                    reusable[k].record(side)
                if i + len(staging) < len(chunks):
                    filled.append(submit(i + len(staging)))
        except BaseException:
            reader.shutdown(cancel_futures=True)  # fail fast: no further reads once one has failed
            raise


# ---- public entry point ----

def load_safetensors(model_or_path, device="cuda", *, checkpoint: str | Path | None = None,
                     strict: bool = True, staging_bytes: int = STAGING_BYTES,
                     staging_buffers: int = STAGING_BUFFERS, zero_copy: bool = ZERO_COPY,
                     copy_threads: int | None = None, fill: str = FILL):
    """Load safetensors weights onto `device` ("cuda[:i]" or "cpu").

    Given a path (a .safetensors file, or a directory with an index json or *.safetensors files): returns
    {name: tensor on device}. Given an nn.Module: loads `checkpoint` into its parameters and persistent
    buffers by state_dict name (a checkpoint saved from the model's base or its task head also matches,
    through HF's base_model_prefix), casting to each tensor's dtype; tied weights load once; tensors not
    on `device` (a model built on the meta device, say) are replaced by new ones there; non-persistent
    buffers left on the meta device (RoPE's inv_freq: in no checkpoint) count as missing. Everything is
    validated before the first byte is copied: on an error nothing in the model changes (except a file
    that shrinks during the copy: its CheckpointError comes after earlier bytes have landed). Missing or
    unexpected tensors raise unless strict=False; returns IncompatibleKeys. On CUDA the copies run on a
    side stream that the caller's current stream waits for. The staging path (zero_copy=False) copies
    through `staging_buffers` pinned buffers of `staging_bytes`, filled by `copy_threads` threads (default
    READ_THREADS for fill="read", COPY_THREADS for "mmap") with a memcpy from the mapped file, its pages
    populated first (fill="mmap"), or os.preadv (fill="read"), and returns without a host sync; zero_copy=True page-locks windows of
    `staging_bytes` of the mapped files (`staging_buffers` pinned ahead, `copy_threads` pinning threads),
    stages whatever the driver refuses to pin, and returns once its DMAs are done.
    """
    device = _check_device(device)
    if staging_bytes < 1:
        raise ValueError(f"staging_bytes: must be >= 1, got {staging_bytes}")
    if staging_buffers < 2:
        raise ValueError(f"staging_buffers: must be >= 2 (one fills while another copies), got {staging_buffers}")
    if fill not in FILLS:
        raise ValueError(f"fill: expected one of {FILLS}, got {fill!r}")
    if copy_threads is None:
        copy_threads = READ_THREADS if fill == "read" else COPY_THREADS
    if copy_threads < 1:
        raise ValueError(f"copy_threads: must be >= 1, got {copy_threads}")
    how = (staging_bytes, staging_buffers, copy_threads, zero_copy, fill)
    if isinstance(model_or_path, torch.nn.Module):
        if checkpoint is None:
            raise ValueError("checkpoint: a model needs the checkpoint (file or directory) to load from")
        return _load_into_model(model_or_path, checkpoint, device, strict, how)
    if checkpoint is not None:
        raise ValueError("checkpoint: only used with a model; the path to load is model_or_path")
    entries = read_checkpoint(model_or_path)
    out = {name: torch.empty(e.shape, dtype=e.dtype, device=device) for name, e in entries.items()}
    _copy([_Job(e, out[name]) for name, e in entries.items()], device, *how)
    return out


def _check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a device: {device!r} ({e})") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device: expected 'cuda[:i]' or 'cpu', got {str(device)!r}")
    if not torch.cuda.is_available():
        raise ValueError("device: CUDA is not available here; pass device='cpu'")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def _load_into_model(model: torch.nn.Module, checkpoint, device: torch.device, strict: bool,
                     how: tuple) -> IncompatibleKeys:
    entries = read_checkpoint(checkpoint)
    targets = model.state_dict(keep_vars=True)
    to_model_name = _name_mapping(model, entries, targets)
    picked: list[tuple[TensorEntry, torch.Tensor]] = []
    loaded, unexpected = set(), []
    for name, e in entries.items():
        t = targets.get(to_model_name(name))
        if t is None:
            unexpected.append(name)
            continue
        if tuple(t.shape) != e.shape:
            raise CheckpointError(f"{e.file}: tensor {name!r}: shape {list(e.shape)}, the model's "
                                  f"{to_model_name(name)} is {list(t.shape)}")
        if id(t) not in loaded:  # a tied weight's second name in the checkpoint adds nothing
            loaded.add(id(t))
            picked.append((e, t))
    missing = [k for k, t in targets.items() if id(t) not in loaded]
    # Non-persistent buffers (RoPE's inv_freq) are never in a checkpoint: left on the meta device they make
    # the model unusable, so they count as missing (strict raises; strict=False names them).
    persistent = {id(t) for t in targets.values()}
    missing += [n for n, b in model.named_buffers() if b.is_meta and id(b) not in persistent]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{checkpoint}: model tensors not in the checkpoint: {_listing(missing)}; "
                              f"checkpoint tensors not in the model: {_listing(unexpected)} "
                              "(strict=False loads the rest)")
    # Validated; from here on only allocation and copying.
    dests = [t if t.device == device else torch.empty(t.shape, dtype=t.dtype, device=device) for _, t in picked]
    _copy([_Job(e, d) for (e, _), d in zip(picked, dests)], device, *how)
    _replace(model, {id(t): d for (_, t), d in zip(picked, dests) if d is not t})
    return IncompatibleKeys(missing, unexpected)


def _replace(model: torch.nn.Module, new: dict[int, torch.Tensor]) -> None:
    """Swap tensors (keyed by the id of the old one) into every module slot holding them, one new
    Parameter per old one so tied weights stay tied (`.data =` cannot move a tensor off the meta device)."""
    swapped: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, old in slots.items():
                if old is None or id(old) not in new:
                    continue
                if id(old) not in swapped:
                    d = new[id(old)]
                    swapped[id(old)] = (torch.nn.Parameter(d, requires_grad=old.requires_grad)
                                        if isinstance(old, torch.nn.Parameter) else d)
                slots[name] = swapped[id(old)]


def _name_mapping(model, entries, targets) -> Callable[[str], str]:
    """Checkpoint name -> state_dict name: as is, or with HF's base_model_prefix ("model") dropped or
    added, whichever matches most names (a task-head checkpoint into a base model, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return lambda n: n
    renames = [lambda n: n, lambda n: n.removeprefix(prefix + "."), lambda n: f"{prefix}.{n}"]
    return max(renames, key=lambda r: sum(r(n) in targets for n in entries))


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")
    return f"{len(names)}" + (f" ({shown})" if names else "")
