"""fusedops/backend/int4.py: options={"weights": "int4"} on a tiny HF Llama (CPU): exact op counts,
parity with the fused bf16 path and with eager on dequantized weights, the cache, the options."""
import copy
import gc

import pytest
import torch

import fusedops  # noqa: F401  (registers the ops and the backend)
import fusedops.backend as backend
from conftest import rel_err
from fusedops import quant
from fusedops.backend import int4
from fusedops.backend.options import parse_options

transformers = pytest.importorskip("transformers")

LAYERS, VOCAB = 2, 97


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def model():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)


def dequantized_copy(m, lm_head):
    """The model with every projection the pass swaps replaced by its int4 round trip."""
    d = copy.deepcopy(m)
    for name, mod in d.named_modules():
        if isinstance(mod, torch.nn.Linear) and (lm_head or name != "lm_head"):
            mod.weight.data = quant.dequantize(*quant.quantize(mod.weight.data))
    return d


def ids():
    return torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))


def compiled_logits(m, options, monkeypatch=None):
    reports = []
    compile_graph = backend.compile_graph

    def spy(gm, example_inputs, opts):
        fn, report = compile_graph(gm, example_inputs, opts)
        reports.append(report)
        return fn, report

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "compile_graph", spy)
        with torch.no_grad():
            logits = torch.compile(m, backend="fusedops", options=options)(ids()).logits
    return logits, reports


@pytest.mark.parametrize("lm_head", [False, True])
def test_counts_and_parity(lm_head):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    logits, reports = compiled_logits(m, {"weights": "int4", "int4_lm_head": lm_head})
    ops = reports[0].ops_after
    assert ops["fusedops.linear_w4"] == 3 * LAYERS + lm_head         # stacked q/k/v, o_proj, down_proj (+ lm_head)
    assert ops["fusedops.add_rms_norm"] == 2 * LAYERS                # the residual adds, as in bf16
    assert ops["fusedops.gate_up_silu_w4"] == LAYERS
    assert ops["fusedops.linear"] == (0 if lm_head else 1)           # lm_head left in bf16 by default
    assert ops["fusedops.linear_residual"] == ops["fusedops.gate_up_silu"] == ops["linear"] == 0
    assert reports[0].matches["int4"] == 4 * LAYERS + lm_head
    # the user's bf16 weights are still there, unchanged
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # parity: the fused bf16 path on dequantized weights computes the very same thing
    torch._dynamo.reset()
    d = dequantized_copy(m, lm_head)
    same, _ = compiled_logits(d, {})
    assert rel_err(logits, same) < 1e-6
    with torch.no_grad():
        eager = d(ids()).logits
    assert rel_err(logits, eager) < 2e-2


def test_quantized_once_and_shared(monkeypatch):
    graphs = []
    apply = backend.apply_int4
    monkeypatch.setattr(backend, "apply_int4", lambda gm, *a: (graphs.append(gm), apply(gm, *a)))
    m = model()
    compiled_logits(m, {"weights": "int4"})
    gc.collect()   # earlier tests' sources die in cycles: their entries leave the store only at collection
    n = len(int4.STORE)
    torch._dynamo.reset()
    _, reports = compiled_logits(m, {"weights": "int4"})
    gc.collect()
    assert len(int4.STORE) == n
    assert all("(cached)" in r for r in reports[0].replacements if r.startswith("int4"))
    # the rewritten graph holds int4 buffers only, no bf16 prepared weight it swapped out
    names = [name for name, _ in graphs[-1].named_buffers()]
    assert len([b for b in names if b.startswith("fusedops_int4_qweight")]) == 4 * LAYERS
    assert not [b for b in names if b.startswith(("fusedops_qkv", "fusedops_gate_up"))]


def test_dry_run_and_fused_off_leave_weights():
    m = model()
    _, reports = compiled_logits(m, {"weights": "int4", "dry_run": True})
    assert reports[0].ops_after["fusedops.linear_w4"] == 0
    assert any("int4: dry run" in n for n in reports[0].notes)
    torch._dynamo.reset()
    _, reports = compiled_logits(m, {"weights": "int4", "fusions": ["rms_norm"]})
    assert reports[0].matches["int4"] == 0 and reports[0].ops_after["fusedops.linear_w4"] == 0


def test_options():
    assert parse_options().weights == "model" and not parse_options().int4_lm_head
    o = parse_options(options={"weights": "int4", "int4_lm_head": True})
    assert o.weights == "int4" and o.int4_lm_head
    with pytest.raises(ValueError, match=r"^options\['weights'\]"):
        parse_options(options={"weights": "int8"})
    with pytest.raises(ValueError, match=r"^options\['int4_lm_head'\]"):
        parse_options(options={"int4_lm_head": True})
    with pytest.raises(ValueError, match=r"^options\['int4_lm_head'\]"):
        parse_options(options={"weights": "int4", "int4_lm_head": 1})


def test_k_not_multiple_of_group_is_a_near_miss():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)
    _, reports = compiled_logits(m, {"weights": "int4"})
    misses = [n for n in reports[0].near_misses if n.pattern == "int4"]
    assert reports[0].matches["int4"] == 1 and len(misses) == 3   # down_proj has K = 128
    assert all("multiple of the group size" in n.reason for n in misses)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 5, 12])   # GEMV m1, m8; dequantize + cuBLAS
def test_cuda_matches_fused_bf16_on_dequantized_weights(tokens):
    m = model().cuda()
    x = torch.randint(3, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        logits = torch.compile(m, backend="fusedops", options={"weights": "int4"})(x).logits
        torch._dynamo.reset()
        d = dequantized_copy(m, False)
        same = torch.compile(d, backend="fusedops")(x).logits
    assert torch.isfinite(logits).all() and rel_err(logits, same) < 3e-2, rel_err(logits, same)


def test_int4_keeps_gate_up_plain_so_it_aliases(monkeypatch):
    """No GEMM reads an interleaved [Wg; Wu] when the int4 pass re-packs it: block = I, 0 B extra, even
    where the bf16 path would interleave (the CUDA CUTLASS route, forced here)."""
    from fusedops.backend.patterns import mlp
    monkeypatch.setattr(mlp, "_default_block", lambda x, inter: 128)
    _, reports = compiled_logits(model(), {})
    assert any("block=128" in r for r in reports[0].replacements)          # bf16: interleaved, copied
    torch._dynamo.reset()
    _, reports = compiled_logits(model(), {"weights": "int4"})
    assert any("gate_up_silu" in r and "block=256" in r for r in reports[0].replacements)
    assert any("gate_up" in w and "aliased" in w for w in reports[0].weights)


def test_biased_projections_stay_in_the_model_dtype_and_say_so():
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval().to(torch.bfloat16)
    _, reports = compiled_logits(m, {"weights": "int4"})
    misses = [n for n in reports[0].near_misses if n.pattern == "int4"]
    assert len(misses) == LAYERS and all("has a bias" in n.reason for n in misses)   # q/k/v of each layer
    assert reports[0].ops_after["fusedops.linear"] == LAYERS + 1                     # + lm_head in bf16
    assert reports[0].ops_after["fusedops.linear_w4"] == 2 * LAYERS                  # o_proj, down_proj


def test_log_shows_what_int4_replaced(capfd, monkeypatch):
    monkeypatch.setenv("FUSEDOPS_LOG", "1")
    compiled_logits(model(), {"weights": "int4"})
    err = capfd.readouterr().err
    assert err.count("replaced  int4: ") == 4 * LAYERS and "projections on int4 weights" in err
