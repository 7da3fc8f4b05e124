"""`saelightning fit|validate`: LightningCLI over SAEModule and ActivationDataModule.

The nanochat model's depth, width and identity are linked from the data module (which reads the
checkpoint) into the SAE module when both are instantiated, so d_in is never typed; for a model-free
source (data.activations, data.synthetic) its hook names and widths are linked instead (hook_widths). Every run writes
to trainer.default_root_dir (checkpoints/<run>/): Lightning checkpoints incl. last.ckpt (so
`--ckpt_path last` resumes), TensorBoard logs under lightning_logs/, and the SAE export under saes/.

Before anything is created on disk the inputs are checked: the config files (YAML syntax), every value
(one line naming the key), the run dir (writable; a fresh fit into a dir that holds another run is
refused), the checkpoint to resume (an intact archive; else the intact step checkpoint beside it is
named). config.yaml goes into the log dir only once training starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pydoc
import re
import sys
import warnings
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from saelightning.callbacks import (
    CleanFailedStart,
    DensityHistograms,
    ExportSAEs,
    FinalCheckpoint,
    ResampleDeadLatents,
    SAEProgressBar,
    export_dir,
)
from saelightning.checkpointing import AtomicCheckpointIO, check_checkpoint, step_of
from saelightning.data import ActivationDataModule
from saelightning.errors import SAELightningError, one_line
from saelightning.faults import Preemption
from saelightning.module import SAEModule, SAESpec, deferred_sae_init
from saelightning.parallel import LatentParallelStrategy

TRAINER_DEFAULTS = {
    "default_root_dir": "checkpoints/run",
    "max_steps": 1000,
    "val_check_interval": 250,  # steps (the stream is infinite: one endless epoch)
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
}
_SAE_OVERRIDE = re.compile(r"^--model\.saes\.(\d+)\.(\w+)(?:=(.*))?$")


def _n_layer(data: ActivationDataModule) -> int:
    return data.n_layer


def _d_model(data: ActivationDataModule) -> int:
    return data.d_model


def _model_info(data: ActivationDataModule) -> dict:
    return data.model_info


def _hook_widths(data: ActivationDataModule) -> dict | None:
    return data.hook_widths


def _model_names(data: ActivationDataModule) -> list | None:
    return data.model_names


class SaveConfigAtStart(SaveConfigCallback):
    """LightningCLI's config.yaml, written when training (or validation) starts rather than at setup: after
    the checkpoint is restored, so a resume that fails leaves no empty TensorBoard version behind."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            super().setup(trainer, pl_module, "validate")


def _split_sae_overrides(args: list[str]) -> tuple[list[str], list[tuple[int, str, str]]]:
    """`--model.saes.N.FIELD VALUE` (jsonargparse cannot index into a list) taken out of argv."""
    rest, overrides, i = [], [], 0
    while i < len(args):
        match = _SAE_OVERRIDE.match(args[i])
        if match is None:
            rest.append(args[i])
            i += 1
            continue
        index, key, value = int(match.group(1)), match.group(2), match.group(3)
        if value is None:
            if i + 1 >= len(args):
                raise SAELightningError(f"{args[i]} needs a value, e.g. {args[i]} 64")
            value, i = args[i + 1], i + 1
        overrides.append((index, key, value))
        i += 1
    return rest, overrides


def _apply_sae_overrides(parser, args: list[str], overrides: list[tuple[int, str, str]]) -> list[str]:
    """args with the overrides folded into one `--model.saes=[...]` (the list as the rest of args gives it, with
    each override applied), so jsonargparse checks the values and --print_config shows them."""
    if not overrides:
        return args
    probe = [a for a in args if not a.startswith("--print_config")]
    config = parser.parse_args(probe)
    subcommand = config.get("subcommand")
    saes = [s.as_dict() if hasattr(s, "as_dict") else dict(s) for s in (config[subcommand]["model"]["saes"] or [])]
    fields = sorted(f.name for f in dataclasses.fields(SAESpec))
    for index, key, value in overrides:
        if key not in fields:
            raise SAELightningError(f"--model.saes.{index}.{key}: an SAE has no field {key!r}; its fields are "
                                    f"{', '.join(fields)}")
        if index >= len(saes):
            raise SAELightningError(f"--model.saes.{index}.{key}: the config lists {len(saes)} SAE(s) (indices "
                                    f"0..{len(saes) - 1}); add the SAE to model.saes first")
        saes[index][key] = yaml.safe_load(value)
    return args + [f"--model.saes={json.dumps(saes)}"]


