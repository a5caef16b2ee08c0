"""Models for the comparison: Llama-family configs (a tiny default and real-shape presets) with seeded
random weights, or a local safetensors checkpoint. Every model is built in fp32 first, so the same
weights serve as the fp32 reference before they are cast to the benchmark dtype."""
from __future__ import annotations

from pathlib import Path

import torch

# Real-shape presets (public config.json values); --layers trims the depth, nothing else changes.
PRESETS = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rms_norm_eps=1e-5,
                       rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, max_position_embeddings=32768, use_sliding_window=False),
}
DEFAULT_PRESET = "tiny"

# Liger-Kernel's patch function per HF model_type.
LIGER_APPLY = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
               "qwen2": "apply_liger_kernel_to_qwen2"}


def preset_config(name: str, layers: int | None = None):
    """The HF config of a preset, optionally with fewer (or more) decoder layers."""
    from transformers import AutoConfig
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r} (choose from {', '.join(PRESETS)})")
    kwargs = dict(PRESETS[name])
    model_type = kwargs.pop("model_type")
    if layers is not None:
        kwargs["num_hidden_layers"] = _check_layers(layers)
    return AutoConfig.for_model(model_type, **kwargs)


def _check_layers(layers: int) -> int:
    if layers < 1:
        raise ValueError(f"layers: must be >= 1, got {layers}")
    return layers


def random_model(config, device: torch.device, seed: int = 0):
    """fp32 model with seeded random weights built directly on `device`. HF initializes norm weights to
    ones; they are perturbed here so a kernel that ignores the norm weight cannot pass parity."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
    return model.eval()


def checkpoint_model(path: str | Path, device: torch.device, layers: int | None = None):
    """fp32 model from a local HF directory (config.json + *.safetensors); never touches the network. Built
    from the config on `device`, then filled by fusedops.load_safetensors (mmap, pinned, side-stream copies);
    with `layers` the checkpoint's deeper layers are skipped unread."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..loader import load_safetensors
    path = Path(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(f"checkpoint: {path} needs config.json and *.safetensors files")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if layers is not None:
        config.num_hidden_layers = _check_layers(layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = load_safetensors(model, device, checkpoint=path, strict=layers is None)
    if missing:
        raise ValueError(f"checkpoint: {path} lacks {len(missing)} of the model's tensors ({', '.join(missing[:5])})")
    return model.eval()


def cast_parameters(model, dtype: torch.dtype) -> None:
    """Cast parameters only: buffers (RoPE inv_freq) stay fp32, as they do when HF loads a bf16 model,
    so the cast model is the one a user would run, not one with bf16-rounded rotary frequencies."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)


def describe(model) -> dict:
    """Shape facts the roofline and FLOP counts need."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())    # parameters() yields a tied weight once
    tied = model.get_output_embeddings().weight is embed
    # A decode step reads every weight except the embedding table (only B rows of it), unless the
    # table doubles as lm_head.
    streamed = total - (0 if tied else embed.numel())
    lm_head = model.get_output_embeddings().weight.numel()
    # per-token GEMM work of a prefill that keeps only the last logits: no embedding, no lm_head,
    # no norm weights or biases
    matmul = total - embed.numel() - (0 if tied else lm_head) - _vector_params(model)
    return dict(model_type=cfg.model_type, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                q_heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                vocab=cfg.vocab_size, params=total, streamed_params=streamed, matmul_params=matmul)


def _vector_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.dim() == 1)
