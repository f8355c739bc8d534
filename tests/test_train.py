"""End-to-end tests of python -m minisdpo.train on a tiny configuration: every stage, resume after
an interruption, a user's own Hugging Face checkpoint, two-process data parallelism, bad input."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import toy_rows

from minisdpo import config, run, train, trainer
from minisdpo.compare import read_records
from minisdpo.evaluate import mcnemar
from minisdpo.step import StageLoss
from minisdpo.checkpoint import from_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
TITLES = [f"Song {chr(65 + i // 10)}{i % 10}" for i in range(60)]


def _rows(n: int, seed: int) -> list[dict]:
    return toy_rows(n, seed, TITLES)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", 48), ("val", 8), ("test", 8)):
        (d / f"toy-{split}.json").write_text(json.dumps(_rows(n, seed=len(split))))
    return d


def _flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", "json", "--data-dir", str(data_dir), "--domain", "music", "--out", str(out),
            "--model", "scratch", "--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab-size", "400",
            "--batch-size", "4", "--grad-accum", "2", "--sft-epochs", "1", "--sdpo-epochs", "1",
            "--lora-r", "4", "--eval-batch-size", "8", "--no-progress", "--seed", "3", *extra]


def kill_at_first_checkpoint(argv: list[str], stage_dir: Path) -> None:
    """Run python -m minisdpo.train ``argv`` in a process killed (SIGKILL) as soon as the stage in
    ``stage_dir`` has written its first checkpoint, before it is done."""
    proc = subprocess.Popen([sys.executable, "-m", "minisdpo.train", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (stage_dir / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage_dir / "done.json").exists(), "the run finished before it could be interrupted"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_all_stages_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(_flags(data_dir, out, "--compare-dpo", "--negatives", "3"))
    assert list(summary["models"]) == ["pop", "sasrec", "sft", "sdpo", "dpo"]
    assert summary["test_rows"] == 8
    for res in summary["models"].values():
        for key in ("hr@1", "valid_ratio", "rank_hr@1", "rank_hr@5", "rank_ndcg@5"):
            assert 0.0 <= res[key] <= 1.0
        assert res["hr@1"] <= res["valid_ratio"]
        assert res["rank_hr@1"] <= res["rank_hr@5"]
    assert json.loads((out / "summary.json").read_text())["models"] == summary["models"]
    assert summary["run_size"] == {"size": "full", "why": "--model scratch", "limit_train": 8000}
    assert set(summary["paired_hr@1"]) == {"sdpo_vs_sft", "dpo_vs_sft"} | {
        f"{lm}_vs_{b}" for lm in ("sft", "sdpo", "dpo") for b in ("pop", "sasrec")}
    assert 0.0 <= summary["paired_hr@1"]["sdpo_vs_sft"]["p_value"] <= 1.0
    # The baselines: trained on the whole training split, scored on the same test rows.
    for name in ("pop", "sasrec"):
        res = summary["models"][name]
        assert res["valid_ratio"] == 1.0 and res["hr@1"] == res["rank_hr@1"]
        assert summary["baselines"][name]["train_rows"] == 48
    assert 1 <= summary["baselines"]["sasrec"]["epoch"] <= summary["baselines"]["sasrec"]["epochs_trained"] <= 5
    # Every model's hits, the baselines' too, are on disk: minisdpo.compare pairs them again.
    records = read_records([str(out)])
    assert sorted(records) == sorted(f"run/{name}" for name in summary["models"])
    for pair, test in summary["paired_hr@1"].items():
        a, b = pair.split("_vs_")
        assert mcnemar(records[f"run/{b}"]["hits"], records[f"run/{a}"]["hits"]) == test
    table = capsys.readouterr().out
    assert "\npop " in table and "\nsasrec " in table and "sdpo vs pop hr@1:" in table
    records = _metrics(out)
    sdpo = [r for r in records if r["stage"] == "sdpo" and "loss" in r]
    assert len(sdpo) == 6  # 48 rows / (4 * 2) per step, one epoch
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lr", "tokens_per_s"):
        assert key in sdpo[0]
    assert all(r["loss"] > 0 for r in sdpo)
    # The SFT model is a Hugging Face directory that loads back; the adapters are PEFT files.
    model = from_pretrained(str(out / "sft" / "model"))
    from minisdpo.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(out / "sft" / "model")
    assert model.args.vocab_size == tok.vocab_size
    assert all(len(tok.encode(t)) == 2 for t in TITLES)  # "▁" + the title's own piece
    for name in ("sdpo", "dpo"):
        assert (out / name / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "plots" / "sft.png").exists() and (out / "plots" / "sdpo.png").exists()
    assert (out / "plots" / "results.png").exists()
    # A second call with --resume finds every stage and every model's evaluation done, and reads
    # the evaluations back.
    again = train.main(_flags(data_dir, out, "--compare-dpo", "--negatives", "3", "--resume"))
    assert again["models"] == summary["models"]


def test_resume_reads_back_the_models_already_evaluated(data_dir, tmp_path, monkeypatch):
    """An evaluation interrupted after some models continues from the first model not evaluated
    yet; a model whose stage was trained again is evaluated again."""
    out = tmp_path / "run"
    flags = ["--negatives", "3", "--max-steps", "2", "--baselines", "none"]
    first = train.main(_flags(data_dir, out, *flags))
    generated = []   # one entry per model generated, on its own or beside others
    alone, shared = train.evaluate_generation, train.generate_answers_shared
    monkeypatch.setattr(train, "evaluate_generation", lambda *a, **k: generated.append(1) or alone(*a, **k))
    monkeypatch.setattr(train, "generate_answers_shared",
                        lambda models, *a, **k: generated.extend([1] * len(models)) or shared(models, *a, **k))

    (out / "answers_sdpo.json").unlink()   # as if stopped while the S-DPO model was generating
    again = train.main(_flags(data_dir, out, *flags, "--resume"))
    assert len(generated) == 1
    assert again["models"] == first["models"] and again["paired_hr@1"] == first["paired_hr@1"]
    assert json.loads((out / "answers_sdpo.json").read_text())["metrics"] == first["models"]["sdpo"]

    train.main(_flags(data_dir, out, *flags, "--resume"))   # nothing left to evaluate
    assert len(generated) == 1
    train.main(_flags(data_dir, out, *flags, "--stage", "sdpo"))   # S-DPO trained again
    train.main(_flags(data_dir, out, *flags, "--stage", "eval", "--resume"))
    assert len(generated) == 2
    train.main(_flags(data_dir, out, *flags, "--stage", "eval"))   # without --resume: every model
    assert len(generated) == 4


@pytest.mark.parametrize("variant", [("--loss", "pytorch"), ("--packing", "none")])
def test_fused_packed_step_trains_like_the_plain_reference(data_dir, tmp_path, variant):
    """The default step (fused kernel, shared-prompt packing, response-only LM head) against its
    slow twins: the PyTorch twin of the loss, and one full sequence per response."""
    runs = {}
    for name, extra in (("default", ()), ("variant", variant)):
        out = tmp_path / name
        flags = ["--max-steps", "3", "--lora-dropout", "0", *extra]
        train.main(_flags(data_dir, out, "--stage", "sft", *flags))
        train.main(_flags(data_dir, out, "--stage", "sdpo", *flags))
        runs[name] = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert len(runs["default"]) == 6
    assert runs["default"] == pytest.approx(runs["variant"], rel=1e-4, abs=1e-5)


def test_resume_after_interruption_matches_uninterrupted(data_dir, tmp_path):
    flags = ["--stage", "sft", "--sft-epochs", "4", "--ckpt-every", "2", "--eval-every", "4"]
    straight = tmp_path / "straight"
    train.main(_flags(data_dir, straight, *flags))

    out = tmp_path / "interrupted"
    kill_at_first_checkpoint(_flags(data_dir, out, *flags), out / "sft")
    train.main(_flags(data_dir, out, *flags, "--resume"))

    def curve(run: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(run)]
    assert curve(out) == curve(straight)
    a = from_pretrained(str(out / "sft" / "model")).state_dict()
    b = from_pretrained(str(straight / "sft" / "model")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def _user_checkpoint(data_dir: Path, base: Path, n_layers: int = 2) -> Path:
    """A "user's" Hugging Face checkpoint: a random tiny Llama with a trained tokenizer beside it."""
    from minisdpo.data import format_prompt, load_json_dir
    from minisdpo.model import Llama, ModelArgs
    from minisdpo.tokenizer import train_tokenizer
    base.mkdir()
    texts = TITLES + [format_prompt(r, "music") for r in load_json_dir(data_dir)["train"]]
    tok = train_tokenizer(texts, 400, base / "tokenizer.model")
    torch.manual_seed(0)
    save_pretrained(Llama(ModelArgs(vocab_size=tok.vocab_size, dim=32, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                                    intermediate_size=64)), str(base))
    return base


def test_user_checkpoint_with_lora_sft(data_dir, tmp_path):
    base = _user_checkpoint(data_dir, tmp_path / "base")
    # Before any training, --stage eval --zero-shot evaluates the pretrained model (and the baselines).
    alone = train.main(_flags(data_dir, tmp_path / "untrained", "--model", str(base), "--stage", "eval",
                              "--zero-shot", "--no-ranking", "--baselines", "pop"))
    assert list(alone["models"]) == ["pop", "zero-shot"] and set(alone["paired_hr@1"]) == {"zero-shot_vs_pop"}
    out = tmp_path / "run"
    summary = train.main(_flags(data_dir, out, "--model", str(base), "--max-steps", "2", "--no-ranking",
                                "--zero-shot", "--baselines", "none"))
    assert list(summary["models"]) == ["zero-shot", "sft", "sdpo"]   # the pretrained model before SFT first
    assert set(summary["paired_hr@1"]) == {"zero-shot_vs_sft", "sdpo_vs_sft"}
    assert (out / "sft" / "adapter" / "adapter_config.json").exists()
    merged = from_pretrained(str(out / "sft" / "model")).state_dict()
    original = from_pretrained(str(base)).state_dict()
    assert set(merged) == set(original)
    assert any(not torch.equal(merged[k], original[k]) for k in original)  # the SFT adapter was merged in


def test_top_layers_from_the_prefix_cache_train_and_rank_like_the_whole_model(data_dir, tmp_path, monkeypatch):
    """--lora-layers 1 --sft-lora-layers 1 on a 3-layer checkpoint: every stage, validation and the
    ranking run from the frozen-prefix cache. Twin: the same top-layer adapters with the whole
    model run on every batch (the cache switched off), which must give the same curves and metrics."""
    base = _user_checkpoint(data_dir, tmp_path / "base", n_layers=3)
    flags = ["--model", str(base), "--dtype", "float32", "--lora-layers", "1", "--sft-lora-layers", "1",
             "--max-steps", "3", "--lora-dropout", "0",
             "--eval-every", "2", "--negatives", "19", "--compare-dpo"]
    cached = train.main(_flags(data_dir, tmp_path / "cached", *flags))
    monkeypatch.setattr(train, "prefix_cache", lambda *a, **kw: None)
    whole = train.main(_flags(data_dir, tmp_path / "whole", *flags))

    def curve(run: Path) -> list:
        return [(r["stage"], r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(run)]
    a, b = curve(tmp_path / "cached"), curve(tmp_path / "whole")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 3 * 5     # 3 stages: 3 steps, 2 checks
    for x, y in zip(a, b):
        for u, v in zip(x[2:], y[2:]):
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-4, abs=1e-5), (x, y)
    for name in ("sft", "sdpo", "dpo"):
        for key in ("rank_hr@1", "rank_hr@5", "rank_ndcg@5", "hr@1"):
            assert cached["models"][name][key] == pytest.approx(whole["models"][name][key]), (name, key)
    stages = cached["stages"]
    assert set(stages) == {"sft", "sdpo", "dpo"}
    assert [stages[s]["negatives"] for s in ("sft", "sdpo", "dpo")] == [0, 19, 1]
    for info in stages.values():
        assert info["lora_layers"] == 1 and info["steps"] == 3 and info["examples_seen"] == 3 * 8
        assert info["cache_mb"] > 0 and info["seconds"] > 0
    # One cache per split, built by the SFT stage and read back by the later ones.
    assert sorted(p.name for p in (tmp_path / "cached" / "cache").iterdir()) == [
        "test-layer2", "train-layer2", "val-layer2"]
    assert stages["sft"]["cache_build_s"] > stages["sdpo"]["cache_build_s"]
    config = json.loads((tmp_path / "cached" / "sdpo" / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [2]
    assert whole["stages"]["sdpo"]["cache_mb"] == 0.0


def test_full_depth_sft_then_top_layers_rebuilds_the_cache_from_the_sft_model(data_dir, tmp_path):
    base = _user_checkpoint(data_dir, tmp_path / "base", n_layers=3)
    out = tmp_path / "run"
    train.main(_flags(data_dir, out, "--model", str(base), "--lora-layers", "2", "--sft-lora-layers", "all",
                      "--max-steps", "1", "--no-ranking"))
    assert not (out / "cache").exists()
    assert sorted(p.name for p in (out / "sft" / "cache").iterdir()) == ["train-layer1", "val-layer1"]


def test_two_processes_match_one_with_the_same_global_batch(data_dir, tmp_path):
    flags = ["--stage", "sft", "--max-steps", "3", "--no-plots"]
    one = tmp_path / "one"
    train.main(_flags(data_dir, one, *flags))  # batch 4 x accumulation 2
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000)]
    args = _flags(data_dir, two, *flags) + ["--grad-accum", "1"]  # batch 4 x 2 processes
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(torchrun + ["-m", "minisdpo.train", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a = [r["loss"] for r in _metrics(one) if "loss" in r]
    b = [r["loss"] for r in _metrics(two) if "loss" in r]
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--negatives", "25"], "--negatives"),
    (["--batch-size", "0"], "--batch-size"),
    (["--beta", "nan"], "--beta"),
    (["--model", "/nonexistent/dir"], "--model"),
    (["--lora-layers", "3"], "--lora-layers 3 exceeds the model's 2 layers"),
    (["--packing", "none", "--lora-layers", "1"], r"--lora-layers is 1, --sft-lora-layers all\) need --packing shared"),
    (["--sdpo-init", "sft-adapter"], "--sdpo-init sft-adapter needs a pretrained --model: --model scratch"),
    (["--recipe", "paper", "--sdpo-init", "sft-adapter"], "--sdpo-init sft-adapter needs a pretrained --model"),
    (["--test-rows", "last"], "--test-rows last is for --data movielens only"),
    (["--adam-betas", "0.9", "1.5"], "--adam-betas must be in"),
    (["--baselines", "pop,knn"], "--baselines: unknown baseline 'knn'"),
    (["--zero-shot"], "--zero-shot needs a pretrained --model"),
])
def test_bad_flags_name_the_flag(data_dir, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        train.main(_flags(data_dir, tmp_path / "run", *flags))


def test_eval_without_an_sft_model_is_refused(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no SFT model"):
        train.main(_flags(data_dir, tmp_path / "run", "--stage", "eval", "--no-plots"))


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--resume"):
        train.main(_flags(data_dir, out, "--max-steps", "1"))


class _RunsCode:
    """Unpickling this object creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_a_state_file_that_would_run_code(data_dir, tmp_path):
    out = tmp_path / "run"
    flags = ["--stage", "sft", "--sft-epochs", "2", "--ckpt-every", "1", "--max-steps", "1"]
    train.main(_flags(data_dir, out, *flags))
    (out / "sft" / "done.json").unlink()
    state = torch.load(out / "sft" / "state.pt", weights_only=True)   # what the trainer writes loads safely
    marker = tmp_path / "ran"
    torch.save({**state, "best": _RunsCode(marker)}, out / "sft" / "state.pt")
    with pytest.raises(SystemExit, match="state.pt holds more than tensors and plain values"):
        train.main(_flags(data_dir, out, *flags, "--resume"))
    assert not marker.exists()


