"""`compare` reports the same numbers as single replays, in the paper's shape."""

import json

import pytest
from click.testing import CliRunner

import moecache as mc
from moecache.cli import cli
from moecache.compare import compare
from moecache.reroute import reroute
from moecache.timeline import with_model_sizes
from moecache.units import bandwidth_profile


@pytest.fixture(scope="module")
def pair():
    base = mc.synth(layers=3, experts=32, top_k=4, tokens=600, stickiness=0.3, seed=7, logits=True)
    return base, reroute(base, bias=1.0, label="remoe")[0]


def test_figures_equal_single_replays(pair):
    base, remoe = pair
    frame = compare(base, remoe, capacities=[8, 12], policies=["lru", "opt"],
                    bandwidths=["ufs4", "2GB/s"], compute_ms=10.0)
    hits = frame[frame.metric == "hit rate"].set_index(["policy", "capacity"])
    for policy in ("lru", "opt"):
        for capacity in (8, 12):
            row = hits.loc[(policy, capacity)]
            assert row["synthetic"] == mc.replay(base, policy, capacity).hit_rate
            assert row["remoe"] == mc.replay(remoe, policy, capacity).hit_rate
    reuse = frame[frame.metric == "reuse rate"].iloc[0]
    assert reuse["remoe"] == mc.replay(remoe, "lru", 8).reuse_rate
    assert reuse["change"] == pytest.approx(reuse["remoe"] / reuse["synthetic"] - 1)
    io = frame[(frame.metric == "I/O ms per token") & (frame.capacity == 8)
               & (frame.profile == "2GB/s")].iloc[0]
    single = mc.replay(base, "lru", 8, bandwidth="2GB/s")
    assert io["synthetic"] == pytest.approx(single.io_seconds_per_token * 1e3)
    timed = frame[(frame.capacity == 8) & (frame.profile == "jetson-orin-nx-16gb")].set_index("metric")
    before, after = (mc.timeline(t, "jetson-orin-nx-16gb", "lru", 8, dense_ms=10.0) for t in (base, remoe))
    assert timed.loc["TPOT ms", "synthetic"] == 1e3 * before.tpot_s
    assert timed.loc["tokens/s", "remoe"] == after.tokens_per_s
    assert timed.loc["decode speedup", "remoe"] == pytest.approx(before.tpot_s / after.tpot_s)


def test_presets_and_errors(pair):
    assert bandwidth_profile("UFS4") == ("UFS 4.0", 4.2e9)
    with pytest.raises(mc.MoecacheError, match="cannot read bandwidth 'floppy'.*preset: ufs3.1, ufs4"):
        bandwidth_profile("floppy")
    other = mc.synth(layers=2, experts=32, top_k=4, tokens=50)
    with pytest.raises(mc.MoecacheError, match="differ in num_layers"):
        compare(pair[0], other)


def test_cli_reroute_then_compare(tmp_path, pair):
    base = pair[0].save(tmp_path / "base.parquet")
    runner = CliRunner()
    result = runner.invoke(cli, ["reroute", str(base), "--out", str(tmp_path / "r.parquet"),
                                 "--bias", "1.0", "--label", "remoe"])
    assert result.exit_code == 0, result.stderr
    assert "reuse" in result.stdout and "gate mass kept" in result.stdout
    result = runner.invoke(cli, ["compare", str(base), str(tmp_path / "r.parquet"), "--capacity", "8,12",
                                 "--compute-ms", "20", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {r["metric"] for r in rows} == {"reuse rate", "hit rate", "MiB per token",
                                            "I/O ms per token", "TPOT ms", "tokens/s", "decode speedup"}
    result = runner.invoke(cli, ["compare", str(base), str(tmp_path / "r.parquet")])
    assert result.exit_code == 0 and "decode speedup" not in result.stdout
    plain = mc.synth(layers=3, experts=32, top_k=4, tokens=50).save(tmp_path / "plain.parquet")
    result = runner.invoke(cli, ["reroute", str(plain), "--out", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and "--save-logits" in result.stderr


def test_model_profile_sizes_every_figure(pair):
    base, remoe = pair
    frame = compare(base, remoe, capacities=[8], policies=["lru"], bandwidths=["2GB/s"],
                    model="olmoe-1b-7b", dtype="q8_0", hardware=["phone-ufs4"])
    sized = mc.replay(with_model_sizes(base, "olmoe-1b-7b", "q8_0"), "lru", 8)
    mib = frame[frame.metric == "MiB per token"].iloc[0]
    assert mib["synthetic"] == pytest.approx(sized.bytes_per_token / 2**20)
    tpot = frame[frame.metric == "TPOT ms"].iloc[0]
    direct = mc.timeline(base, "phone-ufs4", "lru", 8, model="olmoe-1b-7b", dtype="q8_0")
    assert tpot["synthetic"] == 1e3 * direct.tpot_s and tpot["profile"] == "phone-ufs4"
    with pytest.raises(mc.MoecacheError, match="--hardware names no profile"):
        compare(base, remoe, capacities=[8], model="olmoe-1b-7b", hardware=[])
    with pytest.raises(mc.MoecacheError, match="drop --per-token"):
        compare(base, remoe, capacities=[8], model="olmoe-1b-7b", per_token=True)
