"""rewrite_graph on real HF models from tiny configs (CPU, reference ops): exact match counts, op
counts before/after, parity with eager, StaticCache prefill/decode with cache contents, GPT-2
untouched, dry run, fallbacks. Dynamo is driven directly with a backend that only rewrites."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, StaticCache

from conftest import rel_err
from fusedops.backend.rewrite import RewriteOptions, rewrite_graph

L = 2          # decoder layers
VOCAB = 128
_COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=L, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=0,
               eos_token_id=1)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "gpt2": lambda: GPT2Config(n_embd=256, n_layer=L, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1),
}
LLAMA_LIKE = ("llama", "mistral", "qwen2")
# default options on an L-layer Llama-family model: every residual add feeds a norm, so 2L of the 2L+1
# norms are add_rms_norm (the first layer's input norm has no add), and o_proj / down_proj are plain linears
EXPECTED = {"qkv": L, "gate_up_silu": L, "add_rms_norm": 2 * L, "rms_norm": 1, "rope": L,
            "attention": L, "linear": 2 * L + 1}   # linear: o_proj, down_proj, lm_head
# bf16 / fp16 models also carry the residual stream in fp32 between the 2L add_rms_norms (the last h is unused)
EXPECTED_HALF = {**EXPECTED, "residual_fp32": 2 * L - 1}


def build(family, attn="sdpa", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # HF initializes norms to exactly 1 and biases to 0: randomize everything
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05) + (1.0 if p.dim() == 1 else 0.0))
    return model.to(dtype)


def compile_rewritten(model, options=None):
    results = []

    def backend(gm, example_inputs):
        result = rewrite_graph(gm, example_inputs, options or RewriteOptions())
        results.append(result)
        return result.gm

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), results


def static_cache(config, batch=2, length=16):
    if transformers.__version__ < "5":  # 4.4x sizes the cache up front
        return StaticCache(config=config, max_cache_len=length, batch_size=batch, dtype=torch.float32)
    return StaticCache(config=config, max_cache_len=length)


def cache_tensors(cache):
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return list(cache.key_cache) + list(cache.value_cache)  # 4.4x


def ids(batch=2, seq=7, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_fp32_counts_and_parity(family, attn):
    model = build(family, attn)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        compiled, results = compile_rewritten(model)
        got = compiled(x).logits
    assert len(results) == 1
    report = results[0].report
    assert dict(report.matches) == EXPECTED, report.format()
    assert not report.fallbacks
    assert rel_err(got, expected) <= 1e-4
    before, after = report.ops_before, report.ops_after
    assert before["linear"] == 7 * L + 1 and after["linear"] == 0
    assert after["fusedops.linear"] == 3 * L + 1 and after["fusedops.gate_up_silu"] == L
    assert after["fusedops.rms_norm"] == 1 and after["fusedops.add_rms_norm"] == 2 * L and after["rsqrt"] == 0
    assert after["fusedops.linear_residual"] == 0
    assert after["fusedops.attention"] == L and after["sdpa"] == 0 and after["softmax"] == 0
    assert after["fusedops.rope"] == L and after["neg"] == 0
    assert after["silu"] == 0


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_bf16_error_vs_fp32_no_worse_than_eager(family):
    reference = build(family)
    model = build(family, dtype=torch.bfloat16)
    x = ids(seq=16)
    with torch.no_grad():
        truth = reference(x).logits
        eager_err = rel_err(model(x).logits, truth)
        compiled, results = compile_rewritten(model)
        fused_err = rel_err(compiled(x).logits, truth)
    assert dict(results[0].report.matches) == EXPECTED_HALF and not results[0].report.fallbacks
    assert fused_err <= eager_err * 1.05, (fused_err, eager_err)


def test_linear_residual_takes_the_adds_when_add_rms_norm_is_off():
    model = build("llama")
    options = RewriteOptions(fusions=RewriteOptions().fusions - {"add_rms_norm"})
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        compiled, results = compile_rewritten(model, options)
        got = compiled(x).logits
    matches = results[0].report.matches
    assert matches["linear_residual"] == 2 * L and matches["rms_norm"] == 2 * L + 1 and matches["add_rms_norm"] == 0
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_static_cache_prefill_and_decode(family, attn):
    model, reference = build(family, attn), build(family, attn)
    cache_ref, cache = static_cache(reference.config), static_cache(model.config)
    compiled, results = compile_rewritten(model)
    steps = [(ids(seq=6), torch.arange(6))] + [(ids(seq=1, seed=s), torch.tensor([6 + s])) for s in range(3)]
    with torch.no_grad():
        for tokens, position in steps:
            kwargs = dict(cache_position=position, use_cache=True)
            expected = reference(tokens, past_key_values=cache_ref, **kwargs).logits
            got = compiled(tokens, past_key_values=cache, **kwargs).logits
            assert rel_err(got, expected) <= 1e-4
    for mine, theirs in zip(cache_tensors(cache), cache_tensors(cache_ref)):
        assert rel_err(mine, theirs) <= 1e-5
    assert len(results) >= 2  # prefill graph, then decode graph(s)
    for result in results:
        matches = result.report.matches
        assert matches["rope_cache_write"] == L and matches["rope"] == 0 and matches["attention"] == L
        assert result.report.ops_after["index_copy_"] == 0
    # decode attends over the whole static cache with a bool mask: kv_len skips the unwritten tail
    assert all(sum("kv_len" in r for r in result.report.replacements) == L for result in results[1:])


def test_gpt2_only_its_attention_is_rewritten():
    """GPT-2 has no RMSNorm, RoPE, SwiGLU or bias-free residual projection (Conv1D is addmm); its
    SDPA is plain attention and its lm_head a plain projection: both are taken. With every fusion off
    the graph is left as traced."""
    model = build("gpt2")
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        compiled, results = compile_rewritten(model)
        got = compiled(x).logits
        untouched, results_off = compile_rewritten(model, RewriteOptions(fusions=set()))
        same = untouched(x).logits
    assert dict(results[0].report.matches) == {"attention": L, "linear": 1}
    assert rel_err(got, expected) <= 1e-5
    assert sum(results_off[0].report.matches.values()) == 0
    assert results_off[0].report.ops_after == results_off[0].report.ops_before
    assert torch.equal(same, expected)


def test_dry_run_changes_nothing():
    model = build("llama")
    pointers = [p.data_ptr() for p in model.parameters()]
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
        compiled, results = compile_rewritten(model, RewriteOptions(dry_run=True))
        got = compiled(x).logits
    result = results[0]
    assert dict(result.report.matches) == EXPECTED          # what would be rewritten
    assert result.report.ops_after["fusedops.attention"] == L
    assert not any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "fusedops"
                   for n in result.gm.graph.nodes)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert torch.equal(got, expected)
    assert "dry run" in result.report.format()


def test_grad_mode_falls_back_with_reason():
    model = build("llama")
    x = ids()
    expected = model(x).logits
    compiled, results = compile_rewritten(model)
    got = compiled(x).logits
    assert sum(results[0].report.matches.values()) == 0
    assert "grad" in results[0].report.fallbacks[0]
    assert torch.equal(got, expected)


def test_weights_are_aliased_then_shared_across_graphs():
    model = build("llama")
    q = model.model.layers[0].self_attn.q_proj.weight
    before = q.detach().clone()
    compiled, results = compile_rewritten(model)
    with torch.no_grad():
        compiled(ids(seq=5))
        compiled(ids(seq=9))  # a second graph (new shape) must reuse the prepared weights
    first, second = results[0].prepared_weights, results[-1].prepared_weights
    assert len(results) >= 2
    assert all(w.aliased and w.extra_bytes == 0 for w in first)
    assert all(w.cached for w in second)
    assert torch.equal(q, before)                        # same values, now a view of [Wq; Wk; Wv]
    assert q.untyped_storage().nbytes() > q.numel() * q.element_size()


def test_copy_mode_reports_extra_memory():
    model = build("llama")
    compiled, results = compile_rewritten(model, RewriteOptions(weight_mode="copy", gate_up_block=128))
    with torch.no_grad():
        compiled(ids())
    report = results[0].report
    hidden, inter, qkv_rows = 256, 512, 256 + 2 * 128
    assert report.extra_weight_bytes == L * (qkv_rows * hidden + 2 * inter * hidden) * 4
    assert "block=128" in "\n".join(report.replacements)


def test_residual_stream_stays_in_the_model_dtype_where_the_model_returns_it():
    """output_hidden_states returns every layer's h: those h are read outside the fused adds, so none is
    carried in fp32, and what the model returns keeps its dtype."""
    model = build("llama", dtype=torch.bfloat16)
    x = ids()
    with torch.no_grad():
        compiled, results = compile_rewritten(model)
        out = compiled(x, output_hidden_states=True)
    assert results[0].report.matches["add_rms_norm"] == 2 * L
    assert results[0].report.matches["residual_fp32"] == L   # each layer's post-attention h (read by the MLP add only)
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)
