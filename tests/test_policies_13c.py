"""Issue 13, part c: a user's policy file on the command line, and the pinned and lfru
policies on hand-computed traces (tests/test_policies.py checks both against their
references in every configuration)."""

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli

# docs/adding-a-policy.md's LRU, plus a class with a parameter and two that are not policies
USER_FILE = textwrap.dedent('''
    import numpy as np
    import moecache as mc
    from moecache.policies import Param


    class PythonLRU(mc.PythonPolicy):
        name = "python-lru"

        def reset(self, keys, offsets, sizes, capacity, params, seed):
            self.last = {}

        def access(self, key, now, hit):
            self.last[key] = now

        def admit(self, key, now):
            self.last[key] = now

        def victim(self, resident, pinned, mark):
            candidates = np.flatnonzero(resident & (pinned != mark))
            return min(candidates, key=lambda k: (self.last[k], k))


    class Lowest(mc.PythonPolicy):
        """Evicts the smallest candidate id plus ``shift`` (mod the key count)."""
        params = (Param("shift", 0, 0, 100, "added to the id", integer=True),)

        def reset(self, keys, offsets, sizes, capacity, params, seed):
            self.shift = int(params[0])

        def victim(self, resident, pinned, mark):
            candidates = np.flatnonzero(resident & (pinned != mark))
            return min(candidates, key=lambda k: (k - self.shift) % len(resident))


    class NotAPolicy:
        pass


    class Broken(mc.PythonPolicy):
        def __init__(self):
            raise RuntimeError("no")
''')


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    trace = mc.synth(layers=2, experts=12, top_k=2, tokens=150, seed=3).save(root / "t.parquet")
    (root / "mine.py").write_text(USER_FILE)
    (root / "bad.py").write_text("def broken(:\n")
    (root / "boom.py").write_text("raise ImportError('missing dependency')\n")
    return {"trace": trace, "mine": root / "mine.py", "bad": root / "bad.py", "boom": root / "boom.py",
            "none": root / "none.py"}


