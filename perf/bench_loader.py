"""Safetensors loading onto the GPU: fusedops.load_safetensors vs safetensors.torch.load_file(device="cuda"),
both against the pinned host-to-device bandwidth measured in the same run, on a multi-GB bf16 checkpoint
(Llama-3-8B-shaped tensors) this script writes itself. The files were just written, so the warm rows read
from the page cache (RAM); the cold rows first evict one file with posix_fadvise(DONTNEED). Paths: staging
filled by a memcpy from the mapped file after MADV_POPULATE_READ (fill="mmap"; the "faulting" row skips the
populate, as rounds 1-2 did) or by os.preadv threads (fill="read"), and zero-copy (the mapped page-cache pages
page-locked read-only, window by window, and DMA'd from); a zero-copy row that fell back to staging says so.
Host ceilings in the same run: the mmap memcpy faulting and populated, each alone and beside an unrelated
pinned H2D, and the preadv read into pinned memory per thread count.
Run: PYTHONPATH=.:perf python3 perf/bench_loader.py [--gb 6] [--files 4] [--dir /tmp/fusedops_ckpt]"""
import argparse
import contextlib
import logging
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import table
from fusedops import load_safetensors
import fusedops.loader as loader
from fusedops.loader import Chunk, RegistrationError, _FileMap, _pin, _ReadSource, _unpin, split_range

EMBED = (128256, 4096)
LAYER = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (1024, 4096),
         "self_attn.v_proj.weight": (1024, 4096), "self_attn.o_proj.weight": (4096, 4096),
         "mlp.gate_proj.weight": (14336, 4096), "mlp.up_proj.weight": (14336, 4096),
         "mlp.down_proj.weight": (4096, 14336), "input_layernorm.weight": (4096,),
         "post_attention_layernorm.weight": (4096,)}
MiB = 1 << 20
# (label, load_safetensors keyword arguments, populate); the first row is rounds 1-2's default, the fourth stop 12's,
# the last today's.
SWEEP = (
    ("mmap faulting 64 MiB x 2, 1 thread", dict(fill="mmap", staging_bytes=64 * MiB, staging_buffers=2,
                                                copy_threads=1), False),
    ("mmap 64 MiB x 2, 1 thread", dict(fill="mmap", staging_bytes=64 * MiB, staging_buffers=2, copy_threads=1), True),
    ("mmap 64 MiB x 3, 1 thread", dict(fill="mmap", staging_bytes=64 * MiB, staging_buffers=3, copy_threads=1), True),
    ("mmap 64 MiB x 4, 2 threads", dict(fill="mmap", staging_bytes=64 * MiB, staging_buffers=4, copy_threads=2), True),
    ("mmap 16 MiB x 4, 1 thread", dict(fill="mmap", staging_bytes=16 * MiB, staging_buffers=4, copy_threads=1), True),
    ("mmap 256 MiB x 2, 1 thread", dict(fill="mmap", staging_bytes=256 * MiB, staging_buffers=2, copy_threads=1), True),
    ("read 64 MiB x 2, 12 threads", dict(fill="read", staging_bytes=64 * MiB, staging_buffers=2, copy_threads=12),
     True),
    ("zero-copy 64 MiB, 2 ahead, 2 threads", dict(zero_copy=True, staging_bytes=64 * MiB, staging_buffers=2,
                                                  copy_threads=2), True),
    # More threads: does page-locking (the zero-copy path's only host work) or the memcpy scale with them?
    ("zero-copy 64 MiB, 8 ahead, 8 threads", dict(zero_copy=True, staging_bytes=64 * MiB, staging_buffers=8,
                                                  copy_threads=8), True),
    ("zero-copy 256 MiB, 4 ahead, 4 threads", dict(zero_copy=True, staging_bytes=256 * MiB, staging_buffers=4,
                                                   copy_threads=4), True),
    ("mmap 64 MiB x 8, 4 threads", dict(fill="mmap", staging_bytes=64 * MiB, staging_buffers=8, copy_threads=4), True),
    ("mmap 32 MiB x 8, 4 threads", dict(fill="mmap", staging_bytes=32 * MiB, staging_buffers=8, copy_threads=4), True),
)
READ_THREADS = (8, 16)  # the preadv -> pinned ceiling, per thread count (round 3: 1 to 16 threads, 4.8-30.2 GB/s)
RUNS = 5  # first call, then the median of 4 (round 2's single medians of 2 spread 28.7-34.1)
SLOW_S = 4.0  # a configuration whose first call takes longer is not repeated (keeps the GPU call short)


