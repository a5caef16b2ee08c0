"""fusedops.load_safetensors: round trips against safetensors' own loader, the chunk plan, every header
error (naming file and tensor), model loads (HF names, tied weights, casts, meta device, all-or-nothing),
and on the GPU the pinned / side-stream path with NaN-poisoned destinations."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import poison_
from fusedops import load_safetensors
import fusedops.loader as loader
from fusedops.loader import CheckpointError, plan_chunks, plan_windows, split_range

transformers = pytest.importorskip("transformers")

ODD_STAGING = (1, 7, 4099, 1 << 20)  # bytes: byte-by-byte, unaligned, page-crossing, whole tensors
FILLS = [("mmap", 1), ("read", 1), ("read", 3)]  # (fill, copy_threads)


def random_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(257, 9, generator=g).bfloat16(),
        "f16": torch.randn(4099, generator=g).half(), "f64": torch.randn(2, 3, 4, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (6,), generator=g), "i32": torch.randint(-9, 9, (1, 7), generator=g,
                                                                                    dtype=torch.int32),
        "i16": torch.randint(-9, 9, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-9, 9, (3,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (11,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(13, generator=g) > 0.5,
        "f8": torch.randn(17, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.25), "empty": torch.empty(0, 3),
    }


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8).cpu(),
                                                                     b.reshape(-1).view(torch.uint8).cpu())


def write_raw(path, header, data=b""):
    """A safetensors file from a hand-made header, to build files safetensors itself refuses to write."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def tiny_llama(seed, tie=True, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      tie_word_embeddings=tie)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- path loads ----

@pytest.mark.parametrize("fill, threads", FILLS)
@pytest.mark.parametrize("staging_bytes", ODD_STAGING)
def test_directory_round_trip_matches_safetensors(tmp_path, staging_bytes, fill, threads):
    t = random_tensors()
    names = list(t)
    save_file({k: t[k] for k in names[:6]}, tmp_path / "a.safetensors")
    save_file({k: t[k] for k in names[6:]}, tmp_path / "b.safetensors")
    expected = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    out = load_safetensors(tmp_path, device="cpu", staging_bytes=staging_bytes, fill=fill, copy_threads=threads)
    assert out.keys() == expected.keys()
    assert all(same_bytes(out[k], expected[k]) and same_bytes(out[k], t[k]) for k in t)


@pytest.mark.parametrize("nbytes", [0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 10**6 + 3])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_range_covers_every_byte_once(nbytes, parts):
    slices = split_range(nbytes, parts, page=4096)
    assert len(slices) <= parts and all(lo < hi for lo, hi in slices)
    assert [lo for lo, _ in slices] == [0, *(hi for _, hi in slices)][:len(slices)]  # consecutive, no overlap
    assert sum(hi - lo for lo, hi in slices) == nbytes
    if nbytes > parts * 4096:  # big slices start on page offsets of the buffer
        assert all(lo % 4096 == 0 for lo, _ in slices)


@pytest.mark.parametrize("threads", [1, 4])
def test_read_fill_retries_partial_reads(tmp_path, monkeypatch, threads):
    t = random_tensors()
    save_file(t, tmp_path / "a.safetensors")
    real, calls = loader.os.preadv, []

    def at_most_5_bytes(fd, buffers, offset):  # what a signal or a 2 GiB call would do: fewer bytes, not 0
        calls.append(offset)
        return real(fd, [memoryview(buffers[0]).cast("B")[:5]], offset)

    monkeypatch.setattr(loader.os, "preadv", at_most_5_bytes)
    out = load_safetensors(tmp_path, device="cpu", fill="read", copy_threads=threads, staging_bytes=4099)
    assert all(same_bytes(out[k], t[k]) for k in t)
    assert len(calls) > sum(v.numel() * v.element_size() for v in t.values()) // 5 - 1


