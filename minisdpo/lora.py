"""LoRA: low-rank adapters on linear layers, and adapter files in PEFT's format.

Follows "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021), eq. (3):
h = W0 x + (alpha / r) * B A x, with A (r x in) kaiming-uniform (a = sqrt(5)) and B (out x r)
zero, so training starts from the base model. Written in the manner of loralib and litgpt (a
``merged`` flag, ``mark_only_lora_as_trainable``); files match Hugging Face PEFT:
``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` /
``.lora_B.weight``, beside ``adapter_config.json``. LoRA on some layers only (``layers=``) is
PEFT's ``layers_to_transform``: with the layers below the lowest adapted one frozen, their
output is a fixed function of the input (the frozen-prefix cache, ``minisdpo.prefix``).

The wrapped layer keeps the base ``weight`` (and ``bias``) under the same names, so the model's
own tensor names do not change. Merging is explicit (``merge_lora``), never a side effect of
``.train()``/``.eval()``. The S-DPO reference model is the same model inside ``reference``:
with its adapter disabled (``disable_lora``) when the adapter starts at zero on the SFT model,
or, after ``freeze_reference``, with a frozen copy of the adapter's starting weights in place of
the trained ones (the official S-DPO set-up, which keeps training the SFT adapter): a copy of
the adapter only, never of the base weights. Adapter weights of a half-precision base are kept
in float32, as PEFT does, so small updates are not lost to rounding.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = ["LoRALinear", "apply_lora", "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora",
           "disable_lora", "freeze_reference", "has_frozen_reference", "reference", "merge_and_unload",
           "lora_state_dict", "load_lora_state_dict", "save_adapter", "load_adapter",
           "adapted_layers", "top_layers", "DEFAULT_TARGETS"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")   # PEFT's default layers_pattern for a Llama


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * lora_B(lora_A(dropout(x)))``, taking over ``base``'s parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias     # same Parameters: no copy
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        w = base.weight
        lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=lora_dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        # A frozen copy of the adapter (freeze_reference): used instead of lora_A / lora_B, and
        # without dropout, while ``use_reference`` is set (inside ``reference``). Buffers that
        # follow .to(device) but stay out of the state dict and the adapter files.
        self.register_buffer("ref_A", None, persistent=False)
        self.register_buffer("ref_B", None, persistent=False)
        self.use_reference = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B A, (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return out
        # The adapter's product runs in the activations' dtype: for a bfloat16 base the float32
        # A and B (kept so the optimizer's small updates are not rounded away) are rounded for
        # the product, instead of converting the (tokens, in) activations to float32 and the
        # (tokens, out) result back, which cost more than the rank-r products themselves.
        # Gradients still reach A and B in float32, through the rounding.
        if self.use_reference:      # the frozen copy: the reference model, deterministic
            a, b, x_in = self.ref_A, self.ref_B, x
        else:
            a, b, x_in = self.lora_A.weight, self.lora_B.weight, _dropout(x, self.dropout)
        if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)
        h = F.linear(x_in, a)                                            # (..., r)
        # out + scaling * h @ B^T in one GEMM that accumulates into out: no (tokens, out)
        # temporaries for the product, the scaling and the sum.
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                           alpha=self.scaling).view(out.shape)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _dropout(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module(x)`` for the adapter's nn.Dropout (or Identity), with the keep mask drawn from
    float32 uniforms: the same Bernoulli(1 - p) mask and 1 / (1 - p) scaling as F.dropout, but
    torch.rand draws a (tokens, in) mask faster than the bernoulli_ that F.dropout uses on the
    CPU, and a training step draws 7 such masks per layer (docs/benchmarks.md, "Profile of our
    step")."""
    if not (isinstance(module, nn.Dropout) and module.training and module.p > 0):
        return module(x)
    keep = torch.rand(x.shape, device=x.device) >= module.p
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - module.p))


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layer_of(name: str) -> int | None:
    """The block index in a module name (``model.layers.3.self_attn.q_proj`` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def adapted_layers(model: nn.Module) -> list[int]:
    """The block indices that hold LoRA layers, sorted (empty without LoRA)."""
    return sorted({i for name in _lora_layers(model) if (i := _layer_of(name)) is not None})


def top_layers(n_layers: int, n: int | None) -> list[int] | None:
    """The indices of the top ``n`` of ``n_layers`` blocks, or None (every layer) when n is None."""
    if n is None:
        return None
    if not isinstance(n, int) or not 1 <= n <= n_layers:
        raise ValueError(f"the number of LoRA layers must be an int in [1, {n_layers}], got {n!r}")
    return list(range(n_layers - n, n_layers))


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    # PEFT's rule: a string is a regular expression on the full module name; a list names the
    # last component(s) of the name.
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] = DEFAULT_TARGETS,
               layers: Sequence[int] | None = None) -> nn.Module:
    """Replace each matching ``nn.Linear`` of ``model`` with a ``LoRALinear`` (in place); returns model.

    ``layers``: adapt only the modules of these blocks (``model.layers.<i>.``), PEFT's
    ``layers_to_transform``; None adapts every matching module.
    """
    if _lora_layers(model):
        raise ValueError("the model already has LoRA layers")
    targets = [name for name, m in model.named_modules() if name and _matches(name, target_modules)]
    if layers is not None:
        if isinstance(layers, int) or not layers:
            raise ValueError(f"layers must be a non-empty sequence of block indices or None, got {layers!r}")
        blocks = {_layer_of(name) for name, _ in model.named_modules()} - {None}
        unknown = sorted(set(layers) - blocks)
        if unknown:
            raise ValueError(f"layers {unknown} are not blocks of the model (it has {len(blocks)})")
        targets = [name for name in targets if _layer_of(name) in set(layers)]
    if not targets:
        raise ValueError(f"target_modules {target_modules!r} match no module of the model"
                         + (f" in layers {list(layers)}" if layers is not None else ""))
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(base).__name__}, not an nn.Linear")
        layer = LoRALinear(base, r, alpha, dropout)
        layer.train(base.training)  # a new module starts in training mode: keep the model's mode
        setattr(parent, child, layer)
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """requires_grad only on the lora_A / lora_B weights."""
    if not _lora_layers(model):
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in name or ".lora_B." in name


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (idempotent)."""
    for layer in _lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every adapter back out of its base weight (idempotent)."""
    for layer in _lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain ``nn.Linear`` layers back (in place).

    The result is a base model again (what ``save_pretrained`` writes), e.g. the SFT model that
    a second adapter, S-DPO's, is trained on top of.
    """
    for name, layer in _lora_layers(model).items():
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight, linear.bias = layer.weight, layer.bias       # the merged Parameters, no copy
        linear.weight.requires_grad_(True)
        linear.train(layer.training)
        setattr(model.get_submodule(parent_name), child, linear)
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its base: the S-DPO reference, with no second copy of weights."""
    layers = list(_lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("disable_lora on a merged model: call unmerge_lora first")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.enabled = was


def freeze_reference(model: nn.Module) -> None:
    """Keep a frozen copy of the adapter's current weights as the model's reference.

    The official S-DPO stage keeps training the SFT adapter, with the base + the SFT adapter
    frozen as its reference model. Here the reference is this copy of the adapter (r x in and
    out x r per layer, no copy of the base), used by ``reference(model)`` in place of the
    trained weights: at the moment of the call the policy and its reference are the same model.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to freeze as a reference")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("freeze_reference on a merged model: call unmerge_lora first")
    with torch.no_grad():
        for layer in layers.values():
            layer.ref_A = layer.lora_A.weight.detach().clone()
            layer.ref_B = layer.lora_B.weight.detach().clone()


