"""Process group, rank queries, the generated DeepSpeed config and the engine.

With `train/checkpoint.py`, the only module that imports `deepspeed` or `torch.distributed`
(docs/design.md). The deepspeed launcher, torchrun and `accelerate launch` all set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `python script.py` gets a world of
one with a local TCP store, so DeepSpeed (which needs a process group) still runs.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from atlasldm.train.config import TrainConfig, accumulation_steps
from atlasldm.train.shm_buffers import (
    buffer_path,
    claim_buffer,
    job_prefix,
    release_buffer,
    remove_stale_buffers,
)


def _deepspeed() -> Any:
    """Import DeepSpeed on first use, naming the CPU accelerator where there is no other.

    Without an accelerator DeepSpeed falls back to its CPU one and says so on stdout, which
    corrupts machine-read output (`--print-config > run.yaml`); naming the same choice first
    skips the detection and its message. An explicit DS_ACCELERATOR wins. Importing on first use
    also keeps DeepSpeed's import cost out of commands that never build an engine.
    """
    if "DS_ACCELERATOR" not in os.environ and not _has_accelerator():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    return deepspeed


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(threads_per_rank: int = 0) -> torch.device:
    """Initialise the process group (nccl on CUDA, gloo on CPU) and return this rank's device.

    Idempotent. Without launcher variables this process becomes rank 0 of a world of one. The
    call that creates the process group also sets this rank's torch threads (`set_rank_threads`;
    `threads_per_rank` is `run.threads_per_rank`, 0 = automatic).
    """
    if "RANK" not in os.environ:
        # Single-process fallback: a world of one on a free local port.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"launcher variables {missing} are not set; start with deepspeed, torchrun or "
            "accelerate launch, or set none of RANK/WORLD_SIZE for a single process"
        )
    device = torch.device("cpu")
    if torch.cuda.is_available():
        # Select the device before the process group exists so NCCL binds to the right GPU.
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        set_rank_threads(threads_per_rank)  # before any parallel work, so inter-op can be set
        if device.type == "cpu" and os.environ.get("LOCAL_SIZE") == os.environ["WORLD_SIZE"]:
            # DeepSpeed's CPU comm op maps a shm buffer only when all ranks are local (shm.cpp)
            _manage_shm_buffer(shm_buffer_path())
        _deepspeed().init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device


def _manage_shm_buffer(buffer: Path) -> None:
    """Remove killed jobs' buffers, claim this rank's (before DeepSpeed creates it), and unlink
    it at exit: DeepSpeed never does, and /dev/shm is RAM until reboot."""
    removed = remove_stale_buffers(buffer.parent, own_job=job_prefix(buffer))
    if removed:  # whichever rank looked first removed them
        rank_ = os.environ["RANK"]
        print(
            f"rank {rank_}: removed {len(removed)} stale DeepSpeed buffer(s) of dead jobs",
            flush=True,
        )
    claim_buffer(buffer)
    atexit.register(release_buffer, buffer)


def usable_cores() -> int:
    """Return the cores this process may run on: its CPU affinity where the OS reports one.

    The affinity, not `os.cpu_count()`, is what a SLURM task or a `taskset`/`numactl` binding
    actually gets.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Return the number of ranks on this node.

    LOCAL_WORLD_SIZE (torchrun, accelerate), else LOCAL_SIZE (the deepspeed launcher), else 1
    (a plain process).
    """
    env = os.environ if env is None else env
    value = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or "1"
    return max(1, int(value))


def _omp_num_threads(value: str | None) -> int:
    """Return the outermost count of an OMP_NUM_THREADS value ("8", or "8,2" for nested levels).

    0 when it is unset, zero or not a number: then it expresses no choice to respect.
    """
    head = (value or "").split(",")[0].strip()
    return int(head) if head.isdigit() else 0


def rank_threads(
    cores: int, local_ranks: int, override: int = 0, omp_num_threads: str | None = None
) -> int:
    """Return torch's intra-op thread count for one rank.

    Precedence: `override` (`run.threads_per_rank`) when > 0, then an exported OMP_NUM_THREADS,
    then an equal share of `cores` among `local_ranks`, at least 1. Ranks whose threads add up
    to more than the cores make OpenMP workers busy-wait on each other (docs/threads.md).
    """
    if override > 0:
        return override
    from_env = _omp_num_threads(omp_num_threads)
    if from_env > 0:
        return from_env
    return max(1, cores // max(1, local_ranks))


def set_rank_threads(override: int = 0) -> int:
    """Set this rank's torch intra-op threads (and inter-op ones while torch allows); return it.

    Logs "threads per rank: N (cores C, local ranks L)" on global rank 0.
    """
    cores, local = usable_cores(), local_world_size()
    threads = rank_threads(cores, local, override, os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    _set_interop_threads(threads)
    if os.environ.get("RANK", "0") == "0":  # the process group may not exist yet
        print(f"threads per rank: {threads} (cores {cores}, local ranks {local})", flush=True)
    return threads


def _set_interop_threads(threads: int) -> None:
    # torch raises once inter-op work has started or the count was set before (e.g. by the
    # caller); intra-op threads are what eager training uses, so keep going either way.
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)


def shm_buffer_path() -> Path:
    """This rank's shared-memory allreduce buffer of DeepSpeed's CPU comm op (shm.cpp).

    DeepSpeed creates it per rank (~69 MB) and never unlinks it (`train.shm_buffers`).
    """
    return buffer_path()


def world_size() -> int:
    """Return the number of ranks (1 before the process group exists)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """Return this process's global rank (0 before the process group exists)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Return True on global rank 0."""
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on rank 0 only (flushed, so lines from multi-process jobs are not lost)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group after a run that ended normally on every rank.

    A rank that exits with the gloo group still alive could abort in its teardown ("terminate
    called without an active exception", exit -6) after its work was done and saved, which the
    launcher then reports as a failed job. Every collective has completed when this runs.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(
    value: torch.Tensor | Mapping[str, float | torch.Tensor],
) -> torch.Tensor | dict[str, float]:
    """Return the mean over ranks of a tensor, or of a dict of scalars (as floats).

    A dict is packed into one tensor so all keys cost one collective; every rank must pass the
    same keys in the same order.
    """
    if isinstance(value, torch.Tensor):
        out = value.detach().clone().float()
        if dist.is_initialized() and world_size() > 1:
            out = out.to(_collective_device())
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            out = out.to(value.device) / world_size()
        return out
    keys = list(value)
    packed = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64)
    mean = all_reduce_mean(packed)
    return {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}


