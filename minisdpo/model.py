"""A textbook Llama in plain PyTorch: ModelArgs, RMSNorm, RoPE, grouped-query attention, SwiGLU.

Follows "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., 2023) and
Llama 2/3 (grouped-query attention, Ainslie et al. 2023; the "llama3" RoPE frequency scaling),
written in the style of gpt-fast's model.py: one ``ModelArgs`` dataclass, a KV cache object
with explicit positions, prefill and decode kept apart. Modules are named exactly as Hugging
Face's ``LlamaForCausalLM`` names them (docs/design.md section 4), so a checkpoint loads as an
identity copy, and RoPE uses the ``rotate_half`` form those checkpoints are stored for.

Masks are boolean, True meaning "may attend". Every token may always attend to itself: a padding
row would otherwise be fully masked and turn into NaN, which then leaks through 0 * NaN in the
attention of the real tokens.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ModelArgs", "RMSNorm", "Attention", "MLP", "Block", "KVCache", "ItemTokens", "Llama", "rope_inv_freq"]


@dataclass
class ModelArgs:
    """A Llama's hyperparameters, checked when built. Reading and writing them as a Hugging Face
    ``config.json`` is ``minisdpo.checkpoint``'s (``args_from_hf_config``, ``hf_config``)."""

    vocab_size: int = 32000
    dim: int = 4096                      # the width of the residual stream
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None        # None: n_heads (multi-head); 1: multi-query
    intermediate_size: int = 11008
    head_dim: int | None = None          # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # None, or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    max_seq_len: int = 2048              # informative only
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}); give head_dim")
            self.head_dim = self.dim // self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"unsupported rope type {rope_type!r} in rope_scaling: only 'llama3' (or none)")
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling of type 'llama3' lacks {key!r}")


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """The RoPE inverse frequencies theta^(-2i/d), i < d/2, in float32; "llama3" scaled if asked."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))  # (d/2,)
    if args.rope_scaling is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Pairs dimension i with i + d/2 (the layout Hugging Face checkpoints are stored for).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, n_head, T, head_dim); cos, sin (B, 1, T, head_dim)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, then round before scaling, as the reference implementation does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` slots.

    Slots are explicit positions in the cache; they are shared by the whole batch, while RoPE
    positions (``position_ids``) are per row, so padded prompts of different lengths (left or
    right) share one cache. ``key_valid`` (B, max_len) marks the slots that hold real tokens.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)  # (B, n_kv_head, S, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at slots start..start+T; return slots 0..start+T."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, start: int, length: int) -> torch.Tensor:
        """(B, 1, length, start+length) bool: queries at slots start.. see earlier valid slots."""
        end = start + length
        q_slot = torch.arange(start, end, device=self.key_valid.device)[:, None]   # (T, 1)
        k_slot = torch.arange(end, device=self.key_valid.device)[None, :]          # (1, S)
        allowed = (k_slot <= q_slot) & self.key_valid[:, None, :end]             # (B, T, S)
        return (allowed | (k_slot == q_slot))[:, None]                            # (B, 1, T, S)


def pick(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, T, dim) at positions pos (B, Q) of each row: (B, Q, dim)."""
    return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))


