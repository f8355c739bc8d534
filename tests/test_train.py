"""End-to-end tests of python -m minisdpo.train on a tiny configuration: every stage, resume after
an interruption, a user's own Hugging Face checkpoint, two-process data parallelism, bad input."""
from __future__ import annotations

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

from minisdpo import train, trainer
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
    assert set(summary["paired_hr@1"]) == {"sdpo_vs_sft", "dpo_vs_sft"} | {
        f"{lm}_vs_{b}" for lm in ("sft", "sdpo", "dpo") for b in ("pop", "sasrec")}
    assert 0.0 <= summary["paired_hr@1"]["sdpo_vs_sft"]["p_value"] <= 1.0
    # The baselines: trained on the whole training split, scored on the same test rows.
    for name in ("pop", "sasrec"):
        res = summary["models"][name]
        assert res["valid_ratio"] == 1.0 and res["hr@1"] == res["rank_hr@1"]
        assert summary["baselines"][name]["train_rows"] == 48
    assert 1 <= summary["baselines"]["sasrec"]["epoch"] <= summary["baselines"]["sasrec"]["epochs_trained"] <= 5
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
    # A second call with --resume finds every stage done and only evaluates again.
    again = train.main(_flags(data_dir, out, "--compare-dpo", "--negatives", "3", "--resume"))
    assert again["models"] == summary["models"]


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
    cmd = [sys.executable, "-m", "minisdpo.train", *_flags(data_dir, out, *flags)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "sft" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "done.json").exists(), "the run finished before it could be interrupted"
    train.main(_flags(data_dir, out, *flags, "--resume"))

    def curve(run: Path) -> list[tuple]:
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in _metrics(run)]
    assert curve(out) == curve(straight)
    a = from_pretrained(str(out / "sft" / "model")).state_dict()
    b = from_pretrained(str(straight / "sft" / "model")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_user_checkpoint_with_lora_sft(data_dir, tmp_path):
    # A "user's" Hugging Face checkpoint: a random tiny Llama with a trained tokenizer beside it.
    from minisdpo.model import Llama, ModelArgs
    from minisdpo.tokenizer import train_tokenizer
    base = tmp_path / "base"
    base.mkdir()
    from minisdpo.data import format_prompt, load_json_dir
    texts = TITLES + [format_prompt(r, "music") for r in load_json_dir(data_dir)["train"]]
    tok = train_tokenizer(texts, 400, base / "tokenizer.model")
    torch.manual_seed(0)
    save_pretrained(Llama(ModelArgs(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                    intermediate_size=64)), str(base))
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


def test_resume_with_other_settings_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1"))
    with pytest.raises(SystemExit, match="beta"):
        train.main(_flags(data_dir, out, "--stage", "sft", "--max-steps", "1", "--beta", "2", "--resume"))


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
    original = trainer.micro_loss
    calls = []

    def diverging(*a, **kw):  # step 3's first micro-batch gives NaN (2 micro-batches a step)
        value, stats = original(*a, **kw)
        calls.append(1)
        return (value * float("nan") if len(calls) == 5 else value), stats

    monkeypatch.setattr(trainer, "micro_loss", diverging)
    with pytest.raises(SystemExit, match=r"\[sft\] step 3: .*not finite.*step 2.*--resume"):
        train.main(flags)
    state = torch.load(out / "sft" / "state.pt", weights_only=False)
    assert state["step"] == 2                                         # the last good checkpoint
    assert all(math.isfinite(v.abs().sum()) for v in state["params"].values())
    assert [r["step"] for r in _metrics(out) if "loss" in r] == [1, 2]  # no record of the bad step
    monkeypatch.setattr(trainer, "micro_loss", original)
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
    monkeypatch.setattr(trainer, "validation_loss", lambda model, spec, *a, **kw: val_loss if spec.negatives else 1.0)
    train.main(_flags(data_dir, base, "--stage", "sdpo", "--max-steps", "2", "--negatives", "3", "--no-plots"))
    done = json.loads((base / "sdpo" / "done.json").read_text())
    assert done["start_val_loss"] == pytest.approx(math.log(4))
    assert done["best_val_loss"] == val_loss
    message = "[sdpo] warning: the best validation loss (1.5000, step 2) is above the start's ln(1+K) = 1.3863"
    assert (message in capsys.readouterr().out) == warned
