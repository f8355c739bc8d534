"""A run directory of ``python -m minisdpo.train`` and the settings that its readers share.

``train`` writes a run and ``recommend`` reads one; both take the stage names, the places of the
models and the dtype rule from here, so neither imports the other (docs/design.md section 2).

A run directory ``OUT`` holds ``config.json`` (every flag that can change results),
``sft/model`` (the SFT model as a Hugging Face directory, with its tokenizer),
``<stage>/adapter`` for ``sdpo`` and ``dpo`` (PEFT LoRA adapters on top of the SFT model, or,
with ``--sdpo-init sft-adapter``, on top of the base model that ``<stage>/done.json`` names:
``adapter_base``), ``<stage>/done.json``, ``metrics.jsonl``, ``summary.json`` and ``plots/``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

__all__ = ["STAGES", "sft_model_dir", "adapter_dir", "adapter_base", "model_kind", "cpu_has_bf16", "default_dtype",
           "atomic_save", "atomic_write_json", "atomic_dir", "append_jsonl", "truncate_metrics"]

STAGES = ("sft", "sdpo", "dpo")


def sft_model_dir(out: Path) -> Path:
    return Path(out) / "sft" / "model"


def adapter_dir(out: Path, stage: str) -> Path:
    return Path(out) / stage / "adapter"


def adapter_base(out: Path, stage: str) -> Path:
    """The model directory that a preference stage's adapter applies to: the run's SFT model
    (``OUT/sft/model``), unless the stage continued the SFT adapter (``--sdpo-init sft-adapter``):
    then the base model the SFT adapter was trained on, recorded as ``adapter_base`` in
    ``OUT/<stage>/done.json`` (and as the adapter's ``base_model_name_or_path``)."""
    try:
        base = json.loads((Path(out) / stage / "done.json").read_text()).get("adapter_base")
    except (OSError, ValueError, AttributeError):
        base = None
    return Path(base) if base else sft_model_dir(out)


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


# Files of a run: written atomically, so an interruption never leaves half a file.

def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def atomic_dir(write, path: Path) -> None:
    """Write a directory through ``write(tmp_dir)`` and rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path, stage: str, step: int) -> None:
    """On resume, drop the records an interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line and not ((r := json.loads(line))["stage"] == stage and r["step"] > step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