def populate_works(tmp_path):
    """MADV_POPULATE_READ (Linux >= 5.14) is what turns a shrunk mapped file into an error instead of SIGBUS."""
    (tmp_path / "probe").write_bytes(bytes(4096))
    m = loader._FileMap(tmp_path / "probe")
    try:
        return loader._libc().madvise(m.address, 4096, loader.MADV_POPULATE_READ) == 0
    finally:
        m.close()


@pytest.mark.parametrize("fill, threads, staging_bytes", [("read", 1, 1 << 20), ("read", 3, 64), ("read", 2, 7),
                                                          ("mmap", 1, 1 << 20), ("mmap", 1, 64)])
def test_file_shrinking_during_the_load_names_file_and_tensor(tmp_path, monkeypatch, fill, threads, staging_bytes):
    if fill == "mmap" and not populate_works(tmp_path):
        pytest.skip("no MADV_POPULATE_READ here: the memcpy from a shrunk mapping would die of SIGBUS")
    t = random_tensors()
    save_file(t, tmp_path / "a.safetensors")
    header = load_file_header((tmp_path / "a.safetensors").read_bytes())
    begin, end = header["bf16"]["data_offsets"]
    data_start = (tmp_path / "a.safetensors").stat().st_size - max(e for v in header.values()
                                                                   for e in v["data_offsets"][1:])
    real_copy = loader._copy

    def shrink_then_copy(*args):  # headers were read and validated; then the file loses its tail
        with open(tmp_path / "a.safetensors", "r+b") as f:
            f.truncate(data_start + (begin + end) // 2)
        return real_copy(*args)

    monkeypatch.setattr(loader, "_copy", shrink_then_copy)
    with pytest.raises(CheckpointError, match=rf"a\.safetensors: tensor 'bf16': short read, no bytes at offset "
                                              rf"{data_start + (begin + end) // 2}, inside the tensor's data"):
        load_safetensors(tmp_path, device="cpu", fill=fill, copy_threads=threads, staging_bytes=staging_bytes)


def test_mmap_fill_populates_each_chunk_before_copying(tmp_path, monkeypatch):
    t = random_tensors()
    save_file(t, tmp_path / "a.safetensors")
    entries = loader.read_checkpoint(tmp_path)
    populated, real = [], loader._populate
    monkeypatch.setattr(loader, "_populate", lambda m, begin, end: populated.append((begin, end)) or real(m, begin, end))
    load_safetensors(tmp_path, device="cpu", fill="mmap", staging_bytes=4099)
    spans = sorted((e.start, e.end) for e in entries.values() if e.end > e.start)
    assert all(0 < end - begin <= 4099 for begin, end in populated)
    covered = sorted(populated)
    assert covered[0][0] == spans[0][0] and covered[-1][1] == spans[-1][1]
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # safetensors packs tensors back to back


def test_mmap_fill_without_populate_still_loads(tmp_path, monkeypatch, caplog):
    t = random_tensors()
    save_file(t, tmp_path / "a.safetensors")
    monkeypatch.setattr(loader, "MADV_POPULATE_READ", 12345)  # an advice no kernel knows: EINVAL, as before 5.14
    loader._populate_refused.cache_clear()
    with caplog.at_level("DEBUG", logger="fusedops.loader"):
        out = load_safetensors(tmp_path, device="cpu", fill="mmap", staging_bytes=4099)
    assert all(same_bytes(out[k], t[k]) for k in t)
    assert caplog.text.count("MADV_POPULATE_READ) refused (Invalid argument)") == 1  # said once, not per chunk


def test_index_json_picks_the_files(tmp_path):
    model = tiny_llama(0)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    (tmp_path / "stray.safetensors").write_bytes(b"not read: the index lists the files")
    out = load_safetensors(tmp_path, device="cpu", staging_bytes=4099)
    assert out.keys() == index["weight_map"].keys()
    state = model.state_dict()
    assert all(torch.equal(out[k], state[k]) for k in out)


def test_index_naming_a_tensor_its_file_lacks(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors",
                                                                                      "y": "a.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"a\.safetensors: tensor 'y' is missing"):
        load_safetensors(tmp_path, device="cpu")


@pytest.mark.parametrize("target", [5, "../a.safetensors", "/tmp/a.safetensors", "sub/a.safetensors"])
def test_index_may_only_name_files_beside_it(tmp_path, target):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": target}}))
    with pytest.raises(CheckpointError, match=r"tensor 'x' maps to .*not a file name in"):
        load_safetensors(tmp_path, device="cpu")


def test_plan_chunks_covers_every_byte_once():
    g = torch.Generator().manual_seed(1)
    spans, pos = [], [0, 0]
    for j in range(40):
        file = j % 2
        gap = int(torch.randint(0, 3, (1,), generator=g))       # skipped tensors leave gaps
        n = int(torch.randint(0, 300, (1,), generator=g))
        spans.append((file, pos[file] + gap, pos[file] + gap + n))
        pos[file] += gap + n
    for chunk_bytes in (1, 7, 64, 1000, 10**6):
        covered = {j: [] for j in range(len(spans))}
        for c in plan_chunks(spans, chunk_bytes):
            assert 0 < c.nbytes <= chunk_bytes
            assert [p.chunk_offset for p in c.pieces] == [sum(p.nbytes for p in c.pieces[:i])
                                                          for i in range(len(c.pieces))]
            for p in c.pieces:
                file, start, _ = spans[p.job]
                assert c.file == file and c.start + p.chunk_offset == start + p.job_offset
                covered[p.job].append((p.job_offset, p.nbytes))
        for j, (_, start, end) in enumerate(spans):
            offsets = sorted(covered[j])
            assert [o for o, _ in offsets] == [sum(n for _, n in offsets[:i]) for i in range(len(offsets))]
            assert sum(n for _, n in offsets) == end - start


def random_spans(seed, count=40):
    g = torch.Generator().manual_seed(seed)
    spans, pos = [], [0, 0]
    for j in range(count):
        file = j % 2
        gap = int(torch.randint(0, 3, (1,), generator=g))
        n = int(torch.randint(0, 300, (1,), generator=g))
        spans.append((file, pos[file] + gap, pos[file] + gap + n))
        pos[file] += gap + n
    return spans


def test_aligned_chunks_stay_inside_their_window():
    spans = random_spans(2)
    for window in (1, 16, 64, 4096):
        chunks = plan_chunks(spans, window, aligned=True)
        assert all(c.start // window == (c.start + c.nbytes - 1) // window for c in chunks)
        assert sum(c.nbytes for c in chunks) == sum(e - s for _, s, e in spans)
        # contiguous bytes are cut only at window boundaries
        for a, b in zip(chunks, chunks[1:]):
            if a.file == b.file and a.start + a.nbytes == b.start:
                assert b.start % window == 0


@pytest.mark.parametrize("window, page", [(16, 8), (64, 16), (4096, 4096)])
def test_windows_are_page_aligned_disjoint_and_cover_their_chunks(window, page):
    chunks = plan_chunks(random_spans(3, 200), window, aligned=True)
    windows = plan_windows(chunks, window, page)
    assert [c for w in windows for c in w.chunks] == chunks
    for w in windows:
        assert w.begin % page == 0 and w.end % page == 0 and w.end - w.begin <= window
        assert all(w.file == c.file and w.begin <= c.start and c.start + c.nbytes <= w.end for c in w.chunks)
    for file in (0, 1):
        ranges = sorted((w.begin, w.end) for w in windows if w.file == file)
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))  # no page pinned twice
    with pytest.raises(ValueError, match="^window_bytes:"):
        plan_windows(chunks, window + 1, page)


# ---- bad files: CheckpointError naming file and tensor ----

def good_header():
    return {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["w"].update(dtype="F33"), r"tensor 'w': unknown dtype 'F33'"),
    (lambda h: h["b"].update(data_offsets=[16, 32]), r"tensor 'b': data_offsets \[16, 32\] outside"),
    (lambda h: h["b"].update(data_offsets=[-2, 6]), r"tensor 'b': data_offsets must be"),
    (lambda h: h["w"].update(shape=[2, 3]), r"tensor 'w': shape \[2, 3\] of F32 is 24 bytes"),
    (lambda h: h["w"].update(shape=[2, True]), r"tensor 'w': shape must be a list"),
    (lambda h: h["b"].update(data_offsets=[8, 16], shape=[4]), r"tensor 'b' overlaps tensor 'w'"),
    (lambda h: h["b"].pop("dtype"), r"tensor 'b': needs dtype"),
])
def test_bad_header_names_file_and_tensor(tmp_path, edit, message):
    header = good_header()
    edit(header)
    file = write_raw(tmp_path / "bad.safetensors", header, bytes(24))
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: {message}"):
        load_safetensors(file, device="cpu")


