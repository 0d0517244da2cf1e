"""`moecache capture` end to end: the command, then info and replay on what it wrote;
SIGTERM and SIGKILL leave a readable trace of every completed step."""

from __future__ import annotations

import json
import os
import signal

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

import moecache as mc  # noqa: E402
from moecache.cli import cli  # noqa: E402
from moecache.trace_io import parts_dir  # noqa: E402

from .capture_process import start_long_capture  # noqa: E402
from .tiny_models import PROMPTS, save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("olmoe"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_capture_then_info_and_replay(model_dir, prompts, tmp_path):
    out = tmp_path / "t.parquet"
    code, stdout, stderr = run("capture", model_dir, "--prompts", prompts, "--out", out,
                               "--max-new-tokens", 5, "--batch-size", 2, "--device", "cpu")
    assert code == 0, stderr
    assert "wrote" in stdout
    trace = mc.Trace.load(out)
    assert trace.meta["router"] == "baseline" and not trace.partial
    # generate mode: one prefill step per batch, then one step per decoded token
    assert trace.num_steps == 2 * (1 + 4)
    code, stdout, _ = run("info", out)
    assert code == 0 and "olmoe" in stdout.lower() and "complete" in stdout
    code, stdout, _ = run("replay", out, "--per-token", "-c", trace.top_k, "--json")
    assert code == 0 and json.loads(stdout)["requests"] == trace.num_tokens * trace.num_layers * trace.top_k
    code, _, stderr = run("capture", model_dir, "--prompts", prompts, "--out", out)
    assert code == 2 and "already exists" in stderr


@pytest.mark.parametrize("args, message", [
    (["--prompts", "{missing}"], "no such prompts file"),
    (["--prompts", "{prompts}", "--max-new-tokens", "0"], "invalid value for '--max-new-tokens': 0 is not"),
])
def test_capture_bad_input(model_dir, prompts, tmp_path, args, message):
    names = {"missing": tmp_path / "none.txt", "prompts": prompts}
    code, stdout, stderr = run("capture", model_dir, "--out", tmp_path / "x.parquet",
                               *[a.format(**names) for a in args])
    assert code == 2 and message in stderr.lower() and len(stderr.strip().splitlines()) == 1


def test_capture_of_missing_model_is_one_line(tmp_path, prompts):
    code, _, stderr = run("capture", tmp_path / "nope", "--prompts", prompts, "--out", tmp_path / "x.parquet")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminated_capture_leaves_partial_trace(model_dir, tmp_path, sig):
    proc, out = start_long_capture(model_dir, tmp_path, PROMPTS * 100)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "partial trace" in stderr and "Traceback" not in stderr
    trace = mc.Trace.load(out)
    assert trace.partial and trace.num_tokens > 0
    assert not parts_dir(out).exists()


def test_killed_capture_leaves_readable_parts(model_dir, tmp_path):
    proc, out = start_long_capture(model_dir, tmp_path, PROMPTS * 100)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    code, stderr = run("info", out)[0], run("info", out)[2]
    assert code == 2 and "interrupted write left" in stderr
    code, stdout, _ = run("info", parts_dir(out))
    assert code == 0 and "PARTIAL" in stdout
    assert mc.Trace.load(parts_dir(out)).num_tokens > 0


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot load model: Error while deserializing header"),
    ("no-tokenizer", "the tokenizer is missing"),
])
def test_damaged_model_folder_is_one_line(model_dir, prompts, tmp_path, damage, message):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    if damage == "truncate":
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    else:
        for path in broken.glob("tokenizer*"):
            path.unlink()
    code, stdout, stderr = run("capture", broken, "--prompts", prompts, "--out", tmp_path / "x.parquet",
                               "--device", "cpu")
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"moecache: error: {broken}: ") and message in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--seed", str(2**63)),
                                           ("--batch-size", "0"), ("--limit", "0")])
def test_capture_numbers_out_of_range(model_dir, prompts, tmp_path, option, value):
    code, _, stderr = run("capture", model_dir, "--prompts", prompts, "--out", tmp_path / "x.parquet",
                          option, value)
    assert code == 2 and f"Invalid value for '{option}': {value} is not in the range" in stderr
    assert len(stderr.strip().splitlines()) == 1
