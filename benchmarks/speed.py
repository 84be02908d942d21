"""Speed benchmark: inference tiles/s, peak memory, training step time and FLOPs, per method, side by side.

For every method (default: unet, ldiffusion, ldseg, cdal; preset `small`) this measures, in one run:

* inference on random 256x256 tiles at batch 1 and batch 16: tiles/s of `predict_proba` with the
  method's default inference settings (its `n_samples`, DDIM / chain steps; listed in the table),
  and the peak memory of one call;
* one optimiser step of every training stage (`training_step` + back-propagation + optimiser step,
  exactly as `train.loop.fit` does it via `train.loop.apply_losses`) at the stage's batch size
  and the preset's training crop (cDAL with `d_every` = n: the mean over cycles of n steps); the
  *main* stage (the last one, which trains the network that predicts) is the headline number;
* FLOPs per tile (inference) and per training step, counted with
  `torch.utils.flop_counter.FlopCounterMode` (matmul / convolution / attention FLOPs only;
  element-wise ops are not counted);
* the machine's measured matmul throughput (fp32 and bf16, n x n matmuls, n = 2048), so each
  method's achieved FLOP/s is also stated as a fraction of what this machine reaches on a large matmul.

Weights are untrained (initialised from the config seed): speed does not depend on their values.
Inputs are uniform random images and random labels.

Peak memory. On CPU each (method, batch) and each (method, stage) runs in a fresh subprocess that
resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, then `VmHWM`) after building the
model and the input, so the number is the resident-memory increase of the call itself (falls back
to `ru_maxrss` minus the RSS before the call where `clear_refs` is not writable, an upper bound).
On CUDA it is `torch.cuda.max_memory_allocated()` minus the memory allocated before the call.
Memory is taken from the first (warm-up) call; FLOPs are counted on a separate call (the counter
itself adds resident memory).

Usage:
    python benchmarks/speed.py                      # small preset, CPU or CUDA (auto)
    python benchmarks/speed.py --quick              # fewer repetitions; < 5 min on a 2-core CPU
    python benchmarks/speed.py --device cuda --methods unet cdal --batch-sizes 1 16 64

Writes `--out` (default `benchmarks/results/speed-<date>-<host>.json`) and a Markdown table next
to it (same name, `.md`), and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MARKER = "SPEEDJSON:"
DEFAULT_METHODS = ("unet", "ldiffusion", "ldseg", "cdal")
BASELINE = "unet"
# config keys that set a method's inference cost (shown in the table)
INFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "unet": (),
    "ldiffusion": ("n_samples", "steps", "t_start", "feature_draws", "feature_mode"),
    "ldseg": ("n_samples", "ddim_steps", "T", "eta", "mean_map"),
    "cdal": ("n_samples", "T"),
}


# ----------------------------------------------------------------------------------------- measuring
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory increase of a block: CPU resident set (VmHWM after a reset) or CUDA allocations."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.bytes: int | None = None
        self.how = ""

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.how = "torch.cuda.max_memory_allocated - allocated before"
            return self
        self._base = (_status_kb("VmRSS") or 0) * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self._hwm = True
            self.how = "VmHWM after reset (clear_refs=5) - VmRSS before, fresh subprocess"
        except OSError:
            self._hwm = False
            self.how = "ru_maxrss - RSS before, fresh subprocess (upper bound)"
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
            return
        if self._hwm:
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
        self.bytes = max(int(peak - self._base), 0)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: Any) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _repeat(fn: Any, device: Any, min_reps: int, min_time_s: float, max_reps: int) -> list[float]:
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_time_s):
        times.append(_timed(fn, device))
    return times


def measure_matmul(device: Any, n: int, quick: bool) -> dict[str, Any]:
    """Return the measured n x n matmul throughput in FLOP/s for fp32 and bf16 (median of repeats)."""
    import torch

    out: dict[str, Any] = {"n": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        first = _timed(lambda a=a, b=b: a @ b, device)  # warm-up (also sizes the repeats)
        target = 0.5 if quick else 2.0
        reps = int(min(max(math.ceil(target / max(first, 1e-6)), 2), 50))
        times = [_timed(lambda a=a, b=b: a @ b, device) for _ in range(reps)]
        t = sorted(times)[len(times) // 2]
        out[f"{name}_flops"] = 2.0 * n**3 / t
        out[f"{name}_reps"] = reps
    return out


def _flops_registry(fn: Any) -> int:
    """Count FLOPs with FlopCounterMode's formulas (`flop_registry`) in a plain dispatch mode.

    Used when FlopCounterMode itself fails: its per-module tracker raises on the double backward
    of `torch.autograd.grad(..., create_graph=True)` (cDAL's R1 penalty) in torch 2.x.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                _Counter.total += int(formula(*args, **kwargs, out_val=out))
            return out

    with _Counter():
        fn()
    return _Counter.total


def _flops(fn: Any) -> tuple[int, str]:
    """Run `fn` once counting FLOPs; return (flops, counter used).

    Not combined with the memory measurement: FlopCounterMode itself adds ~70 MB of resident memory.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops()), "FlopCounterMode"
    except RuntimeError:
        return _flops_registry(fn), "flop_registry (FlopCounterMode formulas; its module tracker fails here)"


def _build(spec: dict[str, Any]) -> Any:
    import torch

    from ldiffusion.methods import create_method

    method = create_method(spec["method"], preset=spec["preset"], num_classes=spec["num_classes"],
                           overrides=spec.get("overrides", []))
    return method.to(torch.device(spec["device"]))


def worker_infer(spec: dict[str, Any]) -> dict[str, Any]:
    """Inference of one (method, batch): memory + FLOPs on the warm-up call, then timed calls."""
    import torch

    from ldiffusion.core.rng import make_generator

    device = torch.device(spec["device"])
    method = _build(spec).eval()
    b, tile = spec["batch"], spec["tile"]
    x = torch.rand(b, 3, tile, tile, generator=torch.Generator().manual_seed(0)).to(device)
    calls = [0]

    def run() -> None:
        calls[0] += 1
        with torch.no_grad():
            method.predict_proba(x, generator=make_generator(calls[0], device))

    res: dict[str, Any] = {"batch": b, "tile_px": tile}
    if spec.get("with_info"):
        res["info"] = method_info(method, spec["method"])
    with PeakMemory(device) as mem:  # warm-up call: memory
        first = _timed(run, device)
    res["peak_bytes"], res["memory_how"], res["first_call_s"] = mem.bytes, mem.how, first
    if spec["count_flops"]:
        res["flops_per_call"], res["flops_counter"] = _flops(run)
        res["flops_per_tile"] = res["flops_per_call"] / b
    if spec["reps"] > 0:
        times = _repeat(run, device, spec["reps"], spec["min_time_s"], spec["max_reps"])
        res["cold"] = False
    else:  # quick mode at large batch: the single (cold) warm-up call is the measurement
        times = [first]
        res["cold"] = True
    res["times_s"] = times
    res["s_per_call"] = statistics.median(times)
    res["tiles_per_s"] = b / res["s_per_call"]
    return res


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Training steps of one (method, stage): memory + FLOPs on the warm-up step, then timed steps."""
    import torch

    from ldiffusion.core.device import autocast
    from ldiffusion.core.rng import make_generator
    from ldiffusion.train.loop import apply_losses

    device = torch.device(spec["device"])
    method = _build(spec).train()
    stage = next(s for s in method.stages() if s.name == spec["stage"])
    cfg = method.cfg
    b, crop, k = stage.batch_size, cfg.crop_px, spec["num_classes"]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(b, 3, crop, crop, generator=g).to(device),
             "label": torch.randint(0, k, (b, crop, crop), generator=g).to(device),
             "id": [f"tile{i}" for i in range(b)],
             "annotated": torch.ones(b, dtype=torch.bool, device=device)}
    opts = {name: torch.optim.Adam(list(s.params), lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
            for name, s in stage.optimizers.items()}
    step = [0]

    def run() -> None:
        with autocast(device, cfg.precision):
            losses = method.training_step(batch, make_generator(step[0], device), stage.name)
        apply_losses(losses, stage.optimizers, opts, cfg.grad_clip, stage.name, step[0])
        step[0] += 1

    res: dict[str, Any] = {"stage": stage.name, "batch": b, "crop_px": crop, "precision": cfg.precision,
                           "optimizers": sorted(stage.optimizers)}
    with PeakMemory(device) as mem:  # warm-up step: memory (includes the optimiser state allocation)
        res["first_step_s"] = _timed(run, device)
    res["peak_bytes"], res["memory_how"] = mem.bytes, mem.how
    if spec["count_flops"]:
        res["flops_per_step"], res["flops_counter"] = _flops(run)
    # a method whose steps differ periodically (cDAL's `d_every`: D trains on every n-th step) is timed
    # over whole periods, each repetition divided by the period, so the median is the mean step
    cycle = method.step_period

    def run_cycle() -> None:
        for _ in range(cycle):
            run()

    times = [t / cycle for t in _repeat(run_cycle, device, spec["reps"], spec["min_time_s"] * cycle,
                                        spec["max_reps"])]
    res["times_s"], res["steps_per_repetition"] = times, cycle
    res["s_per_step"] = statistics.median(times)
    res["px_per_s"] = b * crop * crop / res["s_per_step"]
    return res


def worker_info(spec: dict[str, Any]) -> dict[str, Any]:
    """Settings and size of a method (no timing)."""
    return method_info(_build(spec), spec["method"])


def method_info(method: Any, name: str) -> dict[str, Any]:
    """Return a method's inference settings, parameter counts, training crop and stages."""
    cfg = method.cfg
    return {"settings": {k: getattr(cfg, k) for k in INFERENCE_KEYS.get(name, ("n_samples",))
                         if hasattr(cfg, k)},
            "params": sum(p.numel() for p in method.parameters()),
            "inference_params": sum(v.numel() for v in method.inference_state_dict().values()),
            "crop_px": cfg.crop_px,
            "stages": [{"name": s.name, "batch": s.batch_size} for s in method.stages()]}


def run_worker(spec: dict[str, Any]) -> None:
    """Entry point of a measurement subprocess: print one JSON line prefixed with MARKER."""
    import torch

    torch.set_num_threads(spec["threads"])
    fn = {"infer": worker_infer, "train": worker_train, "info": worker_info}[spec["kind"]]
    print(MARKER + json.dumps(fn(spec)), flush=True)


def _spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    out = json.loads(lines[-1][len(MARKER):])
    out["subprocess_s"] = round(time.perf_counter() - t0, 2)
    return out


# ----------------------------------------------------------------------------------------- reporting
def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:.3g}"


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or base == 0:
        return "-"
    return f"{x / base:.2f}x"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "deterministic, 1 pass"


