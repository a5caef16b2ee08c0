"""python -m fusedops.perf: the CLI end to end on CPU, and the parts whose mistakes would make the GPU
tables lie (model shapes and byte counts, parity maths and gate, Liger's patches undone, error rows)."""
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fusedops.perf import backends, measure, models, report

REPO = Path(__file__).resolve().parents[1]
TINY_WORKLOAD = measure.Workload([16, 40], [1, 2], 3, 2, 12, 4)


@pytest.fixture(scope="module")
def tiny():
    """bf16 tiny model, its fp32 reference run, and a cache pool (built once: the fp32 pass is the slow part)."""
    model = models.random_model(models.preset_config("tiny"), torch.device("cpu"), seed=3)
    pool = measure.CachePool()
    ref = measure.reference(model, pool, TINY_WORKLOAD, seed=3)
    pool.clear()
    models.cast_parameters(model, torch.bfloat16)
    return model, pool, ref


def _run(spec, tiny, gate=None, speed=False):
    model, pool, ref = tiny
    return measure.run_backend(spec, model, pool, [ref], TINY_WORKLOAD, gate, models.describe(model),
                               dict(copy_gbs=100.0, gemm_tflops=1.0), lambda msg: None, 3, speed=speed)


def test_cli_runs_end_to_end_on_cpu_within_a_minute(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusedops.perf", "--quick", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "speed numbers need a GPU" in proc.stdout
    md = (tmp_path / "e2e_tiny_2L_cpu.md").read_text()
    eager = next(line for line in md.splitlines() if line.startswith("| eager |"))
    assert "| ok |" in eager and "e-0" in eager          # a real, small, nonzero error vs fp32
    assert any(line.startswith("| fusedops |") for line in md.splitlines())   # ok or an error row


def test_parity_only_runs_another_family_and_says_no_speed(tmp_path):
    from fusedops.perf.__main__ import main
    assert main(["--preset", "mistral-7b", "--layers", "1", "--parity-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "e2e_mistral-7b_1L_cpu.md").read_text()
    assert "--parity-only: no speed measured." in md
    assert "| ok |" in next(line for line in md.splitlines() if line.startswith("| eager |"))


def test_llama3_8b_preset_has_the_published_shape():
    config = models.preset_config("llama3-8b")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(config)
    facts = models.describe(model)
    assert facts["params"] == 8_030_261_248
    embed = 128256 * 4096
    assert facts["streamed_params"] == facts["params"] - embed
    assert facts["matmul_params"] == facts["params"] - 2 * embed - (2 * 32 + 1) * 4096
    assert (facts["layers"], facts["kv_heads"], facts["head_dim"]) == (32, 8, 128)


def test_tied_embeddings_are_streamed_once():
    config = models.preset_config("llama3.2-1b", layers=1)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(config)
    facts = models.describe(model)
    assert facts["streamed_params"] == facts["params"]     # the table is lm_head: read every step
    assert facts["head_dim"] == 64 and facts["layers"] == 1


@pytest.mark.parametrize("kwargs, word", [(dict(name="llama9"), "preset"), (dict(name="tiny", layers=0), "layers")])
def test_preset_errors_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        models.preset_config(**kwargs)


def test_checkpoint_round_trip_and_missing_weights(tmp_path):
    model = models.random_model(models.preset_config("tiny"), torch.device("cpu"), seed=1)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = models.checkpoint_model(tmp_path / "ckpt", torch.device("cpu"), layers=1)
    assert loaded.config.num_hidden_layers == 1
    torch.testing.assert_close(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="checkpoint"):
        models.checkpoint_model(tmp_path / "empty", torch.device("cpu"))


def test_cast_keeps_rotary_frequencies_fp32():
    model = models.random_model(models.preset_config("tiny", layers=1), torch.device("cpu"))
    models.cast_parameters(model, torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_compare_against_float64_maths():
    gen = torch.Generator().manual_seed(0)
    ref = measure.Reference(torch.randn(5, 50, generator=gen), torch.zeros(4, dtype=torch.long), None)
    noisy = ref.logits + 0.01 * torch.randn(5, 50, generator=gen)
    err, agree = measure.compare(noisy, ref)
    expected = ((noisy.double() - ref.logits.double()).norm() / ref.logits.double().norm()).item()
    assert err == pytest.approx(expected, rel=1e-12)
    assert agree == (noisy.argmax(-1) == ref.logits.argmax(-1)).double().mean().item()
    assert measure.compare(noisy.fill_(float("nan")), ref) == (float("inf"), 0.0)


def test_parity_gate_is_eager_error_times_margin_with_a_floor():
    eager = measure.BackendResult("eager", rel_err=0.01)
    assert measure.parity_gate(eager) == pytest.approx(measure.PARITY_MARGIN * 0.01)
    assert measure.parity_gate(measure.BackendResult("eager", rel_err=0.0)) == measure.PARITY_FLOOR
    assert measure.parity_gate(measure.BackendResult("eager", status="error")) is None


def test_eager_bf16_parity_and_cpu_speed_path(tiny):
    result = _run(backends.BACKENDS["eager"], tiny, speed=True)
    assert result.status == "ok", result.note
    assert 1e-4 < result.rel_err < 0.1 and result.agreement > 0.5
    assert [d["batch"] for d in result.decode] == TINY_WORKLOAD.decode_batches
    assert [p["tokens"] for p in result.prefill] == TINY_WORKLOAD.prefill_lengths
    facts = models.describe(tiny[0])
    for d in result.decode:      # roofline % = ideal bytes / copy bandwidth ÷ measured step time
        context = measure.DECODE_CONTEXT + measure.DECODE_WARMUP + TINY_WORKLOAD.decode_steps / 2
        kv = 2 * facts["layers"] * d["batch"] * facts["kv_heads"] * context * facts["head_dim"] * 2
        ideal_ms = (facts["streamed_params"] * 2 + kv) / 100e9 * 1e3
        assert d["roofline_pct"] == pytest.approx(100 * ideal_ms / d["step_ms"])
        assert d["tok_s"] == pytest.approx(d["batch"] * 1e3 / d["step_ms"])
        assert d["p50_ms"] <= d["p99_ms"]


def test_parity_is_the_mean_over_prompts_each_judged_on_its_own_reference(tiny):
    """Two prompts: per-prompt errors equal single-prompt runs, the reported error is their mean."""
    model, pool, ref = tiny
    with torch.no_grad():
        model.float()
        other = measure.reference(model, pool, TINY_WORKLOAD, seed=4)
        models.cast_parameters(model, torch.bfloat16)
    assert not torch.equal(other.prompt, ref.prompt)
    eager = backends.BACKENDS["eager"]
    args = (TINY_WORKLOAD, None, models.describe(model), dict(copy_gbs=100.0, gemm_tflops=1.0),
            lambda msg: None, 3)
    both = measure.run_backend(eager, model, pool, [ref, other], *args, speed=False)
    singles = [measure.run_backend(eager, model, pool, [r], *args, speed=False) for r in (ref, other)]
    assert both.rel_errs == [s.rel_err for s in singles]
    assert both.rel_err == pytest.approx(sum(both.rel_errs) / 2)
    assert both.agreement == pytest.approx((singles[0].agreement + singles[1].agreement) / 2)
    assert "err per prompt" in report.summary_rows([both])[0]


def _spec_with(fn_factory, name="broken"):
    import contextlib

    @contextlib.contextmanager
    def make(model):
        yield backends.Runner(fn_factory(model), model)
    return backends.BackendSpec(name, make, compiled=False)


def test_a_backend_off_by_more_than_the_margin_gets_no_speed(tiny):
    def noisy(model):
        def fn(**kwargs):
            out = model(**kwargs)
            out.logits = out.logits + 0.5 * out.logits.std() * torch.randn_like(out.logits)
            return out
        return fn
    result = _run(_spec_with(noisy), tiny, gate=0.02, speed=True)
    assert result.status == "mismatch" and "eager" in result.note
    assert result.decode == [] and result.prefill == []


def test_a_failing_backend_becomes_an_error_row(tiny):
    def failing(model):
        def fn(**kwargs):
            raise RuntimeError("kernel exploded\nsecond line")
        return fn
    result = _run(_spec_with(failing), tiny, gate=1.0)
    assert result.status == "error"
    assert result.note == "parity: RuntimeError: kernel exploded"


def test_liger_patches_are_undone(monkeypatch, tiny):
    """Liger rewrites globals of the HF modeling module; after its run eager must see HF's own code."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    seen = {}

    def apply_liger_kernel_to_llama(model, **kwargs):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_llama.LIGER_ADDED = True
        seen["kwargs"], seen["copy"] = kwargs, model

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_llama = apply_liger_kernel_to_llama
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = tiny[0]
    with backends.BACKENDS["liger"].make(model) as runner:
        assert modeling_llama.apply_rotary_pos_emb is not original
        assert runner.fn is seen["copy"] and runner.fn is not model
    assert modeling_llama.apply_rotary_pos_emb is original
    assert not hasattr(modeling_llama, "LIGER_ADDED")
    assert seen["kwargs"]["fused_linear_cross_entropy"] is False    # logits must stay materialized


def test_report_tables_ratios_and_plot(tmp_path):
    eager = measure.BackendResult("eager", rel_err=0.01, agreement=1.0,
                                  decode=[dict(batch=1, tok_s=100.0, step_ms=10.0, p50_ms=10.0, p99_ms=11.0,
                                               roofline_pct=50.0, first_call_s=0.1)],
                                  prefill=[dict(tokens=512, tok_s=1000.0, ms=512.0, tflops=1.0,
                                                gemm_peak_pct=1.0, first_call_s=0.2)])
    fast = measure.BackendResult("inductor-ro", rel_err=0.012, agreement=1.0,
                                 decode=[dict(eager.decode[0], tok_s=250.0)])
    broken = measure.BackendResult("fusedops", status="error", note="parity: ValueError: x")
    text = report.markdown({"model": "m", "device": "d"}, [eager, fast, broken], None)
    row = next(line for line in text.splitlines() if line.startswith("| inductor-ro | 1 |"))
    assert "2.50×" in row and "| 1.00× |" in row           # vs eager, vs itself
    assert "| fusedops | error |" in text and "parity: ValueError: x" in text
    assert report.plot([broken], "t", tmp_path / "none.png") == "no speed numbers to plot"
    pytest.importorskip("matplotlib")
    assert report.plot([eager, fast], "t", tmp_path / "p.png") is None
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
