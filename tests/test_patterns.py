"""Each pattern on small functions traced by Dynamo (CPU): the variants it must accept (HF 4.4x and
5.x spellings), the near-misses it must name, and the weight store and options it relies on."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from fusedops.backend.report import Report
from fusedops.backend.rewrite import RewriteOptions, rewrite_graph
from fusedops.backend.weights import WeightStore


def same_function_rounded_once(out, fn, *args):
    """The fused ops compute in fp32 and round once, eager bf16 rounds after every op: the rewritten
    output must be the same function (within bf16 rounding) and no further from float64 than eager."""
    eager, exact = fn(*args), fn(*(a.double() for a in args))
    for o, e, x in zip(*((t,) if torch.is_tensor(t) else t for t in (out, eager, exact))):
        assert rel_err(o, e) < 1e-2 and rel_err(o, x) <= rel_err(e, x), (rel_err(o, e), rel_err(o, x), rel_err(e, x))


def rewritten(fn, *args, options=None):
    results = []

    def backend(gm, example_inputs):
        results.append(rewrite_graph(gm, example_inputs, options or RewriteOptions()))
        return results[-1].gm

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, results[0].report


def reasons(report: Report, pattern: str) -> str:
    return " | ".join(m.reason for m in report.near_misses if m.pattern == pattern)


def hf_rms_norm(x, weight, eps=1e-6):  # LlamaRMSNorm.forward
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def other_spelling_rms_norm(x, weight):
    h = x.float()
    h = torch.rsqrt(1e-5 + torch.mean(h * h, dim=-1, keepdim=True)) * h
    return h.type_as(x) * weight


def randn(*shape, dtype=torch.bfloat16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("fn, eps", [(hf_rms_norm, 1e-6), (other_spelling_rms_norm, 1e-5)])
def test_rms_norm_spellings_match_with_their_eps(fn, eps):
    x, w = randn(3, 5, 64), randn(64, seed=1)
    out, report = rewritten(fn, x, w)
    assert report.matches["rms_norm"] == 1 and f"eps={eps:g}" in report.replacements[0]
    same_function_rounded_once(out, fn, x, w)


def test_rms_norm_near_misses_name_the_reason():
    x = randn(4, 64)
    _, report = rewritten(lambda x, w: w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                       + 1e-6)), x, randn(64).float())
    assert report.matches["rms_norm"] == 0 and "no cast back to the input dtype" in reasons(report, "rms_norm")
    _, report = rewritten(hf_rms_norm, x, randn(64).float())
    assert report.matches["rms_norm"] == 0 and "weight" in reasons(report, "rms_norm")


def test_add_rms_norm_returns_h_to_the_adds_other_users():
    def layer(x, residual, w):
        h = residual + x
        return hf_rms_norm(h, w), h * 2
    args = randn(2, 3, 64), randn(2, 3, 64, seed=1), randn(64, seed=2)
    (y, h2), report = rewritten(layer, *args)
    assert report.matches["add_rms_norm"] == 1 and report.ops_after["add"] == 0
    assert torch.equal(h2, layer(*args)[1])   # h is rounded to bf16 as eager stores it
    same_function_rounded_once(y, lambda *a: layer(*a)[0], *args)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):  # HF apply_rotary_pos_emb, unsqueeze_dim=1
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def test_rope_matches_q_and_k_together():
    q, k = randn(2, 8, 5, 64), randn(2, 2, 5, 64, seed=1)
    cos, sin = randn(1, 5, 64, seed=2), randn(1, 5, 64, seed=3)
    (qo, ko), report = rewritten(apply_rope, q, k, cos, sin)
    assert report.matches["rope"] == 1 and report.ops_after["cat"] == 0 and report.ops_after["neg"] == 0
    same_function_rounded_once((qo, ko), apply_rope, q, k, cos, sin)


def test_rope_reads_hf_fp32_cos_sin_before_their_cast():
    """HF's rotary embedding returns cos.to(x.dtype): the op gets the fp32 cos/sin (one rounding fewer)."""
    def layer(q, k, cos32, sin32):
        return apply_rope(q, k, cos32.to(q.dtype), sin32.to(q.dtype))
    q, k = randn(2, 8, 5, 64), randn(2, 2, 5, 64, seed=1)
    angles = torch.rand(1, 5, 64, generator=torch.Generator().manual_seed(2)) * 6.28
    cos32, sin32 = angles.cos(), angles.sin()
    (qo, ko), report = rewritten(layer, q, k, cos32, sin32)
    assert report.matches["rope"] == 1 and report.ops_before["to"] == 2 and report.ops_after["to"] == 0
    exact = apply_rope(q.double(), k.double(), cos32.double(), sin32.double())
    for out, ref, eager in zip((qo, ko), exact, layer(q, k, cos32, sin32)):
        assert rel_err(out, ref) < rel_err(eager, ref)
        assert torch.equal(out, ref.float().bfloat16()) or rel_err(out, ref) < 3e-3


