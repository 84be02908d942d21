"""nnU-Net v2 trainer with a wall-clock budget, copied into nnU-Net by `benchmarks/peers/nnunet.py`.

This file is NOT imported by ldiffusion. `nnunet.py` writes it, unchanged, as
`nnunetv2/training/nnUNetTrainer/nnUNetTrainer_ldiffusion.py` inside the nnU-Net environment:
nnU-Net finds a trainer by name by importing the modules of that folder in turn, and reaches
`primus/` (which imports timm and torchvision, broken beside CPU torch) before `variants/`; a
module placed directly in the folder is found first.

Settings come from environment variables, set by `nnunet.py` for `nnUNetv2_train` only:

    LDIFFUSION_NNUNET_BUDGET_S   wall-clock budget of `run_training` in seconds (from its start,
                                 data loaders and network set-up included); the epoch in progress
                                 stops after the iteration that spends it, then validates and
                                 saves checkpoints as every epoch does
    LDIFFUSION_NNUNET_EPOCHS     most epochs (nnU-Net: 1000)
    LDIFFUSION_NNUNET_ITERS      training iterations per epoch (nnU-Net: 250)
    LDIFFUSION_NNUNET_VAL_ITERS  validation iterations per epoch, >= 1 (nnU-Net: 50); their EMA
                                 pseudo Dice picks checkpoint_best.pth, as in nnU-Net
    LDIFFUSION_NNUNET_THREADS    torch threads (unset or 0: nnU-Net's choice, all cores on CPU)
    LDIFFUSION_NNUNET_FINAL_VAL  1: run nnU-Net's full sliding-window validation of the fold after
                                 training (default 0: skipped; `ldiffusion evaluate` scores test)

Learning rate: nnU-Net's poly schedule, its horizon set after every epoch to the number of epochs
expected to fit in the budget (at most EPOCHS), so that the rate decays over the budget as it does
over nnU-Net's 1000 epochs. Writes `ldiffusion_budget.json` (epochs, iterations, seconds, best EMA
pseudo Dice) beside the checkpoints.
"""

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _env(name, default, cast):
    value = os.environ.get("LDIFFUSION_NNUNET_" + name, "")
    return default if value == "" else cast(value)


class nnUNetTrainer_ldiffusionBudget(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnUNetTrainer stopped by a wall-clock budget, with few iterations per epoch."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _env("EPOCHS", 1000, int)
        self.num_iterations_per_epoch = _env("ITERS", 250, int)
        self.num_val_iterations_per_epoch = max(1, _env("VAL_ITERS", 50, int))
        self.budget_s = _env("BUDGET_S", float("inf"), float)
        self.final_validation = _env("FINAL_VAL", 0, int) == 1
        threads = _env("THREADS", 0, int)
        if threads > 0:
            torch.set_num_threads(threads)

    def run_training(self):
        """nnUNetTrainer.run_training with a budget check after every iteration and an adaptive LR horizon."""
        t0 = time.perf_counter()
        self.on_train_start()
        horizon = self.num_epochs
        iterations, epoch_s, stopped_by = 0, [], "epochs"
        while self.current_epoch < self.num_epochs:
            te = time.perf_counter()
            self.lr_scheduler.max_steps = horizon  # poly LR: 0 at epoch `horizon`; horizon > current epoch
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = []
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
                iterations += 1
                if time.perf_counter() - t0 >= self.budget_s:
                    break
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()  # checkpoint_best on a new best EMA pseudo Dice; current_epoch += 1
            epoch_s.append(time.perf_counter() - te)
            spent = time.perf_counter() - t0
            if spent >= self.budget_s:
                stopped_by = "budget"
                break
            fit = self.current_epoch + int((self.budget_s - spent) // (sum(epoch_s) / len(epoch_s)))
            horizon = max(self.current_epoch + 1, min(self.num_epochs, fit))
        self.on_train_end()
        if self.local_rank == 0:
            info = {
                "budget_s": self.budget_s if self.budget_s != float("inf") else None,
                "train_loop_s": round(time.perf_counter() - t0, 1),
                "epochs": self.current_epoch,
                "iterations": iterations,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "max_epochs": self.num_epochs,
                "stopped_by": stopped_by,
                "epoch_s": [round(s, 1) for s in epoch_s],
                "best_ema_pseudo_dice": None if self._best_ema is None else float(self._best_ema),
                "threads": torch.get_num_threads(),
                "device": str(self.device),
                "patch_size": [int(s) for s in self.configuration_manager.patch_size],
                "batch_size": int(self.batch_size),
                "n_parameters": int(sum(p.numel() for p in self.network.parameters())),
            }
            path = os.path.join(self.output_folder, "ldiffusion_budget.json")
            with open(path + ".tmp", "w") as f:
                json.dump(info, f, indent=1)
            os.replace(path + ".tmp", path)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skip nnU-Net's full validation of the fold unless LDIFFUSION_NNUNET_FINAL_VAL=1."""
        if self.final_validation:
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("ldiffusion budget trainer: full validation of the fold skipped")
        return None
