"""A run directory of ``python -m minisdpo.train`` and the settings that its readers share.

``train`` writes a run and ``recommend`` reads one; both take the stage names, the places of the
models and the dtype rule from here, so neither imports the other (docs/design.md section 2).

A run directory ``OUT`` holds ``config.json`` (every flag that can change results),
``sft/model`` (the SFT model as a Hugging Face directory, with its tokenizer),
``<stage>/adapter`` for ``sdpo`` and ``dpo`` (PEFT LoRA adapters on top of the SFT model),
``<stage>/done.json``, ``metrics.jsonl``, ``summary.json`` and ``plots/``.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["STAGES", "sft_model_dir", "adapter_dir", "model_kind", "cpu_has_bf16", "default_dtype"]

STAGES = ("sft", "sdpo", "dpo")


def sft_model_dir(out: Path) -> Path:
    return Path(out) / "sft" / "model"


def adapter_dir(out: Path, stage: str) -> Path:
    return Path(out) / stage / "adapter"


def model_kind(model: str) -> str:
    """'scratch' for ``--model scratch`` (a small Llama trained from nothing), else 'pretrained'."""
    return "scratch" if model == "scratch" else "pretrained"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bfloat16 matmuls
    are faster than float32 ones; elsewhere they are emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(dtype: str | None, device: torch.device, model: str) -> torch.dtype:
    """``--dtype`` when given; else bfloat16 on CUDA and, for a pretrained model, on CPUs with
    native bfloat16; float32 otherwise (a model trained from scratch keeps float32 weights)."""
    if dtype:
        return getattr(torch, dtype)
    if device.type == "cuda" or (model_kind(model) == "pretrained" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32
