"""`saelightning fit|validate`: LightningCLI over SAEModule and ActivationDataModule.

The nanochat model's depth, width and identity are linked from the data module (which reads the
checkpoint) into the SAE module when both are instantiated, so d_in is never typed. Every run writes
to trainer.default_root_dir (checkpoints/<run>/): Lightning checkpoints incl. last.ckpt (so
`--ckpt_path last` resumes), TensorBoard logs under lightning_logs/, and the SAE export under saes/.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from saelightning.callbacks import DensityHistograms, ExportSAEs, FinalCheckpoint, ResampleDeadLatents, export_dir
from saelightning.data import ActivationDataModule
from saelightning.errors import SAELightningError
from saelightning.faults import Preemption
from saelightning.module import SAEModule

TRAINER_DEFAULTS = {
    "default_root_dir": "checkpoints/run",
    "max_steps": 1000,
    "val_check_interval": 250,  # steps (the stream is infinite: one endless epoch)
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
}


def _n_layer(data: ActivationDataModule) -> int:
    return data.n_layer


def _d_model(data: ActivationDataModule) -> int:
    return data.d_model


def _model_info(data: ActivationDataModule) -> dict:
    return data.model_info


class SAELightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for target, fn in (("model.n_layer", _n_layer), ("model.d_model", _d_model), ("model.model_info", _model_info)):
            parser.link_arguments("data", target, compute_fn=fn, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 250})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath")  # one folder per run
        parser.add_lightning_class_args(ResampleDeadLatents, "resample")
        parser.add_lightning_class_args(ExportSAEs, "export")
        parser.add_lightning_class_args(DensityHistograms, "histograms")
        parser.add_lightning_class_args(Preemption, "preemption")

    def instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            check_writable(self.config["fit"]["trainer"]["default_root_dir"])
        super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        # the data module checks its buffer against memory at setup; this runs the same check before the trainer
        # is built, so a too-large buffer is one line, not one after Lightning's start-up messages
        config = self.config[self.subcommand]["trainer"] if self.subcommand else self.config["trainer"]
        accelerator = config.get("accelerator")
        cuda = torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto", None)
        self.datamodule.check_memory(self.model.hook_names, torch.device("cuda", 0) if cuda else torch.device("cpu"))
        return super().instantiate_trainer(**kwargs)


def check_writable(folder) -> None:
    """The run dir can be created and written (checked before the trainer is built, so the error is one line)."""
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SAELightningError(f"cannot write to the run dir {path} ({e.strerror}); set trainer.default_root_dir to a writable folder") from None


def _report(trainer) -> None:
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    keys = [k for k in metrics if "/val/" in f"/{k}" or k.startswith("val/")] or sorted(metrics)
    print(f"\nsaelightning: trained {trainer.global_step} steps")
    if trainer.logger is not None:
        print(f"  TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.default_root_dir})")
    print(f"  exported SAEs:    {export_dir(trainer)}")
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        print(f"  last checkpoint:  {trainer.checkpoint_callback.last_model_path}")
    for key in sorted(keys):
        print(f"  {key:<48} {metrics[key]:.4f}")


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the run dir also holds lightning_logs/ and saes/, and a resumed run finds its own checkpoints there
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # argv comes from the console script itself, not a second source of arguments
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # the seed is in config.yaml
    try:
        cli = SAELightningCLI(
            SAEModule, ActivationDataModule, args=argv, subclass_mode_model=False, subclass_mode_data=False,
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [FinalCheckpoint()]}, seed_everything_default=0, save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},  # a bad key or value raises ArgumentError (below), not 150 lines of usage
        )
    except ArgumentError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        command = argv[0] if argv and argv[0] in ("fit", "validate") else "fit"
        raise SAELightningError(f"{message}; `saelightning {command} --help` lists the options") from None
    except SystemExit as e:  # --help/--print_config exit 0
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if argv and argv[0] == "fit":
        _report(cli.trainer)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
