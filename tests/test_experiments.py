"""The ReMoE experiment (``make toy-model``, ``make remoe-experiment``), end to end at toy
scale: a tiny corpus, a two-layer model, a few steps; every output is written and holds
what the tables need."""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def scripts():
    """The two scripts, imported; the process-wide torch settings their ``main`` changes
    (threads, flushing subnormal floats to zero, which would break hypothesis's float
    strategies in later tests) restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import remoe_experiment
        import toy_model

        yield toy_model, remoe_experiment
    finally:
        sys.path.remove(str(EXPERIMENTS))
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _corpus(path: Path) -> Path:
    rng = random.Random(0)
    names = ["cache", "expert", "router", "token", "layer", "value", "index", "count"]
    lines = []
    for _ in range(3000):
        a, b = rng.choice(names), rng.choice(names)
        lines.append(rng.choice([f"def {a}_{b}(self, {a}):\n", f"    return self.{a}[{b}]\n",
                                 f"    {a} = {b}({a}, [{b}, {a}])\n", f"class {a.title()}({b.title()}):\n"]))
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("arch", ["olmoe", "qwen2_moe", "deepseek_v3"])
def test_toy_model_and_experiment_end_to_end(scripts, tmp_path, arch):
    toy_model, experiment = scripts
    model, data = tmp_path / "model", tmp_path / "data"
    corpus = _corpus(tmp_path / "corpus.txt")
    toy_model.main(["--arch", arch, "--corpus", str(corpus), "--out", str(model), "--data-dir", str(data), *(
        "--layers 2 --hidden 32 --heads 2 --experts 8 --top-k 2 --expert-width 16 --vocab 300 --steps 3 "
        "--batch-size 2 --seq-len 32 --heldout-every 4 --max-heldout-chars 12000 --eval-blocks 2 --prompts 2 "
        "--threads 1 --experts-impl eager").split()])
    assert all((data / f"{name}.jsonl").exists() for name in ("train", "validation", "test", "test_prompts"))
    results = tmp_path / "results"
    experiment.main(["--arch", arch, "--model", str(model), "--data-dir", str(data),
                     "--remoe-out", str(tmp_path / "remoe"), "--results", str(results),
                     "--base-trace", str(tmp_path / "base.parquet"),
                     "--remoe-trace", str(tmp_path / "remoe.parquet"), *(
                         "--weights 0,1 --seeds 0,1 --steps 2 --seq-len 16 --batch-size 2 --val-blocks 2 "
                         "--test-tokens 512 --lengths 1,4 --recent-biases 2 --cache-biases 2 "
                         "--cache-capacity 4 "
                         "--capacities 2,4 --sweep-capacities 2:8:2 --threads 1").split()])
    with open(results / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    # 2 weights x 2 seeds, each on validation and on test at 2 lengths
    assert len(runs) == 12 and {(r["split"], r["length"]) for r in runs} == {
        ("validation", "256"), ("test", "16"), ("test", "64")}
    summary = json.loads((results / "summary.json").read_text())
    assert summary["chosen_weight"] in (0.0, 1.0)
    # biased routing needs a softmax router: DeepSeek-V3's sigmoid scores are skipped
    methods = set() if arch == "deepseek_v3" else {"recent bias", "cache bias"}
    assert {row["method"] for row in summary["alternatives"]} == methods
    tested = [e for e in summary["summary"] if e["split"] == "test"]
    assert all(e["seeds"] == 2 and 0 <= e["lru_hit_c8"] <= 1 and e["kl"] > -1e-6 for e in tested)
    text = (results / "summary.md").read_text()
    assert "## test, blocks of 64 tokens" in text and "inference-time alternatives" in text
    for name in ("locality_tradeoff.png", "alternatives.png", "compare.txt", "sweep.parquet"):
        assert (results / name).stat().st_size > 0
    assert (tmp_path / "base.parquet").exists() and (tmp_path / "remoe.parquet").exists()


@pytest.mark.parametrize("script, args, message", [
    ("experiment", ["--weights", "0,nan"], "finite number"),
    ("experiment", ["--seeds", "-1"], ">= 0"),
    ("experiment", ["--lengths", "1,x"], "not a int"),
    ("experiment", ["--main-weight", "0.7"], "--main-weight must be auto or one of --weights"),
    ("experiment", ["--test-tokens", "100"], "--test-tokens must hold one block"),
    ("experiment", ["--steps", "0"], "--steps must be an integer >= 1"),
    ("experiment", ["--cache-biases", "inf"], "finite number"),
    ("experiment", ["--results", "{file}/results"], "Not a directory"),
    ("experiment", ["--remoe-trace", "{file}"], "exists: pass --force to replace it"),
    ("toy", ["--lr", "0"], "> 0"),
    ("toy", ["--top-k", "40"], "--top-k must be at most --experts"),
    ("toy", ["--corpus", "{file}", "--out", "{file}/model"], "Not a directory"),
    ("toy", ["--data-dir", "{dir}"], "exists: pass --force to replace it"),
])
def test_bad_flags_are_one_line_and_exit_2(scripts, tmp_path, capsys, script, args, message):
    """Each refused before any training: one line on stderr, exit status 2."""
    toy_model, experiment = scripts
    taken = tmp_path / "taken"
    taken.write_text("a user's file\n")
    made = tmp_path / "made"  # a data folder holding a user's splits
    made.mkdir()
    (made / "train.jsonl").write_text("a user's file\n")
    argv = [arg.replace("{file}", str(taken)).replace("{dir}", str(made)) for arg in args]
    if script == "experiment":
        names = ("remoe-out", "results", "base-trace", "remoe-trace")
        outputs = [f"--{name}={tmp_path / name}" for name in names]
        argv = ["--model", str(tmp_path / "none"), "--data-dir", str(tmp_path / "none"), *outputs, *argv]
        main = experiment.main
    else:
        argv = ["--out", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"), *argv]
        main = toy_model.main
    with pytest.raises(SystemExit) as done:
        toy_model.as_command(main, argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err
    assert taken.read_text() == (made / "train.jsonl").read_text() == "a user's file\n"
