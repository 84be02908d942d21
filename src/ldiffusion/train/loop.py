"""The one training loop: stages, seeded data order, bf16, grad clip, validation-based selection,
atomic checkpoints, exact resume and JSONL logs.

Determinism and resume. Nothing in the loop depends on hidden state:

* the sample order of epoch `e` of a stage is `randperm` from a generator seeded with
  `derive_seed(seed, stage, "epoch", e)`, and `train_ds.set_epoch(e)` (when present) re-seeds the
  augmentation;
* step `k` of a stage hands `training_step` a fresh generator seeded with
  `derive_seed(seed, stage, "step", k)`; validation gets `derive_seed(seed, stage, "val")`;
* `train_state.pt` stores the full state dict, optimiser states, counters, the best score and the
  global RNG states (for dropout-like global draws), so a resumed run continues at step `k + 1` with
  exactly the state an uninterrupted run has there and ends with identical weights. It also stores
  the class count, the resolved config and the data set fingerprint; a resume that differs in any
  of them is refused before anything is written.
* SIGINT (Ctrl-C) or SIGTERM during `fit` lets the running step finish, saves it and then raises
  `KeyboardInterrupt` (see `train.signals`); a second signal stops at once.

Run folder safety: a folder that already holds a run is written only with `resume=True` (continue)
or `overwrite=True` (start over); see `train.preflight.check_run_folder`.

Validation (every `Stage.val_every` steps and at the end of a stage) scores the current weights
with `method.validation_score` on the validation set only; when a stage `selects_on_val`, the best
weights are written with `method.save(out_dir)` (-> `model.safetensors`) and restored at the end
of the stage. The test split never reaches this module.

Data-parallel runs (`torchrun`, see `train.distributed`): when a process group is initialised,
each global batch is split between the ranks, gradients are averaged before every optimiser step
(all ranks end each step with identical parameters), and only rank 0 validates and writes the run
folder, checkpoints and logs. `batch_size` stays the global batch, so a run's optimisation does
not depend on the number of processes except through per-rank noise seeds
(`derive_seed(seed, stage, "step", k, "rank", r)` when more than one process trains).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ldiffusion.core.device import autocast, precision_note, resolve_precision
from ldiffusion.core.errors import CheckpointError, ConfigError
from ldiffusion.core.io import load_weights, read_json, write_json
from ldiffusion.core.rng import derive_seed, make_generator, rng_state, set_rng_state, worker_init_fn
from ldiffusion.train import distributed as ddp
from ldiffusion.train.preflight import check_run_folder, fingerprint_mismatch
from ldiffusion.train.schedule import schedule_factor, stage_progress
from ldiffusion.train.signals import StopRequest
from ldiffusion.train.state import STATE_FILE, TrainState, counters, load_state, save_state

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESOLVED_FILE = "config.resolved.json"


@dataclasses.dataclass
class FitResult:
    """What `fit` did: output folder, best validation score of the last stage, steps run in this call."""

    out_dir: Path
    best_score: float | None
    steps_run: int
    finished: bool
    stopped_by_budget: list[str]


class _StopFitError(Exception):
    """Internal: `max_steps` reached."""


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _annotated_indices(ds: Dataset) -> list[int]:
    """Indices of samples with labels, from `ds.ids`/`ds.annotated_ids` when present (no image reads)."""
    ids = getattr(ds, "ids", None)
    if ids is not None and hasattr(ds, "annotated_ids"):
        keep = ds.annotated_ids
        return [i for i, case_id in enumerate(ids) if keep is None or case_id in keep]
    return [i for i in range(len(ds)) if bool(ds[i].get("annotated", True))]  # type: ignore[arg-type]


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    perm = torch.randperm(n, generator=generator).tolist()
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if n > batch_size and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class _MetricsLog:
    """Append-only `metrics.jsonl` (one JSON record per line, flushed per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        self.path.write_text("")

    def truncate_after(self, stage_index: int, step: int) -> None:
        """Keep records up to (stage_index, step), dropping what an interrupted run wrote later."""
        if not self.path.is_file():
            self.reset()
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the interruption
            if (rec.get("stage_index", 0), rec.get("step", 0)) <= (stage_index, step):
                keep.append(line)
        self.path.write_text("".join(f"{x}\n" for x in keep))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def fit(method: Any, train_ds: Dataset, val_ds: Dataset | None, out_dir: str | Path, *,
        device: str | torch.device = "cpu", generator_seed: int = 0, resume: bool = False,
        progress: bool = True, max_minutes: float | None = None, max_steps: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        run_info: dict[str, Any] | None = None, overwrite: bool = False,
        data_fingerprint: str | None = None, snapshot_minutes: Sequence[float] = ()) -> FitResult:
    """Train `method` through all its stages and write the run folder `out_dir`.

    Args:
        method: a `methods.base.Trainable` (moved to `device`).
        train_ds: training data set (batch contract of `data.dataset`); `set_epoch(e)` is called
            when present.
        val_ds: validation data set or None (then the last weights are kept).
        out_dir: run folder (`config.json`, `model.safetensors`, `train_state.pt`, `metrics.jsonl`,
            `config.resolved.json`).
        device: compute device.
        generator_seed: seed of data order, per-step noise and validation noise.
        resume: continue from `out_dir/train_state.pt`.
        progress: show a tqdm bar on stderr.
        max_minutes: wall-clock budget per stage (default `method.cfg.max_minutes`); a stage that
            spends it stops cleanly, checkpointed, and the next stage starts. A stage's own
            `Stage.max_minutes` replaces it for that stage.
        max_steps: stop (checkpointed) after this many optimiser steps in this call, as if
            interrupted; used by tests and for chunked jobs.
        callback: called with every step record; a `KeyboardInterrupt` raised from it (or from
            Ctrl-C between steps) checkpoints the last completed step and re-raises.
        run_info: extra entries for `config.resolved.json` (data set, annotated fraction, ...).
        overwrite: start a new run in a folder that already holds one (its state is deleted first);
            without it such a folder is refused unless `resume`.
        data_fingerprint: identity of the training data (`train.preflight.scan_training_data`),
            stored in the state; a resume with another one is refused.
        snapshot_minutes: learning-curve points of the last stage: when its wall clock first passes
            M minutes, the run validates and copies the weights a run with `max_minutes=M` would
            keep (the best on validation so far) to `out_dir/snapshots/<M>min/` (a run folder of its
            own, with `snapshot.json`). The learning rate does not depend on the budget, so the
            snapshot is that shorter run, up to wall-clock noise.

    Returns:
        A `FitResult` (under torch.distributed: the same on every rank; only rank 0 writes files).

    Raises:
        CheckpointError: `out_dir` holds a run and neither `resume` nor `overwrite` is set, or the
            stored state does not match the method, seed, class count, config or data set.
        ConfigError: a stage's batch is smaller than the number of processes.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    _check_snapshot_minutes(snapshot_minutes, method.cfg.lr_schedule)
    device = torch.device(device)
    w = ddp.world()
    out = Path(out_dir)
    replaced = check_run_folder(out, resume=resume, overwrite=overwrite)
    ddp.barrier()  # every rank has looked at the folder before rank 0 writes into it
    state_path = out / STATE_FILE
    cfg = method.cfg
    budget_min = max_minutes if max_minutes is not None else cfg.max_minutes
    method.to(device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    resolved = {**method.run_info(), "seed": generator_seed, "device": str(device),
                "precision": resolve_precision(cfg.precision, device),
                "n_train": len(train_ds), "n_val": len(val_ds) if val_ds is not None else 0,  # type: ignore[arg-type]
                "stages": [{"name": s.name, "steps": s.steps, "epochs": s.epochs, "batch_size": s.batch_size,
                            "selects_on_val": s.selects_on_val, "uses_unannotated": s.uses_unannotated,
                            "optimizers": {k: {"lr": o.lr, "betas": list(o.betas)}
                                           for k, o in s.optimizers.items()}}
                           for s in method.stages()],
                **(run_info or {})}
    if w.distributed:
        resolved["world_size"] = w.size
    identity = {"num_classes": int(method.num_classes),
                "config": json.dumps(resolved["config"], sort_keys=True, default=str),
                "data_fingerprint": data_fingerprint}
    log = _MetricsLog(out / METRICS_FILE)
    st = TrainState()
    saved: dict[str, Any] | None = None
    if resume:
        saved = load_state(state_path)
        if saved["method"] != method.name:
            raise CheckpointError(f"{state_path}: saved by method {saved['method']!r}, not {method.name!r}")
        if saved["seed"] != generator_seed:
            raise CheckpointError(f"{state_path}: saved with seed {saved['seed']}, resumed with "
                                  f"{generator_seed}; resume with --seed {saved['seed']}")
        why = fingerprint_mismatch(saved.get("run") or {}, identity)
        if why is not None:
            raise CheckpointError(f"{state_path}: cannot resume: {why} (or choose a new --out folder)")
        old = out / RESOLVED_FILE
        if old.is_file() and read_json(old).get("config") != resolved["config"]:
            raise CheckpointError(f"{old}: the stored config differs from the resumed one; resume with "
                                  "the same method, preset and --set values, or choose a new folder")
        try:
            method.load_state_dict(saved["model"])
        except RuntimeError as e:  # shapes of another config or class count
            raise CheckpointError(f"{state_path}: the stored weights do not fit this method and data set "
                                  f"({str(e).splitlines()[-1].strip()[:200]})") from e
        st = counters(saved)
        set_rng_state(saved["rng"])
        if w.is_main:
            log.truncate_after(st.stage_index, st.step)
        logger.info("resuming %s at stage %d (%s), step %d", out, st.stage_index, st.stage_name, st.step)
    elif w.is_main:
        for p in replaced:  # --overwrite: nothing of the replaced run (its state above all) survives
            p.unlink()
        if replaced:
            logger.warning("--overwrite: removed %s from %s", ", ".join(p.name for p in replaced), out)
        out.mkdir(parents=True, exist_ok=True)
        log.reset()
    if w.is_main:
        write_json(out / RESOLVED_FILE, resolved)
        note = precision_note(cfg.precision, device)
        if note:
            logger.info(note)
    ddp.broadcast_module(method)  # identical start on every rank (also a barrier after the checks above)

    stages = method.stages()
    steps_run = 0
    budget_stops: list[str] = []
    t_call = time.monotonic()
    with logging_redirect_tqdm(), StopRequest() as stop:
        for si, stage in enumerate(stages):
            if si < st.stage_index:
                continue
            if si > st.stage_index:  # fresh stage
                st = TrainState(stage_index=si)
            st.stage_name = stage.name
            if st.step == 0:  # each stage selects on its own score; the previous stage's is not comparable
                st.best_score, st.best_step = None, None
            indices = list(range(len(train_ds))) if stage.uses_unannotated else _annotated_indices(train_ds)  # type: ignore[arg-type]
            if not indices:
                raise ConfigError(f"stage {stage.name!r} needs annotated training images, but none of the "
                                  f"{len(train_ds)} are annotated")  # type: ignore[arg-type]
            bs = stage.batch_size
            if bs < w.size:
                raise ConfigError(f"stage {stage.name!r}: batch size {bs} is smaller than the {w.size} "
                                  "processes; each process needs at least one sample per step: raise the "
                                  "batch size (--set) or start fewer processes")
            per_epoch = len(indices) // bs if len(indices) > bs else 1
            total = stage.epochs * per_epoch if stage.epochs is not None else stage.steps
            specs = stage.optimizers
            opts = {name: torch.optim.Adam(list(s.params), lr=s.lr, betas=s.betas,
                                           weight_decay=s.weight_decay)
                    for name, s in specs.items()}
            if saved is not None and saved["stage_index"] == si and saved["optimizers"]:
                for name, o in opts.items():
                    o.load_state_dict(saved["optimizers"][name])
            saved = None
            gen_state = make_generator(derive_seed(generator_seed, stage.name, "loop")).get_state()

            def checkpoint(st: TrainState = st, opts: dict[str, Any] = opts, gen_state: Any = gen_state,
                           sync: bool = True) -> None:
                if w.is_main:
                    save_state(state_path, method_name=method.name, model=method.state_dict(),
                               optimizers={k: o.state_dict() for k, o in opts.items()}, state=st,
                               seed=generator_seed, generator=gen_state, rng=rng_state(), run=identity)
                if sync:
                    ddp.barrier()

            def validate(st: TrainState = st, stage: Any = stage) -> None:
                if val_ds is None or len(val_ds) == 0 or not w.is_main:  # type: ignore[arg-type]
                    return
                method.eval()
                loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0)
                score = method.validation_score((_to_device(b, device) for b in loader),
                                                make_generator(derive_seed(generator_seed, stage.name, "val"),
                                                               device), stage.name)
                method.train()
                improved = st.best_score is None or score > st.best_score
                if improved:
                    st.best_score, st.best_step = score, st.step
                    if stage.selects_on_val:
                        method.save(out)
                log.write({"type": "val", "stage": stage.name, "stage_index": st.stage_index, "step": st.step,
                           method.score_name: score, "best": bool(improved),
                           "elapsed_s": round(st.elapsed_s, 3)})
                logger.info("%s step %d: %s %.4f%s", stage.name, st.step, method.score_name, score,
                            " (best)" if improved else "")

            if st.step == 0:
                method.eval()
                method.on_stage_start(stage.name, _hook_batches(train_ds, indices, bs, device))
                ddp.broadcast_module(method)
            method.train()
            t_stage = time.monotonic() - st.elapsed_s
            bar = tqdm(total=total, initial=st.step, desc=f"{method.name}:{stage.name}", file=sys.stderr,
                       disable=not progress or not w.is_main, leave=False, dynamic_ncols=True)
            validated_at = -1
            in_update = False
            last_stage = si == len(stages) - 1
            stage_min = stage.max_minutes if stage.max_minutes is not None else budget_min
            pending = _pending_snapshots(out, snapshot_minutes, stage_min, resume) if last_stage else []
            try:
                while st.step < total:
                    st.epoch = st.step // per_epoch
                    within = st.step % per_epoch
                    if hasattr(train_ds, "set_epoch"):
                        train_ds.set_epoch(st.epoch)
                    g_epoch = make_generator(derive_seed(generator_seed, stage.name, "epoch", st.epoch))
                    batches = [[indices[j] for j in b] for b in _epoch_batches(len(indices), bs, g_epoch)]
                    batches = batches[within:per_epoch]
                    shares = [len(ddp.shard(b, w)) / len(b) for b in batches]
                    loader = DataLoader(train_ds, batch_sampler=[ddp.shard(b, w) for b in batches],
                                        num_workers=cfg.num_workers, worker_init_fn=worker_init_fn,
                                        generator=g_epoch, pin_memory=device.type == "cuda")
                    for share, batch in zip(shares, loader, strict=True):
                        step_key: tuple[Any, ...] = (stage.name, "step", st.step)
                        if w.distributed:
                            step_key += ("rank", w.rank)
                        g_step = make_generator(derive_seed(generator_seed, *step_key), device)
                        batch = _to_device(batch, device)
                        factor = _lr_factor(method, stage.name, st.step, per_epoch, total,
                                            time.monotonic() - t_stage, stage_min, device)
                        if factor is not None:
                            for name, o in opts.items():
                                for group in o.param_groups:
                                    group["lr"] = specs[name].lr * factor
                        in_update = True
                        with autocast(device, cfg.precision):
                            losses = method.training_step(batch, g_step, stage.name)
                        apply_losses(losses, specs, opts, cfg.grad_clip, stage.name, st.step, share=share)
                        ddp.broadcast_norm_buffers(method)
                        st.step += 1
                        in_update = False
                        steps_run += 1
                        st.elapsed_s = time.monotonic() - t_stage
                        rec = {"type": "step", "stage": stage.name, "stage_index": si, "step": st.step,
                               "epoch": st.epoch,
                               "losses": ddp.all_reduce_mean({k: float(losses[k].detach())
                                                              for k in stepped_losses(losses, specs)},
                                                             share, device),
                               "log": ddp.all_reduce_mean({k[4:]: float(v.detach()) for k, v in losses.items()
                                                           if k.startswith("log/")}, share, device),
                               "lr": {k: o.param_groups[0]["lr"] for k, o in opts.items()},
                               "elapsed_s": round(st.elapsed_s, 3)}
                        if w.is_main:
                            log.write(rec)
                        bar.update(1)
                        bar.set_postfix({k: f"{v:.4f}" for k, v in rec["losses"].items()}, refresh=False)
                        if stage.val_every and st.step % stage.val_every == 0 and st.step < total:
                            validate()
                            validated_at = st.step
                        while pending and st.elapsed_s > pending[0] * 60 and w.is_main:
                            if validated_at != st.step:
                                validate()
                                validated_at = st.step
                            _write_snapshot(method, out, pending.pop(0), st, stage.selects_on_val)
                        over_budget = stage_min is not None and st.elapsed_s > stage_min * 60
                        over_budget = ddp.any_rank(over_budget, device) if stage_min is not None else False
                        if st.step % cfg.ckpt_every == 0 or over_budget:
                            checkpoint()
                        if callback is not None:
                            callback(rec)
                        if ddp.any_rank(stop.requested, device) if w.distributed else stop.requested:
                            raise KeyboardInterrupt  # step finished: the handler below saves it
                        if over_budget:
                            logger.warning("stage %s: wall-clock budget of %.2f min spent at step %d/%d; "
                                           "stopping the stage", stage.name, stage_min, st.step, total)
                            budget_stops.append(stage.name)
                            total = st.step
                            break
                        if max_steps is not None and steps_run >= max_steps:
                            raise _StopFitError
                        if st.step >= total:
                            break
            except _StopFitError:
                bar.close()
                checkpoint()
                return FitResult(out, st.best_score, steps_run, False, budget_stops)
            except KeyboardInterrupt:
                bar.close()
                if in_update:
                    logger.warning("interrupted inside step %d; keeping the previous checkpoint", st.step + 1)
                else:
                    checkpoint(sync=False)
                    logger.warning("interrupted%s; state of step %d saved to %s (continue with --resume)",
                                   f" by {stop.name}" if stop.requested else "", st.step, state_path)
                raise
            bar.close()
            # end of stage: final validation, restore the best weights, hook, save
            if validated_at != st.step:
                validate()
            if (w.is_main and stage.selects_on_val and st.best_score is not None
                    and (out / "model.safetensors").is_file()):
                method.load_inference_state_dict(load_weights(out / "model.safetensors", device=str(device)))
            ddp.broadcast_module(method)  # rank 0 selected (and restored) the weights
            st.best_score, st.best_step = ddp.broadcast_object((st.best_score, st.best_step))
            method.eval()
            method.on_stage_end(stage.name, _hook_batches(train_ds, indices, bs, device))
            ddp.broadcast_module(method)
            method.train()
            if w.is_main:
                method.save(out)
            best = st.best_score
            st = TrainState(stage_index=si + 1, stage_name=stage.name, best_score=best, step=0)
            opts = {}
            checkpoint(st=st, opts=opts)
            if w.is_main:
                log.write({"type": "stage_end", "stage": stage.name, "stage_index": si, "step": total,
                           "best_score": best, "elapsed_s": round(time.monotonic() - t_call, 3)})
            if stop.requested and si + 1 < len(stages):
                logger.warning("interrupted by %s; stage %s finished and saved to %s (continue with "
                               "--resume)", stop.name, stage.name, state_path)
                raise KeyboardInterrupt
    method.eval()
    return FitResult(out, st.best_score, steps_run, True, budget_stops)


def stepped_losses(losses: dict[str, torch.Tensor], specs: dict[str, Any]) -> list[str]:
    """Names of the optimisers that step on `losses`: those whose loss requires grad, in `specs` order."""
    return [k for k in specs if losses[k].requires_grad]


def apply_losses(losses: dict[str, torch.Tensor], specs: dict[str, Any],
                 opts: dict[str, torch.optim.Optimizer], grad_clip: float | None, stage: str, step: int, *,
                 share: float = 1.0) -> None:
    """Back-propagate each optimiser's loss into its own parameters only, clip, and step.

    All losses of a step are computed from the same (pre-update) weights; each optimiser gets the
    gradient of its own loss w.r.t. its own parameters (`torch.autograd.grad`), so a generator loss
    never leaks gradients into the discriminator and vice versa. Under torch.distributed the
    gradients are averaged over ranks (this rank weighted by `share`, its fraction of the global
    batch) before clipping and the step. A loss that does not require grad (a discriminator that
    sits this step out, cDAL's ``d_every``) leaves its optimiser untouched: no step, no Adam moment
    update; at least one loss of the step must require grad.

    Args:
        losses: `training_step` output; one scalar per optimiser name of `specs`.
        specs: the stage's `OptimizerSpec`s by name.
        opts: the optimisers by the same names.
        grad_clip: max gradient norm per optimiser (None = off).
        stage: stage name (error messages).
        step: steps done before this one (error messages).
        share: this rank's share of the global batch (1.0 in a single process).
    """
    missing = [k for k in specs if k not in losses]
    if missing:
        raise KeyError(f"training_step of stage {stage!r} returned {sorted(losses)}, missing losses for "
                       f"optimisers {missing}")
    names = stepped_losses(losses, specs)
    if not names:
        raise RuntimeError(f"stage {stage!r} step {step + 1}: no loss of {sorted(specs)} requires grad "
                           "(was training_step run under torch.no_grad?)")
    for i, name in enumerate(names):
        loss = losses[name]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {stage!r} step {step + 1}: loss {name!r} is {float(loss)}")
        params = [p for p in specs[name].params if p.requires_grad]
        grads = torch.autograd.grad(loss.float(), params, retain_graph=i < len(names) - 1, allow_unused=True)
        grads = ddp.all_reduce_grads(params, grads, share)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], grad_clip)
        opts[name].step()
        for p in params:
            p.grad = None


def _hook_batches(ds: Dataset, indices: list[int], bs: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """The training images in order, batches of `bs`, for the stage hooks."""
    batches = [indices[i:i + bs] for i in range(0, len(indices), bs)]
    loader = DataLoader(ds, num_workers=0, batch_sampler=batches)
    return (_to_device(b, device) for b in loader)


def _lr_factor(method: Any, stage: str, step: int, per_epoch: int, total: int, elapsed_s: float,
               stage_min: float | None, device: torch.device) -> float | None:
    """Factor on every optimiser's `lr` for the next step, or None to leave the rates alone.

    The product of the method's own per-step factor (`lr_multiplier`, e.g. LDSeg's per-epoch decay)
    and the config's `lr_schedule` at the stage's progress (`train.schedule`). Under torch.distributed
    the progress is averaged over ranks so that every process steps with the same rate.
    """
    lr_mult = getattr(method, "lr_multiplier", None)
    schedule = method.cfg.lr_schedule
    if lr_mult is None and schedule == "constant":
        return None
    factor = float(lr_mult(stage, step, per_epoch)) if lr_mult is not None else 1.0
    if schedule != "constant":
        progress = stage_progress(step, total, elapsed_s, stage_min)
        w = ddp.world()
        if w.distributed:
            progress = ddp.all_reduce_mean({"p": progress}, 1.0 / w.size, device)["p"]
        factor *= schedule_factor(schedule, progress)
    return factor


def _snapshot_dir(out: Path, minutes: float) -> Path:
    return out / "snapshots" / f"{minutes:g}min"


def _check_snapshot_minutes(minutes: Sequence[float], lr_schedule: str) -> None:
    for m in minutes:
        if not 0 < m < float("inf"):  # also rejects nan
            raise ConfigError(f"--snapshot-minutes {m!r}: expected a positive number of minutes")
    if minutes and lr_schedule != "constant":
        raise ConfigError(f"--snapshot-minutes with lr_schedule={lr_schedule!r}: a snapshot would not be the "
                          "model of a shorter run (its rate follows the full budget); train each budget as "
                          "its own run, or use lr_schedule=constant")


def _pending_snapshots(out: Path, minutes: Sequence[float], budget_min: float | None,
                       resume: bool) -> list[float]:
    """Snapshot times (minutes, ascending) inside the stage's budget and, on resume, not yet written."""
    return sorted(m for m in set(minutes) if (budget_min is None or m < budget_min)
                  and not (resume and (_snapshot_dir(out, m) / "snapshot.json").is_file()))


def _write_snapshot(method: Any, out: Path, minutes: float, st: TrainState, selects_on_val: bool) -> None:
    """Copy the weights a `minutes`-long run keeps into `out/snapshots/<minutes>min/` (atomically)."""
    dest = _snapshot_dir(out, minutes)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a partial snapshot of this run, interrupted
    tmp.mkdir(parents=True)
    if selects_on_val and (out / "model.safetensors").is_file():
        for name in ("model.safetensors", "config.json"):
            shutil.copy2(out / name, tmp / name)
    else:
        method.save(tmp)
    write_json(tmp / "snapshot.json", {"minutes": minutes, "step": st.step,
                                       "elapsed_s": round(st.elapsed_s, 3),
                                       "best_step": st.best_step, "best_score": st.best_score,
                                       "stage": st.stage_name})
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    logger.info("snapshot at %.1f min (step %d) -> %s", st.elapsed_s / 60, st.step, dest)


def iterate_batches(ds: Dataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """Yield batches of `ds` in order (no shuffling)."""
    yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


__all__ = ["FitResult", "apply_losses", "fit", "iterate_batches", "stepped_losses"]
