"""The VAE training step of this tree against an earlier commit, interleaved in one run.

``python -m atlasldm.bench.step_vs_commit COMMIT [--cells 64 --expressed 500 --genes 2000]``

Run from a git checkout. The commit is checked out into a temporary worktree, and the
``atlasldm`` namespace of each tree is linked into a folder of its own, as pyproject's
package-dir maps it. Then the reference VAE (``VAEConfig`` defaults, each tree's own defaults)
trains in a fresh single-threaded process per round and tree: one warm-up step, then timed steps
of loss, backward and AdamW on the same synthetic packed cells. Rounds alternate between the two
trees so that a shared machine's load falls on both. Printed: process CPU-seconds per step per
round, their means and the ratio; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = """
import json, sys, time, torch
torch.set_num_threads(1)
import atlasldm.models.vae as V
from atlasldm.models.batch import CellBatch
B, S, G, steps = (int(a) for a in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
ids = torch.cat([torch.randperm(G, generator=g)[:S] + 1 for _ in range(B)])
counts = torch.randint(1, 20, (B * S,), generator=g).float()
batch = CellBatch.from_packed(ids, counts, torch.arange(B + 1, dtype=torch.int32) * S)
torch.manual_seed(0)
vae = V.VAE(V.VAEConfig(num_genes=G)).train()
opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.95))
def step():
    vae.loss(batch).total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
cpu = time.process_time()
for _ in range(steps):
    step()
print(json.dumps({"cpu_s_per_step": (time.process_time() - cpu) / steps}))
"""
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONSAFEPATH": "1"}
MAPPING = re.compile(r'^"atlasldm\.([a-z_]+)" = "([^"]+)"$', re.M)


def link_namespace(tree: Path, into: Path) -> Path:
    """A folder holding `atlasldm/` whose subpackages link to `tree`'s top-level folders."""
    pkg = into / "atlasldm"
    pkg.mkdir(parents=True)
    for item in (tree / "atlasldm").iterdir():
        (pkg / item.name).symlink_to(item)
    for name, folder in MAPPING.findall((tree / "pyproject.toml").read_text()):
        if not (pkg / name).exists():
            (pkg / name).symlink_to(tree / folder)
    return into


def time_step(path: Path, args: argparse.Namespace) -> float:
    """CPU-seconds per step of the tree linked at `path`, in a fresh process."""
    sizes = [str(v) for v in (args.cells, args.expressed, args.genes, args.steps)]
    env = os.environ | ENV | {"PYTHONPATH": str(path)}
    cmd = [sys.executable, "-c", WORKER, *sizes]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=path)
    return json.loads(out.stdout.strip().splitlines()[-1])["cpu_s_per_step"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: the commit, the batch shape, steps and rounds."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commit", help="the earlier commit (hash, tag or branch)")
    for flag, default in (("cells", 64), ("expressed", 500), ("genes", 2000), ("steps", 5)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


def interleaved(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, list[float]]:
    """Time every tree once per round, alternating; print each round."""
    times: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, path in trees.items():
            times[name].append(time_step(path, args))
        line = ", ".join(f"{name} {t[-1]:.3f} s" for name, t in times.items())
        print(f"round {r + 1}: {line}", flush=True)
    return times


def main(argv: list[str] | None = None) -> int:
    """Check out the commit, time both trees round by round, print the comparison."""
    args = parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(here), "worktree"]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp, "old")
        subprocess.run([*git, "add", "-q", "--detach", str(old), args.commit], check=True)
        try:
            then, now = link_namespace(old, Path(tmp, "a")), link_namespace(here, Path(tmp, "b"))
            times = interleaved({args.commit: then, "now": now}, args)
        finally:
            subprocess.run([*git, "remove", "--force", str(old)], check=False)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    ratio = mean["now"] / mean[args.commit]
    then_s, now_s = mean[args.commit], mean["now"]
    print(f"mean CPU s/step: {then_s:.3f} at {args.commit}, {now_s:.3f} now: {ratio:.2f}x")
    out = {"commit": args.commit, "settings": vars(args), "cpu_s_per_step": times}
    print(json.dumps(out | {"now_over_commit": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
