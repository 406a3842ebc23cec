"""`seg fit | validate | test`: Lightning's CLI over `SegmentationModule` and `NiftiDataModule`.

Everything is reachable from a YAML config and from `--section.key value` on the command line. What we add
to Lightning's defaults: the data's channels, classes and patch size are linked into the model; checkpoints
go to `<default_root_dir>/checkpoints/{best,last}.ckpt` (best = highest mean validation Dice), saved
atomically; W&B logging with an offline fallback, or MLflow (`seg.training.mlflow_logger`), or CSV only, and
a metrics CSV under `<default_root_dir>/csv/` in every case (the learning curves of `seg review`); a rich
progress bar on a terminal and plain progress lines in logs (`seg.training.callbacks.LogProgress`, `--progress.every_n_seconds`); a validation of
the last epoch whatever the schedule, and at most a tenth of a time-bounded run (`ValidationSchedule`,
`--validation.max_share`); gate-activation overlays of every validation volume
(`seg.training.overlays.GateOverlays`, options under `--overlays.*`); optimiser steps with NaN or inf gradients
skipped (`SkipNonFiniteSteps`, `--nonfinite.max_consecutive`); the review page `review.html` at the end
(`ReviewPage`); with `--ema_decay`, an exponential moving average of the weights (Lightning's `EMAWeightAveraging`)
that validation scores and the checkpoints hold.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from seg.data import NiftiDataModule
from seg.errors import SegError
from seg.training.callbacks import (LogProgress, ModelLine, ReviewPage, SkipNonFiniteSteps, ValidationSchedule,
                                    progress_bar)
from seg.training.checkpoint_io import (AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, describe_os_error,
                                       load_weights_only)
from seg.training.cv import option_value
from seg.training.mlflow_logger import MLflowSettings, SegMLFlowLogger
from seg.training.module import SegmentationModule
from seg.training.overlays import GateOverlays


def wandb_credentials_available() -> bool:
    """True when W&B could log online: an API key in the environment or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class SegCLI(LightningCLI):
    """LightningCLI with seg's links, logger, checkpoints and progress bar."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # parser defaults, not `trainer_defaults`: LightningCLI adds those at instantiation, unseen by --print_config
        parser.set_defaults(DECLARED)
        parser.link_arguments("data.spatial_dims", "model.spatial_dims")
        parser.link_arguments("data.patch_size", "model.roi_size")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.out_channels", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # Gate overlays at every validation by default; `--overlays.every_n_epochs 0` turns them off.
        parser.add_lightning_class_args(GateOverlays, "overlays")
        # When to validate: the last epoch always, and at most `max_share` of a time-bounded run.
        parser.add_lightning_class_args(ValidationSchedule, "validation")
        # A step with NaN or inf gradients is skipped instead of making every weight NaN.
        parser.add_lightning_class_args(SkipNonFiniteSteps, "nonfinite")
        # Used when the output is not a terminal; on a terminal Lightning's Rich bar draws instead.
        parser.add_class_arguments(LogProgress, "progress", instantiate=False)
        parser.add_argument("--logging", choices=["wandb", "mlflow", "csv"], default="wandb",
                            help="wandb (offline when no credentials are found), mlflow (--mlflow.*) or csv only")
        parser.add_class_arguments(MLflowSettings, "mlflow", instantiate=False)
        parser.add_argument("--ema_decay", type=float, default=0.0,
                            help="train an exponential moving average of the weights beside them, w_ema <- d w_ema + "
                                 "(1 - d) w after every step, started from the first step's weights; validation, "
                                 "best.ckpt and last.ckpt use it (so do predict and export). d = 0.99 averages about "
                                 "the last 100 steps; 0 (the default) turns it off")
        parser.add_argument("--wandb_project", default=os.environ.get("WANDB_PROJECT", "seg"),
                            help="W&B project (env WANDB_PROJECT)")
        parser.add_argument("--wandb_name", default=os.environ.get("WANDB_NAME"),
                            help="W&B run name (env WANDB_NAME); default: W&B's own")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # `seg` hands Lightning its own slice of argv; Lightning's warning about `args` given beside sys.argv
        # is meant for scripts that do both by mistake.
        self.config = parser.parse_args(args)
        # Lightning reads `--ckpt_path`'s hyper-parameters next: an unsafe or corrupt file is a one-line
        # CheckpointError here (weights-only), before Lightning's own reader turns it into a traceback.
        config = self.config.get(self.config.get("subcommand")) if self.config.get("subcommand") else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            load_weights_only(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """`--ckpt_path best|last` in a new process means the run folder's own `checkpoints/{best,last}.ckpt`.

        Lightning resolves "best" only inside the process that trained; `seg validate/test --ckpt_path best`
        is how users score a finished run.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        name = config.get("ckpt_path")
        if name in ("best", "last"):
            path = Path(config["trainer"]["default_root_dir"] or os.getcwd()) / "checkpoints" / f"{name}.ckpt"
            if path.is_file() or self.subcommand != "fit":
                config["ckpt_path"] = str(path)

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config["trainer"]["default_root_dir"] or os.getcwd())
        if self.subcommand == "fit" and self.trainer_is_rank_zero():
            # A dataset or split that cannot train is refused here, before a logger or the run folder exists
            # (`check-data`'s checks and the split's; `prepare_data` then finds them done).
            self.datamodule.check()
        user_logger = config["trainer"].get("logger")
        if user_logger is None or user_logger is True:  # the user did not pick a logger: ours
            kwargs["logger"] = self._make_logger(config, root)
        # The checkpoints and the atomic checkpoint IO are declared (`trainer_defaults` in
        # `run_lightning`: `--print_config` and config.yaml show them, a YAML can change them). What depends on
        # other settings is added here: the progress display (a terminal or a log), the one-line model summary and
        # the learning-rate monitor (only with a logger).
        declared = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = [*declared, *(kwargs.get("callbacks") or [])]
        if config["trainer"].get("enable_progress_bar") is not False:  # Lightning refuses a bar it was told not to show
            callbacks.append(progress_bar(config["progress"]["every_n_seconds"]))
        if config["trainer"].get("enable_model_summary") is not False:
            callbacks.append(ModelLine())
        if kwargs.get("logger") is not False:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        if not 0.0 <= config["ema_decay"] < 1.0:
            raise SegError(f"--ema_decay {config['ema_decay']}: the decay is in [0, 1) (0 turns the average off)")
        if config["ema_decay"] > 0 and self.subcommand == "fit":
            # The checkpoints keep the average in `state_dict` and the trained weights in `current_model_state`
            # (Lightning's layout): every reader of `state_dict` (predict, export, validate) gets the average.
            callbacks.append(EMAWeightAveraging(decay=config["ema_decay"]))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def _make_logger(self, config, root: Path):
        csv = CSVLogger(save_dir=root, name="csv")  # always: the metrics on disk, for `seg review`
        if config["logging"] == "csv":
            return csv
        if config["logging"] == "mlflow":
            return [SegMLFlowLogger(config.as_dict(), root, MLflowSettings(**config["mlflow"])), csv]
        return [self._wandb_logger(config, root), csv]

    def _wandb_logger(self, config, root: Path) -> WandbLogger:
        root.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE")
        offline = mode in ("offline", "dryrun") or (mode is None and not wandb_credentials_available())
        if offline and mode is None and self.trainer_is_rank_zero():
            print(f"W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging offline to {root / 'wandb'}; "
                  f"upload later with `wandb sync {root / 'wandb'}/offline-run-*`", file=sys.stderr)
        # Offline tables with images are staged as artifacts under WANDB_DATA_DIR (default ~/.local/share/wandb):
        # keep them in the run folder so that copying the folder keeps everything `wandb sync` needs.
        os.environ.setdefault("WANDB_DATA_DIR", str(root / "wandb"))
        logger = WandbLogger(project=config["wandb_project"], name=config["wandb_name"], save_dir=str(root),
                             offline=offline, log_model=False)
        # Lightning 2.6 always passes `anonymous` (None), which W&B >= 0.22 warns about on every run: leave it out.
        logger._wandb_init.pop("anonymous", None)
        return logger

    @staticmethod
    def trainer_is_rank_zero() -> bool:
        return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


