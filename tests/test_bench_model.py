"""End to end: ``python -m minisdpo.bench --step --model DIR`` and ``--generate --model DIR`` on a
tiny random Hugging Face Llama directory (no tokenizer: the bench falls back to its synthetic
one). Checks the JSON's shape and that our step and transformers + PEFT's compute the same
loss on the same batch; no timing assertions (the machine is shared)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
from hf_utils import tiny_hf_model  # noqa: E402  (skips without transformers)

from minisdpo import bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    # Tied embeddings as SmolLM2 has them; a vocabulary large enough for the synthetic tokenizer.
    tiny_hf_model(seed=0, tie_word_embeddings=True, vocab_size=300).save_pretrained(path)
    return str(path)


def test_step_model_json_and_losses_agree(model_dir, tmp_path):
    out = tmp_path / "step.json"
    # One prompt per transformers micro-batch: its loss is accumulated over two.
    result = bench.main(["--step", "--model", model_dir, "--dtype", "float32", "--groups", "2",
                         "--hf-micro-batch", "1", "--repeats", "1", "--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    for side in ("ours", "hf_peft"):
        entry = written[side]
        assert entry["ms"] > 0 and entry["peak_mb"] > 0 and entry["dtype"] == "float32"
        assert entry["step_mb"] is not None and len(entry["runs_ms"]) == 1
    assert written["speedup"] == pytest.approx(written["hf_peft"]["ms"] / written["ours"]["ms"])
    assert written["setup"]["groups"] == 2 and written["setup"]["K"] == 3
    # 2 groups of 1 + K = 4 responses; ours packs each group into one row, transformers gets
    # two micro-batches of 4 full sequences.
    shapes = written["setup"]["shapes"]
    assert shapes["ours"][0] == 2 and [s[0] for s in shapes["hf_peft"]] == [4, 4]
    # Same batch, same adapter, float32 on both sides: the same S-DPO loss, and not the
    # log(1 + K) of a policy equal to its reference.
    ours, hf = written["ours"]["loss"], written["hf_peft"]["loss"]
    assert ours == pytest.approx(hf, abs=1e-4)
    assert abs(ours - 1.3862944) > 1e-3
    assert result["ours"]["loss"] == ours


def cached_mb(written: dict) -> float:
    return written["cached"]["cache_mb"]


def test_step_model_top_layers_cached_and_uncached(model_dir, tmp_path):
    out = tmp_path / "step.json"
    bench.main(["--step", "--model", model_dir, "--dtype", "float32", "--groups", "2", "--lora-layers", "1",
                "--no-hf-peft", "--item-tokens", "--repeats", "1", "--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert "hf_peft" not in written and "speedup" not in written
    # With item tokens: a longer prompt, another loss (the projector's output is in the input).
    items = written["cached_items"]
    assert items["ms_per_group"] > 0 and items["cache_mb"] > cached_mb(written)
    assert written["item_tokens_cost"] == pytest.approx(items["ms"] / written["cached"]["ms"])
    assert abs(items["loss"] - written["cached"]["loss"]) > 1e-6
    cached, top, uncached = written["cached"], written["uncached_top"], written["uncached"]
    for key in ("ms_per_group", "build_ms_per_row", "ref_ms_per_row", "peak_mb", "cache_mb"):
        assert cached[key] > 0, key
    assert uncached["ms_per_group"] == pytest.approx(written["ours"]["ms"] / 2)
    assert uncached["peak_mb"] == written["ours"]["peak_mb"] and top["peak_mb"] > 0
    # The same top-layer adapter with and without the cache: the same loss, and not log(1 + K).
    assert cached["loss"] == pytest.approx(top["loss"], abs=1e-5) and written["cached_loss_diff"] < 1e-5
    assert abs(cached["loss"] - 1.3862944) > 1e-4
    assert written["cached_speedup"] == pytest.approx(written["ours"]["ms"] / cached["ms"])


def test_step_model_modes_bfloat16_close(model_dir):
    result = bench.main(["--step", "--model", model_dir, "--dtype", "bfloat16", "autocast",
                         "--groups", "1", "--repeats", "1", "--threads", "1", "--no-memory"])
    tried = result["tried"]
    assert set(tried["ours"]) == set(tried["hf_peft"]) == {"bfloat16", "autocast"}
    for mode in ("bfloat16", "autocast"):
        assert tried["ours"][mode]["loss"] == pytest.approx(tried["hf_peft"][mode]["loss"], abs=0.05)
    assert result["ours"]["peak_mb"] is None and result["memory_ratio"] is None


def test_generate_json(model_dir, tmp_path):
    out = tmp_path / "gen.json"
    bench.main(["--generate", "--model", model_dir, "--batch", "3", "--new-tokens", "4",
                "--repeats", "1", "--threads", "1", "--json", str(out)])
    written = json.loads(out.read_text())
    assert written["setup"]["batch"] == 3 and written["setup"]["new_tokens"] == 4
    for dtype in ("float32", "bfloat16"):
        assert written[dtype]["ms"] > 0 and written[dtype]["tokens_per_s"] > 0
    assert written["float32"]["agreement"] == 1.0


def test_model_flags_checked():
    with pytest.raises(SystemExit):
        bench.parse_args(["--generate"])                      # needs --model
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "x"])                    # needs --step or --generate
    with pytest.raises(SystemExit):
        bench.parse_args(["--step", "--dtype", "autocast"])   # autocast only with --model
