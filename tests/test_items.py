"""Collaborative item tokens (minisdpo.items, model.ItemTokens): the prompt, the injection at the
input or at the frozen-prefix cache's boundary, the projector's gradients and reference, and
the whole pipeline (train, resume, evaluation, recommend) with item tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOK, random_rows, tiny_llama

from minisdpo import data as D
from minisdpo import loss as pytorch_backend
from minisdpo import ops, recommend, train
from minisdpo.baselines import UNKNOWN, SASRec, SASRecRecommender
from minisdpo.batches import packed_batch
from minisdpo.checkpoint import from_pretrained
from minisdpo.items import PROJECTOR_FILE, ItemTokenizer, attach, load_projector, save_projector
from minisdpo.prefix import PrefixCache
from minisdpo.step import StageLoss



def _sasrec(titles: list[str], seed: int = 0) -> SASRecRecommender:
    """An untrained SASRec over ``titles`` (its embeddings are random: what the tests need)."""
    torch.manual_seed(seed)
    vocab = {t: i + 2 for i, t in enumerate(titles)}
    return SASRecRecommender(SASRec(len(vocab) + 2, dim=8), vocab, {})


def _setup(rows, layer: int, dtype=torch.float32, seed: int = 0, user: bool = False, before: bool = False):
    model = tiny_llama(seed).to(dtype)
    titles = sorted({t for r in rows for t in (*r.history, *r.candidates)})[:-3]   # three unknown titles
    rec = _sasrec(titles, seed)
    attach(model, rec, layer, placeholder=TOK.encode(" ")[0], user=user, before=before, seed=seed)
    with torch.no_grad():   # a projector far from its initialisation, whose output matters
        for p in model.items.proj.parameters():
            p.normal_(0.0, 0.5)
    return model, ItemTokenizer.of(TOK, rec, model.args.vocab_size, before)


def test_an_item_token_follows_every_title_and_the_text_is_unchanged():
    row = random_rows(1, seed=1)[0]
    rec = _sasrec(list(row.history[:-1]) + list(row.candidates[1:]))
    tok = ItemTokenizer.of(TOK, rec, TOK.vocab_size)
    ids = D.encode_prompt(tok, row, "music")
    items = [i - TOK.vocab_size for i in ids if i >= TOK.vocab_size]
    titles = (*row.history, *row.candidates)
    n = rec.model.items.num_embeddings     # a candidate's token: the item's id after all history ids
    assert items == [rec.vocab.get(t, UNKNOWN) + n * (k >= len(row.history)) for k, t in enumerate(titles)]
    items = [i % n for i in items]
    assert items[len(row.history) - 1] == UNKNOWN and items[len(row.history)] == UNKNOWN   # not in SASRec
    # Without the item tokens, the ids are the text prompt's (bytes: no merges across the cut).
    assert [i for i in ids if i < TOK.vocab_size] == D.encode_prompt(TOK, row, "music")
    # Each item token right after its title's last byte.
    text = D.format_prompt(row, "music")
    for title, pos in zip(titles, [k for k, i in enumerate(ids) if i >= TOK.vocab_size]):
        assert TOK.decode(ids[pos - len(title.encode()):pos]) == title
    assert text.count("\n") + 1 == len(TOK.decode([i for i in ids if i < TOK.vocab_size]).splitlines())
    before = ItemTokenizer.of(TOK, rec, TOK.vocab_size, before=True)
    ids = D.encode_prompt(before, row, "music")
    for title, pos in zip(titles, [k for k, i in enumerate(ids) if i >= TOK.vocab_size]):
        assert TOK.decode(ids[pos + 1:pos + 1 + len(title.encode())]) == title       # the title follows its token
    bad = D.Row(row.history, (row.candidates[0] + D.ITEM_MARK, *row.candidates[1:]), row.target)
    with pytest.raises(ValueError, match="marks item tokens"):
        D.encode_prompt(tok, bad, "music")


@pytest.mark.parametrize("user,before", [(False, False), (True, False), (True, True)],
                         ids=["items", "items+user", "items+user-before"])
@pytest.mark.parametrize("layer", [0, 1], ids=["input", "boundary"])
@pytest.mark.parametrize("backend", [pytorch_backend, ops], ids=["pytorch", "fused"])
def test_the_cached_path_equals_the_whole_model_with_item_tokens(layer, backend, user, before):
    """The cache at layer 1 of a 2-layer model: with the projection entering at the boundary the
    cache holds the placeholder only and the projector runs on top of it; entering at the input,
    the cache holds its output. Both equal the whole model in float32, log-probs and gradients."""
    rows = random_rows(4, seed=2)
    model, tok = _setup(rows, layer, user=user, before=before)
    cache = PrefixCache.build(model, tok, rows, "music", 256, 1, batch_size=2, progress=False)
    responses = [[r.target, *[c for c in r.candidates if c != r.target][:3]] for r in rows]
    objective = StageLoss(model, backend, negatives=3)
    whole = packed_batch(tok, rows, responses, 256, domain="music")
    cached = cache.batch(list(range(len(rows))), responses)
    assert torch.equal(whole.input_ids, cached.input_ids) and (whole.input_ids >= TOK.vocab_size).any()
    ref = torch.randn(len(rows) * 4)
    grads = []
    for batch in (whole, cached):
        model.zero_grad()
        loss, logps = objective(batch, None, ref)
        loss.backward()
        grads.append((logps.detach(), [None if p.grad is None else p.grad.clone() for p in model.items.proj.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    if layer == 1:   # the projector enters above the cache: its gradients come from the top layer
        for a, b in zip(grads[1][1], grads[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The item tokens matter: without the projection the log-probs differ.
    with torch.no_grad():
        model.items.proj[2].bias.add_(1.0)
        moved, _ = objective(whole, None, ref)
    assert not torch.allclose(moved, loss.detach())


@pytest.mark.parametrize("user,before", [(False, False), (True, False), (True, True)],
                         ids=["items", "items+user", "items+user-before"])
@pytest.mark.parametrize("layer", [0, 1], ids=["input", "boundary"])
def test_projector_gradients_equal_those_of_a_plain_twin(layer, user, before):
    """The model's item tokens against the same computation written out by hand: the
    placeholder's ids through the layers below ``layer``, the projected features put in at the
    item positions with index_put, the layers above; same log-probs, same projector gradients
    (float32, within 1e-5)."""
    rows = random_rows(3, seed=3)
    model, tok = _setup(rows, layer=layer, user=user, before=before)
    batch = packed_batch(tok, rows, [[r.target, r.candidates[0]] for r in rows], 256, domain="music")
    weights = torch.randn(batch.labels.shape)
    V, items = model.args.vocab_size, model.items

    def objective(h: torch.Tensor) -> torch.Tensor:
        logps = torch.log_softmax(model.lm_head(h.flatten(0, 1)[batch.index]).float(), -1)   # (S, R, V)
        picked = logps.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
        return (picked * weights * (batch.labels >= 0)).sum()

    def twin() -> torch.Tensor:
        is_item = batch.input_ids >= V
        plain = torch.where(is_item, items.placeholder_id, batch.input_ids)
        kw = {"position_ids": batch.position_ids, "mask": batch.mask}
        x = model.model.embed_tokens(plain) if layer == 0 else model(plain, stop_layer=layer, **kw)
        n = items.features.shape[0]
        features = []
        for g, ids in enumerate(batch.input_ids.tolist()):
            history = [i - V for i in ids if V <= i < V + n][-items.history_len:]
            u = None
            if items.user is not None:
                seq = torch.tensor([[0] * (items.history_len - len(history)) + history])
                u = items.user(seq)[0]
            for i in ids:
                if i >= V + n:          # a candidate: [e, u * e] with the row's user
                    e = items.features[i - V - n]
                    features.append(e if u is None else torch.cat([e, u * e]))
                elif i >= V:            # a history item: [e, 0]
                    e = items.features[i - V]
                    features.append(e if u is None else torch.cat([e, torch.zeros_like(e)]))
        where = is_item.nonzero(as_tuple=True)
        added = items.proj(torch.stack(features)).to(x.dtype)
        x = x.index_put(where, x[where] + added)
        if before:      # the title's first token, right after its item token, gets the same
            after = (where[0], where[1] + 1)
            x = x.index_put(after, x[after] + added)
        if layer == 0:   # the embedding is the residual stream entering layer 0: run the model on it by hand
            cos, sin = model._rope(batch.position_ids, x.dtype)
            allowed = batch.mask.view(-1, 1, *batch.mask.shape[1:])
            for block in model.model.layers:
                x = block(x, cos, sin, allowed)
            return objective(model.model.norm(x))
        return objective(model(plain, first_layer=layer, hidden=x, return_hidden=True, **kw))

    results = []
    for run in (lambda: objective(model(batch.input_ids, position_ids=batch.position_ids, mask=batch.mask,
                                        return_hidden=True)), twin):
        model.zero_grad()
        value = run()
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in items.proj.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_reference_reads_the_frozen_projector():
    rows = random_rows(3, seed=4)
    model, tok = _setup(rows, layer=1)
    objective = StageLoss(model, pytorch_backend, negatives=1)
    batch = packed_batch(tok, rows, [[r.target, r.candidates[0] if r.candidates[0] != r.target else r.candidates[1]]
                                     for r in rows], 256, domain="music")
    before = objective.reference(batch)
    model.items.freeze_reference()
    with torch.no_grad():
        for p in model.items.proj.parameters():
            p.add_(0.3)
    torch.testing.assert_close(objective.reference(batch), before, rtol=0, atol=0)
    assert not torch.allclose(objective.token_logps(batch).sum(-1), before)


def test_a_saved_projector_loads_back_and_a_foreign_one_is_refused(tmp_path):
    rows = random_rows(2, seed=5)
    model, _ = _setup(rows, layer=1)
    save_projector(model, tmp_path / PROJECTOR_FILE)
    other, _ = _setup(rows, layer=1, seed=1)
    load_projector(other, tmp_path / PROJECTOR_FILE)
    for a, b in zip(model.items.proj.state_dict().values(), other.items.proj.state_dict().values()):
        assert torch.equal(a, b)
    elsewhere, _ = _setup(rows, layer=0)
    with pytest.raises(ValueError, match="layer 1 \\(here 0\\)"):
        load_projector(elsewhere, tmp_path / PROJECTOR_FILE)
    with pytest.raises(FileNotFoundError, match="no item-token projector"):
        load_projector(other, tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ the pipeline

def _run_flags(data_dir: Path, base: Path, out: Path, *extra: str) -> list[str]:
    from test_train import _flags
    return _flags(data_dir, out, "--model", str(base), "--dtype", "float32",
                  "--lora-layers", "1", "--sasrec-epochs", "1", "--lora-dropout", "0", *extra)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from test_train import _rows, _user_checkpoint
    d = tmp_path_factory.mktemp("items-data")
    for split, n in (("train", 48), ("val", 8), ("test", 8)):
        (d / f"toy-{split}.json").write_text(json.dumps(_rows(n, seed=len(split))))
    return d, _user_checkpoint(d, tmp_path_factory.mktemp("items-base") / "base", n_layers=3)


@pytest.mark.parametrize("where", ["boundary", "input", "sft-adapter"])
def test_every_stage_trains_and_evaluates_with_item_tokens(checkpoint, tmp_path, where, monkeypatch):
    data_dir, base = checkpoint
    passes = []   # the models of each shared pass of the bottom layers
    shared = train.generate_answers_shared
    monkeypatch.setattr(train, "generate_answers_shared",
                        lambda models, *a, **k: passes.append(len(models)) or shared(models, *a, **k))
    extra = {"boundary": ["--item-layer", "boundary"],
             "input": ["--item-layer", "input", "--item-projector", "freeze", "--item-tokens", "sasrec",
                       "--item-position", "after"],
             # the SFT adapter continued, on the top layer from the base model's cache
             "sft-adapter": ["--sdpo-init", "sft-adapter", "--sft-lora-layers", "1"]}[where]
    out = tmp_path / "run"
    summary = train.main(_run_flags(data_dir, base, out, "--max-steps", "3", "--compare-dpo", *extra))
    assert list(summary["models"]) == ["pop", "sasrec", "sft", "sdpo", "dpo"]
    # The three models generated from one pass of the layers below the top one; evaluated each on
    # its own (the whole model run for every one) they score the same.
    assert passes == [3]
    monkeypatch.setattr(train, "shares_bottom", lambda *a: False)
    alone = train.main(_run_flags(data_dir, base, out, "--stage", "eval", "--compare-dpo", *extra))
    assert passes == [3] and alone["models"] == summary["models"]
    assert summary["item_tokens"] == {"source": "sasrec" if where == "input" else "sasrec-user",
                                      "layer": 0 if where == "input" else 2,
                                      "projector": "freeze" if where == "input" else "train"}
    for name in ("sft", "sdpo", "dpo"):
        assert (out / name / PROJECTOR_FILE).is_file()
    # The SFT model is a plain Hugging Face checkpoint (the projector is a file of its own), and
    # the adapters are PEFT's.
    assert set(from_pretrained(str(out / "sft" / "model")).state_dict()) == set(from_pretrained(str(base)).state_dict())
    assert not any("items" in f.name for f in (out / "sdpo" / "adapter").iterdir())
    # SFT trained the projector; the preference stage trained it further or kept it.
    from safetensors.torch import load_file
    sft, sdpo = load_file(str(out / "sft" / PROJECTOR_FILE)), load_file(str(out / "sdpo" / PROJECTOR_FILE))
    assert any(not torch.equal(sft[k], sdpo[k]) for k in sft) == (where != "input")
    # The run's SASRec is the baseline's: trained once, saved, read back in the evaluation.
    assert (out / "sasrec" / "model.safetensors").is_file()
    assert summary["baselines"]["sasrec"]["epochs_trained"] == 1


def test_item_tokens_none_is_the_text_only_run(checkpoint, tmp_path):
    data_dir, base = checkpoint
    out = tmp_path / "run"
    summary = train.main(_run_flags(data_dir, base, out, "--max-steps", "1", "--item-tokens", "none",
                                    "--no-ranking", "--baselines", "none"))
    assert summary["item_tokens"] is None and not (out / "sft" / PROJECTOR_FILE).exists()
    assert not (out / "sasrec").exists()


def test_an_interrupted_run_with_item_tokens_resumes_like_an_uninterrupted_one(checkpoint, tmp_path):
    data_dir, base = checkpoint
    flags = ["--stage", "sdpo", "--sdpo-epochs", "4", "--ckpt-every", "2", "--no-ranking", "--baselines", "none"]
    straight, out = tmp_path / "straight", tmp_path / "interrupted"
    for run in (straight, out):
        train.main(_run_flags(data_dir, base, run, "--stage", "sft", "--max-steps", "2"))
    train.main(_run_flags(data_dir, base, straight, *flags))
    from test_train import kill_at_first_checkpoint
    kill_at_first_checkpoint(_run_flags(data_dir, base, out, *flags), out / "sdpo")
    train.main(_run_flags(data_dir, base, out, *flags, "--resume"))

    def curve(run: Path) -> list[tuple]:
        return [(r["stage"], r["step"], r.get("loss"), r.get("val_loss"))
                for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert curve(out) == curve(straight)
    from safetensors.torch import load_file
    a, b = load_file(str(out / "sdpo" / PROJECTOR_FILE)), load_file(str(straight / "sdpo" / PROJECTOR_FILE))
    assert all(torch.equal(a[k], b[k]) for k in b)
    # The evaluation reads the same models back.
    one = train.main(_run_flags(data_dir, base, out, *flags, "--stage", "eval", "--resume"))
    two = train.main(_run_flags(data_dir, base, straight, *flags, "--stage", "eval", "--resume"))
    assert one["models"] == two["models"]


def test_recommend_and_missing_files_with_item_tokens(checkpoint, tmp_path, capsys):
    data_dir, base = checkpoint
    out = tmp_path / "run"
    train.main(_run_flags(data_dir, base, out, "--max-steps", "2", "--baselines", "none"))
    rows = D.load_json_dir(data_dir)["test"][:2]
    history = [*rows[0].history, "A title SASRec never saw"]
    results = recommend.run([str(out), "--stage", "sdpo", "--json", "--history", *history,
                             "--candidates", *rows[0].candidates[:5], "Another unknown title"])
    assert len(results) == 1 and len(results[0]["ranking"]) == 6
    assert all(torch.isfinite(torch.tensor(r["score"])) for r in results[0]["ranking"])
    capsys.readouterr()

    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    (out / "sdpo" / PROJECTOR_FILE).rename(tmp_path / "kept")
    with pytest.raises(SystemExit) as e:
        recommend.main([str(out), "--stage", "sdpo", "--history", "x", "--candidates", "a", "b"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no item-token projector" in err and PROJECTOR_FILE in err
    with pytest.raises(SystemExit, match="projector .* is missing"):
        train.main(_run_flags(data_dir, base, out, "--max-steps", "2", "--baselines", "none", "--stage", "eval",
                              "--resume"))
    (tmp_path / "kept").rename(out / "sdpo" / PROJECTOR_FILE)
    (out / "sasrec" / "config.json").rename(tmp_path / "kept")
    with pytest.raises(SystemExit) as e:
        recommend.main([str(out), "--history", "x", "--candidates", "a", "b"])
    assert "its SASRec" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not the SASRec they came from"):
        train.main(_run_flags(data_dir, base, out, "--max-steps", "2", "--baselines", "none", "--stage", "eval",
                              "--resume"))
    (tmp_path / "kept").rename(out / "sasrec" / "config.json")
    after = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
    assert after == before     # the refused commands changed nothing