class SaveConfigToLoggers(SaveConfigCallback):
    """Lightning's `config.yaml` in the run folder, and the same nested config (model, data, trainer, ...) as the
    loggers' hyper-parameters: the W&B run's config reads like the YAML, trainer settings included.

    The module and the datamodule do not log their own hyper-parameters (`save_hyperparameters(logger=False)`),
    which W&B would show as one flat list of both.
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def _minutes(max_time: str | None) -> float | None:
    """`--trainer.max_time` "DD:HH:MM:SS" in minutes, so that the plan fits its validations into that budget."""
    if not max_time or max_time == "null":
        return None
    try:
        days, hours, minutes, seconds = (int(v) for v in max_time.split(":"))
    except ValueError:
        return None  # another form: Lightning reads (or refuses) it; the plan keeps its default budget
    return days * 1440 + hours * 60 + minutes + seconds / 60


def plan_when_unconfigured(subcommand: str, args: list[str]) -> list[str]:
    """`seg fit --data.root ROOT` without `--config`: plan the dataset first (`seg plan`) and train on the plan.

    The plan is written to `<default_root_dir>/plan.yaml`, summarised one line per decision on stderr, and put
    first on the command line, so every other option given still overrides it. A `--trainer.max_time` given is
    the plan's time budget (validation frequency follows it).
    """
    root = option_value(args, "--data.root")
    if (subcommand != "fit" or root is None or option_value(args, "--config") is not None
            or "--print_config" in args):
        return args
    from seg.data.plan import plan_dataset, render_yaml, summary, write_plan

    run_dir = Path(option_value(args, "--trainer.default_root_dir") or "runs/latest")
    accelerator = option_value(args, "--trainer.accelerator")  # as `seg plan --device`: auto unless told
    device = "cpu" if accelerator == "cpu" else "gpu" if accelerator in ("gpu", "cuda") else "auto"
    decisions = plan_dataset(root, device=device, minutes=_minutes(option_value(args, "--trainer.max_time")))
    path = write_plan(run_dir / "plan.yaml", render_yaml(decisions, root, "seg fit " + " ".join(args)))
    print(f"seg fit: no --config given: planned {root} (`seg plan`), written to {path}:\n{summary(decisions)}",
          file=sys.stderr)
    return ["--config", str(path), *args]


# Known-harmless notices of the libraries, silenced in `seg fit|validate|test` only (importing seg changes nothing):
# MONAI's surface distance passes its own deprecated argument, Lightning's pytree helper uses a deprecated torch
# class; Lightning advertises its services, says it found our model summary, and that it counts batches.
# Anything else still shows.
HARMLESS_WARNINGS = (
    (FutureWarning, r"monai\.metrics\.utils get_mask_edges:always_return_as_numpy"),
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (Warning, r"Precision bf16-mixed is not supported by the model summary"),
)
HARMLESS_INFO = ("💡 Tip:", "Trainer already configured with model summary callbacks",
                 "Loading `train_dataloader` to estimate number of stepping batches")


class _DropHarmlessInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HARMLESS_INFO)


def quiet_library_notices() -> None:
    """Filter `HARMLESS_WARNINGS` and Lightning's `HARMLESS_INFO` lines (on its console handlers, which every
    Lightning logger reaches)."""
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropHarmlessInfo) for f in handler.filters):
                handler.addFilter(_DropHarmlessInfo())


# last.ckpt from its own callback: since Lightning 2.6 `save_last=True` writes it only when a top-k checkpoint was
# saved at the same step, so it went stale whenever the Dice did not improve. It is written at every training epoch's
# end and before each validation, so a failing or killed validation never costs the epoch.
DECLARED = {
    "trainer.callbacks": [{"class_path": f"{c.__module__}.{c.__name__}"}
                          for c in (BestCheckpoint, LastCheckpoint, ReviewPage)],
    "trainer.plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
}
TRAINER_DEFAULTS = {"default_root_dir": "runs/latest", "log_every_n_steps": 10}
FIT_USAGE = "seg fit [--config plan.yaml] [--data.root DATASET] [--section.option VALUE ...]"
FIT_DESCRIPTION = (
    "Train an Attention U-Net. `seg fit --data.root DATASET` without --config plans first (as `seg plan DATASET "
    "--device auto`): it prints one line per decision, writes <default_root_dir>/plan.yaml (runs/latest/plan.yaml by "
    "default) and trains on it, for 60 minutes on a CPU (--trainer.max_time DD:HH:MM:SS to change it) or 1000 epochs "
    "on a GPU. `seg fit --config plan.yaml` trains on a config written by `seg plan` or by hand; any option below "
    "given on the command line overrides the config. A dataset that cannot train (fewer than 2 labelled cases, no "
    "foreground, a class in one case only, no case left for validation) is refused before anything is written.")


def run_lightning(subcommand: str, args: list[str]) -> int:
    """Run `seg fit|validate|test ARGS`; returns the exit code."""
    args = plan_when_unconfigured(subcommand, args)
    quiet_library_notices()
    try:
        SegCLI(
            SegmentationModule,
            NiftiDataModule,
            args=[subcommand, *args],
            save_config_callback=SaveConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"prog": "seg", "fit": {"description": FIT_DESCRIPTION, "usage": FIT_USAGE}},
            seed_everything_default=0,
        )
    except OSError as err:
        # A path the user chose cannot be written (full disk, read-only, a parent that is a file): name it in
        # one line. An OSError without a file name is not a path problem and keeps its traceback.
        if err.filename is None:
            raise
        raise SegError(describe_os_error(err), err.filename) from err
    return 0