def all_reduce_min(flag: int) -> int:
    """Return the minimum of an integer over ranks (used to agree on success or failure)."""
    if not dist.is_initialized() or world_size() == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """Return True on every rank when `flag` is True on at least one (e.g. a SIGTERM arrived)."""
    return all_reduce_min(0 if flag else 1) == 0


def global_sum(value: float) -> float:
    """Return the sum of a scalar over ranks (`value` itself without a process group).

    float64, so integer counts such as cells per micro-batch add up exactly.
    """
    if not dist.is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def deepspeed_config(cfg: TrainConfig, world: int, load_universal: bool = False) -> dict:
    """Return the DeepSpeed config generated from the typed config for `world` ranks.

    No optimizer or scheduler sections: the engine gets our AdamW object and the loop sets the
    learning rate each step. `load_universal` makes the engine read a universal checkpoint
    (world-size change, see `train.resume.prepare_resume`).

    Raises:
        ConfigError: the batch arithmetic does not divide (see `accumulation_steps`).
    """
    accum = accumulation_steps(cfg.batch, world)
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    offload = cfg.zero.offload_optimizer != "none"
    if offload:
        zero["offload_optimizer"] = {"device": cfg.zero.offload_optimizer, "pin_memory": True}
    if cfg.zero.stage == 3:
        # Gather the full 16-bit weights on save so export tools can read them without ZeRO.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_cells,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_cells,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "fp16": {
            "enabled": cfg.precision.dtype == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
        },
        # Offload with our torch AdamW (DeepSpeed would demand its compiled CPUAdam otherwise).
        "zero_force_ds_cpu_optimizer": not offload,
        "steps_per_print": 10**9,  # we print our own metric lines
        "wall_clock_breakdown": False,
    }
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def save_deepspeed_config(ds_config: dict, run_dir: str | Path) -> Path:
    """Write the generated DeepSpeed config to `run_dir/deepspeed.json` on rank 0; return path."""
    path = Path(run_dir) / "deepspeed.json"
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ds_config, indent=2, sort_keys=True))
        os.replace(tmp, path)
    return path


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> Any:
    """Return the DeepSpeed engine wrapping `model` and our `optimizer` (no DeepSpeed scheduler).

    The fp32 values of the frozen parameters are copied first (see `frozen_fp32_params`).
    """
    frozen = frozen_fp32_params(model)
    engine, _, _, _ = _deepspeed().initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.frozen_fp32 = frozen
    return engine