def has_frozen_reference(model: nn.Module) -> bool:
    """Whether ``freeze_reference`` gave the model's adapter a frozen copy (on every LoRA layer)."""
    layers = list(_lora_layers(model).values())
    frozen = [layer.ref_A is not None for layer in layers]
    if any(frozen) and not all(frozen):
        raise RuntimeError("only some LoRA layers have a frozen reference copy: call freeze_reference")
    return bool(layers) and all(frozen)


@contextmanager
def reference(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is its frozen reference model: the base with the frozen copy of
    its adapter (``freeze_reference``; no dropout in the adapter's path), or, without a copy,
    the base with the adapter disabled (``disable_lora``). No weights are changed, so gradients
    and autograd's saved tensors of the trained adapter are untouched; run it under no_grad."""
    if not has_frozen_reference(model):
        with disable_lora(model):
            yield model
        return
    layers = list(_lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("reference on a merged model: call unmerge_lora first")
    previous = [(layer.enabled, layer.use_reference) for layer in layers]
    for layer in layers:
        layer.enabled, layer.use_reference = True, True
    try:
        yield model
    finally:
        for layer, (enabled, use) in zip(layers, previous):
            layer.enabled, layer.use_reference = enabled, use


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the model's own names (``...q_proj.lora_A.weight``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``lora_state_dict``: every adapter tensor must be given, with its shape."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"adapter tensors do not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise ValueError(f"shape mismatch for adapter tensor {name!r}: {tuple(t.shape)} vs the model's "
                             f"{tuple(own[name].shape)}")
    if any(layer.merged for layer in _lora_layers(model).values()):
        raise RuntimeError("load an adapter into an unmerged model: call unmerge_lora first")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)


def save_adapter(model: nn.Module, directory: str, base_model: str | None = None) -> None:
    """Write the adapter as PEFT does: adapter_model.safetensors and adapter_config.json
    (``base_model``: the model it applies to, PEFT's ``base_model_name_or_path``)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    ranks = {(layer.r, layer.alpha, _dropout_p(layer)) for layer in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"layers differ in (r, alpha, dropout): {sorted(ranks)}; PEFT's file needs one")
    r, alpha, dropout = ranks.pop()
    blocks = {_layer_of(name) for name, _ in model.named_modules()} - {None}
    adapted = adapted_layers(model)
    transform = None if set(adapted) == blocks else adapted
    os.makedirs(directory, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted({name.rpartition(".")[2] for name in layers}), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": transform,
        "layers_pattern": None if transform is None else "layers",
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model, "revision": None,
    }
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def _dropout_p(layer: LoRALinear) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, applying LoRA first if it has none."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing {os.path.basename(path)} in adapter directory {directory!r}")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"unsupported peft_type {config.get('peft_type')!r}: only LORA")
    unsupported = {"bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
                   "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    for key, ok in unsupported.items():
        if config.get(key, ok) not in (ok, None):
            raise ValueError(f"unsupported adapter_config {key}={config[key]!r} (supported: {ok!r})")
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if config.get("layers_pattern") not in (None, "layers", ["layers"]):
        raise ValueError(f"unsupported adapter_config layers_pattern={config['layers_pattern']!r} "
                         f"(supported: 'layers')")
    if not _lora_layers(model):
        apply_lora(model, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                   target_modules=config["target_modules"], layers=layers)
    for name, layer in _lora_layers(model).items():
        if (layer.r, layer.scaling) != (config["r"], config["lora_alpha"] / config["r"]):
            raise ValueError(f"layer {name!r} has r={layer.r}, alpha={layer.alpha}; the adapter has "
                             f"r={config['r']}, lora_alpha={config['lora_alpha']}")
    state = {}
    for key, t in load_file(weights_path).items():
        if not key.startswith(PEFT_PREFIX):
            raise KeyError(f"adapter tensor {key!r} does not start with {PEFT_PREFIX!r}")
        # Some PEFT versions keep the adapter name: ...lora_A.default.weight
        state[key[len(PEFT_PREFIX):].replace(".default.weight", ".weight")] = t
    load_lora_state_dict(model, state)
    return model
