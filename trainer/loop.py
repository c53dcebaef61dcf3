"""
The training loop shared by `nanoplay train` and `nanoplay finetune`, nanoGPT's train.py in a function.

bf16 autocast and torch.compile on CUDA, fp32 on CPU; fused AdamW where available; TF32 on; DDP under
torchrun with gradients synchronised on the last micro-step only (DDP.no_sync for the others).

Everything random is a function of (seed, step): the batches (see data.py) and the dropout RNG, which is
re-seeded at every step. So the training state is just the weights, the optimizer and the step, and a
resumed run computes exactly what an uninterrupted one would (bit for bit on CPU).

Ctrl+C or SIGTERM ask the loop to stop: it finishes the step, saves a checkpoint and returns.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanoplay.errors import NanoplayError
from nanoplay.loading import resolve_device
from nanoplay.model import GPT

from . import checkpoints
from .config import TrainConfig
from .monitor import Monitor


WARMUP_SHARE = 0.1  # warm-up takes at most this share of the run's steps
MIN_LEARNING_STEPS = 50  # fewer steps than this barely move the loss: the run says so


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule sized to a run: warm-up steps, and the step where the cosine decay ends."""

    warmup: int
    decay_end: int


def fit_schedule(cfg: TrainConfig) -> Schedule:
    """
    warmup_iters and lr_decay_iters are upper bounds that the run's length caps: warm-up takes at most
    WARMUP_SHARE of max_iters, and the decay ends by max_iters (lr_decay_iters 0: at max_iters). So a
    short run (a fine-tune of a few conversations, a test) still reaches learning_rate and ends at min_lr,
    instead of stopping part-way up the warm-up ramp.
    """
    warmup = min(cfg.warmup_iters, int(cfg.max_iters * WARMUP_SHARE))
    decay_end = min(cfg.lr_decay_iters or cfg.max_iters, cfg.max_iters)
    return Schedule(warmup, max(decay_end, warmup))


def schedule_notes(cfg: TrainConfig) -> dict[str, str]:
    """Comments for --print-config on the schedule keys that the run's length caps."""
    fitted, notes = fit_schedule(cfg), {}
    if fitted.warmup < cfg.warmup_iters:
        notes["warmup_iters"] = (f"capped to {fitted.warmup} steps: warm-up takes at most {WARMUP_SHARE:.0%} "
                                 f"of max_iters {cfg.max_iters}")
    if cfg.lr_decay_iters > cfg.max_iters:
        notes["lr_decay_iters"] = f"capped: the decay ends at max_iters {cfg.max_iters}"
    return notes