def frozen_fp32_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return exact fp32 copies of `model`'s frozen parameters (requires_grad False) by name.

    Call before DeepSpeed wraps the model. Frozen parameters (fixed sin-cos position tables) get
    no fp32 master in the optimizer: under bf16/fp16 the module only keeps a 16-bit rounding of
    them, and under ZeRO-3 only an empty local partition. Their value never changes, so the copy
    taken here is what exports and the EMA must hold.
    """
    return {
        name: param.detach().float().clone()
        for name, param in model.named_parameters()
        if not param.requires_grad
    }


@contextlib.contextmanager
def gathered_params(engine: Any) -> Iterator[None]:
    """Context in which `engine.module`'s parameters are full on every rank (ZeRO-3 gathers).

    Collective under ZeRO-3: every rank must enter it. A no-op at stages 0-2.
    """
    if engine.zero_optimization_stage() == 3:
        params = list(engine.module.parameters())
        with _deepspeed().zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def update_skipped(engine: Any) -> Iterator[None]:
    """Context in which `engine.step()` runs its bookkeeping but applies no update.

    DeepSpeed still reduces, clips and clears the gradients and advances its own counters, but
    the wrapped torch optimizer's `step` is a no-op: the fp32 master weights, the Adam moments
    and step counts stay bit for bit, and so do the 16-bit weights DeepSpeed copies from the
    masters. An lr of 0 would not do: AdamW would still decay its moments and count the step.
    Works at ZeRO 0-3, with or without bf16/fp16 and offload (checked on DeepSpeed 0.19.8).
    """
    wrapper, base = None, engine.optimizer
    while hasattr(base, "optimizer"):  # ZeRO, bf16 and fp16 wrappers hold our torch optimizer
        wrapper, base = base, base.optimizer
    fresh = len(base.state) == 0
    base.step = lambda *args, **kwargs: None  # the instance attribute shadows the method
    try:
        yield
    finally:
        del base.step
        if fresh and hasattr(wrapper, "_hp_optimizer_states_linked"):
            # ZeRO-1/2 and bf16 link their optimizer-state views once, after the first update;
            # a skipped first step has no state to link yet, so let the next update do it.
            wrapper._hp_optimizer_states_linked = False


def master_weights(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 weight) of every parameter of `engine.module`, on every rank.

    Under bf16/fp16 the module holds 16-bit copies; the values returned are the optimizer's fp32
    master weights (an EMA of the 16-bit copies would lose every update smaller than their
    rounding step). Frozen parameters come from the fp32 copy `build_engine` took. Collective at
    every ZeRO stage: all ranks must exhaust the iterator.
    """
    frozen: dict[str, torch.Tensor] = getattr(engine, "frozen_fp32", {})
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        with gathered_params(engine):  # fp32: the module parameters are the masters
            for name, param in engine.module.named_parameters():
                yield name, frozen.get(name, param)
        return
    from deepspeed.utils import safe_get_full_fp32_param

    for name, param in engine.module.named_parameters():
        if name in frozen:  # the same set on every rank, so collectives still pair up
            yield name, frozen[name]
            continue
        yield name, _checked_full(name, param, safe_get_full_fp32_param(param))


def _checked_full(name: str, param: torch.Tensor, full: torch.Tensor | None) -> torch.Tensor:
    """Return the full fp32 value of trainable `param`: `full` (the master) or the parameter.

    Without a master (stage 0 fp32, where the parameter is the master) the parameter itself is
    used; a ZeRO-3 parameter holds only an empty partition, so a shape that differs from the
    declared one is an error here rather than an export that cannot be loaded.
    """
    value = param.detach() if full is None else full
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if tuple(value.shape) != shape:
        raise RuntimeError(
            f"parameter {name}: got a {tuple(value.shape)} tensor for a {shape} weight (no full "
            "fp32 copy under this ZeRO stage); gather it before reading"
        )
    return value.float()


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Return the full fp32 master weights by name on rank 0 (an empty dict on other ranks).

    Reads the optimizer's fp32 master copy (not the 16-bit model weights) via
    `deepspeed.utils.safe_get_full_fp32_param`, and frozen parameters from the exact fp32 copy
    `build_engine` took; collective at every ZeRO stage, so all ranks must call it. Buffers are
    taken from the module as they are.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    frozen: dict[str, torch.Tensor] = getattr(engine, "frozen_fp32", {})
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if name in frozen:  # the same set on every rank, so collectives still pair up
            full = frozen[name]
        else:
            full = _checked_full(name, param, safe_get_full_fp32_param(param))
        if is_main():
            state[name] = full.detach().float().cpu().clone()
    for name, buf in engine.module.named_buffers():
        if is_main():
            state[name] = buf.detach().cpu().clone()
    return state