class FallbackCounter(logging.Handler):
    """Counts the loader's debug records: each is a zero-copy load that fell back to staging."""
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count, self.last = 0, ""

    def emit(self, record):
        self.count, self.last = self.count + 1, record.getMessage()


def write_checkpoint(folder: Path, gb: float, files: int) -> dict:
    """Random bf16 tensors on the GPU (kept as the reference), saved into `files` shards."""
    layer_bytes = 2 * sum(torch.Size(s).numel() for s in LAYER.values())
    layers = max(1, round((gb * 1e9 - 2 * EMBED[0] * EMBED[1]) / layer_bytes))
    names = {"model.embed_tokens.weight": EMBED}
    names.update({f"model.layers.{i}.{k}": s for i in range(layers) for k, s in LAYER.items()})
    ref = {n: torch.randn(s, device="cuda", dtype=torch.bfloat16) for n, s in names.items()}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    items, total = list(ref.items()), sum(t.numel() * 2 for t in ref.values())
    shard, size, index = {}, 0, 0
    for i, (name, t) in enumerate(items):
        shard[name] = t.cpu()
        size += t.numel() * 2
        if size >= total / files or i == len(items) - 1:
            save_file(shard, folder / f"model-{index:05d}.safetensors")
            shard, size, index = {}, 0, index + 1
    return ref


def wall(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def pinned_h2d_gbs(nbytes: int = 1 << 30, pinned: bool = True) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=pinned)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return nbytes / statistics.median(times) / 1e9


def host_copy(files, populate: bool, chunk: int = 64 << 20) -> tuple[int, float]:
    """mmap -> pinned memcpy alone (page cache warm), as fill="mmap" does it, with each chunk populated
    first or faulted in by the memcpy: (bytes, seconds)."""
    buf = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    t0, total = time.perf_counter(), 0
    for f in files:
        m = _FileMap(f)
        for a in range(0, m.size, chunk):
            n = min(chunk, m.size - a)
            if populate:
                loader._populate(m, a, a + n)
            buf[:n].copy_(m.data[a:a + n])
        total += m.size
        m.close()
    return total, time.perf_counter() - t0