def short_run_warning(cfg: TrainConfig) -> str | None:
    """One line when the run has too few steps to learn much, naming the flags that lengthen it."""
    if cfg.max_iters >= MIN_LEARNING_STEPS:
        return None
    fix = "--epochs or --min-iters (a --max-iters wins over both)" if cfg.epochs else "--max-iters"
    return (f"warning: {cfg.max_iters} steps are too few to learn much (the loss barely moves in under "
            f"{MIN_LEARNING_STEPS}): raise {fix}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr, then flat; sized by fit_schedule."""
    fitted = fit_schedule(cfg)
    if step < fitted.warmup:
        return cfg.learning_rate * (step + 1) / (fitted.warmup + 1)
    if step >= fitted.decay_end:
        return cfg.min_lr
    ratio = (step - fitted.warmup) / max(1, fitted.decay_end - fitted.warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Distributed:
    """Under torchrun (RANK set): join the process group (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def pick_device(name: str, dist_info: Distributed | None = None) -> torch.device:
    """The config's device (auto: the GPU when there is one), checked; under torchrun, this rank's GPU."""
    device = resolve_device(None if name == "auto" else name)
    if device.type == "cuda" and dist_info and dist_info.enabled:
        return torch.device("cuda", dist_info.local_rank)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())  # torch.cuda.set_device needs an index
    return device


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second Ctrl+C aborts at once."""

    def __init__(self, event=None):
        self.signalled = False
        self.event = event  # a threading.Event another thread may set (the TUI's stop button)
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signalled or (self.event is not None and self.event.is_set())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (Ctrl+C again to abort)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    last_loss: float | None
    best_val_loss: float | None
    checkpoint: str | None


def train_loop(cfg: TrainConfig, model: GPT, data, run_dir, *, meta: dict, title: str,
               resume_state: dict | None = None, sampler=None, dist_info: Distributed | None = None,
               display: str = "auto", on_progress=None, stop_event=None) -> TrainResult:
    """
    Train `model` (fp32, on CPU; moved to the device here) on `data` (train_batch(step, micro),
    val_batches()), saving to `run_dir`. `meta` goes into every checkpoint's config.json; `sampler(model)`
    returns a short text printed after each evaluation. `display`: auto, live, plain or none (see
    Monitor); `on_progress(Progress)` after each step; `stop_event.set()` stops like Ctrl+C.
    """
    dist_info = dist_info or Distributed()
    device = pick_device(cfg.device, dist_info)
    device_type = device.type
    if device_type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device_type == "cuda")
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    raw_model = model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    start_step, best_val, best_step = 0, math.inf, None
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        start_step = resume_state["step"]
        best_val = resume_state.get("best_val_loss", math.inf)
        best_step = resume_state.get("best_step")
    if cfg.compile and device_type == "cuda":
        model = torch.compile(raw_model)
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[dist_info.local_rank] if device_type == "cuda" else None)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if device_type == "cuda" else t

    @torch.no_grad()
    def evaluate() -> float | None:
        """Mean loss over the fixed validation batches (split across ranks, summed back); None if none."""
        batches = data.val_batches()
        if not batches:
            return None
        model.eval()
        total = torch.zeros((), device=device)
        for i in range(dist_info.rank, len(batches), dist_info.world_size):
            x, y = batches[i]
            with autocast:
                _, loss = raw_model(to_device(x), to_device(y))
            total += loss.float()
        if dist_info.enabled:
            torch.distributed.all_reduce(total)
        model.train()
        return total.item() / len(batches)

    if dist_info.is_main and display != "none":  # before the live view starts; stderr, as warnings go
        if resume_state is not None:
            print(f"resuming {run_dir} from step {start_step} (of {cfg.max_iters})", file=sys.stderr, flush=True)
        warning = short_run_warning(cfg)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    monitor = None
    if dist_info.is_main:
        monitor = Monitor(run_dir=run_dir, title=title, max_iters=cfg.max_iters, start_step=start_step,
                          log_interval=cfg.log_interval, flops_per_token=raw_model.estimate_flops_per_token(),
                          device_name=torch.cuda.get_device_name(device) if device_type == "cuda" else None,
                          tensorboard=cfg.tensorboard, display=display, on_progress=on_progress)
        monitor.message(f"{title}: {raw_model.num_params() / 1e6:.1f}M parameters, {data.describe()}, "
                        f"{cfg.batch_size} x {cfg.gradient_accumulation_steps} x {dist_info.world_size} sequences "
                        f"per step, {device}{' bf16' if use_bf16 else ' fp32'}; checkpoints in {run_dir}/")

    def save(step: int, val_loss: float | None, train_loss: float | None) -> str | None:
        if not dist_info.is_main:
            return None
        state = {"step": step, "optimizer": optimizer.state_dict(), "best_val_loss": best_val,
                 "best_step": best_step, "tokens_seen": tokens_seen, "config": cfg.to_dict(),
                 "world_size": dist_info.world_size,
                 "data_position": {"step": step, "seed": cfg.seed}}
        info = {**meta, "train_loss": train_loss, "val_loss": val_loss, "tokens_seen": tokens_seen,
                "train_config": cfg.to_dict()}
        path = checkpoints.save_step(run_dir, step, raw_model, state, info)
        deleted = checkpoints.prune(run_dir, cfg.keep_last)
        monitor.message(f"saved {path}" + (f" (removed steps {', '.join(map(str, deleted))})" if deleted else ""))
        return str(path)

    model.train()
    step, loss_value, last_checkpoint, stopped = start_step, None, None, False
    tokens_seen = resume_state.get("tokens_seen", 0) if resume_state else 0
    if start_step == 0 and cfg.eval_interval:  # the starting point of the validation curve
        val = evaluate()
        if monitor and val is not None:
            monitor.evaluation(0, val, val)
    try:
        with StopRequest(stop_event) as stop:
            while step < cfg.max_iters:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                torch.manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + dist_info.rank)  # dropout noise
                loss_sum = torch.zeros((), device=device)
                tokens = 0
                accum = cfg.gradient_accumulation_steps
                for micro in range(accum):
                    x, y = data.train_batch(step, micro * dist_info.world_size + dist_info.rank)
                    tokens += x.numel()
                    sync = nullcontext() if not dist_info.enabled or micro == accum - 1 else model.no_sync()
                    with sync:
                        with autocast:
                            _, loss = model(to_device(x), to_device(y))
                        loss = loss / accum
                        loss.backward()
                    loss_sum += loss.detach().float()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                # one all-reduce per step: the mean loss over ranks, the tokens, and whether anyone was asked to stop
                stats = torch.tensor([loss_sum.item(), tokens, float(stop.requested)], dtype=torch.float64, device=device)
                if dist_info.enabled:
                    torch.distributed.all_reduce(stats)
                loss_value = stats[0].item() / dist_info.world_size
                tokens_seen += int(stats[1].item())
                stopped = stats[2].item() > 0
                if monitor:
                    monitor.step(step, loss_value, lr, int(stats[1].item()), time.perf_counter() - t0)

                val = None
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_iters:
                    val = evaluate()
                    if val is not None and val < best_val:
                        best_val, best_step = val, step
                    if monitor and val is not None:
                        monitor.evaluation(step, val, best_val)
                        if sampler and cfg.sample_tokens:
                            monitor.sample_text(step, sampler(raw_model))
                if (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0) or step == cfg.max_iters or stopped:
                    last_checkpoint = save(step, val, loss_value)
                if stopped:
                    break
    finally:
        if monitor:
            monitor.close()
    return TrainResult(step=step, stopped_early=stopped and step < cfg.max_iters, last_loss=loss_value,
                       best_val_loss=best_val if math.isfinite(best_val) else None, checkpoint=last_checkpoint)


def find_resume(run_dir) -> tuple[int, object]:
    """(step, directory) of the newest checkpoint of a run that can be resumed."""
    steps = checkpoints.resumable_steps(run_dir)
    if not steps:
        raise NanoplayError(f"--resume: {run_dir} has no checkpoint with a training state; start without --resume")
    step = max(steps)
    return step, steps[step]