class Queries(NamedTuple):
    """The positions of a layer's only queries, (B, Q), with their RoPE (B, 1, Q, head_dim) and
    their rows of the attention mask (B, 1, Q, T), True = may attend."""
    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int = 0, queries: Queries | None = None) -> torch.Tensor:
        # queries: only these positions' outputs are computed (keys and values still come from all).
        B, T, _ = x.shape
        xq, q_cos, q_sin = (x, cos, sin) if queries is None else (pick(x, queries.pos), queries.cos, queries.sin)
        Tq = xq.shape[1]
        q = self.q_proj(xq).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)   # (B, n_head, Tq, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)
        if queries is not None:
            mask = queries.mask
        if cache is not None and start == 0:
            # A prefill: the cache holds nothing before these keys, so attend over them as they are,
            # in the model's dtype, exactly as the forward pass does; the cache keeps a copy.
            cache.update(self.layer, 0, k, v)
        elif cache is not None:
            k, v = cache.update(self.layer, start, k, v)                               # (B, n_kv_head, S, head_dim)
            # A cache kept wider than the model (see Llama.cache_dtype): attend in its dtype.
            q = q.to(k.dtype)
        # Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads).
        # enable_gqa lets the kernel index the shared heads instead of copying k and v n_rep
        # times (and summing their gradients back): with a KV cache the copy was of the whole
        # cache, every layer, every decoded token.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, n_head, Tq, head_dim)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim).to(x.dtype)  # (B, Tq, n_head * head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int = 0, queries: Queries | None = None) -> torch.Tensor:
        # With queries: (B, Q, dim), the output at those positions only.
        residual = x if queries is None else pick(x, queries.pos)
        x = residual + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, queries)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The ``model.`` part of a Hugging Face checkpoint: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class ItemTokens(nn.Module):
    """Extra input tokens that stand for the rows of a frozen item table (LLaRA's hybrid prompt,
    docs/design.md section 8): with N items, input id ``vocab_size + i`` is item ``i`` in the
    history and ``vocab_size + N + i`` item ``i`` as a candidate.

    Such a token goes through the embedding and the layers below ``layer`` as the ordinary
    token ``placeholder_id``; on entering layer ``layer`` its residual stream gets
    ``proj(f)`` added, where ``f`` is the item's row of ``features`` and ``proj`` LLaRA's
    trainable projector, Linear(f, dim), GELU, Linear(dim, dim). ``layer`` 0 is LLaRA's way (at
    the input embeddings); a layer b > 0 leaves the residual stream entering b a function of
    the text alone, so a frozen-prefix cache built below b stays valid while the projector trains.

    With a ``user`` encoder (frozen: SASRec's, mapping left-padded (B, L) item sequences, 0 for
    padding, to (B, f) user representations u) a candidate's ``f`` is ``[e, u * e]``, the item's
    features beside their elementwise product with u of the row's history tokens (the last L of
    them, in order), whose sum is the encoder's score of the candidate; a history item's is
    ``[e, 0]``.

    The table and the encoder stay outside the state dict's trained part; the projector is
    float32 whatever the model's dtype (as LoRA's weights are), its output rounded to the
    activations' dtype. ``freeze_reference`` keeps a frozen copy of the projector that
    ``use_reference`` selects: the S-DPO reference when a preference stage trains it further.
    With ``spread`` (item tokens placed before their titles) the projection is also added at the
    token after each item token, the first token of its title, which a model copies to answer.
    """

    def __init__(self, features: torch.Tensor, dim: int, layer: int, placeholder_id: int,
                 user: nn.Module | None = None, history_len: int = 10, spread: bool = False):
        super().__init__()
        if features.dim() != 2 or features.shape[0] < 1:
            raise ValueError(f"features must be (items, f) with items >= 1, got shape {tuple(features.shape)}")
        if not (isinstance(layer, int) and layer >= 0):
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        self.layer, self.placeholder_id, self.history_len, self.spread = layer, placeholder_id, history_len, spread
        self.register_buffer("features", features.detach().float().clone(), persistent=False)
        self.user = None if user is None else user.float().requires_grad_(False).eval()
        f = features.shape[1] * (2 if user is not None else 1)
        self.proj = nn.Sequential(nn.Linear(f, dim), nn.GELU(), nn.Linear(dim, dim)).to(features.device)
        self.reference: nn.Module | None = None     # the frozen copy (freeze_reference)
        self.use_reference = False

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the projector's current weights as the reference's projector."""
        self.reference = copy.deepcopy(self.proj).requires_grad_(False)

    def _users(self, items: torch.Tensor, in_history: torch.Tensor) -> torch.Tensor:
        """(B, f): the user encoder on each row's history items, left-padded to history_len."""
        B, L = items.shape[0], self.history_len
        from_end = in_history.flip(-1).long().cumsum(-1).flip(-1)                # (B, T): 1 at the last
        col = torch.where(in_history & (from_end <= L), L - from_end, L)        # column L: discarded
        seqs = torch.zeros(B, L + 1, dtype=torch.long, device=items.device)
        seqs.scatter_(1, col, torch.where(in_history, items, 0))
        with torch.no_grad():
            return self.user(seqs[:, :L]).float()                               # (B, f)

    def add(self, x: torch.Tensor, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``x`` (B, T, dim) with the projected features added at the item tokens of ``input_ids``."""
        n = self.features.shape[0]
        rel = input_ids - vocab_size
        is_item, is_cand = rel >= 0, rel >= n                                   # (B, T)
        items = torch.where(is_cand, rel - n, rel).clamp(0, n - 1)              # (B, T)
        f = self.features[items]                                                # (B, T, f)
        if self.user is not None:
            u = self._users(items, is_item & ~is_cand)                          # (B, f)
            f = torch.cat([f, f * u[:, None] * is_cand.unsqueeze(-1)], -1)      # (B, T, 2f)
        proj = self.reference if self.use_reference and self.reference is not None else self.proj
        v = proj(f).to(x.dtype)                                                 # (B, T, dim)
        v = v * is_item.unsqueeze(-1).to(x.dtype)
        if self.spread:     # and at the token after each item token: the first of the title it precedes
            v = v + F.pad(v[:, :-1], (0, 0, 1, 0))
        return x + v


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # A plain attribute, not a buffer: .to(bfloat16) must not round the frequencies.
        self._inv_freq: torch.Tensor | None = None
        # Collaborative item tokens (ItemTokens; minisdpo.items attaches them): ids from
        # vocab_size on. Kept out of the Hugging Face checkpoint (save_pretrained).
        self.items: ItemTokens | None = None

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so (again after loading)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.args, device)
        freqs = position_ids[..., None].float() * self._inv_freq       # (B, T, head_dim/2), float32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]               # (B, 1, T, head_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int = 0, *, first_layer: int = 0,
                stop_layer: int | None = None, hidden: torch.Tensor | None = None,
                items: bool = True, outputs: torch.Tensor | None = None) -> torch.Tensor:
        # The residual stream enters layer first_layer as `hidden` (the embedding when first_layer
        # is 0); with stop_layer it is returned as it enters that layer, before the final norm.
        # Item tokens (ItemTokens) read as their placeholder below items.layer and get their
        # features added on entering it: a model split at that layer splits before the addition.
        # outputs (B, Q): the final states of these positions only; the last layer computes
        # their queries alone (no other position's output there is read).
        items = self.items if items else None
        if hidden is None:
            ids = input_ids if items is None else input_ids.masked_fill(input_ids >= self.args.vocab_size,
                                                                        items.placeholder_id)
            x = self.model.embed_tokens(ids)                                   # (B, T, dim)
        else:
            x = hidden
        cos, sin = self._rope(position_ids, x.dtype)
        stop = self.args.n_layers if stop_layer is None else stop_layer
        queries = None
        if outputs is not None:
            B, T = input_ids.shape
            if mask is None:                                                   # causal
                q_mask = torch.arange(T, device=x.device) <= outputs[..., None]   # (B, Q, T)
            elif mask.dim() == 2:                                              # (T, T)
                q_mask = mask[outputs]                                         # (B, Q, T)
            else:                                                              # (B or 1, 1, T, T)
                q_mask = mask.expand(B, 1, T, T)[:, 0].gather(1, outputs[..., None].expand(-1, -1, T))
            queries = Queries(outputs, *self._rope(position_ids.gather(1, outputs), x.dtype), q_mask[:, None])
            if first_layer == stop:
                x = pick(x, outputs)
        for i in range(first_layer, stop):
            if items is not None and i == items.layer:
                x = items.add(x, input_ids, self.args.vocab_size)
            x = self.model.layers[i](x, cos, sin, mask, cache, start, queries if i == stop - 1 else None)
        return x if stop_layer is not None else self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                return_hidden: bool = False, *, stop_layer: int | None = None, first_layer: int = 0,
                hidden: torch.Tensor | None = None, outputs: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or final hidden states (B, T, dim) if return_hidden.

        attention_mask (B, T): 1 for real tokens, 0 for padding (left or right).
        position_ids (B, T) or (T,): RoPE positions; by default the count of real tokens before
            each one, so left-padded rows start at 0.
        mask (T, T), (B, T, T) or (B, 1, T, T) bool, True = may attend: replaces the causal mask
            (for example a block mask: a shared prompt, responses that see the prompt and
            themselves only). It is combined with attention_mask when both are given.

        The model split at a layer b (the frozen-prefix cache, docs/design.md): ``stop_layer=b``
        returns the residual stream as it enters layer b, (B, T, dim), before any final norm;
        ``first_layer=b, hidden=h`` starts from such states and runs layers b.. only (the
        embedding and the layers below b are skipped; input_ids still give the shape). Run with
        the same positions and mask, the two halves equal the whole forward pass.

        outputs (B, Q) long: return the logits or hidden states of these positions only,
        (B, Q, ...). Every layer but the last still runs on every position (the last one's keys
        and values need them); the last computes the queries of these positions alone, so its
        attention, MLP and LM head cost Q rows instead of T.

        cache (KVCache of B rows and at least T slots): the keys and values of the layers run are
        also written to its slots 0..T-1, for ``generate`` to continue from (``generate``'s
        ``first_layer``); the result is the same as without it.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(T, device=device)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids.shape not in ((T,), (B, T)):
            raise ValueError(f"position_ids must have shape {(B, T)} or {(T,)}, got {tuple(position_ids.shape)}")
        position_ids = position_ids.expand(B, T)
        n = self.args.n_layers
        if stop_layer is not None and not (isinstance(stop_layer, int) and 0 <= stop_layer <= n):
            raise ValueError(f"stop_layer must be an int in [0, {n}], got {stop_layer!r}")
        if not (isinstance(first_layer, int) and 0 <= first_layer <= n):
            raise ValueError(f"first_layer must be an int in [0, {n}], got {first_layer!r}")
        if (hidden is None) != (first_layer == 0):
            raise ValueError("hidden (the residual stream entering first_layer) is given exactly when "
                             f"first_layer > 0; got first_layer={first_layer} and hidden "
                             f"{'given' if hidden is not None else 'None'}")
        if hidden is not None and hidden.shape != (B, T, self.args.dim):
            raise ValueError(f"hidden must have shape {(B, T, self.args.dim)}, got {tuple(hidden.shape)}")
        if cache is not None and (cache.key_valid.shape[0] != B or cache.max_len < T):
            raise ValueError(f"cache must hold {B} rows of at least {T} slots, "
                             f"got {cache.key_valid.shape[0]} rows of {cache.max_len}")
        if outputs is not None:
            if stop_layer is not None:
                raise ValueError("outputs selects final states: it does not go with stop_layer")
            if outputs.dim() != 2 or outputs.shape[0] != B or outputs.dtype != torch.long:
                raise ValueError(f"outputs must be a (B, Q) = ({B}, Q) long tensor of positions, "
                                 f"got {tuple(outputs.shape)} {outputs.dtype}")

        allowed = None                                                  # None: plain causal
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
            if mask.shape[-2:] != (T, T) or mask.dim() not in (2, 3, 4):
                raise ValueError(f"mask must be (T, T), (B, T, T) or (B, 1, T, T) with T={T}, "
                                 f"got {tuple(mask.shape)}")
            allowed = mask.view(-1, 1, T, T) if mask.dim() == 3 else mask  # (B, 1, T, T) or (T, T)
        if attention_mask is not None:
            if allowed is None:
                allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        if allowed is not None:
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=device)
        h = self._hidden(input_ids, position_ids, allowed, cache, 0, first_layer=first_layer, stop_layer=stop_layer,
                         hidden=hidden, outputs=outputs)
        return h if return_hidden or stop_layer is not None else self.lm_head(h)

    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype for ``generate``: the parameters', except float32 for a half-precision
        model on the CPU, where PyTorch's attention kernel reads a half-precision cache for a
        decoded token several times slower than a float32 one, which outweighs the wider cache
        (docs/benchmarks.md, "Greedy generation")."""
        param = next(self.parameters())
        if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
            return torch.float32
        return param.dtype

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache, *,
                first_layer: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run padded prompts (B, T) through the model into slots 0..T-1; logits of each row's last
        real token (B, V). Each row's real tokens are one run (left- or right-padded).
        With ``first_layer`` b > 0 the layers below b are already in ``cache`` and ``hidden``
        (B, T, dim) is the residual stream entering b (``forward``'s ``stop_layer``)."""
        T = input_ids.shape[1]
        cache.key_valid[:, :T] = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)   # (B, T)
        last = T - 1 - attention_mask.flip(-1).long().argmax(-1, keepdim=True)   # (B, 1)
        h = self._hidden(input_ids, position_ids, cache.mask(0, T), cache, 0, first_layer=first_layer,
                         hidden=hidden, outputs=last)                                # (B, 1, dim)
        return self.lm_head(h[:, -1])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                    slot: int) -> torch.Tensor:
        """One new token per row (B,) at cache slot ``slot`` and RoPE positions (B,); logits (B, V)."""
        cache.key_valid[:, slot] = True
        # A decoded token is never an item token (the LM head predicts vocabulary ids only).
        h = self._hidden(tokens[:, None], position_ids[:, None], cache.mask(slot, 1), cache, slot, items=False)
        return self.lm_head(h[:, -1])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | Sequence[int] | None,
                 attention_mask: torch.Tensor | None = None, pad_id: int | None = None, *,
                 cache: KVCache | None = None, first_layer: int = 0,
                 hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding of padded prompts; returns only the new tokens (B, n), n <= max_new_tokens.

        Each row's real tokens (attention_mask 1) must be one run: left- or right-padded. A row
        stops after its first EOS; later slots of that row hold ``pad_id`` (default: the first
        EOS id). Decoding ends when every row has stopped or after max_new_tokens.

        To continue from layers run before (several models sharing their bottom layers decode
        from one pass of them): ``cache`` (B rows, at least T + max_new_tokens slots) holds the
        keys and values of layers 0..first_layer-1 at slots 0..T-1 (``forward(..., cache=)``),
        and ``hidden`` (B, T, dim) the residual stream entering ``first_layer``. Only the layers
        from ``first_layer`` on run over the prompts; decoded tokens run through every layer and
        take slots T.., so one cache serves several models in turn.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        real = attention_mask.long()
        count = real.sum(-1)
        first, last = real.argmax(-1), T - 1 - real.flip(-1).argmax(-1)   # (B,) each row's first and last real token
        if bool(((count == 0) | (last - first + 1 != count)).any()):
            raise ValueError("every row of attention_mask needs its real tokens in one run (left- or "
                             "right-padded), at least one")
        n = self.args.n_layers
        if not (isinstance(first_layer, int) and 0 <= first_layer <= n - 1):
            raise ValueError(f"first_layer must be an int in [0, {n - 1}], got {first_layer!r}")
        if first_layer and (cache is None or hidden is None):
            raise ValueError("first_layer > 0 needs the cache of the layers below it and hidden, the "
                             "residual stream entering it")
        if hidden is not None and (not first_layer or hidden.shape != (B, T, self.args.dim)):
            raise ValueError(f"hidden goes with first_layer > 0 and must have shape {(B, T, self.args.dim)}, "
                             f"got {tuple(hidden.shape)} with first_layer={first_layer}")
        if cache is not None and (cache.key_valid.shape[0] != B or cache.max_len < T + max_new_tokens):
            raise ValueError(f"cache must hold {B} rows of at least T + max_new_tokens = {T + max_new_tokens} "
                             f"slots, got {cache.key_valid.shape[0]} rows of {cache.max_len}")
        eos = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id),
                           dtype=torch.long, device=input_ids.device)
        if pad_id is None:
            pad_id = int(eos[0]) if len(eos) else 0

        was_training = self.training
        self.eval()
        if cache is None:
            cache = KVCache(self.args, B, T + max_new_tokens, self.cache_dtype(), input_ids.device)
        logits = self.prefill(input_ids, attention_mask, cache, first_layer=first_layer, hidden=hidden)   # (B, V)
        position = count                                                    # (B,) next RoPE position
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(done, pad_id)             # (B,)
            out.append(token)
            done = done | torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self.decode_step(token, position, cache, T + step)
            position = position + 1
        self.train(was_training)
        return torch.stack(out, dim=1)                                      # (B, n)
