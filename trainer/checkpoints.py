"""
A run's checkpoints: `checkpoints/NAME/step-XXXXXXXX/` in the engine's format, with the training state
(`training_state.pt`: optimizer, step, best validation loss, config) beside the weights.

Each step directory, weights and state together, is written to a hidden temporary sibling and renamed
into place in one step (nanoplay.checkpoint.write_dir_atomically): a kill at any moment leaves either
the new checkpoint complete or no trace of it, and the previous ones untouched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from nanoplay.checkpoint import list_steps, read_config, save_checkpoint, step_dir_name, write_dir_atomically
from nanoplay.loading import checkpoints_root, read_torch_file

from .config import check_run_name

STATE_FILE = "training_state.pt"


def run_dir(name: str) -> Path:
    """checkpoints/NAME, for a name that is one plain folder name (never the root, never outside it)."""
    check_run_name(name)
    return checkpoints_root() / name


def save_step(run_dir: Path, step: int, model, state: dict, meta: dict) -> Path:
    """Weights + config.json (engine format) + training_state.pt, atomically, as step-XXXXXXXX/."""

    def write(tmp: Path):
        # the engine writes its format (atomically into `tmp`, which nobody sees yet); the state goes beside it
        save_checkpoint(model, tmp, step=step, meta=meta)
        torch.save(state, tmp / STATE_FILE)

    return write_dir_atomically(Path(run_dir) / step_dir_name(step), write)


def load_state(step_dir: Path) -> dict:
    step_dir = Path(step_dir)
    earlier = [s for s, d in resumable_steps(step_dir.parent).items() if d.name < step_dir.name]  # zero-padded
    then = (f"delete {step_dir} to resume from step {max(earlier)}, the one before it" if earlier else
            f"this run has no other checkpoint to resume from: delete {step_dir} and start again without --resume")
    return read_torch_file(step_dir / STATE_FILE, fix=then)  # weights_only=True; damage is one line, then `then`


def resumable_steps(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints that also hold a training state."""
    return {s: d for s, d in list_steps(Path(run_dir)).items() if (d / STATE_FILE).is_file()}


def clean_partial_writes(run_dir: Path) -> None:
    """Remove what a killed writer left: hidden temporary directories (never visible as checkpoints)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for child in run_dir.iterdir():
        name = child.name
        if name.startswith(".trash-step-") or (name.startswith("..step-") or name.startswith(".step-")) and ".tmp-" in name:
            shutil.rmtree(child, ignore_errors=True)  # half-written or half-deleted: never a checkpoint
        elif name.startswith(".step-") and ".old-" in name:
            # killed between the two renames that replace an existing step: the old copy is the checkpoint
            final = run_dir / name[1:].split(".old-")[0]
            if final.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, final)


def prune(run_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` steps and the best by validation loss; returns deleted steps."""
    steps = list_steps(Path(run_dir))
    keep = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set(steps)
    scored = {s: read_config(d).get("val_loss") for s, d in steps.items()}
    scored = {s: v for s, v in scored.items() if v is not None}
    if scored:
        keep.add(min(scored, key=lambda s: (scored[s], -s)))
    deleted = []
    for step, directory in steps.items():
        if step not in keep:
            trash = directory.with_name(f".trash-{directory.name}")
            os.replace(directory, trash)  # gone from view at once; the slow delete comes after
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(step)
    return deleted
