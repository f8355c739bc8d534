"""Tests of minisdpo.evaluate: the paper's valid/hit rule on hand-made answers, HR@1 and
ValidRatio with a scripted model, ranking metrics with models whose scores are known, and both
evaluators end to end on a tiny random Llama."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from minisdpo import ops
from minisdpo.data import Row, encode_prompt, encode_response, format_prompt
from minisdpo.evaluate import (_ranking_scores_unpacked, evaluate_generation, evaluate_ranking, generate_answers,
                               generate_answers_shared, judge, rank_metrics, ranking_scores)
from minisdpo.lora import apply_lora
from minisdpo.model import Llama, ModelArgs
from minisdpo.prefix import PrefixCache

from conftest import TOK, ByteTokenizer


# ------------------------------------------------------------------------------------ judge

CANDS = ("Beck", "Jeff Beck", "Muse", "The Beatles", "Glee Cast")


@pytest.mark.parametrize("answer, expected", [
    ("Muse", (True, True)),                 # the target alone
    ("  Muse\n", (True, True)),             # surrounding text is allowed (substring rule)
    ("The Beatles", (True, False)),         # another single candidate: valid, no hit
    ("Muse or The Beatles", (False, False)),  # two candidates: invalid
    ("Radiohead", (False, False)),          # none
    ("", (False, False)),
    ("muse", (False, False)),               # case-sensitive, as the public S-DPO code
    ("Jeff Beck", (False, False)),          # contains "Beck" too: invalid by the paper's rule
    ("Beck", (True, False)),                # the shorter one alone is fine
])
def test_judge_rule(answer, expected):
    assert judge(answer, CANDS, "Muse") == expected


def test_judge_substring_target():
    # The target "Beck" named alone is a hit; naming "Jeff Beck" is invalid, not a hit.
    assert judge("Beck", CANDS, "Beck") == (True, True)
    assert judge("Jeff Beck", CANDS, "Beck") == (False, False)
    assert judge("Jeff Beck", CANDS, "Jeff Beck") == (False, False)


def test_judge_bad_input():
    with pytest.raises(ValueError, match="target"):
        judge("Muse", CANDS, "Blur")
    with pytest.raises(TypeError, match="answer"):
        judge(None, CANDS, "Muse")


# ------------------------------------------------------------------------------------ generation

def row(i, cands, target):
    # histories of different lengths, so that batched prompts need padding
    return Row((f"History {'x' * i}", "Shared", "Item"), tuple(cands), target)


class ScriptedModel:
    """Answers each prompt from a script; checks the left padding it is given and appends junk
    after EOS (which the evaluator must ignore)."""

    def __init__(self, script: dict[str, str]):
        self.script, self.batch_shapes, self.padded_rows = script, [], 0

    def generate(self, input_ids, max_new_tokens, eos_id, attention_mask=None):
        B, T = input_ids.shape
        self.batch_shapes.append((B, T))
        lengths = attention_mask.sum(1)
        self.padded_rows += int((lengths < T).sum())
        assert torch.equal(attention_mask, (torch.arange(T) >= T - lengths[:, None]).long()), "not left-padded"
        out = torch.full((B, max_new_tokens), TOK.pad_id)
        for b in range(B):
            prompt = input_ids[b][attention_mask[b].bool()].tolist()
            assert prompt[0] == TOK.bos_id
            answer = self.script[TOK.decode(prompt)]
            ids = (TOK.encode(answer) + [eos_id] + TOK.encode("Muse Beck"))[:max_new_tokens]
            out[b, :len(ids)] = torch.tensor(ids)
        return out


def test_evaluate_generation_hand_counted():
    cands = ["Beck", "Jeff Beck", "Muse", "The Beatles", "Glee Cast"]
    cases = [  # (target, answer, valid, hit)
        ("Muse", "Muse", 1, 1),
        ("Muse", "The Beatles", 1, 0),
        ("Muse", "Muse, The Beatles", 0, 0),
        ("Glee Cast", "nothing at all", 0, 0),
        ("Beck", "Jeff Beck", 0, 0),
        ("Beck", "Beck", 1, 1),                          # junk after EOS names Muse: ignored
        ("Glee Cast", "x" * 30 + "Glee Cast", 0, 0),     # cut by max_new_tokens before the title
    ]
    rows = [row(i, cands, t) for i, (t, *_ ) in enumerate(cases)]
    model = ScriptedModel({format_prompt(r, "music"): a for r, (_, a, _, _) in zip(rows, cases)})
    result = evaluate_generation(model, TOK, rows, "music", batch_size=3, max_new_tokens=20, progress=False)
    assert result["n"] == 7
    assert result["hr@1"] == pytest.approx(2 / 7) and result["valid_ratio"] == pytest.approx(3 / 7)
    assert result["answers"][:6] == [a for _, a, _, _ in cases[:6]]
    assert result["answers"][6] == "x" * 20
    assert [b for b, _ in model.batch_shapes] == [3, 3, 1]
    assert model.padded_rows > 0


def test_evaluate_generation_bad_input():
    with pytest.raises(ValueError, match="rows"):
        evaluate_generation(ScriptedModel({}), TOK, [], "music")
    rows = [row(0, ["A", "B"], "A")]
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_generation(ScriptedModel({}), TOK, rows, "music", batch_size=0)


# ------------------------------------------------------------------------------------ ranking

def test_rank_metrics_by_hand():
    scores = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    out = rank_metrics(scores, torch.tensor([0, 0, 0]))    # ranks 1, 2 (tie, pessimistic), 3
    assert out["rank_hr@1"] == pytest.approx(1 / 3) and out["rank_hr@5"] == pytest.approx(1.0)
    assert out["rank_ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)


class UnigramModel:
    """The same next-token distribution everywhere: EOS likely, every byte equally unlikely, so
    logp(title + EOS) falls with the title's length and shorter candidates rank higher."""

    def __call__(self, input_ids, attention_mask=None, position_ids=None, mask=None, return_hidden=False,
                 outputs=None):
        hidden = torch.zeros(*(input_ids.shape if outputs is None else outputs.shape), 1)
        return hidden if return_hidden else self.lm_head(hidden)

    def lm_head(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], ByteTokenizer.vocab_size)
        logits[..., TOK.eos_id] = 5.0
        return logits


