"""fusedops/backend/__init__.py, options.py and fusedops/explain.py: the torch.compile entry point,
its options, the eager/Inductor fallback and the Hugging Face drop-in paths (CPU, small configs)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusedops
import fusedops.backend as backend
from conftest import rel_err
from fusedops.backend.options import MAX_GRAPH_TOKENS, parse_options

transformers = pytest.importorskip("transformers")

VOCAB = 97


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def llama_config(layers=2):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0)


def small_model(config):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt(batch=1, length=7):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def calls(monkeypatch):
    """Records (mode, options) of each fusedops_backend call and the report of each graph."""
    seen = {"modes": [], "reports": []}
    parse, compile_graph = backend.parse_options, backend.compile_graph

    def spy_parse(mode=None, options=None):
        seen["modes"].append((mode, options))
        return parse(mode, options)

    def spy_compile(gm, example_inputs, opts):
        fn, report = compile_graph(gm, example_inputs, opts)
        seen["reports"].append(report)
        return fn, report

    monkeypatch.setattr(backend, "parse_options", spy_parse)
    monkeypatch.setattr(backend, "compile_graph", spy_compile)
    return seen


# ---- options -------------------------------------------------------------------------------------

def test_mode_defaults():
    assert parse_options().cuda_graphs and parse_options().clone_outputs
    ro = parse_options(mode="reduce-overhead")
    assert ro.cuda_graphs and not ro.clone_outputs
    assert not parse_options(mode="max-autotune-no-cudagraphs").cuda_graphs
    assert parse_options().max_graph_tokens == MAX_GRAPH_TOKENS and parse_options().fallback == "eager"


def test_options_override_and_normalise():
    o = parse_options(options={"cuda_graphs": False, "buckets": [8, 1, 4, 1], "fallback": "inductor",
                               "fusions": ["rms_norm"], "dry_run": True, "clone_outputs": False})
    assert (o.cuda_graphs, o.buckets, o.fallback, o.fusions, o.dry_run, o.clone_outputs) == \
        (False, (1, 4, 8), "inductor", frozenset({"rms_norm"}), True, False)
    assert parse_options(options={"fusions": "all"}).fusions is None


@pytest.mark.parametrize("options, key", [
    ({"cuda_graph": True}, "'cuda_graph'"),
    ({"cuda_graphs": "yes"}, "'cuda_graphs'"),
    ({"buckets": [0, 4]}, "'buckets'"),
    ({"buckets": 4}, "'buckets'"),
    ({"buckets": []}, "'buckets'"),
    ({"fallback": "aot_eager"}, "'fallback'"),
    ({"max_graphs": 0}, "'max_graphs'"),
    ({"warmup": 1.5}, "'warmup'"),
    ({"fusions": "rms_norm"}, "'fusions'"),
    ({"dry_run": 1}, "'dry_run'"),
])
def test_bad_option_names_the_key(options, key):
    with pytest.raises(ValueError, match=key):
        parse_options(options=options)


def test_bad_mode_and_options_type():
    with pytest.raises(ValueError, match="mode"):
        parse_options(mode="fast")
    with pytest.raises(ValueError, match="options"):
        parse_options(options=[("dry_run", True)])


def test_bad_option_surfaces_through_torch_compile():
    f = torch.compile(lambda x: x * 2, backend="fusedops", options={"cuda_graph": True})
    with pytest.raises(Exception, match="cuda_graph"):
        f(torch.ones(3))


def test_unknown_fusion_is_refused():
    with pytest.raises(ValueError, match=r"^options\['fusions'\]: unknown \['no_such_fusion'\]"):
        parse_options(options={"fusions": ["no_such_fusion"]})
    with pytest.raises(ValueError, match=r"^options\['fusions'\]"):
        parse_options(options={"fusions": 5})
    f = torch.compile(lambda x: x + 1, backend="fusedops", options={"fusions": ["no_such_fusion"]})
    with pytest.raises(Exception, match="no_such_fusion"):
        f(torch.ones(3))


# ---- registration --------------------------------------------------------------------------------

def test_entry_point_works_without_importing_fusedops():
    script = textwrap.dedent("""
        import sys, torch
        f = torch.compile(lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x,
                          backend="fusedops", mode="reduce-overhead")
        x = torch.randn(4, 8)
        torch.testing.assert_close(f(x), torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x)
        print("fusedops.backend" in sys.modules)
    """)
    env = dict(os.environ, FUSEDOPS_LOG="0")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"   # loaded by torch through the entry point, not by us


# ---- Hugging Face drop-in (CPU, fp32: parity with eager) ----------------------------------------

FAMILIES = {
    "llama": llama_config,
    "qwen2": lambda: transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              vocab_size=VOCAB, max_position_embeddings=128),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compile_model_matches_eager(family, calls):
    model = small_model(FAMILIES[family]())
    ids = prompt()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="fusedops")(ids).logits
    assert rel_err(got, want) <= 1e-4
    assert sum(r.matches["rms_norm"] + r.matches.get("add_rms_norm", 0) for r in calls["reports"]) > 0


def test_compile_forward_attribute_and_from_pretrained(tmp_path, calls):
    small_model(llama_config()).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = prompt(batch=2)
    with torch.no_grad():
        want = model(ids).logits
        model.forward = torch.compile(model.forward, backend="fusedops")
        got = model(ids).logits
    assert rel_err(got, want) <= 1e-4 and calls["reports"]


def static_generate(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                          **kwargs)


def test_generate_with_compile_config(calls):
    model = small_model(llama_config())
    ids = prompt()
    want = static_generate(model, ids)
    config = transformers.CompileConfig(backend="fusedops")
    config._compile_all_devices = True   # HF compiles on CUDA only unless told (tests run on CPU)
    got = static_generate(model, ids, compile_config=config)
    assert torch.equal(got, want)
    assert ("reduce-overhead", None) in calls["modes"]     # CompileConfig's default mode reaches us
    assert calls["reports"]


def test_generate_with_generation_config_compile_config(calls):
    model = small_model(llama_config())
    ids = prompt()
    want = static_generate(model, ids)
    config = transformers.CompileConfig(backend="fusedops", mode=None,
                                        options={"buckets": [1, 2, 4], "clone_outputs": False})
    config._compile_all_devices = True
    model.generation_config.compile_config = config
    got = static_generate(model, ids)
    assert torch.equal(got, want)
    assert (None, {"buckets": [1, 2, 4], "clone_outputs": False}) in calls["modes"]


def test_gpt2_compiles_and_matches_eager(calls):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    model = small_model(config)
    ids = prompt()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="fusedops")(ids).logits
    assert rel_err(got, want) <= 1e-5
    # no Llama pattern (RMSNorm, RoPE, SwiGLU) in GPT-2; its SDPA may still become fusedops::attention
    assert calls["reports"] and not any(r.matches["rms_norm"] or r.matches["rope"] or r.matches["gate_up_silu"]
                                        for r in calls["reports"])


def test_grad_mode_on_still_runs_as_pytorch(calls):
    model = small_model(llama_config(layers=1))
    ids = prompt()
    got = torch.compile(model, backend="fusedops")(ids).logits
    got.sum().backward()                        # autograd through the unfused graph
    assert model.lm_head.weight.grad is not None
    assert any("grad" in f for r in calls["reports"] for f in r.fallbacks)


def test_dry_run_changes_nothing(calls):
    model = small_model(llama_config(layers=1))
    ids = prompt()
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, backend="fusedops", options={"dry_run": True})(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    report = calls["reports"][0]
    assert report.dry_run and report.matches and report.ops_before != report.ops_after


def test_fallback_inductor_runs_the_rest():
    def f(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.tanh(w * h.to(x.dtype)) + 1

    x, w = torch.randn(4, 32), torch.randn(32)
    got = torch.compile(f, backend="fusedops", options={"fallback": "inductor"})(x, w)
    torch.testing.assert_close(got, f(x, w), rtol=1e-5, atol=1e-5)


def test_fallback_inductor_on_a_hf_model():
    """Inductor compiles against the parameters Dynamo recorded: the rewrite must not re-point them
    (aliasing q/k/v into the stacked weight moved their storage offset and failed Inductor's guards)."""
    model = small_model(llama_config(layers=1))
    x = prompt()
    with torch.no_grad():
        expected = model(x).logits
        got = torch.compile(model, backend="fusedops", options={"fallback": "inductor"})(x).logits
    assert rel_err(got, expected) <= 1e-4


def test_float64_projections_are_left_as_pytorch_runs_them():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(torch.compile(model, backend="fusedops")(x), model(x))


def test_log_prints_report_and_run_stage(capfd, monkeypatch):
    monkeypatch.setenv("FUSEDOPS_LOG", "1")
    model = small_model(llama_config(layers=1))
    with torch.no_grad():
        torch.compile(model, backend="fusedops")(prompt())
    err = capfd.readouterr().err
    assert "fusedops rewrite:" in err and "rms_norm" in err
    assert "CUDA graphs: inputs on ['cpu']" in err and "compiled in" in err


def test_explain_reports_without_changing_results():
    model = small_model(llama_config())
    ids = prompt()
    with torch.no_grad():
        result = fusedops.explain(model, ids, verbose=False)
        want = model(ids).logits
    assert len(result.reports) == 1 and all(r.dry_run for r in result.reports)
    assert sum(result.reports[0].matches.values()) > 0
    torch.testing.assert_close(result.output.logits, want, rtol=0, atol=0)
    assert "graph 0" in str(result)


def test_import_names_the_backend_when_no_entry_point_is_installed(monkeypatch):
    """A checkout used from PYTHONPATH (no entry point): importing fusedops registers the name."""
    import importlib.metadata

    from torch._dynamo.backends import registry

    import fusedops
    from fusedops.backend import fusedops_backend
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    monkeypatch.delitem(registry._COMPILER_FNS, "fusedops", raising=False)
    fusedops._register_backend_name()
    assert registry.lookup_backend("fusedops") is fusedops_backend