def _run_holds(folder: Path) -> str | None:
    """What of another run a run dir holds (its checkpoints, its export), or None when it holds none."""
    if not folder.is_dir():
        return None
    ckpts = sorted(folder.glob("*.ckpt"))
    if ckpts:
        steps = [step_of(p) for p in ckpts if step_of(p) >= 0]
        names = "last.ckpt" if folder / "last.ckpt" in ckpts else ckpts[0].name
        return names + (f" and step checkpoints up to step {max(steps)}" if steps else "")
    if (folder / "saes").is_dir() and any((folder / "saes").iterdir()):
        return "an exported SAE in saes/"
    return None


def _resume_point(ckpt: Path, max_steps: int) -> dict:
    """The step and TensorBoard version a checkpoint resumes at. Resuming a run that already reached max_steps
    trains and writes nothing: say so and stop here, before Lightning opens a log version for it."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    step = int(checkpoint.get("global_step", 0))
    if 0 < max_steps <= step:
        print(f"saelightning: {ckpt} is at step {step}, and trainer.max_steps is {max_steps}: nothing to train "
              f"(its export is in {ckpt.parent / 'saes'}); raise --trainer.max_steps to continue the run")
        raise SystemExit(0)
    return {"step": step, "log_version": checkpoint.get("saelightning_log_version")}


def check_writable(folder: Path) -> None:
    """The run dir can be created and written; nothing is created yet (a failed start leaves no debris)."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SAELightningError(f"cannot write to the run dir {folder} ({probe} is not a writable directory); "
                                "set trainer.default_root_dir to a writable folder")


def _is_latent_parallel(strategy) -> bool:
    """Whether trainer.strategy (a name, a {class_path, init_args} or an instance) is LatentParallelStrategy."""
    if isinstance(strategy, LatentParallelStrategy):
        return True
    path = strategy.get("class_path") if hasattr(strategy, "get") else strategy
    found = pydoc.locate(path) if isinstance(path, str) else None
    return isinstance(found, type) and issubclass(found, LatentParallelStrategy)


