"""Overlapped safetensors loading: `load_safetensors(model_or_path, device)`.

Every file is memory-mapped and its header parsed and validated here (8-byte little-endian length, JSON,
then per tensor dtype / shape / data_offsets), all files before any byte is copied, so a bad checkpoint
raises `CheckpointError` naming the file and the tensor and leaves a model untouched. On CUDA the bytes go
through pinned staging buffers: a worker thread copies chunk i+1 from the mapping into one buffer while
the side stream's host-to-device copy of chunk i reads another; an event per buffer tells the worker when
it may refill it, and the caller's stream waits for the side stream at the end. On the CPU the same chunk
plan copies straight from the mapping, so CI exercises everything but the pinned buffers and streams.
"""
from __future__ import annotations

import json
import mmap
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

# Pinned staging: 64 MiB x 2 loaded 5.85 GB at 34.1 GB/s on the H100 (2026-11-25), the best of 16/64/256 MiB
# x 2-4 buffers (28.7-34.1 GB/s, one run each; perf/notes/loader.md): more or larger buffers bought nothing.
STAGING_BYTES = 64 << 20
STAGING_BUFFERS = 2

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_LISTED = 5  # names shown in a missing / unexpected tensors error


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


def plan_chunks(spans: list[tuple[int, int, int]], chunk_bytes: int) -> list[Chunk]:
    """Cut the (file, start, end) byte spans of the tensors into chunks of at most chunk_bytes: small
    adjacent tensors share a chunk, large ones split over several; a gap (a skipped tensor) starts a
    new chunk, so skipped bytes are never read."""
    chunks: list[Chunk] = []
    for job in sorted(range(len(spans)), key=lambda j: spans[j][:2]):
        file, start, end = spans[job]
        pos = start
        while pos < end:
            last = chunks[-1] if chunks else None
            if last is None or last.file != file or last.start + last.nbytes != pos or last.nbytes == chunk_bytes:
                last = Chunk(file, pos)
                chunks.append(last)
            n = min(end - pos, chunk_bytes - last.nbytes)
            last.pieces.append(Piece(job, pos - start, last.nbytes, n))
            last.nbytes += n
            pos += n
    return chunks


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


def _map(file: Path) -> torch.Tensor:
    """The file as a uint8 tensor over a private mapping (writable so torch.frombuffer takes it; only
    ever read, so no page is copied)."""
    with open(file, "rb") as f:
        return torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)


def _copy(jobs: list[_Job], device: torch.device, staging_bytes: int, staging_buffers: int) -> None:
    files = sorted({j.entry.file for j in jobs})
    index = {f: i for i, f in enumerate(files)}
    chunks = plan_chunks([(index[j.entry.file], j.entry.start, j.entry.end) for j in jobs], staging_bytes)
    maps = [_map(f) for f in files]
    with torch.no_grad():
        if device.type == "cuda":
            _stream_to_cuda(chunks, maps, jobs, device, staging_buffers)
        else:
            for c in chunks:
                _apply(c, maps[c.file][c.start:c.start + c.nbytes], jobs, non_blocking=False)


def _stream_to_cuda(chunks: list[Chunk], maps: list[torch.Tensor], jobs: list[_Job], device: torch.device,
                    staging_buffers: int) -> None:
    if not chunks:
        return
    caller = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(caller)  # destinations were allocated (and maybe last used) on the caller's stream
    size = max(c.nbytes for c in chunks)
    staging = [torch.empty(size, dtype=torch.uint8, pin_memory=True)
               for _ in range(min(staging_buffers, len(chunks)))]
    reusable = [torch.cuda.Event() for _ in staging]  # recorded after each H2D copy out of that buffer

    def fill(i: int) -> None:
        c, k = chunks[i], i % len(staging)
        reusable[k].synchronize()
        staging[k][:c.nbytes].copy_(maps[c.file][c.start:c.start + c.nbytes])

    with ThreadPoolExecutor(1, thread_name_prefix="fusedops-load") as reader, torch.cuda.stream(side):
        filled = deque(reader.submit(fill, i) for i in range(len(staging)))
        for i, c in enumerate(chunks):
            filled.popleft().result()
            k = i % len(staging)
            _apply(c, staging[k], jobs, non_blocking=True)
            reusable[k].record(side)
            if i + len(staging) < len(chunks):
                filled.append(reader.submit(fill, i + len(staging)))
    caller.wait_stream(side)


# ---- public entry point ----

def load_safetensors(model_or_path, device="cuda", *, checkpoint: str | Path | None = None,
                     strict: bool = True, staging_bytes: int = STAGING_BYTES,
                     staging_buffers: int = STAGING_BUFFERS):
    """Load safetensors weights onto `device` ("cuda[:i]" or "cpu").

    Given a path (a .safetensors file, or a directory with an index json or *.safetensors files): returns
    {name: tensor on device}. Given an nn.Module: loads `checkpoint` into its parameters and persistent
    buffers by state_dict name (a checkpoint saved from the model's base or its task head also matches,
    through HF's base_model_prefix), casting to each tensor's dtype; tied weights load once; tensors not
    on `device` (a model built on the meta device, say) are replaced by new ones there. Everything is
    validated before the first byte is copied: on an error nothing in the model changes. Missing or
    unexpected tensors raise unless strict=False; returns IncompatibleKeys. On CUDA the copies run on a
    side stream that the caller's current stream waits for: no host synchronization at the end.
    """
    device = _check_device(device)
    if staging_bytes < 1:
        raise ValueError(f"staging_bytes: must be >= 1, got {staging_bytes}")
    if staging_buffers < 2:
        raise ValueError(f"staging_buffers: must be >= 2 (one fills while another copies), got {staging_buffers}")
    if isinstance(model_or_path, torch.nn.Module):
        if checkpoint is None:
            raise ValueError("checkpoint: a model needs the checkpoint (file or directory) to load from")
        return _load_into_model(model_or_path, checkpoint, device, strict, staging_bytes, staging_buffers)
    if checkpoint is not None:
        raise ValueError("checkpoint: only used with a model; the path to load is model_or_path")
    entries = read_checkpoint(model_or_path)
    out = {name: torch.empty(e.shape, dtype=e.dtype, device=device) for name, e in entries.items()}
    _copy([_Job(e, out[name]) for name, e in entries.items()], device, staging_bytes, staging_buffers)
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
                     staging_bytes: int, staging_buffers: int) -> IncompatibleKeys:
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
    if strict and (missing or unexpected):
        raise CheckpointError(f"{checkpoint}: model tensors not in the checkpoint: {_listing(missing)}; "
                              f"checkpoint tensors not in the model: {_listing(unexpected)} "
                              "(strict=False loads the rest)")
    # Validated; from here on only allocation and copying.
    dests = [t if t.device == device else torch.empty(t.shape, dtype=t.dtype, device=device) for _, t in picked]
    _copy([_Job(e, d) for (e, _), d in zip(picked, dests)], device, staging_bytes, staging_buffers)
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