def test_evaluate_ranking_hand_computed():
    def cands(lengths):
        return [chr(ord("a") + i) * n for i, n in enumerate(lengths)]
    rows = []
    c = cands(range(1, 21)); rows.append(row(0, c, c[0]))                  # shortest: rank 1
    c = cands(range(1, 21)); rows.append(row(1, c, c[2]))                  # 3rd shortest: rank 3
    c = cands([1, 2, 2, 2] + list(range(3, 19))); rows.append(row(2, c, c[1]))  # tied with 2: rank 4
    c = cands(range(1, 21)); rows.append(row(3, c, c[19]))                 # longest: rank 20
    out = evaluate_ranking(UnigramModel(), TOK, rows, "movies", batch_size=3, progress=False)
    assert out["n"] == 4
    assert out["rank_hr@1"] == pytest.approx(1 / 4) and out["rank_hr@5"] == pytest.approx(3 / 4)
    assert out["rank_ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 4)


class BigramModel(torch.nn.Module):
    """Logits depend on the current token: tests that batching, padding and the label shift of
    the evaluator give the same scores as scoring each sequence alone."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(ByteTokenizer.vocab_size, ByteTokenizer.vocab_size,
                                                    generator=torch.Generator().manual_seed(0)))
        self.lm_head = torch.nn.Identity()      # the "hidden state" is already the logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, mask=None, return_hidden=False,
                outputs=None):
        return self.table[input_ids if outputs is None else input_ids.gather(1, outputs)]


def test_evaluate_ranking_matches_unbatched_scores():
    model = BigramModel()
    names = ["Muse", "Jeff Beck", "Beck", "The Beatles", "Glee Cast", "Air", "Bach", "Blur"]
    rows = [row(i, names, names[i % len(names)]) for i in range(5)]
    expected_scores = []
    for r in rows:
        prompt = encode_prompt(TOK, r, "music")
        scores = []
        for title in r.candidates:
            ids = torch.tensor([prompt + encode_response(TOK, title)])
            logp = torch.log_softmax(model(ids)[0].double(), -1)
            # token at position t is predicted by the logits at t - 1
            scores.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])))
        expected_scores.append(scores)
    target_index = torch.tensor([r.candidates.index(r.target) for r in rows])
    expected = rank_metrics(torch.tensor(expected_scores), target_index)
    got = evaluate_ranking(model, TOK, rows, "music", batch_size=2, progress=False)
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    # a non-trivial case: not every target ranked first or last
    assert 0 < expected["rank_hr@5"] < 1 or 0 < expected["rank_hr@1"] < 1


def test_evaluate_ranking_bad_input():
    rows = [row(0, ["A", "B"], "A"), row(1, ["A", "B", "C"], "A")]
    with pytest.raises(ValueError, match="same number of candidates"):
        evaluate_ranking(UnigramModel(), TOK, rows, "music", progress=False)


# ------------------------------------------------------------------------------------ real model

def test_both_evaluators_on_tiny_random_llama():
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=ByteTokenizer.vocab_size, dim=32, n_layers=2, n_heads=4,
                     n_kv_heads=2, intermediate_size=64)
    model = Llama(args).eval()
    names = ["Muse", "Beck", "Air", "Blur", "Bach"]
    rows = [Row(("H" * (i + 1), "Blur"), tuple(names), names[i]) for i in range(3)]
    gen = evaluate_generation(model, TOK, rows, "music", batch_size=2, max_new_tokens=6, progress=False)
    assert gen["n"] == 3 and 0 <= gen["hr@1"] <= gen["valid_ratio"] <= 1
    # left padding and the KV cache must not change the greedy answer
    alone = evaluate_generation(model, TOK, rows, "music", batch_size=1, max_new_tokens=6, progress=False)
    assert gen["answers"] == alone["answers"]
    rank = evaluate_ranking(model, TOK, rows, "music", batch_size=2, progress=False)
    assert rank["n"] == 3
    for key in ("rank_hr@1", "rank_hr@5", "rank_ndcg@5"):
        assert 0 <= rank[key] <= 1
    assert rank["rank_hr@5"] == 1.0            # 5 candidates: every target is in the top 5


def _twenty_candidates_on_tiny_llama(seed: int, dtype: torch.dtype = torch.float32):
    """A random 2-layer Llama and 5 rows of 20 candidate titles of 3 to 22 bytes, prompts of
    decreasing length."""
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=ByteTokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                     n_kv_heads=2, intermediate_size=128)
    model = Llama(args).to(dtype).eval()
    names = [f"{'Title' * (i % 4)} {i}" for i in range(20)]
    rows = [Row(("H" * (20 - 4 * i), "Blur"), tuple(names), names[3 * i]) for i in range(5)]
    return model, rows


@pytest.mark.parametrize("max_len", [512, 80])
def test_packed_ranking_scores_equal_unpacked_on_tiny_llama(max_len):
    # 20 candidates share one prompt pass: the scores must equal 20 full prompt + title passes,
    # in the rows' order although batches are formed by prompt length (here longest first),
    # also when max_len cuts the prompts.
    model, rows = _twenty_candidates_on_tiny_llama(seed=0)
    packed = ranking_scores(model, TOK, rows, "music", batch_size=2, max_len=max_len, progress=False)
    unpacked = _ranking_scores_unpacked(model, TOK, rows, "music", batch_size=2, max_len=max_len)
    assert packed.shape == (5, 20)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    assert packed.std(1).min() > 0.1               # candidates really score differently


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_ranking_scores_with_the_fused_lm_head_equal_the_logits_path(dtype, tol):
    # backend=minisdpo.ops scores from the hidden states with the fused LM head and skips the
    # padding of the shorter titles; the scores are the logits path's, in float32 and bfloat16
    # (there the logits path rounds the logits to bfloat16 first, the fused head does not).
    model, rows = _twenty_candidates_on_tiny_llama(seed=1, dtype=dtype)
    plain = ranking_scores(model, TOK, rows, "music", batch_size=2, progress=False)
    fused = ranking_scores(model, TOK, rows, "music", batch_size=2, progress=False, backend=ops)
    assert fused.dtype == plain.dtype == torch.float32 and fused.shape == (5, 20)
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    assert plain.std(1).min() > 0.1


def _tuned_copy(model: Llama, layers: list[int]) -> Llama:
    """A copy of ``model`` with LoRA far from zero on ``layers``."""
    tuned = copy.deepcopy(model).float()
    apply_lora(tuned, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers=layers)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 3.0)
    return tuned.to(next(model.parameters()).dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_len", [512, 490])
def test_generate_answers_shared_equals_each_model_alone(max_len, dtype):
    # One pass of layer 0 over the packed rows serves both models' generation and builds the
    # rows' frozen-prefix cache: the answers of each model's own generate_answers (whose prompts
    # are cut the same way, also when max_len cuts them) and the cache PrefixCache.build makes.
    model, rows = _twenty_candidates_on_tiny_llama(seed=2, dtype=dtype)
    tuned = _tuned_copy(model, [1])
    alone = [generate_answers(m, TOK, rows, "music", batch_size=2, max_new_tokens=8, max_len=max_len,
                              progress=False) for m in (model, tuned)]
    shared, cache = generate_answers_shared([model, tuned], TOK, rows, "music", 1, max_len, batch_size=2,
                                            max_new_tokens=8, progress=False)
    assert shared == alone
    assert alone[0] != alone[1] and len(set(alone[1])) > 1          # the answers tell models and rows apart
    built = PrefixCache.build(model, TOK, rows, "music", max_len, 1, batch_size=2, progress=False)
    assert torch.equal(cache.hidden, built.hidden) and torch.equal(cache.prompt_lens, built.prompt_lens)
    if max_len == 490:   # rows 0 and 1 cut, the others whole
        assert (cache.prompt_lens < torch.tensor([len(encode_prompt(TOK, r, "music")) for r in rows])).any()


def test_generate_answers_shared_bad_input(tmp_path):
    model, rows = _twenty_candidates_on_tiny_llama(seed=2)
    with pytest.raises(ValueError, match=r"models\[1\] differs from models\[0\] below layer 1"):
        generate_answers_shared([model, _tuned_copy(model, [0])], TOK, rows, "music", 1, 512, progress=False)
    with pytest.raises(ValueError, match="layer must be an int in \\[1, 1\\]"):
        generate_answers_shared([model], TOK, rows, "music", 2, 512, progress=False)
    with pytest.raises(ValueError, match="models is empty"):
        generate_answers_shared([], TOK, rows, "music", 1, 512, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers_shared([model], TOK, rows, "music", 1, 512, max_new_tokens=0, progress=False)


def test_mcnemar_exact_test_by_hand():
    from minisdpo.evaluate import mcnemar
    a = [True, True, False, False, True, False, False, False]
    b = [True, False, True, True, True, True, False, False]
    t = mcnemar(a, b)
    # disagreements: a alone on row 1 (b = 1), b alone on rows 2, 3, 5 (c = 3); n = 4:
    # P(X <= 1) for Binomial(4, 1/2) = 5/16, two-sided 10/16.
    assert (t["b"], t["c"]) == (1, 3)
    assert t["diff"] == pytest.approx(2 / 8)
    assert t["p_value"] == pytest.approx(10 / 16)
    assert mcnemar([True] * 5, [True] * 5)["p_value"] == 1.0                 # no disagreement
    assert mcnemar([False] * 10, [True] * 10)["p_value"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="equally long"):
        mcnemar([True], [True, False])
