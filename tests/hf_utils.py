"""Tiny random Hugging Face Llamas for comparing minisdpo's model against transformers."""
from __future__ import annotations

import warnings

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  # small, so that head_dim 16 at theta 5e5 has all three bands: kept (wavelength
                  # 6.3 < 40/4), smoothed (32.3) and divided by the factor (166 and up > 40/1)
                  "original_max_position_embeddings": 40}

# Each case stresses one thing that a wrong implementation would get wrong.
CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "head_dim_odd_vocab": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, vocab_size=101),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0,
                        rope_scaling=dict(LLAMA3_SCALING)),
}


def tiny_config(**overrides) -> LlamaConfig:
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
              # large initial weights: logits of order 1, so a 1e-5 tolerance means something
              initializer_range=0.2, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(tiny_config(**overrides))
    # RMSNorm weights start at 1: randomise them too, so a misplaced norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def padded_batch(vocab_size: int, T: int = 16, pad: int = 5, seed: int = 1, left: bool = True):
    """input_ids (2, T), attention_mask (2, T): row 0 full, row 1 with `pad` padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    if left:
        mask[1, :pad] = 0
    else:
        mask[1, T - pad:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