def test_resume_with_other_settings_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1"))
    with pytest.raises(SystemExit, match="beta"):
        train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1", "--beta", "2", "--resume"))
    # --run-size acts through the rows it sets: another share is another limit_train.
    with pytest.raises(SystemExit, match="limit_train was 8000, now 2000"):
        train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1", "--run-size", "small", "--resume"))
    assert "run_size" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("case", ["lastfm without --data-dir", "missing directory", "malformed row",
                                  "json without --domain"])
def test_a_run_that_cannot_start_leaves_nothing(data_dir, tmp_path, capsys, case):
    """One error line naming the flag or file (and row), nothing written, and the corrected
    command then just runs."""
    out = tmp_path / "run"
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    rows = json.loads((bad / "toy-train.json").read_text())
    rows[5]["itemList"] = "not a list"
    (bad / "toy-train.json").write_text(json.dumps(rows))
    flags = {"lastfm without --data-dir": ["--data", "lastfm", "--data-dir", None],
             "missing directory": ["--data-dir", str(tmp_path / "nowhere")],
             "malformed row": ["--data-dir", str(bad)],
             "json without --domain": ["--domain", None]}[case]
    argv = _flags(data_dir, out, "--max-steps", "1", "--stage", "sft", "--no-plots")
    for name, value in zip(flags[::2], flags[1::2]):  # replace (or drop, for None) each flag's value
        i = argv.index(name) if name in argv else None
        if i is not None:
            del argv[i:i + 2]
        if value is not None:
            argv += [name, value]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message
    want = {"lastfm without --data-dir": "data_dir", "missing directory": "nowhere",
            "malformed row": "row 5", "json without --domain": "--domain"}[case]
    assert want in message and ("toy-train.json" in message or case != "malformed row")
    assert not out.exists()
    summary_flags = _flags(data_dir, out, "--max-steps", "1", "--stage", "sft", "--no-plots")
    assert train.main(summary_flags) is None and (out / "sft" / "done.json").exists()


