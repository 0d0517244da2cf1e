"""The driver's seams: Python policies (the code of docs/adding-a-policy.md), prefetch
input, events, and the registry's table and errors."""

import re
from pathlib import Path

import numpy as np
import pytest

import moecache as mc
from moecache.policies import REGISTRY, policy_table, resolve

DOCS = Path(__file__).resolve().parent.parent / "docs"


def doc_namespace() -> dict:
    """Run the plain-Python blocks of docs/adding-a-policy.md (not the numba file excerpt,
    nor the reference class, which live in their own files)."""
    text = (DOCS / "adding-a-policy.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
              if "@njit" not in b and "@reference" not in b]
    namespace: dict = {}
    exec("\n".join(blocks), namespace)  # noqa: S102 - the documentation's own example
    return namespace


def test_documented_python_policies_equal_the_compiled_ones():
    space = doc_namespace()
    trace = mc.synth(layers=3, experts=12, top_k=3, tokens=60, seed=4)
    batches = mc.Prefetch.from_lists([[[(t + layer) % 12, (t * 5) % 12] for layer in range(3)]
                                      for t in range(60)])
    for python, compiled in ((space["PythonLRU"], "lru"), (space["PythonLFU"], "lfu")):
        for scope, capacity in (("layer", 5), ("global", 14)):
            for prefetch in (None, batches):
                mine = mc.replay(trace, python, capacity, scope=scope, prefetch=prefetch, record_events=True)
                theirs = mc.replay(trace, compiled, capacity, scope=scope, prefetch=prefetch,
                                   record_events=True)
                np.testing.assert_array_equal(mine.per_layer["hits"], theirs.per_layer["hits"])
                assert mine.prefetch_wasted == theirs.prefetch_wasted
                assert mine.events.equals(theirs.events)
                assert mine.policy == python.name


def test_a_victim_that_is_pinned_is_an_error():
    class Greedy(mc.PythonPolicy):
        def victim(self, resident, pinned, mark):
            return int(np.flatnonzero(resident)[0])  # ignores the pins

    trace = mc.synth(layers=1, experts=8, top_k=2, tokens=30, seed=1)
    with pytest.raises(ValueError, match="not resident or is pinned"):
        mc.replay(trace, Greedy, 2)


def test_plain_replay_has_no_prefetch_fields_or_events():
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=30, seed=1)
    result = mc.replay(trace, "lru", 4)
    assert result.prefetched is None and result.events is None
    assert "prefetched" not in result.to_dict()
    events = mc.replay(trace, "lru", 4, record_events=True).events
    assert list(events.columns) == ["step", "layer", "hits", "misses", "evictions", "prefetched",
                                    "prefetch_evictions"]
    assert len(events) == result.steps * 2 and events["misses"].sum() == result.misses


def test_prefetch_that_does_not_fit_the_replay_is_one_line():
    trace = mc.synth(layers=2, experts=8, top_k=2, tokens=5, seed=1)
    with pytest.raises(mc.MoecacheError, match="prefetch: has 4 steps x 2 layers, the replay 5 steps"):
        mc.replay(trace, "lru", 4, prefetch=mc.Prefetch.from_lists([[[0], [1]]] * 4))
    with pytest.raises(mc.MoecacheError, match="expert id 8 is out of range"):
        mc.replay(trace, "lru", 4, prefetch=mc.Prefetch.from_lists([[[8], []]] * 5))


@pytest.mark.parametrize("spec, args, message", [
    ("clock:bits=9", None, "policy clock: bits=9 is outside \\[1, 8\\]"),
    ("clock", {"bits": 1.5}, "bits must be a whole number"),
    ("clock", {"bits": "x"}, "bits must be a number"),
    ("clock:bits=2", {"bits": 2}, "not both"),
    ("lru:x=1", None, "unknown parameter 'x': it has no parameters"),
    ("clock:bits=1,bits=2", None, "given twice"),
    ("nope", None, "unknown policy 'nope'"),
    (3, None, "policy must be a name"),
])
def test_bad_policy_choices_are_one_line(spec, args, message):
    with pytest.raises(mc.MoecacheError, match=message):
        resolve(spec, args)


def test_labels_are_canonical():
    assert resolve("clock:bits=1").label == "clock"
    assert resolve("clock", {"bits": 3}).label == "clock:bits=3"
    np.testing.assert_array_equal(resolve("clock").params, [1.0])


def test_policies_command_prints_the_registry_table():
    from click.testing import CliRunner

    from moecache.cli import cli

    result = CliRunner().invoke(cli, ["policies"])
    assert result.exit_code == 0 and result.stdout.strip() == policy_table()


def test_readme_policy_table_is_the_registry():
    readme = (DOCS.parent / "README.md").read_text()
    assert policy_table() in readme
    assert all(f"| `{name}` |" in policy_table() for name in REGISTRY)
