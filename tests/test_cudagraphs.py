"""fusedops/backend/cudagraphs.py: input classes, signatures, capture bookkeeping (CPU, with a
recording stand-in for the CUDA graph) and real capture/replay on the GPU."""
import pytest
import torch
import torch.fx

from fusedops.backend.cudagraphs import GraphRunner, cuda_graph_blocker, mutated_placeholders
from fusedops.backend.options import parse_options


def trace(fn):
    return torch.fx.symbolic_trace(fn)


def dynamo_graph(fn, *args):
    """The GraphModule Dynamo hands a backend for fn(*args) (one graph, no breaks)."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    return graphs[0]


# ---- which placeholders a graph mutates ----------------------------------------------------------

def test_mutated_direct_view_setitem_and_out():
    def f(x, cache, pos, counter, buf, other, weight):
        cache.index_copy_(2, pos, x)            # StaticCache write
        counter.add_(1)                          # cumulative_length
        buf.view(-1)[0] = 1.0                    # setitem through a view
        torch.mul(weight, 2, out=other.transpose(0, 1)[:, 0])
        return cache.sum() + weight.sum()
    args = (torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 4, 2), torch.tensor([1]), torch.zeros(()),
            torch.zeros(3), torch.zeros(2, 3), torch.ones(3))
    gm = dynamo_graph(f, *args)
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    mutated = sorted(names[i] for i in mutated_placeholders(gm))
    assert mutated == ["l_buf_", "l_cache_", "l_counter_", "l_other_"], (names, mutated)


def test_not_mutated_by_out_of_place_ops():
    def f(x, w):
        y = x.float().pow(2).mean(-1, keepdim=True)
        return torch.rsqrt(y + 1e-6) * w.to(x.dtype)
    assert mutated_placeholders(trace(f)) == set()


def test_hf_static_cache_graph_marks_cache_and_counter_mutated():
    transformers = pytest.importorskip("transformers")
    from fusedops.backend import compile_graph
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    cache = transformers.StaticCache(config=cfg, max_cache_len=16)
    seen = {}

    def spy(gm, example_inputs):
        names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
        seen["mutated"] = sorted(names[i] for i in mutated_placeholders(gm))
        fn, _ = compile_graph(gm, example_inputs, parse_options(options={"log": False}))
        rewritten = fn.__self__   # cache writes are now fusedops::rope_cache_write (schema: Tensor(a!))
        seen["rewritten"] = sorted(names[i] for i in mutated_placeholders(rewritten))
        seen["ops"] = {str(n.target) for n in rewritten.graph.nodes}
        return fn

    compiled = torch.compile(model, backend=spy)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache, cache_position=torch.arange(3))
        compiled(torch.tensor([[4]]), past_key_values=cache, cache_position=torch.tensor([3]))
    mutated = seen["mutated"]
    assert len(mutated) == 3 * cfg.num_hidden_layers, mutated
    assert sum(n.endswith("_keys") for n in mutated) == sum(n.endswith("_values") for n in mutated) == 2
    assert not any("parameters" in n for n in mutated)
    if "fusedops.rope_cache_write.default" in seen["ops"]:
        assert seen["rewritten"] == mutated


def test_blocker_reasons():
    cpu = torch.zeros(2)
    assert "CUDA" in cuda_graph_blocker([cpu], needs_grad=False)
    assert "autograd" in cuda_graph_blocker([cpu], needs_grad=True)
    assert cuda_graph_blocker([3], needs_grad=False) is not None


# ---- capture bookkeeping on CPU: a stand-in graph that records fn and its static args ------------

class RecordedGraph:
    """Replays fn(*static args) into the outputs captured first, as a CUDA graph would: the same
    output tensors every time, inputs read from the static buffers."""
    def __init__(self, fn, call_args, outputs):
        self.fn, self.call_args, self.outputs = fn, call_args, outputs

    def replay(self):
        fresh = self.fn(*self.call_args)
        for static, new in zip(self.outputs, fresh):
            if isinstance(static, torch.Tensor) and static is not new:
                static.copy_(new)


class RecordingRunner(GraphRunner):
    captures = 0

    def _record(self, call_args):
        # a real capture executes nothing: undo the recording run's writes to mutated inputs
        saved = [(call_args[i], call_args[i].clone()) for i in self.stable_idx]
        outputs = self.fn(*call_args)
        outputs = tuple(o.clone() if all(o is not a for a in call_args) else o for o in outputs)
        for t, before in saved:
            t.copy_(before)
        self.captures += 1
        return RecordedGraph(self.fn, call_args, outputs), outputs


def make_runner(fn, example_inputs, **options):
    gm = trace(fn)
    options.setdefault("log", False)
    return RecordingRunner(gm.forward, gm, list(example_inputs), parse_options(options=options))


def decode_step(ids, cache, pos, weight):
    """A StaticCache-like step: write at pos, read the whole cache."""
    cache.index_copy_(0, pos, weight[ids])
    return (cache.sum(0) * 2.0, ids)


def static_weight(n=4):
    w = torch.nn.Parameter(torch.randn(10, n), requires_grad=False)
    return w


def test_input_classes_and_replay_matches_eager():
    w = static_weight()
    cache, ref_cache = torch.zeros(8, 4), torch.zeros(8, 4)
    runner = make_runner(decode_step, [torch.tensor([1]), cache, torch.tensor([0]), w])
    assert runner.stable_idx == [1, 3] and runner.dynamic_idx == [0, 2]
    for step in range(6):
        ids, pos = torch.tensor([step % 10]), torch.tensor([step])
        out, ids_out = runner(ids, cache, pos, w)
        ref, _ = decode_step(ids, ref_cache, pos, w)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)   # written exactly once per call
        assert ids_out is ids                                          # an input comes back as itself
    assert runner.captures == 1 and len(runner.graphs) == 1


def test_warmup_calls_run_eagerly_before_capture():
    w = static_weight()
    runner = make_runner(decode_step, [torch.tensor([1]), torch.zeros(8, 4), torch.tensor([0]), w],
                         warmup=3)
    cache = torch.zeros(8, 4)
    for step in range(3):
        runner(torch.tensor([1]), cache, torch.tensor([step]), w)
    assert runner.captures == 0
    runner(torch.tensor([1]), cache, torch.tensor([3]), w)
    assert runner.captures == 1


def test_clone_outputs_versus_static_outputs():
    w = static_weight()
    cache = torch.zeros(8, 4)
    args = lambda step: (torch.tensor([step]), cache, torch.tensor([step]), w)  # noqa: E731
    static = make_runner(decode_step, args(0), clone_outputs=False)
    cloned = make_runner(decode_step, args(0), clone_outputs=True)
    for runner in (static, cloned):
        runner(*args(0))                       # warm-up
        first = runner(*args(1))[0]            # captured and replayed
        kept = first.clone()
        second = runner(*args(2))[0]
        if runner is static:
            assert second is first             # one static buffer, overwritten by the next call
        else:
            assert second is not first and torch.equal(first, kept)


def test_moved_stable_input_recaptures_never_replays_stale_address():
    w = static_weight()
    runner = make_runner(decode_step, [torch.tensor([1]), torch.zeros(8, 4), torch.tensor([0]), w])
    caches = [torch.zeros(8, 4) for _ in range(2)]
    ref = [torch.zeros(8, 4) for _ in range(2)]
    for step in range(8):
        which = step // 4                       # switch to a new cache half-way (a new generate call)
        runner(torch.tensor([step]), caches[which], torch.tensor([step % 4]), w)
        decode_step(torch.tensor([step]), ref[which], torch.tensor([step % 4]), w)
    for got, want in zip(caches, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert runner.captures == 2 and not runner.eager_only


def test_thrashing_stable_input_falls_back_to_eager():
    w = static_weight()
    runner = make_runner(decode_step, [torch.tensor([1]), torch.zeros(8, 4), torch.tensor([0]), w])
    for step in range(10):
        cache = torch.zeros(8, 4)               # a fresh buffer every call
        out, _ = runner(torch.tensor([step]), cache, torch.tensor([0]), w)
        torch.testing.assert_close(out, 2.0 * w[step], rtol=0, atol=0)
    assert list(runner.eager_only.values()) == ["stable input cache changes address on every call"]
    assert runner.captures <= 4


def dynamic_step(ids, cache, w):
    cache.add_(1.0)
    return (w[ids].sum(1) + cache.sum(),)


def dynamic_runner(**options):
    """A graph compiled with a symbolic token dimension, as Dynamo hands it over after a recompile."""
    captured = {}

    def backend(gm, example_inputs):
        options.setdefault("log", False)
        captured["runner"] = RecordingRunner(gm.forward, gm, list(example_inputs),
                                             parse_options(options=options))
        return captured["runner"]

    compiled = torch.compile(dynamic_step, backend=backend, dynamic=True)
    return compiled, captured


def test_signatures_lru_and_buckets():
    w = static_weight()
    cache = torch.zeros(3)
    compiled, captured = dynamic_runner(max_graphs=2, buckets=[2, 3, 5])
    ref_cache = torch.zeros(3)
    # sizes >= 2: Dynamo specializes size 1 into a graph of its own
    for n in [2, 3, 2, 3, 5, 5, 4, 4, 2, 2]:
        ids = torch.arange(n).view(1, n) % 10
        got = compiled(ids, cache, w)[0]
        want = dynamic_step(ids, ref_cache, w)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
    runner = captured["runner"]
    assert len(runner.graphs) == 2                                      # LRU bound
    held = list(runner.graphs)                                          # least recent first
    assert (1, 5) in held[0] and (1, 2) in held[1], held
    assert any("4 tokens not in buckets" in r for r in runner.eager_only.values())


def test_max_graph_tokens_without_buckets():
    w = static_weight()
    compiled, captured = dynamic_runner(max_graph_tokens=2)
    cache = torch.zeros(7)  # a size no token count shares (Dynamo would duck-size them together)
    for n in [3, 3, 3, 2, 2, 2]:
        compiled(torch.arange(n).view(1, n), cache, w)
    runner = captured["runner"]
    assert runner.captures == 1
    assert any("> max_graph_tokens 2" in r for r in runner.eager_only.values())


def test_hf_static_cache_decode_through_recorded_graphs():
    """The real HF decode graph, rewritten by fusedops, run through the runner's capture/replay logic."""
    transformers = pytest.importorskip("transformers")
    from fusedops.backend import compile_graph

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    runners = []

    def backend(gm, example_inputs):
        opts = parse_options(options={"cuda_graphs": False, "log": False})
        fn, _ = compile_graph(gm, example_inputs, opts)
        gm_rewritten = fn.__self__
        runners.append(RecordingRunner(fn, gm_rewritten, list(example_inputs),
                                       parse_options(mode="reduce-overhead", options=None)))
        return runners[-1]

    compiled = torch.compile(model, backend=backend)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits, caches = {}, {}
    with torch.no_grad():
        for name, fn in (("eager", model), ("fused", compiled)):
            cache = transformers.StaticCache(config=cfg, max_cache_len=16)
            out = model(ids, past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
            for layer in cache.layers:   # unmark: the runner must find the cache through its mutations
                for t in (layer.keys, layer.values):
                    if hasattr(t, "_dynamo_static_input_type"):
                        del t._dynamo_static_input_type
            token, steps = out.logits[:, -1:].argmax(-1), []
            for step in range(6):
                out = fn(token, past_key_values=cache, cache_position=torch.tensor([4 + step]), use_cache=True)
                steps.append(out.logits.clone())
                token = out.logits[:, -1:].argmax(-1)
            logits[name], caches[name] = torch.cat(steps, 1), cache
    torch.testing.assert_close(logits["fused"], logits["eager"], rtol=1e-4, atol=1e-5)
    for a, b in zip(caches["fused"].layers, caches["eager"].layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
    assert len(runners) == 1 and runners[0].captures == 1
    assert next(iter(runners[0].graphs.values())).replays == 5


# ---- the real thing on the GPU --------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_capture_replay_matches_eager_with_mutation():
    w = torch.nn.Parameter(torch.randn(10, 64, device="cuda"), requires_grad=False)
    cache, ref_cache = torch.zeros(32, 64, device="cuda"), torch.zeros(32, 64, device="cuda")
    gm = trace(decode_step)
    runner = GraphRunner(gm.forward, gm, [torch.tensor([1], device="cuda"), cache,
                                          torch.tensor([0], device="cuda"), w],
                         parse_options(mode="reduce-overhead", options=None))
    for step in range(20):
        ids = torch.tensor([step % 10], device="cuda")
        pos = torch.tensor([step], device="cuda")
        out, _ = runner(ids, cache, pos, w)
        ref, _ = decode_step(ids, ref_cache, pos, w)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)
    assert len(runner.graphs) == 1 and runner.graphs[None].replays == 19


@pytest.mark.gpu
def test_cuda_moved_cache_recaptures():
    w = torch.nn.Parameter(torch.randn(10, 64, device="cuda"), requires_grad=False)
    gm = trace(decode_step)
    example = [torch.tensor([1], device="cuda"), torch.zeros(8, 64, device="cuda"),
               torch.tensor([0], device="cuda"), w]
    runner = GraphRunner(gm.forward, gm, example, parse_options(mode="reduce-overhead"))
    caches = [torch.zeros(8, 64, device="cuda") for _ in range(2)]
    refs = [torch.zeros(8, 64, device="cuda") for _ in range(2)]
    for step in range(8):
        which = step // 4
        ids, pos = torch.tensor([step], device="cuda"), torch.tensor([step % 4], device="cuda")
        out, _ = runner(ids, caches[which], pos, w)
        ref, _ = decode_step(ids, refs[which], pos, w)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(caches, refs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(runner.graphs) == 1 and not runner.eager_only


@pytest.mark.gpu
def test_cuda_capture_after_every_earlier_graph_died(monkeypatch):
    """A second compile of one model: the first compile's graphs are gone but the caller still holds
    an output they allocated from the shared pool. The next capture must still work (before the
    sentinel graph it hit the allocator's `use_count > 0` assert and ran eagerly)."""
    import gc
    from fusedops.backend import cudagraphs
    monkeypatch.setattr(cudagraphs, "_pools", {})      # a fresh pool, whatever earlier tests captured
    w = torch.nn.Parameter(torch.randn(10, 64, device="cuda"), requires_grad=False)
    gm = trace(decode_step)
    kept = []
    for attempt in range(3):
        cache = torch.zeros(8, 64, device="cuda")
        runner = GraphRunner(gm.forward, gm, [torch.tensor([1], device="cuda"), cache,
                                              torch.tensor([0], device="cuda"), w],
                             parse_options(mode="reduce-overhead"))
        for step in range(3):
            out, _ = runner(torch.tensor([step], device="cuda"), cache, torch.tensor([step], device="cuda"), w)
        assert not runner.eager_only, f"compile {attempt}: {runner.eager_only}"
        assert runner.graphs[None].replays == 2
        kept.append(out)                                 # a static output outlives its graph
        del runner
        gc.collect()


def cuda_llama(dtype, layers=2, seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=503,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval()
    return model, cfg


def spy_backend(runners):
    from fusedops.backend import fusedops_backend

    def backend(gm, example_inputs, mode=None, options=None):
        fn = fusedops_backend(gm, example_inputs, mode=mode, options=options)
        runners.append(fn)
        return fn
    return backend


def decode_logits(model, cfg, compiled, ids, steps):
    """Prefill eagerly into a StaticCache, then `steps` greedy decode steps through `compiled`;
    returns the logits of every step and the cache."""
    transformers = pytest.importorskip("transformers")
    cache = transformers.StaticCache(config=cfg, max_cache_len=64)
    n = ids.shape[1]
    out = model(ids, past_key_values=cache, cache_position=torch.arange(n, device="cuda"), use_cache=True)
    token, logits = out.logits[:, -1:].argmax(-1), []
    for step in range(steps):
        pos = torch.tensor([n + step], device="cuda")
        step_logits = compiled(token, past_key_values=cache, cache_position=pos, use_cache=True).logits
        logits.append(step_logits.clone())
        token = step_logits[:, -1:].argmax(-1)
    return torch.cat(logits, 1), cache


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_hf_decode_under_cuda_graphs_matches_eager_fp32(mode):
    model, cfg = cuda_llama(torch.float32)
    ids = torch.randint(3, 503, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runners = []
    compiled = torch.compile(model, backend=spy_backend(runners), mode=mode)
    with torch.no_grad():
        want, want_cache = decode_logits(model, cfg, model, ids, steps=12)
        got, got_cache = decode_logits(model, cfg, compiled, ids, steps=12)
    err = ((got - want).norm() / want.norm()).item()
    assert err <= 1e-4, err
    for a, b in zip(got_cache.layers, want_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-4)
    graphs = [r for r in runners if isinstance(r, GraphRunner)]
    assert graphs and sum(len(r.graphs) for r in graphs) >= 1
    assert max(c.replays for r in graphs for c in r.graphs.values()) >= 10


@pytest.mark.gpu
def test_hf_generate_tokens_identical_fp32_on_cuda():
    transformers = pytest.importorskip("transformers")
    model, _ = cuda_llama(torch.float32)
    ids = torch.randint(3, 503, (1, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kwargs = dict(max_new_tokens=24, do_sample=False, cache_implementation="static")
    want = model.generate(ids, disable_compile=True, **kwargs)   # else HF compiles it with Inductor
    config = transformers.CompileConfig(backend="fusedops")
    for _ in range(2):   # the second call gets a new StaticCache: its graph is recaptured
        assert torch.equal(model.generate(ids, compile_config=config, **kwargs), want)
    model.generation_config.compile_config = transformers.CompileConfig(
        backend="fusedops", mode=None, options={"buckets": [1, 2, 4, 8]})
    assert torch.equal(model.generate(ids, **kwargs), want)


@pytest.mark.gpu
def test_hf_bf16_error_vs_fp32_reference_no_worse_than_eager():
    model, cfg = cuda_llama(torch.float32, layers=4)
    ids = torch.randint(3, 503, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
        model.to(torch.bfloat16)
        eager = model(ids).logits
        fused = torch.compile(model, backend="fusedops", mode="reduce-overhead")
        for _ in range(3):    # warm-up, capture, replay
            got = fused(ids).logits
    eager_err = ((eager.float() - reference).norm() / reference.norm()).item()
    fused_err = ((got.float() - reference).norm() / reference.norm()).item()
    assert fused_err <= 2 * eager_err, (fused_err, eager_err)   # STYLE.md rule 13
