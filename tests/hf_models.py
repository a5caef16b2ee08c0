"""Tiny random HF models for backend tests (CPU): Llama, Mistral, Qwen2 (GQA, head_dim 64) and GPT-2."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

LAYERS = 2
VOCAB = 128
_COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
               bos_token_id=0, eos_token_id=1, pad_token_id=None)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "gpt2": lambda: GPT2Config(n_embd=256, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, bos_token_id=0,
                               eos_token_id=1),
}


def build(family: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # HF inits some weights to exactly 1 / 0: randomize them all
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() == 1 else 0.05)
            if p.dim() == 1 and p.shape[0] == config.hidden_size:
                p.add_(1.0)
    return model.to(dtype)