def test_rope_near_misses():
    q, k, cos, sin = randn(1, 4, 5, 64), randn(1, 4, 5, 64), randn(1, 5, 64), randn(1, 5, 64)
    _, report = rewritten(apply_rope, q, k, cos.float(), sin.float())
    assert report.matches["rope"] == 0 and "cos dtype torch.float32 differs" in reasons(report, "rope")
    _, report = rewritten(lambda q, c, s: q * c.unsqueeze(1) + rotate_half(q) * s.unsqueeze(1), q, cos, sin)
    assert report.matches["rope"] == 0 and "one tensor only" in reasons(report, "rope")


def repeat_kv(x, n_rep):  # HF repeat_kv
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa_with_repeat(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.1)


def eager_attention(q, k, v, bool_mask):  # HF eager_attention_forward with masking_utils' float mask
    mask = torch.where(bool_mask, torch.zeros((), dtype=q.dtype), torch.finfo(q.dtype).min)
    k, v = repeat_kv(k, 4), repeat_kv(v, 4)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.125
    w = F.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v)


def _attention_inputs(dtype=torch.float32):
    q, k, v = randn(2, 8, 6, 64, dtype=dtype), randn(2, 2, 10, 64, dtype=dtype, seed=1), \
        randn(2, 2, 10, 64, dtype=dtype, seed=2)
    mask = torch.arange(10).view(1, 1, 1, 10) <= torch.arange(6).view(1, 1, 6, 1) + 4
    return q, k, v, mask


@pytest.mark.parametrize("fn", [sdpa_with_repeat, eager_attention])
def test_attention_takes_kv_from_before_repeat_kv(fn):
    q, k, v, mask = _attention_inputs()
    out, report = rewritten(fn, q, k, v, mask)
    assert report.matches["attention"] == 1
    assert report.ops_after["expand"] == 0 and report.ops_after["softmax"] == 0
    assert "over kv [2, 2, 10, 64]" in report.replacements[0]
    assert rel_err(out, fn(q.double(), k.double(), v.double(), mask)) <= 1e-5


def test_attention_near_misses():
    q, k, v, mask = _attention_inputs()
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, -1e9)
    _, report = rewritten(sdpa_with_repeat, q, k, v, float_mask)
    assert report.matches["attention"] == 0 and "float32 attn_mask" in reasons(report, "attention")

    def eager_with_float_mask(q, k, v, m):
        w = torch.softmax(torch.matmul(q, repeat_kv(k, 4).transpose(2, 3)) * 0.125 + m, dim=-1)
        return torch.matmul(w, repeat_kv(v, 4))
    _, report = rewritten(eager_with_float_mask, q, k, v, float_mask)
    assert report.matches["attention"] == 0 and "additive float mask" in reasons(report, "attention")


def two_layers_with_4x_mask(q, k, v, position):
    """transformers 4.4x: one float causal mask built in the graph, sliced per layer, fed to SDPA."""
    mask = torch.full((q.shape[2], k.shape[2]), torch.finfo(q.dtype).min, dtype=q.dtype)
    mask *= torch.arange(k.shape[2]) > position.reshape(-1, 1)
    mask = mask[None, None, :, :].expand(q.shape[0], 1, -1, -1)
    out = q
    for _ in range(2):
        out = sdpa_with_repeat(out, k, v, mask[:, :, :, : k.shape[2]])
    return out


def test_float_mask_built_in_the_graph_becomes_one_bool_mask():
    q, k, v, _ = _attention_inputs()
    position = torch.arange(4, 10)
    out, report = rewritten(two_layers_with_4x_mask, q, k, v, position)
    assert report.matches["attention"] == 2
    assert report.ops_after["eq"] == 1                     # one `mask == 0` serves both layers
    assert report.ops_after["full"] == 1 and report.ops_after["imul"] == 1
    assert rel_err(out, two_layers_with_4x_mask(q.double(), k.double(), v.double(), position)) <= 1e-5


class GeluMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = (torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False),
                                         torch.nn.Linear(64, 32, bias=False))

    def forward(self, x, act=F.gelu):
        return self.down(act(self.gate(x)) * self.up(x))


def test_swiglu_matches_and_gelu_is_a_near_miss():
    x = randn(3, 32, dtype=torch.float32)
    mlp = GeluMlp().eval()
    with torch.no_grad():
        expected = mlp(x, F.silu)
    out, report = rewritten(lambda x: mlp(x, F.silu), x)
    assert report.matches["gate_up_silu"] == 1 and report.ops_after["silu"] == 0
    assert rel_err(out, expected) <= 1e-6
    _, report = rewritten(mlp, x)
    assert report.matches["gate_up_silu"] == 0 and "is not silu" in reasons(report, "gate_up_silu")