class SAELightningCLI(LightningCLI):
    resume: dict | None = None  # the checkpoint's step and log version, when fit resumes one

    def add_arguments_to_parser(self, parser) -> None:
        for target, fn in (("model.n_layer", _n_layer), ("model.d_model", _d_model), ("model.model_info", _model_info),
                           ("model.hook_widths", _hook_widths), ("model.model_names", _model_names)):
            parser.link_arguments("data", target, compute_fn=fn, apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt is always the newest state (no last-v1.ckpt beside it when a resumed run changes the interval)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 250,
                             "checkpoint.enable_version_counter": False})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath")  # one folder per run
        parser.add_lightning_class_args(ResampleDeadLatents, "resample")
        parser.add_lightning_class_args(ExportSAEs, "export")
        parser.add_lightning_class_args(DensityHistograms, "histograms")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="train into checkpoints/<run_name>: the folder beside trainer.default_root_dir's, "
                                 "with this name (a fresh run next to an earlier one)")

    def parse_arguments(self, parser, args) -> None:
        args, overrides = _split_sae_overrides(list(args))
        super().parse_arguments(parser, _apply_sae_overrides(parser, args, overrides))
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        run_dir = Path(config["trainer"]["default_root_dir"]).expanduser()
        if config.get("run_name"):
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", config["run_name"]):
                raise SAELightningError(f"--run_name {config['run_name']!r}: use letters, digits, '.', '_' and '-'")
            run_dir = run_dir.parent / config["run_name"]
            config["trainer"]["default_root_dir"] = str(run_dir)
            config["checkpoint"]["dirpath"] = str(run_dir)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None:
            path = run_dir / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path).expanduser()
            if ckpt_path != "last" or path.exists():  # "last" with none yet starts afresh (Lightning's rule)
                check_checkpoint(path)
                if subcommand == "fit":
                    self.resume = _resume_point(path, config["trainer"].get("max_steps") or -1)
        if subcommand == "fit":
            check_writable(run_dir)
            held = _run_holds(run_dir)
            if ckpt_path is None and held is not None:
                raise SAELightningError(
                    f"the run dir {run_dir} already holds a run ({held}); resume it with --ckpt_path last, train "
                    f"a new one with --run_name NAME (into {run_dir.parent}/NAME) or another trainer.default_root_dir, "
                    f"or delete {run_dir}")

    def instantiate_classes(self) -> None:
        # under the latent_parallel strategy each rank draws only its shards of the SAEs (in configure_model)
        strategy = self._get(self.config, "trainer", default={}).get("strategy")
        with deferred_sae_init() if _is_latent_parallel(strategy) else contextlib.nullcontext():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs):
        # the data module checks its buffer against memory at setup; this runs the same check before the trainer
        # is built, so a too-large buffer is one line, not one after Lightning's start-up messages
        config = self.config[self.subcommand]["trainer"] if self.subcommand else self.config["trainer"]
        accelerator = config.get("accelerator")
        cuda = torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto", None)
        self.datamodule.check_memory(self.model.hook_names, torch.device("cuda", 0) if cuda else torch.device("cpu"))
        # checkpoints written atomically, unless the config names a CheckpointIO of its own
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = plugins + [AtomicCheckpointIO()]
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = callbacks + [SAEProgressBar()]
        if self.resume is not None and self.resume["log_version"] is not None and trainer.get("logger") in (None, True):
            # the default logger, continuing the resumed run's version; purge_step hides what the old event file
            # logged after the checkpoint (the steps this run trains again)
            kwargs["logger"] = TensorBoardLogger(config["default_root_dir"], version=self.resume["log_version"],
                                                 purge_step=self.resume["step"])
        return super().instantiate_trainer(**kwargs)


def check_config_files(argv: list[str]) -> None:
    """Each --config FILE exists and is YAML; one line naming the file, line and problem (a tab, say) otherwise."""
    for name in _config_files(argv):
        path = Path(name).expanduser()
        if not path.is_file():
            raise SAELightningError(f"the config file {name} does not exist; pass the path of a YAML config "
                                    "(configs/demo.yaml, for one)")
        text = path.read_text()
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            text = text.splitlines()
            tab = mark is not None and mark.line < len(text) and "\t" in text[mark.line]
            problem = ("a tab character (YAML indents with spaces only)" if tab
                       else one_line(getattr(e, "problem", None) or e))
            fix = "replace the tab with spaces" if tab else "fix the YAML there"
            raise SAELightningError(f"{name}{where}: {problem}; {fix}") from None