def replay_json(*args):
    code, out, err = run("replay", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_user_file_on_the_cli_equals_lru(files, scope):
    capacity = 5 if scope == "layer" else 9
    mine = replay_json(files["trace"], "--policy", f"{files['mine']}:PythonLRU", "-c", capacity,
                       "--scope", scope)
    lru = replay_json(files["trace"], "--policy", "lru", "-c", capacity, "--scope", scope)
    assert mine["hits"] == lru["hits"] and mine["misses"] == lru["misses"]
    assert mine["policy"] == "python-lru"
    assert lru["hits"] > 0 and lru["misses"] > lru["cold_misses"]  # evictions happened


def test_user_file_parameters(files):
    trace = mc.Trace.load(files["trace"])
    hits = []
    for shift in (0, 3):
        out = replay_json(files["trace"], "--policy", f"{files['mine']}:Lowest:shift={shift}", "-c", 4)
        api = mc.replay(trace, f"{files['mine']}:Lowest", 4, policy_args={"shift": shift})
        assert out["hits"] == api.hits
        hits.append(api.hits)
    assert out["policy"] == "Lowest:shift=3" and hits[0] != hits[1]


@pytest.mark.parametrize("spec, message", [
    ("{none}:PythonLRU", "none.py does not exist"),
    ("{mine}:Missing", "mine.py defines no 'Missing'"),
    ("{mine}:NotAPolicy", "NotAPolicy is not a moecache.PythonPolicy subclass"),
    ("{mine}:np", "np is not a moecache.PythonPolicy subclass"),
    ("{mine}", "name the class, as"),
    ("{mine}:Broken", "Broken() failed: RuntimeError: no"),
    ("{bad}:PythonLRU", "bad.py failed to load: SyntaxError"),
    ("{boom}:PythonLRU", "boom.py failed to load: ImportError: missing dependency"),
    ("{mine}:Lowest:shift=200", "policy Lowest: shift=200 is outside [0, 100]"),
    ("{mine}:Lowest:speed=1", "policy Lowest: unknown parameter 'speed'"),
    ("pinned:train=0", "policy pinned: train=0 is outside"),
])
def test_bad_policy_file_is_one_line_and_exit_2(files, spec, message):
    code, out, err = run("replay", files["trace"], "-c", 4, "--policy", spec.format(**files))
    assert code == 2, (out, err)
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""


BUGGY = """
import moecache as mc

class OffBy(mc.PythonPolicy):
    def victim(self, resident, pinned, mark):
        return -1

class Raises(mc.PythonPolicy):
    def victim(self, resident, pinned, mark):
        raise RuntimeError("oops in my policy")
"""


@pytest.mark.parametrize("name, message", [
    ("OffBy", "policy OffBy: ValueError: the victim hook returned a key that is not resident"),
    ("Raises", "policy Raises: RuntimeError: oops in my policy (buggy.py, line 10)"),
])
def test_a_buggy_user_policy_is_one_line_naming_it(files, tmp_path, name, message):
    (tmp_path / "buggy.py").write_text(BUGGY)
    code, out, err = run("replay", files["trace"], "-c", 4, "--policy", f"{tmp_path / 'buggy.py'}:{name}")
    assert code == 2, (out, err)
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""


def one_layer(*requests, num_experts=4):
    """A trace of one layer, one token per step, ``requests`` its expert ids (K = 1)."""
    experts = np.array(requests, np.int16).reshape(-1, 1, 1)
    return mc.Trace.from_arrays(experts, num_experts=num_experts, step=np.arange(len(requests)))


def test_pinned_keeps_the_profile_after_training():
    # T = ceil(0.5 x 7) = 4; the first 4 requests hold 0 three times, 1 once: 0 is pinned.
    # LRU evicts 0 at requests 5 (room for 1) and then misses it at 6; pinned evicts 2 instead.
    trace = one_layer(0, 0, 1, 0, 2, 1, 0)
    assert mc.replay(trace, "lru", 2).hits == 2
    assert mc.replay(trace, "pinned", 2, policy_args={"train": 0.5, "n": 1}).hits == 3
    assert mc.replay(trace, "pinned", 2, policy_args={"train": 0.5, "n": 0}).hits == 2
    # trained on requests 0..4 only (T = 5 > 4.9): still 0 is the most used, same result
    assert mc.replay(trace, "pinned", 2, policy_args={"train": 0.7, "n": 1}).hits == 3


def test_pinned_is_lru_during_training():
    # The profile is {0} either way. With T = ceil(0.75 x 8) = 6, request 5 is still LRU's,
    # which evicts 0 and misses it at 6; with T = ceil(0.6 x 8) = 5 request 5 evicts 2 instead.
    trace = one_layer(0, 0, 1, 0, 2, 1, 0, 0)
    assert mc.replay(trace, "pinned", 2, policy_args={"train": 0.75, "n": 1}).hits == \
        mc.replay(trace, "lru", 2).hits == 3
    assert mc.replay(trace, "pinned", 2, policy_args={"train": 0.6, "n": 1}).hits == 4


def test_pinned_counts_only_the_prefix():
    # the prefix (T = 4) pins 0; later requests make 3 the most used, which is not pinned
    trace = one_layer(0, 0, 1, 0, 3, 2, 3, 1, 3, 2, 3)
    pinned = mc.replay(trace, "pinned", 2, policy_args={"train": 0.3, "n": 1}, record_events=True)
    lru = mc.replay(trace, "lru", 2, record_events=True)
    np.testing.assert_array_equal(pinned.events["hits"], [0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(lru.events["hits"], [0, 1, 0, 1, 0, 0, 1, 0, 1, 0, 1])


def test_lfru_keeps_frequent_experts_and_breaks_ties_by_insertion():
    # A A A B C A: at C's miss (clock 4) A scores 3/2, B 1/1: B goes, where LRU evicts A
    assert mc.replay(one_layer(0, 0, 0, 1, 2, 0), "lfru", 2).hits == 3
    assert mc.replay(one_layer(0, 0, 0, 1, 2, 0), "lru", 2).hits == 2
    # 1 1 0 2 1 0: at 2's miss (clock 3) 1 scores 2/2 and 0 scores 1/1; the tie evicts 1,
    # inserted first (not the smallest id); then 1 misses and evicts 0 (1/2 against 2's 1/1)
    assert mc.replay(one_layer(1, 1, 0, 2, 1, 0), "lfru", 2).hits == 1