def test_a_diverging_run_stops_and_resumes_from_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    flags = _flags(data_dir, out, "--stage", "sft", "--max-steps", "5", "--ckpt-every", "2", "--no-plots")
    original = StageLoss.__call__
    calls = []

    def diverging(*a, **kw):  # step 3's first micro-batch gives NaN (2 micro-batches a step)
        value, logps = original(*a, **kw)
        calls.append(1)
        return (value * float("nan") if len(calls) == 5 else value), logps

    monkeypatch.setattr(StageLoss, "__call__", diverging)
    with pytest.raises(SystemExit, match=r"\[sft\] step 3: .*not finite.*step 2.*--resume"):
        train.main(flags)
    state = torch.load(out / "sft" / "state.pt", weights_only=True)
    assert state["step"] == 2                                         # the last good checkpoint
    assert all(math.isfinite(v.abs().sum()) for v in state["params"].values())
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2]  # no record of the bad step
    monkeypatch.setattr(StageLoss, "__call__", original)
    train.main(flags + ["--resume"])
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


def test_fixed_negatives_reuse_reference_logps_with_the_same_results(data_dir, tmp_path, monkeypatch):
    from minisdpo.step import RefCache
    flags = ["--stage", "sdpo", "--sdpo-epochs", "2", "--fixed-negatives", "--lora-dropout", "0", "--no-plots"]
    base = tmp_path / "base"
    train.main(_flags(data_dir, base, "--stage", "sft", "--max-steps", "2"))
    curves = {}
    for name in ("cached", "uncached"):
        out = tmp_path / name
        shutil.copytree(base, out)
        hits = []
        original = RefCache.get
        if name == "uncached":
            monkeypatch.setattr(RefCache, "get", lambda self, keys: None)
        else:
            def counting_get(self, keys):
                found = original(self, keys)
                hits.append(found is not None)
                return found
            monkeypatch.setattr(RefCache, "get", counting_get)
        train.main(_flags(data_dir, out, *flags))
        monkeypatch.setattr(RefCache, "get", original)
        curves[name] = [r["loss"] for r in _metrics(out) if r["stage"] == "sdpo" and "loss" in r]
        if name == "cached":
            assert any(hits)  # the second epoch reads the first one's reference log-probs
    assert len(curves["cached"]) == 12
    assert curves["cached"] == pytest.approx(curves["uncached"], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("val_loss, warned", [(1.5, True), (1.3, False)])
def test_a_preference_stage_worse_than_its_start_on_validation_is_reported(data_dir, tmp_path, monkeypatch,
                                                                           capsys, val_loss, warned):
    # K = 3: the stage starts at ln(4) = 1.386 on every group (policy = reference).
    base = tmp_path / "base"
    train.main(_flags(data_dir, base, "--stage", "sft", "--max-steps", "1", "--no-plots"))
    monkeypatch.setattr(trainer, "validation_loss", lambda objective, *a, **kw: val_loss if objective.negatives else 1.0)
    train.main(_flags(data_dir, base, "--stage", "sdpo", "--max-steps", "2", "--negatives", "3", "--no-plots"))
    done = json.loads((base / "sdpo" / "done.json").read_text())
    assert done["best_val_loss"] == val_loss
    message = "[sdpo] warning: the best validation loss (1.5000, step 2) is above the start's ln(1+K) = 1.3863"
    assert (message in capsys.readouterr().out) == warned


def test_the_recorded_start_of_a_preference_stage_is_the_measured_loss_of_a_fresh_adapter(data_dir, tmp_path):
    """done.json's start_val_loss (ln(1 + K), a formula) against the validation loss measured on
    the run's own validation groups with a fresh adapter on its SFT model."""
    from minisdpo import loss as torch_loss
    from minisdpo.step import RefCache
    out = tmp_path / "run"
    train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1", "--no-plots"))
    train.main(_flags(data_dir, out, "--stage", "sdpo", "--max-steps", "1", "--negatives", "3", "--no-plots"))
    args = config.resolve_args(_flags(data_dir, out, "--negatives", "3"))
    splits, domain, _ = train.load_rows(args)
    model = train.load_sft_model(out, trainer.Env(dtype=torch.float32))
    train.add_lora(model, args, 1, "all")
    data = trainer.StageData(train.Tokenizer(out / "tokenizer" / "tokenizer.model"), domain, splits["train"],
                             splits["val"])
    objective = StageLoss(model, torch_loss, packing=args.packing, negatives=3, beta=args.beta)
    measured = trainer.validation_loss(objective, args, data, trainer.Env(), RefCache())
    done = json.loads((out / "sdpo" / "done.json").read_text())
    assert done["start_val_loss"] == pytest.approx(measured, abs=1e-6)
    assert not math.isclose(done["best_val_loss"], measured, abs_tol=1e-9)   # one step moved the adapter


# ------------------------------------------------------------------ --recipe paper, --sdpo-init

def _recipe_flags(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """A tiny scratch model and the toy data, and nothing the recipe sets."""
    return ["--data", "json", "--data-dir", str(data_dir), "--domain", "music", "--out", str(out), "--model", "scratch",
            "--dim", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--vocab-size", "400",
            "--eval-batch-size", "8", "--no-progress", "--no-plots", "--seed", "3", *extra]


@pytest.mark.usefixtures("one_thread")   # tests/conftest.py: tiny models, a busy machine
def test_recipe_paper_runs_end_to_end_with_the_official_values(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train.main(_recipe_flags(data_dir, out, "--recipe", "paper", "--limit-train", "64", "--limit-val", "8"))
    config = json.loads((out / "config.json").read_text())
    assert (config["sft_lr"], config["sdpo_lr"], config["sft_epochs"], config["sdpo_epochs"]) == (1e-5, 1e-5, 5, 3)
    assert (config["batch_size"], config["grad_accum"], config["world"], config["effective_batch"]) == (4, 32, 1, 128)
    assert config["adam_betas"] == [0.9, 0.999] and config["fixed_negatives"] is True
    assert (config["sft_eval_every"], config["sdpo_eval_every"], config["limit_test"]) == (0.2, 0.1, 0)
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"], config["clip"], config["warmup"]) == (
        8, 32.0, 0.1, 0.3, 0.05)
    assert config["recipe"] == "paper" and config["sdpo_init"] == "fresh"   # scratch: no SFT adapter to continue
    assert {"sft_lr", "sdpo_lr", "sft_epochs", "sdpo_epochs", "grad_accum", "adam_betas"} <= set(config["recipe_set"])
    assert sorted(config["recipe_overridden"]) == ["limit_train", "limit_val"]
    assert "sdpo_init" not in config["recipe_set"] and config["limit_train"] == 64
    log = capsys.readouterr().out
    assert "recipe paper: set sft_lr=1e-05, sdpo_lr=1e-05, sft_epochs=5.0, sdpo_epochs=3.0" in log
    assert "effective batch 128 = batch-size 4 x grad-accum 32 x 1 process(es)" in log
    # 48 toy rows < 128: one step an epoch; validation every 20% (SFT) and 10% (S-DPO) of the steps
    records = _metrics(out)
    for stage, steps in (("sft", 5), ("sdpo", 3)):
        assert [r["step"] for r in records if r["stage"] == stage and "loss" in r] == list(range(1, steps + 1))
        assert [r["step"] for r in records if r["stage"] == stage and "val_loss" in r] == list(range(1, steps + 1))
        assert all(r["lr"] <= 1e-5 for r in records if r["stage"] == stage and "lr" in r)
    assert summary["test_rows"] == 8 and set(summary["models"]) == {"pop", "sasrec", "sft", "sdpo"}


def test_recipe_grad_accum_follows_the_processes_and_explicit_flags_win(tmp_path, monkeypatch):
    def configure(*flags: str) -> argparse.Namespace:
        return config.resolve_args(["--model", "scratch", "--recipe", "paper", *flags])
    for world, batch, accum in (("1", [], 32), ("4", [], 8), ("4", ["--batch-size", "8"], 4), ("2", ["--batch-size", "16"], 4)):
        monkeypatch.setenv("WORLD_SIZE", world)
        args = configure(*batch)
        assert args.grad_accum == accum and args.batch_size * args.grad_accum * int(world) == 128
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"--recipe paper: an effective batch of 128 needs --batch-size x processes "
                                         r"\(4 x 3\) to divide 128"):
        configure()
    args = configure("--grad-accum", "2", "--sdpo-lr", "1e-4", "--lora-dropout", "0.1")   # explicit, even at the value
    assert (args.grad_accum, args.sdpo_lr, args.sft_lr) == (2, 1e-4, 1e-5)
    assert {"grad_accum", "sdpo_lr", "lora_dropout"} <= set(args.recipe_overridden)
    monkeypatch.setenv("WORLD_SIZE", "1")
    plain = config.resolve_args(["--model", "scratch"])
    assert not hasattr(plain, "recipe_set") and plain.adam_betas == [0.9, 0.95] and plain.sdpo_init == "fresh"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    args = configure("--model", str(model_dir))
    assert args.sdpo_init == "sft-adapter" and "sdpo_init" in args.recipe_set
    with pytest.raises(SystemExit, match="--lora-layers \\(2\\) must equal --sft-lora-layers \\(all\\)"):
        configure("--model", str(model_dir), "--lora-layers", "2", "--sft-lora-layers", "all")


def test_a_pretrained_model_trains_sft_on_every_layer_and_s_dpo_on_the_top_4(tmp_path):
    """The defaults chosen on the validation split (docs/results.md): SFT's adapter on every layer,
    the preference stages' on the top 4 from the frozen-prefix cache, no LoRA dropout (0.1 for
    the small model and the paper's recipe); --sdpo-init sft-adapter
    continues the SFT adapter, so SFT then takes --lora-layers' layers; a model of at most 4
    layers takes every layer, unless a flag says otherwise (then resolve_args rejects a number
    of layers beyond the model's)."""
    def configure(*flags: str, n_layers: int = 30) -> argparse.Namespace:
        return config.resolve_args(["--model", str(tmp_path), *flags], lambda args: n_layers)
    args = configure()
    assert (args.lora_layers, args.sft_lora_layers, args.sdpo_epochs, args.sft_epochs) == (4, "all", 2.0, 0.5)
    assert (args.lora_dropout, configure("--lora-dropout", "0.05").lora_dropout,
            configure("--recipe", "paper").lora_dropout) == (0.0, 0.05, 0.1)
    assert (configure("--sdpo-init", "sft-adapter").sft_lora_layers, configure("--lora-layers", "2").sft_lora_layers) \
        == (4, "all")
    assert (configure(n_layers=4).lora_layers, configure(n_layers=5).lora_layers) == ("all", 4)
    small = configure("--sdpo-init", "sft-adapter", n_layers=3)
    assert (small.lora_layers, small.sft_lora_layers) == ("all", "all")
    with pytest.raises(SystemExit, match="--lora-layers 4 exceeds the model's 3 layers"):
        configure("--lora-layers", "4", n_layers=3)
    assert configure("--lora-layers", "3", n_layers=3).lora_layers == 3      # given: kept, not 'all'
    scratch = config.resolve_args(["--model", "scratch"])
    assert (scratch.lora_layers, scratch.sft_lora_layers, scratch.lora_dropout) == ("all", "all", 0.1)
    with pytest.raises(SystemExit, match="need --packing shared: with --packing none pass --lora-layers all"):
        configure("--packing", "none")


def test_run_size_auto_trains_a_quarter_in_float32_on_a_cpu(tmp_path, monkeypatch):
    """--run-size auto: the pretrained model's default rows where it computes in bfloat16, a
    quarter of them in float32 on a CPU (no native bfloat16, or --dtype float32); decided by the
    CPU's flags and the flags alone; an explicit --limit-train or --recipe sets the rows."""
    def configure(*flags: str) -> argparse.Namespace:
        return config.resolve_args(["--model", str(tmp_path), "--device", "cpu", *flags], lambda args: 30)
    for native in (True, False):
        monkeypatch.setattr(run, "cpu_has_bf16", lambda: native)
        args = configure()
        assert (args.run_size, args.limit_train) == (("full", 512) if native else ("small", 128))
        assert ("no native bfloat16" in args.run_size_why) != native
        assert (configure("--run-size", "full").limit_train, configure("--run-size", "small").limit_train) == (512, 128)
        assert (configure("--dtype", "float32").run_size, configure("--dtype", "bfloat16").run_size) == ("small", "full")
        given = configure("--limit-train", "64")
        assert (given.run_size, given.limit_train, given.run_size_why) == ("full", 64, "--limit-train sets the rows")
    assert configure("--recipe", "paper").limit_train == 0
    scratch = config.resolve_args(["--model", "scratch", "--device", "cpu"])
    assert (scratch.run_size, scratch.limit_train) == ("full", 8000)
    with pytest.raises(SystemExit, match="--run-size small scales the default --limit-train, but --limit-train"):
        configure("--run-size", "small", "--limit-train", "64")
    with pytest.raises(SystemExit, match="but --recipe paper sets the training rows"):
        configure("--run-size", "full", "--recipe", "paper")


def test_eval_every_in_steps_or_as_a_fraction_of_the_stage():
    assert [trainer.eval_interval(e, 100) for e in (0, 16, 0.2, 0.1, 0.001)] == [0, 16, 20, 10, 1]
    assert trainer.eval_interval(0.1, 33) == 4 and trainer.eval_interval(0.2, 5) == 1   # rounded up
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="eval_every"):
            trainer.eval_interval(bad, 10)
    assert config._every_flag("16") == 16 and config._every_flag("0.2") == 0.2 and config._every_flag("0") == 0
    for bad in ("2.5", "-1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            config._every_flag(bad)


def _capture_trained(monkeypatch) -> dict:
    """Keep each stage's trained model (train.train_stage's first argument) by stage name."""
    trained = {}
    original = train.train_stage

    def keep(model, spec, *a, **kw):
        info = original(model, spec, *a, **kw)
        trained[spec.name] = model
        return info
    monkeypatch.setattr(train, "train_stage", keep)
    return trained


@pytest.mark.usefixtures("one_thread")   # tests/conftest.py: tiny models, a busy machine
def test_sdpo_continues_the_sft_adapter_from_the_prefix_cache_and_evaluates_what_it_trained(
        data_dir, tmp_path, monkeypatch):
    """--sdpo-init sft-adapter with --lora-layers 1 on a 3-layer checkpoint: the S-DPO stage starts
    at ln(1+K) (the SFT adapter and its frozen copy), shares the frozen-prefix cache that SFT
    built from the base model, trains like the whole model run on every batch, and the model
    that the evaluation and recommend load (the base + the S-DPO adapter) is the trained one."""
    from minisdpo import recommend
    from minisdpo.data import load_json_dir
    from minisdpo.evaluate import evaluate_ranking
    from minisdpo.lora import load_adapter
    from minisdpo.tokenizer import Tokenizer
    base = _user_checkpoint(data_dir, tmp_path / "base", n_layers=3)
    flags = ["--model", str(base), "--dtype", "float32", "--lora-layers", "1", "--max-steps", "3", "--lora-dropout", "0",
             "--eval-every", "2", "--sdpo-init", "sft-adapter", "--item-tokens", "none"]   # titles: the tokenizer below
    trained = _capture_trained(monkeypatch)
    out = tmp_path / "cached"
    cached = train.main(_flags(data_dir, out, *flags))
    model = trained["sdpo"].eval()
    monkeypatch.setattr(train, "prefix_cache", lambda *a, **kw: None)
    whole = train.main(_flags(data_dir, tmp_path / "whole", *flags))

    def curve(run: Path) -> list:
        return [(r["stage"], r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(run)]
    a, b = curve(out), curve(tmp_path / "whole")
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        for u, v in zip(x[2:], y[2:]):
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-4, abs=1e-5), (x, y)
    first = [r for r in _metrics(out) if r["stage"] == "sdpo" and "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(4), abs=1e-5)               # policy = reference
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    # One cache for every stage: built from the base by SFT, read back by S-DPO and the ranking.
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["test-layer2", "train-layer2", "val-layer2"]
    assert not (out / "sft" / "cache").exists()
    assert cached["stages"]["sft"]["cache_build_s"] > cached["stages"]["sdpo"]["cache_build_s"]
    # The S-DPO adapter applies to the base model, and says so.
    done = json.loads((out / "sdpo" / "done.json").read_text())
    assert done["sdpo_init"] == "sft-adapter" and done["adapter_base"] == str(base.resolve())
    adapter_config = json.loads((out / "sdpo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    assert adapter_config["layers_to_transform"] == [2]
    # Evaluated = trained: the summary's ranking metrics are the trained model's, and recommend
    # loads the same function; the SFT model + this adapter (the 'fresh' way) would not be.
    tok = Tokenizer.from_dir(out / "sft" / "model")
    rows = load_json_dir(data_dir)["test"]
    direct = evaluate_ranking(model, tok, rows, "music", batch_size=4, max_len=512, progress=False)
    for key in ("rank_hr@1", "rank_hr@5", "rank_ndcg@5"):
        assert cached["models"]["sdpo"][key] == pytest.approx(direct[key]), key
    ids = torch.tensor([tok.encode("Song A1 Song B2 Song C3", bos=True)])
    loaded = recommend.load_model(out, "sdpo", torch.float32, torch.device("cpu"))
    wrong = load_adapter(from_pretrained(str(out / "sft" / "model")), str(out / "sdpo" / "adapter")).eval()
    with torch.no_grad():
        want = model(ids)
        assert (loaded(ids) - want).abs().max() <= 1e-5
        assert (wrong(ids) - want).abs().max() > 1e-3


@pytest.mark.usefixtures("one_thread")   # tests/conftest.py: tiny models, a busy machine
def test_sdpo_from_the_sft_adapter_resumes_like_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    base = _user_checkpoint(data_dir, tmp_path / "base")
    flags = ["--model", str(base), "--dtype", "float32", "--sdpo-init", "sft-adapter", "--no-ranking", "--no-plots"]
    start = tmp_path / "start"
    train.main(_flags(data_dir, start, "--stage", "sft", "--max-steps", "2", *flags))
    sdpo = ["--stage", "sdpo", "--max-steps", "5", "--ckpt-every", "2", *flags]   # dropout 0.1: the RNG resumes too
    straight, out = tmp_path / "straight", tmp_path / "interrupted"
    shutil.copytree(start, straight)
    shutil.copytree(start, out)
    train.main(_flags(data_dir, straight, *sdpo))

    original, calls = StageLoss.__call__, []

    def interrupted(*a, **kw):   # 2 micro-batches a step: the 5th call is step 3's first
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*a, **kw)
    monkeypatch.setattr(StageLoss, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(_flags(data_dir, out, *sdpo))
    monkeypatch.setattr(StageLoss, "__call__", original)
    state = torch.load(out / "sdpo" / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["train_s"] > 0
    # The stage's seconds count the steps kept from before the interruption: planted as 1,000.
    torch.save(state | {"train_s": 1000.0}, out / "sdpo" / "state.pt")
    t0 = time.time()
    train.main(_flags(data_dir, out, *sdpo, "--resume"))
    resumed = time.time() - t0
    assert 1000.0 < json.loads((out / "sdpo" / "done.json").read_text())["train_s"] < 1000.0 + resumed

    def curve(run: Path) -> list:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(run) if r["stage"] == "sdpo"]
    assert curve(out) == curve(straight) and len([c for c in curve(out) if c[1] is not None]) == 5
    from safetensors.torch import load_file
    a = load_file(out / "sdpo" / "adapter" / "adapter_model.safetensors")
    b = load_file(straight / "sdpo" / "adapter" / "adapter_model.safetensors")
    sft = load_file(start / "sft" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() == sft.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], sft[k]) for k in a)        # the SFT adapter trained on


def test_resolve_args_parses_once_and_keeps_every_default_it_does_not_fill():
    """resolve_args tells the flags given from the defaults with one parse: every flag it does not
    fill from the model or the recipe keeps the parser's default, typed as argparse types it."""
    parsed = vars(config.build_parser().parse_args(["--model", "scratch"]))
    resolved = vars(config.resolve_args(["--model", "scratch"]))
    for name, value in parsed.items():
        if value is not None and name not in ("sft_lora_layers", "run_size"):   # run_size: what 'auto' chose
            assert resolved[name] == value and type(resolved[name]) is type(value), name
