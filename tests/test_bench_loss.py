"""python -m minisdpo.bench (the fused loss against its twin and the exp floor) on tiny logits:
the fields of its JSON, and --capabilities, which times the fused op once per copy of the row
kernels this CPU runs. No timing is checked, only that each measurement exists."""
import json
import os

import pytest

from minisdpo import bench, ops
from minisdpo.bench import fused_loss

TINY = ["--S", "4", "--T", "3", "--V", "40", "--K", "1", "--repeats", "1", "--no-compile",
        "--dtype", "float32"]


def test_bench_json(tmp_path):
    path = tmp_path / "bench.json"
    bench.main([*TINY, "--json", str(path)])
    result = json.loads(path.read_text())
    assert result["machine"]["cpu_capability"] == ops.cpu_capability()
    entry = result["results"]["float32"]
    assert entry["floor_s"]["exp"] > 0 and entry["floor_s"]["exp_fresh"] > 0
    assert set(entry["times_s"]) == {"fused", "eager"}
    for times in entry["times_s"].values():
        assert times["fwd"] > 0 and times["fwd+bwd"] > 0
    assert set(entry["peak_extra_bytes"]) == {"fused", "eager"}
    # Every timed run behind the medians: the floor's and each variant's, one per round.
    assert set(entry["samples_s"]) == {"floor exp", "floor exp_fresh", "fused fwd", "fused fwd+bwd",
                                       "eager fwd", "eager fwd+bwd"}
    assert all(len(runs) == 1 for runs in entry["samples_s"].values())


def test_bench_every_capability(monkeypatch, tmp_path):
    monkeypatch.delenv("MINISDPO_CPU_CAPABILITY", raising=False)
    best = ops.cpu_capability()
    path = tmp_path / "bench.json"
    bench.main([*TINY, "--no-memory", "--capabilities", "all", "--json", str(path)])
    times = json.loads(path.read_text())["results"]["float32"]["times_s"]
    # Every copy from the CPU's best down to the portable one, each once; nothing above it.
    caps = fused_loss.CAPABILITIES[fused_loss.CAPABILITIES.index(best):]
    assert list(times) == [f"fused[{c}]" for c in caps] + ["eager"]
    assert "MINISDPO_CPU_CAPABILITY" not in os.environ  # restored after each run


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_capability_context_runs_that_copy(monkeypatch, cap):
    monkeypatch.setenv("MINISDPO_CPU_CAPABILITY", "default")
    if cap not in fused_loss.supported_capabilities([cap]):
        pytest.skip(f"this CPU does not run {cap}")
    with fused_loss.capability(cap):
        assert ops.cpu_capability() == cap
    assert os.environ["MINISDPO_CPU_CAPABILITY"] == "default"


def test_interleaved_rounds_shuffle():
    """Each function runs once a round, warm-up rounds first in the given order; the timed
    rounds each in an order of their own, the same from run to run."""
    from minisdpo.bench.common import interleaved_medians

    def run():
        calls = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        medians = interleaved_medians(fns, repeats=6, device="cpu", warmup=1)
        assert set(medians) == set("abcd") and all(t >= 0 for t in medians.values())
        return ["".join(calls[i:i + 4]) for i in range(0, len(calls), 4)]

    rounds = run()
    assert rounds[0] == "abcd" and all(sorted(r) == list("abcd") for r in rounds[1:])
    assert len(set(rounds[1:])) > 1
    assert run() == rounds