def pin_costs(files, window: int = 64 << 20, probe: int = 1 << 30) -> dict:
    """The zero-copy path's parts alone: page-locking / unlocking the mapped files window by window (GB/s of
    file bytes, one thread), and H2D straight from `probe` bytes of a page-locked mapping (scattered
    page-cache pages instead of one pinned allocation)."""
    from fusedops.runtime.driver import _ensure_context
    _ensure_context(torch.cuda.current_device())
    pin_s = unpin_s = total = 0.0
    for f in files:
        m = _FileMap(f)
        for a in range(0, m.size, window):
            n = -(-min(window, m.size - a) // 4096) * 4096
            t0 = time.perf_counter()
            _pin(m.address + a, n)
            t1 = time.perf_counter()
            _unpin(m.address + a)
            unpin_s, pin_s, total = unpin_s + time.perf_counter() - t1, pin_s + t1 - t0, total + n
        m.close()
    m = _FileMap(files[0])
    n = min(probe, m.size // 4096 * 4096)
    _pin(m.address, n)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(m.data[:n], non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    ok = torch.equal(dst.cpu(), m.data[:n])
    _unpin(m.address)
    m.close()
    return {"pin": total / pin_s / 1e9, "unpin": total / unpin_s / 1e9,
            "h2d": n / statistics.median(times) / 1e9, "equal": ok}


def host_read(files, threads: int, chunk: int = 64 << 20) -> tuple[int, float]:
    """os.preadv -> pinned buffer alone (page cache warm), as fill="read" does it: each 64 MiB chunk split
    over `threads` threads, one chunk at a time. (bytes, seconds)"""
    buf = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    total = 0
    with _ReadSource(files) as source, ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        for i, f in enumerate(files):
            size = f.stat().st_size
            for a in range(0, size, chunk):
                c = Chunk(i, a, min(chunk, size - a))
                for _ in pool.map(lambda r: source.read(c, r[0], r[1], buf), split_range(c.nbytes, threads)):
                    pass
            total += size
        return total, time.perf_counter() - t0


@contextlib.contextmanager
def faulting():
    """fill="mmap" as rounds 1-2 ran it: no MADV_POPULATE_READ, the memcpy faults every page in."""
    populate = loader._populate
    loader._populate = lambda m, begin, end: None
    try:
        yield
    finally:
        loader._populate = populate


def on_a_thread_gbs(copier) -> float:
    with ThreadPoolExecutor(1) as pool:
        nbytes, seconds = pool.submit(copier).result()
    return nbytes / seconds / 1e9


def concurrent_gbs(copier, piece: int = 256 << 20) -> tuple[float, float]:
    """A host copier ((bytes, seconds) on a worker thread) and pinned H2D of an unrelated buffer (this
    thread) at the same time, GB/s of each: rates well below each one's alone mean a shared ceiling."""
    src = torch.empty(piece, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(piece, dtype=torch.uint8, device="cuda")
    with ThreadPoolExecutor(1) as pool:
        t0, sent = time.perf_counter(), 0
        copying = pool.submit(copier)
        while not copying.done():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            sent += piece
        h2d = sent / (time.perf_counter() - t0) / 1e9
        nbytes, seconds = copying.result()
    return nbytes / seconds / 1e9, h2d


def safetensors_load(files):
    out = {}
    for f in files:
        out.update(load_file(f, device="cuda"))
    return out


def evict(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=6.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fusedops_ckpt"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    ref = write_checkpoint(args.dir, args.gb, args.files)
    files = sorted(args.dir.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    print(f"wrote {nbytes / 1e9:.2f} GB in {len(files)} files, {len(ref)} tensors, "
          f"{time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    h2d, pageable = pinned_h2d_gbs(), pinned_h2d_gbs(pinned=False)
    print(f"pinned H2D {h2d:.1f} GB/s, pageable H2D {pageable:.1f} GB/s on {torch.cuda.get_device_name()}",
          flush=True)
    host = {}
    for populate in (False, True):
        host[populate] = on_a_thread_gbs(lambda: host_copy(files, populate))
        both = concurrent_gbs(lambda: host_copy(files, populate))
        print(f"mmap->pinned memcpy, {'populated' if populate else 'faulting'}: {host[populate]:.1f} GB/s alone; "
              f"beside an unrelated pinned H2D: memcpy {both[0]:.1f} + H2D {both[1]:.1f} GB/s", flush=True)
    reads = {t: on_a_thread_gbs(lambda: host_read(files, t)) for t in READ_THREADS}
    best = max(reads, key=reads.get)
    read_both = concurrent_gbs(lambda: host_read(files, best))
    print("preadv -> pinned alone, GB/s by threads: " + ", ".join(f"{t}: {g:.1f}" for t, g in reads.items())
          + f"; with {best} threads at the same time as an unrelated H2D: read {read_both[0]:.1f} + H2D "
          f"{read_both[1]:.1f} GB/s", flush=True)
    try:
        pin = pin_costs(files)
        print(f"zero-copy parts: page-lock {pin['pin']:.1f} GB/s, unlock {pin['unpin']:.1f} GB/s (64 MiB windows, "
              f"one thread); H2D from a page-locked 1 GiB of the mapping {pin['h2d']:.1f} GB/s, bytes equal "
              f"{pin['equal']}", flush=True)
    except RegistrationError as e:
        print(f"zero-copy parts: page-locking the mapping refused: {e}", flush=True)
    fallbacks = FallbackCounter()
    logging.getLogger("fusedops.loader").addHandler(fallbacks)
    logging.getLogger("fusedops.loader").setLevel(logging.DEBUG)

    def row(case, seconds, out, baseline=None, fell_back="-"):
        ok = out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
        gbs = nbytes / seconds / 1e9
        return {"case": case, "ms": 1e3 * seconds, "GB/s": gbs, "% pinned H2D": 100 * gbs / h2d,
                "x safetensors": f"{baseline / seconds:.2f}" if baseline else "-", "fell back": fell_back,
                "bytes equal": ok}

    def runs(fn):
        """First call (pinned / device allocations cold) and the median of the next RUNS - 1 (just the
        first again if that took over SLOW_S)."""
        times = []
        for _ in range(RUNS):
            seconds, out = wall(fn)
            times.append(seconds)
            if times[0] > SLOW_S:
                break
            if len(times) < RUNS:
                del out
        return times[0], statistics.median(times[1:] or times), out

    st_first, st_steady, out = runs(lambda: safetensors_load(files))
    rows = [row("safetensors load_file, first call", st_first, out),
            row("safetensors load_file", st_steady, out)]
    del out
    for label, kwargs, populate in SWEEP:
        before = fallbacks.count
        with contextlib.nullcontext() if populate else faulting():
            first, steady, out = runs(lambda: load_safetensors(args.dir, **kwargs))
        fell_back = f"{fallbacks.count - before} loads" if kwargs.get("zero_copy") else "-"
        if not rows[2:]:
            rows.append(row(label + ", first call", first, out, st_first))
        rows.append(row(label, steady, out, st_steady, fell_back))
        print(rows[-1], flush=True)  # a row at a time: a cut-off run still reports what it measured
        del out
    if fallbacks.count:
        print(f"last fallback: {fallbacks.last}", flush=True)
    table(rows, f"Loading {nbytes / 1e9:.2f} GB of bf16 safetensors (page cache warm; pinned H2D {h2d:.1f} GB/s,"
          f" mmap->pinned memcpy {host[False]:.1f} faulting / {host[True]:.1f} populated, preadv->pinned "
          f"{reads[best]:.1f} with {best} threads)",
          "loader.md")

    cold = min(files, key=lambda f: f.stat().st_size)
    cold_rows = []
    for case, fn in (("safetensors load_file", lambda: load_file(cold, device="cuda")),
                     ("fusedops mmap 64 MiB x 2 (populate)", lambda: load_safetensors(cold, fill="mmap")),
                     ("fusedops read 64 MiB x 2, 12 threads", lambda: load_safetensors(cold, fill="read")),
                     ("fusedops zero-copy 64 MiB, 2 ahead", lambda: load_safetensors(cold, zero_copy=True,
                                                                                     copy_threads=2))):
        evict(cold)
        seconds, out = wall(fn)
        gbs = cold.stat().st_size / seconds / 1e9
        cold_rows.append({"case": case, "ms": 1e3 * seconds, "GB/s": gbs, "% pinned H2D": 100 * gbs / h2d,
                          "bytes equal": all(torch.equal(v, ref[k]) for k, v in out.items())})
        del out
    table(cold_rows, f"Cold: {cold.name} ({cold.stat().st_size / 1e9:.2f} GB) evicted from the page cache "
          "with posix_fadvise(DONTNEED) before each load", "loader_cold.md")
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
