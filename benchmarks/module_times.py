"""Where one training step goes: forward time per top-level module, whole forward, backward.

Builds a method at a preset (random weights, random images and labels at the preset's batch and crop),
runs `--warmup` steps, then times `--steps` steps of `training_step` + backward (no optimiser step, so
the weights stay the same) and prints the median of each figure. A module's time is the wall clock of
its own forward calls (forward hooks on the method's direct children); backward is not split by module.
Use it to find the part of a step worth making cheaper; `benchmarks/speed.py` gives the step time
with the optimiser.

Example:
    python benchmarks/module_times.py --method ldseg --set "decoder_widths=[32,64,64,32]"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from ldiffusion.methods import create_method


def module_times(method: str, preset: str, overrides: list[str], num_classes: int, warmup: int,
                 steps: int, seed: int = 0) -> dict[str, Any]:
    """Return median seconds {"forward", "backward", "modules": {child: forward s}} and the step's shapes."""
    model = create_method(method, preset=preset, num_classes=num_classes, overrides=overrides)
    model.train()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(cfg.batch_size, 3, cfg.crop_px, cfg.crop_px, generator=gen)
    labels = torch.randint(0, num_classes, (cfg.batch_size, cfg.crop_px, cfg.crop_px), generator=gen)
    spent: dict[str, float] = {}
    started: dict[str, float] = {}

    def start(name: str) -> None:
        started[name] = time.perf_counter()

    def stop(name: str) -> None:
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]

    for name, child in model.named_children():
        child.register_forward_pre_hook(lambda _m, _i, n=name: start(n))
        child.register_forward_hook(lambda _m, _i, _o, n=name: stop(n))
    rows: list[dict[str, Any]] = []
    for i in range(warmup + steps):
        spent.clear()
        t0 = time.perf_counter()
        losses = model.training_step({"image": images, "label": labels}, gen, "main")
        t1 = time.perf_counter()
        total = sum(v for k, v in losses.items() if not k.startswith("log/") and v.requires_grad)
        total.backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            rows.append({"forward": t1 - t0, "backward": t2 - t1, "modules": dict(spent)})
    names = sorted({n for r in rows for n in r["modules"]})
    return {
        "method": method, "preset": preset, "overrides": overrides, "batch": cfg.batch_size,
        "crop_px": cfg.crop_px, "threads": torch.get_num_threads(), "steps": steps,
        "forward": statistics.median(r["forward"] for r in rows),
        "backward": statistics.median(r["backward"] for r in rows),
        "modules": {n: statistics.median(r["modules"].get(n, 0.0) for r in rows) for n in names},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True)
    p.add_argument("--preset", default="small")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        print(f"error: --steps {args.steps} should be >= 1 and --warmup {args.warmup} >= 0", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    r = module_times(args.method, args.preset, args.overrides, args.num_classes, args.warmup, args.steps)
    print(f"{r['method']} {r['preset']} {' '.join(r['overrides'])}: batch {r['batch']} x {r['crop_px']} px, "
          f"{r['threads']} thread(s), median of {r['steps']} steps (no optimiser step)")
    print(f"  forward {r['forward']:.2f} s, backward {r['backward']:.2f} s")
    for name, sec in r["modules"].items():
        print(f"  forward of {name}: {sec:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