def test_truncated_file_names_the_cut_tensor(tmp_path):
    save_file(random_tensors(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-10])
    last = max(load_file_header(data).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: tensor '{last}': data_offsets .*truncated"):
        load_safetensors(tmp_path / "m.safetensors", device="cpu")


def load_file_header(data):
    (n,) = struct.unpack("<Q", data[:8])
    return {k: v for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__"}


@pytest.mark.parametrize("data, message", [
    (b"\x05\x00\x00", "fewer than the 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "header of 1000 bytes, file of 10"),
    (struct.pack("<Q", 4) + b"{[}]", "header is not UTF-8 JSON"),
    (struct.pack("<Q", 2) + b"[]", "header is a JSON list"),
])
def test_truncated_or_garbled_header(tmp_path, data, message):
    (tmp_path / "h.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"h\.safetensors: .*{message}"):
        load_safetensors(tmp_path / "h.safetensors", device="cpu")


@pytest.mark.parametrize("kwargs, arg", [
    (dict(device="meta"), "device"), (dict(device="nonsense"), "device"),
    (dict(device="cpu", staging_bytes=0), "staging_bytes"), (dict(device="cpu", staging_buffers=1), "staging_buffers"),
    (dict(device="cpu", checkpoint="x"), "checkpoint"), (dict(device="cpu", copy_threads=0), "copy_threads"),
    (dict(device="cpu", fill="pread"), "fill"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, arg):
    save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=f"^{arg}:"):
        load_safetensors(tmp_path / "a.safetensors", **kwargs)


def test_missing_path_and_model_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="^path: .* does not exist"):
        load_safetensors(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ValueError, match="^path: no \\*.safetensors"):
        load_safetensors(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="^checkpoint:"):
        load_safetensors(torch.nn.Linear(2, 2), device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_names_device(tmp_path):
    save_file({"x": torch.ones(1)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="^device: CUDA is not available"):
        load_safetensors(tmp_path / "a.safetensors")


# ---- model loads ----

@pytest.mark.parametrize("fill", ["mmap", "read"])
@pytest.mark.parametrize("tie", [True, False])
def test_model_round_trip_hf_checkpoint(tmp_path, tie, fill):
    source = tiny_llama(0, tie)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    model = tiny_llama(1, tie)
    assert not torch.equal(model.lm_head.weight, source.lm_head.weight)
    result = load_safetensors(model, device="cpu", checkpoint=tmp_path, staging_bytes=4099, fill=fill)
    assert result == ([], [])
    expected = source.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


@pytest.mark.parametrize("fill", ["mmap", "read"])
def test_model_cast_to_its_dtype(tmp_path, fill):
    source = tiny_llama(0)
    source.save_pretrained(tmp_path)
    model = tiny_llama(1, dtype=torch.bfloat16)
    load_safetensors(model, device="cpu", checkpoint=tmp_path, staging_bytes=7, fill=fill, copy_threads=2)
    expected = source.state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k].bfloat16())
               for k, v in model.state_dict().items())


def test_meta_model_gets_real_tied_tensors(tmp_path):
    source = tiny_llama(0)
    source.save_pretrained(tmp_path)
    model = tiny_llama(1, device="meta")
    # RoPE's non-persistent inv_freq is in no checkpoint: on meta it counts as missing
    with pytest.raises(CheckpointError, match=r"model tensors not in the checkpoint: 2 \(model.rotary_emb"):
        load_safetensors(model, device="cpu", checkpoint=tmp_path)
    assert all(v.is_meta for v in model.state_dict().values())          # nothing half-loaded
    missing, _ = load_safetensors(model, device="cpu", checkpoint=tmp_path, strict=False)
    assert missing == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    expected = source.state_dict()
    assert all(v.device.type == "cpu" and torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, torch.nn.Parameter) and model.lm_head.weight.requires_grad


def test_task_checkpoint_into_base_model(tmp_path):
    source = tiny_llama(0, tie=False)
    source.save_pretrained(tmp_path)
    base = transformers.LlamaModel(source.config).eval()
    with pytest.raises(CheckpointError, match=r"checkpoint: 0; checkpoint tensors not in the model: 1 \(lm_head"):
        load_safetensors(base, device="cpu", checkpoint=tmp_path)
    assert load_safetensors(base, device="cpu", checkpoint=tmp_path, strict=False) == ([], ["lm_head.weight"])
    assert all(torch.equal(v, source.model.state_dict()[k]) for k, v in base.state_dict().items())


def test_missing_and_unexpected(tmp_path):
    state = tiny_llama(0).state_dict()
    state = {k: v for k, v in state.items() if "layers.1.mlp" not in k and k != "lm_head.weight"}
    state["extra.weight"] = torch.ones(3)
    save_file(state, tmp_path / "model.safetensors")
    model = tiny_llama(1)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"model tensors not in the checkpoint: 3 \(model.layers.1.mlp"):
        load_safetensors(model, device="cpu", checkpoint=tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    missing, unexpected = load_safetensors(model, device="cpu", checkpoint=tmp_path, strict=False)
    assert sorted(missing) == sorted(k for k in before if "layers.1.mlp" in k) and unexpected == ["extra.weight"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert all(torch.equal(loaded[k], before[k]) for k in missing)


@pytest.mark.parametrize("breakage", ["dtype", "shape", "truncated"])
def test_all_or_nothing(tmp_path, breakage):
    source = tiny_llama(0)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    last = shards[-1]
    data = bytearray(last.read_bytes())
    header = load_file_header(bytes(data))
    name = sorted(header)[0]
    if breakage == "truncated":
        last.write_bytes(bytes(data[:-1]))
    else:
        (n,) = struct.unpack("<Q", data[:8])
        full = json.loads(data[8:8 + n])
        if breakage == "dtype":
            full[name]["dtype"] = "X9"
        else:  # same byte count, shape the model does not have
            begin, end = full[name]["data_offsets"]
            full[name]["shape"] = [1, (end - begin) // 4]
        write_raw(last, full, bytes(data[8 + n:]))
    model = tiny_llama(1)
    before = snapshot(model)
    message = {"dtype": "unknown dtype 'X9'", "shape": "shape \\[1, ", "truncated": "truncated"}[breakage]
    with pytest.raises(CheckpointError, match=rf"{last.name}: tensor '.*': .*{message}"):
        load_safetensors(model, device="cpu", checkpoint=tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---- GPU: pinned staging, side stream, caller-stream ordering ----

_REAL_PIN = loader._pin


def cuda_round_trip(tmp_path, **kwargs):
    t = random_tensors()
    big = {f"big{i}": torch.randn(1000 + i, 333).bfloat16() for i in range(3)}
    save_file({**t, **big}, tmp_path / "a.safetensors")
    out = load_safetensors(tmp_path, **kwargs)
    # no synchronize: work queued on the current stream must see the loaded bytes
    sums = {k: v.double().sum() for k, v in out.items() if v.is_floating_point()}
    assert all(v.device.type == "cuda" for v in out.values())
    assert all(same_bytes(out[k], v) for k, v in {**t, **big}.items())
    assert all(torch.equal(sums[k].cpu(), v.double().sum()) for k, v in {**t, **big}.items() if k in sums)


@pytest.mark.gpu
@pytest.mark.parametrize("fill", ["mmap", "read"])
@pytest.mark.parametrize("staging_bytes, buffers, threads", [(4099, 2, 1), (4099, 3, 2), (1 << 16, 4, 3),
                                                              (64 << 20, 3, 1), (64 << 20, 2, 8)])
def test_cuda_round_trip(tmp_path, staging_bytes, buffers, threads, fill):
    cuda_round_trip(tmp_path, staging_bytes=staging_bytes, staging_buffers=buffers, copy_threads=threads, fill=fill)


@pytest.mark.gpu
@pytest.mark.parametrize("window, ahead, threads", [(4096, 2, 1), (12288, 3, 2), (1 << 16, 2, 2), (64 << 20, 2, 1)])
def test_cuda_zero_copy_pins_the_mapping(tmp_path, caplog, monkeypatch, window, ahead, threads):
    pinned = []
    monkeypatch.setattr(loader, "_pin", lambda address, nbytes: pinned.append(nbytes) or _REAL_PIN(address, nbytes))
    with caplog.at_level("DEBUG", logger="fusedops.loader"):
        cuda_round_trip(tmp_path, zero_copy=True, staging_bytes=window, staging_buffers=ahead, copy_threads=threads)
    assert "zero-copy" not in caplog.text  # the driver pinned every window: no fallback
    assert pinned and all(n % 4096 == 0 and n <= -(-window // 4096) * 4096 for n in pinned)


@pytest.mark.gpu
@pytest.mark.parametrize("fill", ["mmap", "read"])
@pytest.mark.parametrize("refused", [0, 3])
def test_cuda_zero_copy_falls_back_to_staging(tmp_path, caplog, monkeypatch, refused, fill):
    calls = []

    def pin(address, nbytes):
        calls.append(nbytes)
        if len(calls) > refused:
            raise loader.RegistrationError("refused by the test")
        return _REAL_PIN(address, nbytes)

    monkeypatch.setattr(loader, "_pin", pin)
    with caplog.at_level("DEBUG", logger="fusedops.loader"):
        cuda_round_trip(tmp_path, zero_copy=True, staging_bytes=4096, staging_buffers=2, fill=fill)
    assert "refused by the test" in caplog.text and "staging the remaining" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("zero_copy, fill", [(False, "mmap"), (False, "read"), (True, "mmap")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_in_place_cast_and_moved(tmp_path, dtype, zero_copy, fill):
    source = tiny_llama(0)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    expected = {k: v.to(dtype) for k, v in source.state_dict().items()}
    on_gpu = tiny_llama(1, dtype=dtype, device="cuda")
    ptrs = {k: v.data_ptr() for k, v in on_gpu.state_dict().items()}
    for p in on_gpu.parameters():
        poison_(p.data)
    load_safetensors(on_gpu, checkpoint=tmp_path, staging_bytes=4099, staging_buffers=2, zero_copy=zero_copy,
                     fill=fill)
    state = on_gpu.state_dict()
    assert all(v.data_ptr() == ptrs[k] and torch.equal(v.cpu(), expected[k]) for k, v in state.items())
    on_meta = tiny_llama(1, dtype=dtype, device="meta")
    load_safetensors(on_meta, checkpoint=tmp_path, zero_copy=zero_copy, fill=fill, strict=False)  # inv_freq: none
    assert all(v.is_cuda and torch.equal(v.cpu(), expected[k]) for k, v in on_meta.state_dict().items())
    assert on_meta.lm_head.weight is on_meta.model.embed_tokens.weight