def _config_files(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"] + \
        [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _argument_error(e: Exception, command: str, argv: list[str]) -> SAELightningError:
    """jsonargparse's error (tens of lines for a value deep in a list of dataclasses) as one line: the key,
    where it was given, what was expected and what was given."""
    text = str(e)
    keys = re.findall(r'[Kk]ey "([^"]+)"', text)
    innermost = text[text.rfind(f'key "{keys[-1]}"'):] if keys else text
    expected = [re.sub(r"<class '(\w+)'>", r"\1", t)
                for t in re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", innermost, re.M)]
    given = re.search(r"(?:Given value|Got value): (.+)$", innermost, re.M)
    files = _config_files(argv)
    where = f" (in {', '.join(files)} or on the command line)" if files else ""
    if expected and given:
        key = ".".join(keys) or "a value"
        wants = " or ".join(dict.fromkeys(w.replace("NoneType", "null") for w in expected))
        return SAELightningError(f"{key}{where}: expected {wants}, got {given.group(1).strip()!r}; fix the value "
                                 f"(`saelightning {command} --help` lists the options)")
    message = one_line(text)
    if len(message) > 300:
        message = message[:300] + " ..."
    return SAELightningError(f"{message}; `saelightning {command} --help` lists the options")


def _missing_package(e: BaseException) -> SAELightningError | None:
    """A logger or profiler named in the config whose package is not installed (Lightning says which)."""
    text = "\n".join(str(x) for x in (e, e.__cause__, e.__context__) if x is not None)
    requirement = re.search(r"Requirement '([^']+)' not met", text)
    if requirement is not None:
        wanted = requirement.group(1)
    elif isinstance(e, ImportError) and getattr(e, "name", None):
        wanted = e.name
    else:
        return None
    classes = re.findall(r"class_path '([\w.]+)'", text)
    what = classes[0].rsplit(".", 1)[-1] if classes else "the config"
    return SAELightningError(f"{what} needs {wanted}, which is not installed; install it with "
                             f"`pip install '{wanted}'` or choose another --trainer.logger")


def _report(trainer, start_step: int | None) -> None:
    """The end-of-fit summary: where the logs, export and checkpoint are, and the last validation's figures.
    start_step: the step training started at in this process (None: the loop never ran)."""
    if not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    keys = [k for k in metrics if "/val/" in f"/{k}" or k.startswith("val/")] or sorted(metrics)
    if start_step is None or start_step == trainer.global_step:
        print(f"\nsaelightning: the run in {trainer.default_root_dir} had already trained {trainer.global_step} steps "
              f"(trainer.max_steps {trainer.max_steps}); nothing was trained or exported: raise --trainer.max_steps "
              "to continue it")
        return
    print(f"\nsaelightning: trained {trainer.global_step} steps")
    for logger in trainer.loggers:
        where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        name = type(logger).__name__
        hint = f"  (tensorboard --logdir {trainer.default_root_dir})" if name == "TensorBoardLogger" else ""
        print(f"  {name} logs: {where}{hint}")
    exported = export_dir(trainer)
    if exported.is_dir():
        print(f"  exported SAEs:    {exported}")
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.last_model_path:
        print(f"  last checkpoint:  {trainer.checkpoint_callback.last_model_path}")
    for key in sorted(keys):
        print(f"  {key:<48} {metrics[key]:.4f}")


def _quiet_lightning() -> None:
    """Lightning's start-up lines that are not the user's concern."""
    # the run dir also holds lightning_logs/ and saes/, and a resumed run finds its own checkpoints there
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # argv comes from the console script itself, not a second source of arguments
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\..*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # the seed is in config.yaml
    os.environ.setdefault("LITLOGGER_DISABLE_TIPS", "1")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage().lower() and "lightning.ai" not in record.getMessage())


def cli_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("fit", "validate") else "fit"
    _quiet_lightning()
    check_config_files(argv)
    try:
        cli = SAELightningCLI(
            SAEModule, ActivationDataModule, args=argv, subclass_mode_model=False, subclass_mode_data=False,
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [FinalCheckpoint(), CleanFailedStart()]},
            seed_everything_default=0, save_config_callback=SaveConfigAtStart, save_config_kwargs={"overwrite": True},
            # a bad key or value raises ArgumentError (below), not 150 lines of usage
            parser_kwargs={"exit_on_error": False},
        )
    except ArgumentError as e:
        raise (_missing_package(e) or _argument_error(e, command, argv)) from None
    except SystemExit as e:  # --help/--print_config exit 0
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except (ImportError, ValueError) as e:  # jsonargparse wraps a logger's missing package in a ValueError
        missing = _missing_package(e)
        if missing is None:
            raise
        raise missing from None
    if command == "fit" and argv and argv[0] == "fit":
        _report(cli.trainer, cli.model.start_step)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