def test_options_errors_name_the_argument():
    with pytest.raises(ValueError, match="fusions"):
        RewriteOptions(fusions={"rms_norm", "flash"})
    with pytest.raises(ValueError, match="weight_mode"):
        RewriteOptions(weight_mode="share")
    with pytest.raises(ValueError, match="gate_up_block"):
        RewriteOptions(gate_up_block=0)


def test_weight_store_alias_is_memory_neutral_and_cached():
    store = WeightStore()
    q, k, v = (torch.nn.Parameter(randn(n, 16, dtype=torch.float32, seed=n)) for n in (8, 4, 4))
    originals = [t.detach().clone() for t in (q, k, v)]
    with torch.no_grad():
        stacked, info = store.rows("qkv", [q, k, v], "alias")
        again, info2 = store.rows("qkv", [q, k, v], "alias")
    assert info.aliased and info.extra_bytes == 0 and info2.cached
    assert again.data_ptr() == stacked.data_ptr() == q.data_ptr()
    assert all(torch.equal(t, o) for t, o in zip((q, k, v), originals))
    assert torch.equal(stacked, torch.cat(originals))
    store_fresh = WeightStore()  # a new store finds the back-to-back layout and makes no copy
    _, info3 = store_fresh.rows("qkv", [q, k, v], "alias")
    assert info3.cached and info3.extra_bytes == 0


def test_weight_store_copies_when_aliasing_is_unsafe():
    store = WeightStore()
    g, u = (torch.nn.Parameter(randn(8, 4, dtype=torch.float32, seed=s)) for s in (1, 2))
    with torch.no_grad():
        w, info = store.gate_up(g, u, 4, "alias")  # block < I: rows interleave, no view possible
    assert not info.aliased and info.extra_bytes == 16 * 4 * 4
    assert torch.equal(w[:4], g[:4]) and torch.equal(w[4:8], u[:4])
    with torch.enable_grad():
        _, info = WeightStore().rows("qkv", [g, u], "alias")  # params require grad, grad mode on
    assert not info.aliased and g.untyped_storage().nbytes() == g.numel() * 4


def test_fusedops_log_prints_the_report(monkeypatch, capsys):
    monkeypatch.setenv("FUSEDOPS_LOG", "1")
    rewritten(hf_rms_norm, randn(2, 64), randn(64))
    err = capsys.readouterr().err
    assert "fusedops rewrite: rms_norm x1" in err and "replaced  rms_norm" in err


def two_layers_with_hf_mask(q, k, v):
    """transformers 5.x sdpa_mask over a StaticCache: one bool mask (kv <= q + offset, expanded to the
    batch) built in the graph and passed to every layer's SDPA."""
    s, kv_len = q.shape[2], k.shape[2]
    mask = (torch.arange(kv_len)[None, None, None, :] <= torch.arange(s)[None, None, :, None] + 2).expand(
        q.shape[0], -1, s, kv_len)
    h = sdpa_with_repeat(q, k, v, mask)
    return sdpa_with_repeat(h, k, v, mask)


def two_layers_mask_changed_through_a_view(q, k, v):
    s, kv_len = q.shape[2], k.shape[2]
    mask = torch.arange(kv_len)[None, None, None, :] <= torch.arange(s)[None, None, :, None] + 2
    h = sdpa_with_repeat(q, k, v, mask)
    mask[..., :4].fill_(False)   # in place through a view: the first layer's block map is stale now
    return sdpa_with_repeat(h, k, v, mask)


def test_a_mask_written_through_a_view_gets_a_fresh_block_map():
    _, k, v, _ = _attention_inputs()
    q = randn(2, 8, 12, 64, dtype=torch.float32, seed=3)
    out, report = rewritten(two_layers_mask_changed_through_a_view, q, k, v)
    assert report.matches["attention"] == 2 and report.ops_after["fusedops.attention_mask_blocks"] == 2
    assert rel_err(out, two_layers_mask_changed_through_a_view(q.double(), k.double(), v.double())) <= 1e-5


@pytest.mark.parametrize("s, maps", [(12, 1), (1, 0)])  # S <= 8 runs the decode kernel: no map
def test_one_block_map_per_mask_and_none_for_decode(s, maps):
    _, k, v, _ = _attention_inputs()
    q = randn(2, 8, s, 64, dtype=torch.float32, seed=3)
    out, report = rewritten(two_layers_with_hf_mask, q, k, v)
    assert report.matches["attention"] == 2
    assert report.ops_after["fusedops.attention_mask_blocks"] == maps
    assert rel_err(out, two_layers_with_hf_mask(q.double(), k.double(), v.double())) <= 1e-5


