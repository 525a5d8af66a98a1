"""The benchmarks (bench/): the loader's diversity measure, the model benchmark's presets (the
shipped training recipes, not copies of them) and its measurements in fresh processes."""

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from atlasldm.bench import model
from atlasldm.bench.diversity import batch_entropy, random_entropy
from atlasldm.bench.model_presets import build_configs, load_preset, preset_names
from atlasldm.configs import config_path
from atlasldm.train.config import load_config
from atlasldm.train.vae_stage import VAEStageConfig

# A DiT small enough to train one step in a fresh process in seconds.
TINY_DIT = ["dit.embed_dim=32", "dit.num_layers=1", "dit.num_heads=2", "bench.dit_cells=2"]


def test_batch_entropy_closed_forms() -> None:
    assert batch_entropy(np.zeros(64, dtype=int)) == 0.0
    assert np.isclose(batch_entropy(np.repeat(np.arange(4), 16)), np.log(4))


def test_random_entropy_orders_shuffled_above_grouped() -> None:
    """Contiguous dataset blocks (Census order) are far less diverse than random batches."""
    codes = np.repeat(np.arange(10), 1000)
    grouped = np.mean([batch_entropy(codes[i : i + 100]) for i in range(0, len(codes), 100)])
    rand = random_entropy(codes, 100, draws=200)
    assert grouped < 0.1 * rand
    assert rand > 0.9 * np.log(10)


@pytest.mark.parametrize("name", preset_names())
def test_model_preset_is_its_training_recipe(name: str) -> None:
    """The benchmarked VAE is the recipe's `model` section with the preset's gene count."""
    preset = load_preset(name, [], quick=False)
    recipe = load_config(VAEStageConfig, [config_path(preset.recipes.vae)]).model
    vae, dit, bench = build_configs(name, [], quick=False)
    assert vae == dataclasses.replace(recipe, num_genes=preset.data.num_genes)
    assert (dit.num_latent_tokens, dit.latent_dim) == (vae.num_latent_tokens, vae.latent_dim)
    assert dit.vocab_sizes == preset.data.vocab_sizes and bench == preset.bench


def test_model_presets_are_the_shipped_files() -> None:
    assert preset_names() == ["census70m", "reference"]
    census, reference = build_configs("census70m", [], False), build_configs("reference", [], False)
    assert census[0].embed_dim == 512 and reference[0].embed_dim == 32  # vae_census_70m.yaml
    assert census[2].train_cells == 4 and reference[2].train_cells == 32  # bench sections
    assert build_configs("reference", [], True)[2].steps == 2  # --quick


def test_model_benchmark_counts_without_measuring(capsys: pytest.CaptureFixture[str]) -> None:
    assert model.main(["--no-measure"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["params"]["dit"] == 9_745_424  # REF's published DiT count (README, Models)
    assert out["measured"] is None and out["settings"]["steps"] == 3


def test_model_worker_trains_in_a_fresh_process() -> None:
    """One DiT step through `python -m atlasldm.bench.model_worker`."""
    vae, dit, bench = build_configs("reference", TINY_DIT, quick=True)
    spec = {"task": "train_dit", "dit": dataclasses.asdict(dit)}
    spec |= {"vae": dataclasses.asdict(vae), "bench": dataclasses.asdict(bench)}
    res = model.run_worker(spec)
    assert "error" not in res, res
    assert res["cells_per_s"] > 0 and res["s_per_step"] > 0 and res["threads"] >= 1
    assert "error" in model.run_worker(spec | {"task": "no_such_task"})


def test_decode_comparison_puts_today_first_and_every_variant_beside_it() -> None:
    """The comparison runs today's decode, the new defaults and sampled rows on the same cells."""
    tiny = ["vae.embed_dim=8", "vae.num_heads=2", "vae.num_cross_heads=2", "vae.num_layers=1"]
    bench_lines = ["bench.compare_genes=300", "bench.compare_expressed=40", "bench.compare_ks=64"]
    vae, dit, bench = build_configs(
        "reference", [*tiny, *bench_lines, "bench.compare_cells=4"], True
    )
    base = {"vae": dataclasses.asdict(vae), "bench": dataclasses.asdict(bench)}
    (row,) = model.decode_comparison(base, bench)
    labels = list(row["variants"])
    assert labels[0].startswith("today") and "new defaults" in labels
    assert {"sampled k=64", "sampled k=64 exact"} <= set(labels)
    today, new = row["variants"][labels[0]], row["variants"]["new defaults"]
    assert today["checkpointed"] and not new["checkpointed"]  # 4 x 300 rows fit any budget
    for res in row["variants"].values():
        assert "error" not in res, res
        assert res["cpu_s_per_step"] > 0
        ratio = today["cpu_s_per_step"] / res["cpu_s_per_step"]
        assert res["today_over_this"] == pytest.approx(ratio)


def test_step_against_a_commit_times_both_trees_and_removes_the_worktree(capsys) -> None:
    """Against HEAD itself: both trees are timed every round, and no worktree is left behind."""
    from atlasldm.bench import step_vs_commit

    repo = Path(__file__).resolve().parents[1]
    before = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True)
    tiny = ["--cells", "2", "--expressed", "8", "--genes", "40", "--steps", "1", "--rounds", "2"]
    assert step_vs_commit.main(["HEAD", *tiny]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["cpu_s_per_step"]["HEAD"]) == len(out["cpu_s_per_step"]["now"]) == 2
    assert out["now_over_commit"] > 0
    after = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True)
    assert after.stdout == before.stdout
