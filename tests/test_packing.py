"""`--gpus-per-trial auto`: shares from each trial's training memory, on the committed probe table (estimated on
a CPU, marked not measured: the GPU check measures the real one), through Ray's own per-trial resources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from tune_inat.packing import SHARE_STEP, MemoryShares, estimate_on_cpu, gpu_share, probe_key, read_probes

PROBE_TABLE = REPO / "benchmarks" / "results" / "gpu_memory_probe.json"
H200_MIB, A100_80_MIB = 143771.0, 81920.0
PROBES = read_probes(PROBE_TABLE)
PAIRS = [(p.backbone, p.image_size) for p in PROBES.values()]


def test_the_committed_probe_table_says_it_was_not_measured() -> None:
    table = json.loads(PROBE_TABLE.read_text())
    assert table["note"].startswith("NOT MEASURED") and PROBES
    assert not any(probe.measured for probe in PROBES.values())


@settings(max_examples=200, deadline=None)
@given(
    trials=st.lists(
        st.tuples(st.sampled_from(PAIRS), st.sampled_from([8, 16, 32, 64, 128, 256]), st.sampled_from([1, 2, 4])),
        min_size=1,
        max_size=24,
    ),
    total=st.sampled_from([H200_MIB, A100_80_MIB, 24576.0]),
)
def test_trials_packed_by_their_shares_never_need_more_memory_than_the_gpu_has(trials, total) -> None:
    """Ray places a trial where its share still fits; whatever it places on one GPU fits that GPU's memory."""
    shares = MemoryShares(PROBES, total, cpus=1.0)
    on_gpu, reserved = [], 0.0
    for (backbone, size), batch, accumulation in trials:
        config = {"backbone": backbone, "image_size": size, "batch_size": batch * accumulation}
        config["grad_accum_steps"] = accumulation
        share = shares.share(config)
        assert SHARE_STEP <= share <= 1 and (share / SHARE_STEP) == pytest.approx(round(share / SHARE_STEP))
        peak = PROBES[probe_key(backbone, size)].peak_mib(batch)
        assert share * total >= min(total, peak * 1.15) - 1e-6  # the share holds the trial and its margin
        if peak * 1.15 > total:  # more than the GPU holds: a whole GPU, where its own out-of-memory retry halves it
            assert share == 1.0
            continue
        if reserved + share <= 1 + 1e-9:  # what Ray does with fractional GPUs
            on_gpu.append(peak)
            reserved += share
    assert sum(on_gpu) <= total


def test_small_trials_pack_eight_to_a_gpu_and_large_ones_fewer() -> None:
    shares = MemoryShares(PROBES, A100_80_MIB, cpus=1.0)
    small = shares.share({"backbone": "resnet18", "image_size": 48, "batch_size": 64})
    large = shares.share({"backbone": "efficientnet_v2_s", "image_size": 384, "batch_size": 128})
    assert small == SHARE_STEP  # eight to a GPU
    assert large >= 4 * small  # two at most beside each other on an 80 GiB GPU
    native = shares.share({"backbone": "resnet50", "image_size": None, "batch_size": 32})  # native: 224
    assert native == shares.share({"backbone": "resnet50", "image_size": 224, "batch_size": 32})
    assert gpu_share(2 * A100_80_MIB, A100_80_MIB) == 1.0  # more than a GPU: a whole one (it runs out alone)


def test_the_cpu_estimate_grows_with_the_image_and_the_trainable_part() -> None:
    small, large = estimate_on_cpu("resnet18", 32), estimate_on_cpu("resnet18", 64)
    assert large.per_image_mib > 3 * small.per_image_mib  # activations scale with the pixels (4x here)
    assert small.static_mib == large.static_mib and not small.measured


def test_ray_gives_each_trial_the_share_its_config_needs(ray_cluster, tmp_path: Path) -> None:
    """Real Ray (the session's declared GPU): tune.with_resources with the planner, each trial's reservation read
    back inside the trial."""
    from ray import tune

    from tune_inat.tuner import MemoryResources

    shares = MemoryShares(PROBES, 16384.0, cpus=0.5)

    def trial(config: dict) -> None:
        tune.report({"gpu": tune.get_context().get_trial_resources().required_resources.get("GPU", 0.0)})

    space = {
        "backbone": tune.grid_search(["resnet18", "efficientnet_v2_s"]),
        "image_size": tune.sample_from(lambda spec: 48 if spec.config.backbone == "resnet18" else 384),
        "batch_size": 64,
    }
    grid = tune.Tuner(
        tune.with_resources(trial, MemoryResources(shares)),
        param_space=space,
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="shares", verbose=0),
    ).fit()
    got = {result.config["backbone"]: result.metrics["gpu"] for result in grid}
    assert got == {
        "resnet18": shares.share({"backbone": "resnet18", "image_size": 48, "batch_size": 64}),
        "efficientnet_v2_s": shares.share({"backbone": "efficientnet_v2_s", "image_size": 384, "batch_size": 64}),
    }
    assert got["efficientnet_v2_s"] > got["resnet18"]


def test_auto_on_a_cluster_whose_driver_has_no_gpu_is_one_line(ray_cluster, demo_root: Path, tmp_path: Path) -> None:
    from tune_inat.data.dataset import DataConfig
    from tune_inat.errors import UserError
    from tune_inat.job import prepare_data
    from tune_inat.space import load_space, with_fixed, with_overrides
    from tune_inat.tuner import run_search

    spec = with_overrides(with_fixed(load_space("demo"), {"image_size": 32}), gpus_per_trial="auto", num_samples=1)
    data_config = DataConfig(root=demo_root, cache_dir=tmp_path / "cache")
    with pytest.raises(UserError, match=r"^--gpus-per-trial auto measures .* this driver has none"):
        run_search(spec, data_config, prepare_data(spec, data_config), str(tmp_path), "auto", verbose=0)


def test_the_flag_takes_a_share_or_auto(tmp_path: Path) -> None:
    bad = run_cli("tune_inat.search", "--demo", "--gpus-per-trial", "lots", "--plan", cwd=tmp_path)
    assert bad.returncode == 2 and "must be a GPU share (e.g. 0.25) or auto, got lots" in bad.stderr
    plan = run_cli("tune_inat.search", "--demo", "--gpus-per-trial", "auto", "--plan", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr  # no GPU here: the trials run on the CPU, as the warning says