# ---- decode-step glue: the StaticCache counter as kv_len, repeated aranges computed once -------------------

def _traced_counter_step(advance, start=None, after=False, end_kwarg=False, view_write=False, use_advance=False):
    """The graph HF's StaticCache layer gives Dynamo: pos = arange(1) + counter; counter.add_(advance);
    then attention (torch.neg stands in). Returns (pos node, attention node)."""
    g = torch.fx.Graph()
    counter = g.placeholder("cumulative_length")
    counter.meta["example_value"] = torch.tensor(0)        # what Dynamo records: a 0-d int64 counter
    alias = g.call_method("view", (counter, 1))            # a view made before pos, as the mask code does
    if end_kwarg:
        rng = g.call_function(torch.arange, (2,), {"end": 3})
    else:
        rng = g.call_function(torch.arange, (1,) if start is None else (start, start + 1))
    pos = g.call_function(operator.add, (rng, counter))
    pos.meta["example_value"] = torch.tensor([0])
    step = None
    if not after:
        step = g.call_method("add_", (counter, advance))
    if view_write:
        g.call_method("sub_", (alias, 1))                  # a second write, through the view
    attention = g.call_function(torch.neg, (pos,))
    if after:
        g.call_method("add_", (counter, advance))
    g.output((attention, step) if use_advance else attention)
    return pos, attention


def test_kv_len_is_the_advanced_counter_only_when_it_provably_equals_pos_last_plus_one():
    from fusedops.backend.patterns.attention import _advanced_counter
    pos, attention = _traced_counter_step(1)
    advance = _advanced_counter(pos, attention)
    assert advance is not None and advance.target == "add_"
    assert _advanced_counter(*_traced_counter_step(2)) is None              # another step than arange's length
    assert _advanced_counter(*_traced_counter_step(1, start=3)) is None     # arange with a start
    assert _advanced_counter(*_traced_counter_step(1, end_kwarg=True)) is None  # arange(2, end=3)
    assert _advanced_counter(*_traced_counter_step(1, after=True)) is None  # advanced only after attention
    assert _advanced_counter(*_traced_counter_step(1, view_write=True)) is None  # written again through a view
    assert _advanced_counter(*_traced_counter_step(1, use_advance=True)) is None  # add_'s result used elsewhere


def test_hf_static_cache_decode_reads_the_advanced_counter_and_shares_one_arange():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    reference = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    reference.load_state_dict(model.state_dict())
    results = []

    def backend(gm, example_inputs):
        results.append(rewrite_graph(gm, example_inputs, RewriteOptions()))
        return results[-1].gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    caches = [transformers.StaticCache(config=cfg, max_cache_len=16) for _ in range(2)]
    tokens = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for step in range(4):
            chunk, pos = (tokens, torch.arange(5)) if step == 0 else (tokens[:, step:step + 1], torch.tensor([4 + step]))
            got = compiled(chunk, past_key_values=caches[0], cache_position=pos).logits
            want = reference(chunk, past_key_values=caches[1], cache_position=pos).logits
            assert rel_err(got, want) <= 1e-4
    decode = results[-1]
    attentions = [n for n in decode.gm.graph.nodes if n.target is torch.ops.fusedops.attention.default]
    assert len(attentions) == 3
    for node in attentions:
        kv_len = node.args[6]
        assert kv_len.target is torch.reshape and kv_len.args[0].target == "add_"
        assert "cumulative_length" in kv_len.args[0].args[0].name
    aranges = [n for n in decode.gm.graph.nodes if n.target is torch.arange]
    assert len({(n.args, tuple(n.kwargs.items())) for n in aranges}) == len(aranges) < 3
    assert any("arange" in note for note in decode.report.notes)


def test_factories_with_a_writer_or_other_arguments_stay_apart():
    from fusedops.backend.patterns.factories import share_identical_factories
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a, b, c, d, e = (g.call_function(torch.arange, (n,)) for n in (4, 4, 5, 4, 4.0))
    g.call_method("mul_", (d, 2))                       # d is written in place: not a constant
    g.output((g.call_function(operator.add, (x, a)), g.call_function(operator.add, (x, b)),
              g.call_function(operator.add, (c, 1)), g.call_function(operator.add, (x, d)),
              g.call_function(operator.add, (e, 1))))   # arange(4.0) is float32, not arange(4)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    x = torch.randn(4)
    want = gm(x)
    assert share_identical_factories(gm.graph) == 1     # b joins a; c has another length; d is written
    gm.recompile()
    for got, expected in zip(gm(x), want):
        torch.testing.assert_close(got, expected)
    assert sum(n.target is torch.arange for n in gm.graph.nodes) == 4
