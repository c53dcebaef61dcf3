"""
Training throughput of `nanoplay train` against a plain nanoGPT-style loop: same model, same batch.

    python benchmarks/train_speed.py                      # CPU: owt-30m shape, batch 8 x 512, fp32
    python benchmarks/train_speed.py --preset gpt2-124m --device cuda --batch-size 12 --steps 30

The trainer's figure comes from its own metrics.jsonl (seconds per optimizer step, first steps skipped
for warm-up and compilation); the reference loop is nanoGPT's train.py reduced to its inner loop
(random windows from a uint16 memmap, forward, backward, clip, AdamW step). Prints tokens/s for both,
their ratio, and on a GPU the MFU.
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch


def plain_loop(cfg, shards: Path, steps: int, warmup: int, device: str) -> float:
    """nanoGPT's loop on the same data and model shape; returns tokens/s over the timed steps."""
    from trainer.train import model_from_scratch

    data = np.memmap(next(shards.glob("train-*.bin")), dtype=np.uint16, mode="r")
    model = model_from_scratch(cfg).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           "cuda" if device.startswith("cuda") else "cpu")
    use_cuda = device.startswith("cuda")
    train_model = torch.compile(model) if use_cuda and cfg.compile else model
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else nullcontext()

    def get_batch():
        ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)) if use_cuda else (x, y)

    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            x, y = get_batch()
            with ctx:
                _, loss = train_model(x, y)
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the sync nanoGPT does when it logs
        times.append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    return tokens / (sum(times[warmup:]) / len(times[warmup:]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="owt-30m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default="pydoc-topics", help="any --data source (the bundled corpus by default)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    os.environ.setdefault("NANOPLAY_CHECKPOINTS", str(tmp / "checkpoints"))
    from nanoplay.textdata import resolve_source
    from trainer import data
    from trainer.config import load_preset
    from trainer.train import train

    cfg = load_preset(args.preset, data=args.data, val_fraction=0.1, batch_size=args.batch_size,
                      gradient_accumulation_steps=args.accum, max_iters=args.steps, eval_interval=0,
                      checkpoint_interval=0, sample_tokens=0, device=args.device, name="bench")
    shards = data.prepare(resolve_source(cfg.data, cfg.text_column, cfg.val_fraction), progress=False)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset} batch {args.batch_size}x{cfg.block_size}x{args.accum} on {device}")
    ratios = []
    for r in range(args.rounds):  # alternate the two, so a busy moment of the machine hits both alike
        ref = plain_loop(cfg, shards, args.steps, args.warmup, args.device)
        name = f"bench{r}"
        train(dataclasses.replace(cfg, name=name), display="none")
        metrics = [json.loads(line) for line in (tmp / "checkpoints" / name / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "seconds" in m][args.warmup:]
        ours = sum(m["tokens"] for m in steps) / sum(m["seconds"] for m in steps)
        mfu = [m["mfu"] for m in steps if m.get("mfu") is not None]
        ratios.append(ours / ref)
        print(f"  round {r}: nanoplay train {ours:10,.0f} tokens/s" + (f" (MFU {sum(mfu) / len(mfu):.1%})" if mfu else "")
              + f" | plain nanoGPT loop {ref:10,.0f} tokens/s | ratio {ours / ref:.3f}", flush=True)
    print(f"  median ratio: {sorted(ratios)[len(ratios) // 2]:.3f}")


if __name__ == "__main__":
    main()