def build_tables(res: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Return (inference header, rows, training header, rows); ratios are against the U-Net."""
    peak = res["machine"]
    bs = res["batch_sizes"]
    big = str(max(bs))
    methods = res["methods"]
    base = methods.get(BASELINE, {})

    def inf(m: dict[str, Any], b: str, key: str) -> Any:
        return m.get("inference", {}).get(b, {}).get(key)

    def tile_time(m: dict[str, Any], b: str) -> float | None:
        t = inf(m, b, "tiles_per_s")
        return None if not t else 1.0 / t

    ih = ["method", "inference settings", "GFLOP/tile"]
    for b in bs:
        ih += [f"tiles/s b{b}", f"peak MB b{b}"]
    ih += [f"% fp32 peak b{big}", f"time/tile vs U-Net b{big}", "FLOPs vs U-Net", f"memory vs U-Net b{big}"]
    irows = []
    for name, m in methods.items():
        flops = inf(m, str(bs[0]), "flops_per_tile")
        row = [name, _settings_text(m.get("info", {}).get("settings", {})), _g(flops)]
        for b in bs:
            tps = inf(m, str(b), "tiles_per_s")
            cold = " (cold)" if inf(m, str(b), "cold") else ""
            err = inf(m, str(b), "error")
            row += ["error" if err else ("-" if tps is None else f"{tps:.3g}{cold}"),
                    _mb(inf(m, str(b), "peak_bytes"))]
        tps = inf(m, big, "tiles_per_s")
        frac = flops * tps / peak["fp32_flops"] if flops and tps else None
        row += [_pct(frac), _ratio(tile_time(m, big), tile_time(base, big)),
                _ratio(flops, inf(base, str(bs[0]), "flops_per_tile")),
                _ratio(inf(m, big, "peak_bytes"), inf(base, big, "peak_bytes"))]
        irows.append(row)

    th = ["method", "stage", "batch x crop", "s/step", "Mpx/s", "peak MB", "GFLOP/step", "% peak",
          "time/px vs U-Net", "memory vs U-Net"]
    trows = []
    base_main = base.get("training", {}).get(base.get("main_stage", ""), {})
    base_tpx = 1.0 / base_main["px_per_s"] if base_main.get("px_per_s") else None
    for name, m in methods.items():
        for stage, t in m.get("training", {}).items():
            main = " (main)" if stage == m.get("main_stage") else ""
            if "error" in t:
                trows.append([name, stage + main, "-", "error", "-", "-", "-", "-", "-", "-"])
                continue
            pk = peak["bf16_flops"] if t.get("precision") == "bf16" else peak["fp32_flops"]
            frac = t["flops_per_step"] / t["s_per_step"] / pk if t.get("flops_per_step") else None
            n_timed = len(t.get("times_s", [])) * t.get("steps_per_repetition", 1)
            trows.append([name, stage + main, f"{t['batch']} x {t['crop_px']}", f"{t['s_per_step']:.3g}"
                          + (f" (mean of {n_timed} steps)" if t.get("steps_per_repetition", 1) > 1
                             else " (1 step)" if n_timed == 1 else ""),
                          f"{t['px_per_s'] / 1e6:.3g}", _mb(t.get("peak_bytes")), _g(t.get("flops_per_step")),
                          _pct(frac), _ratio(1.0 / t["px_per_s"], base_tpx) if main else "",
                          _ratio(t.get("peak_bytes"), base_main.get("peak_bytes")) if main else ""])
    return ih, irows, th, trows


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """Render a Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _load(res: dict[str, Any]) -> str:
    a, b = res.get("load_average_start"), res.get("load_average_end")
    return "-" if a is None else f"{a:.1f} at start, {b:.1f} at end on {res.get('cpu_count')} cores"


def summary_lines(res: dict[str, Any]) -> list[str]:
    """Return the header lines that state what was measured and how."""
    m = res["machine"]
    return [
        f"speed benchmark {res['date']} on {res['host']}: {res['device_name']} ({res['device']}), "
        f"{res['threads']} threads ({res.get('threads_requested', '-')}; load average {_load(res)}), "
        f"torch {res['torch']}, "
        f"ldiffusion {res['ldiffusion']}"
        + (f", commit {res['git_commit'][:10]}" if res.get("git_commit") else ""),
        f"preset {res['preset']}, {res['num_classes']} classes, inference tiles "
        f"{res['tile_px']}x{res['tile_px']} random images, untrained weights "
        "(speed does not depend on weight values); "
        f"{'quick mode' if res['quick'] else 'full mode'}",
        f"machine peak (measured {m['n']}^3 matmul): fp32 {m['fp32_flops'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {m['bf16_flops'] / 1e9:.1f} GFLOP/s; FLOPs counted with FlopCounterMode "
        "(matmul/conv/attention only)",
        f"memory: {res.get('memory_how', '-')}",
    ]


def write_outputs(res: dict[str, Any], out: Path) -> Path:
    """Write the JSON result and the Markdown table next to it; return the Markdown path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    ih, irows, th, trows = build_tables(res)
    md = ["# Speed benchmark", "", *[f"- {x}" for x in summary_lines(res)],
          f"- run time {res['run_time_s']:.0f} s; command: `{res['command']}`", "",
          f"## Inference ({res['tile_px']}x{res['tile_px']} tiles, `predict_proba`, "
          "default inference settings)",
          "", md_table(ih, irows), "",
          "## Training (one optimiser step: `training_step` + backward + optimiser step)", "",
          md_table(th, trows), ""]
    md_path = out.with_suffix(".md")
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, md_path)
    return md_path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to measure")
    p.add_argument("--preset", default="small", help="method preset (default: small, the real-run preset)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16], help="inference batch sizes")
    p.add_argument("--tile", type=int, default=256, help="inference tile side in px")
    p.add_argument("--num-classes", type=int, default=2, help="classes K (2 = binary, as MoNuSeg)")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads; auto (default) = the cores not busy with other processes at the "
                        "start (CPU count minus the rounded 1-minute load average, at least 1)")
    p.add_argument("--matmul-n", type=int, default=2048, help="side of the matmuls that measure the peak")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions (< 5 min on a 2-core CPU): batch 1 timed over 2 calls and "
                        "training over 1 step after one warm-up, larger batches timed on their single "
                        "(cold) call, no training FLOPs")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override key=value for every method (or method:key=value)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement subprocess")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/speed-<date>-<host>.json; .md beside it)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def choose_threads(requested: str, default: int, cores: int, load: float | None) -> int:
    """Return the torch thread count: an explicit number, or for "auto" the cores not already busy.

    OpenMP threads placed on cores that other processes keep busy wait for their descheduled peers
    at every parallel region: on a 2-core machine running one other training, cDAL inference took
    45 s per tile with 2 threads and 3.4 s with 1. "auto" therefore leaves busy cores alone.

    Example:
        >>> choose_threads("auto", 2, 2, 1.2), choose_threads("auto", 2, 2, 0.1)
        (1, 2)
        >>> choose_threads("3", 2, 2, 4.0)
        3
    """
    if requested != "auto":
        n = int(requested)
        if n < 1:
            raise SystemExit(f"--threads {requested}: expected a positive integer or 'auto'")
        return n
    if load is None:
        return default
    return max(1, min(default, cores - round(load)))


def _overrides_for(method: str, items: list[str]) -> list[str]:
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            name, rest = item.split(":", 1)
            if name == method:
                out.append(rest)
        else:
            out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or one measurement when called with --worker)."""
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0
    t_start = time.perf_counter()
    import torch

    import ldiffusion
    from ldiffusion.core.device import resolve_device

    device = resolve_device(args.device)
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads = choose_threads(args.threads, torch.get_num_threads(), cores, load_start)
    torch.set_num_threads(threads)
    host = socket.gethostname().split(".")[0] or "host"
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "benchmarks" / "results" / f"speed-{date}-{host}.json"
    bs = sorted(set(args.batch_sizes))
    if args.quick:
        reps1, reps_big, reps_train, min_time = 2, 0, 1, 0.0
    else:
        reps1, reps_big, reps_train, min_time = 5, 3, 3, 3.0
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    if device.type == "cpu" and load_start is not None and load_start > 0.5:
        print(f"note: the machine is busy (1-min load average {load_start:.1f} on {cores} cores); using "
              f"{threads} thread(s); CPU timings are slower and noisier than on an idle machine",
              file=sys.stderr, flush=True)
    print(f"measuring matmul peak on {device_name} ({threads} threads) ...", file=sys.stderr, flush=True)
    machine = measure_matmul(device, args.matmul_n, args.quick)
    res: dict[str, Any] = {
        "schema": 1, "date": date, "host": host, "device": str(device), "device_name": device_name,
        "threads": threads, "threads_requested": f"--threads {args.threads}",
        "torch": torch.__version__, "ldiffusion": ldiffusion.__version__,
        "python": platform.python_version(), "git_commit": _git_commit(), "preset": args.preset,
        "tile_px": args.tile, "num_classes": args.num_classes, "batch_sizes": bs, "quick": args.quick,
        "weights": "untrained (initialised from the config seed)", "inputs": "uniform random images/labels",
        "flops_counter": "torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention FLOPs)",
        "machine": machine, "methods": {}, "cpu_count": cores, "load_average_start": load_start,
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    common = {"preset": args.preset, "num_classes": args.num_classes, "device": str(device),
              "threads": threads}
    for name in args.methods:
        spec0 = {**common, "method": name, "overrides": _overrides_for(name, args.overrides)}
        entry: dict[str, Any] = {"info": {}, "inference": {}, "training": {}}
        res["methods"][name] = entry
        for b in bs:
            reps = reps1 if (b == bs[0] or not args.quick) else reps_big
            spec = {**spec0, "kind": "infer", "batch": b, "tile": args.tile, "count_flops": b == bs[0],
                    "reps": reps, "min_time_s": min_time, "max_reps": 20, "with_info": b == bs[0]}
            print(f"{name}: inference batch {b} ...", file=sys.stderr, flush=True)
            entry["inference"][str(b)] = r = _spawn(spec, args.timeout)
            if "info" in r:
                entry["info"] = r.pop("info")
            res.setdefault("memory_how", r.get("memory_how"))
            if "error" in r:
                print(f"  error: {r['error']}", file=sys.stderr)
            else:
                print(f"  {r['tiles_per_s']:.3g} tiles/s, peak {_mb(r['peak_bytes'])} MB", file=sys.stderr)
        if not entry["info"]:  # the first inference run failed: get the settings on their own
            entry["info"] = _spawn({**spec0, "kind": "info"}, args.timeout)
            if "error" in entry["info"]:
                print(f"{name}: cannot build ({entry['info']['error']})", file=sys.stderr)
                continue
        if args.no_train:
            continue
        stages = [s["name"] for s in entry["info"]["stages"]]
        entry["main_stage"] = stages[-1]
        for stage in stages:
            spec = {**spec0, "kind": "train", "stage": stage, "reps": reps_train, "min_time_s": 2 * min_time,
                    "max_reps": 10, "count_flops": not args.quick}
            print(f"{name}: training stage {stage} ...", file=sys.stderr, flush=True)
            entry["training"][stage] = r = _spawn(spec, args.timeout)
            if "error" in r:
                print(f"  error: {r['error']}", file=sys.stderr)
            else:
                print(f"  {r['s_per_step']:.3g} s/step", file=sys.stderr)
    res["run_time_s"] = round(time.perf_counter() - t_start, 1)
    res["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    md_path = write_outputs(res, out)
    ih, irows, th, trows = build_tables(res)
    print("\n".join(summary_lines(res)))
    print()
    print(f"Inference, {args.tile}x{args.tile} tiles (predict_proba, default inference settings):")
    print(plain_table(ih, irows))
    if not args.no_train:
        print()
        print("Training, one optimiser step (training_step + backward + step) at the preset's batch "
              "and crop:")
        print(plain_table(th, trows))
    print()
    print(f"run time {res['run_time_s']:.0f} s; wrote {out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
