"""The LightningModule: AttentionUNet + Dice loss + whole-volume sliding-window validation."""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss
from monai.metrics import DiceMetric

from seg.inference.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, build_network
from seg.inference.slabs import class_indices, stitch_budget
from seg.inference.window import WindowInference
from seg.metrics import dice_from_confusion, surface_scores
from seg.models import NETWORK_DEFAULTS as _D
from seg.models.topology import check_strides
from seg.training.callbacks import is_final_validation

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEY", "SegmentationModule", "hausdorff95"]


def hausdorff95(prediction: torch.Tensor, label: torch.Tensor, spacing=None) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance of binary masks `(N, 1, *S)` -> `(N, 1)`, in mm with `spacing`.

    `seg.metrics.surface_scores` per volume (MONAI's edge distances, numpy's percentile: `torch.quantile` refuses
    the 2^24+ distances of a speckled prediction on a CT). NaN when either mask is empty: the distance is
    undefined, never 0 (`SegmentationModule` counts such volumes as missing).
    """
    scores = torch.full((prediction.shape[0], 1), float("nan"), dtype=torch.float32)
    spacing = list(spacing) if spacing else [1.0] * (prediction.dim() - 2)
    for b in range(prediction.shape[0]):
        if prediction[b, 0].any() and label[b, 0].any():
            scores[b, 0] = surface_scores(prediction[b, 0].cpu().numpy(), label[b, 0].cpu().numpy(), spacing,
                                          tolerance_mm=1.0)[0]
    return scores


def patch_dice(logits: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """Dice per foreground class `(classes,)` of a batch's arg-max `logits` (N, K, *S) against `label` (N, 1, *S).

    Pooled over the batch: `seg.metrics.dice_from_confusion` of the confusion matrix, counted on the logits' device
    so that one K x K matrix, not the batch, reaches the CPU (one sync a step). NaN for a class in neither.
    """
    classes = logits.shape[1]
    flat = label.long().flatten() * classes + logits.argmax(dim=1).flatten()
    matrix = torch.bincount(flat, minlength=classes * classes).reshape(classes, classes)
    return dice_from_confusion(matrix.cpu().numpy())


def class_presence(volume: torch.Tensor, classes) -> torch.Tensor:
    """Which of `classes` occur in each class-index volume `(N, 1, *S)`: `(N, len(classes))` bool, on the CPU."""
    return torch.stack([(volume == c).flatten(1).any(1) for c in classes], 1).cpu().as_subclass(torch.Tensor)


def score_reduction(name: str, per_volume: torch.Tensor) -> torch.Tensor:
    """Per-class summary `(classes,)` of per-volume scores `(volumes, classes)` named `name`.

    "missing" (1 where a class is absent from the prediction or the label) is summed: a count of volumes. Dice and
    HD95 are averaged over the volumes where they are defined; a class defined in none is NaN. (MONAI's
    `do_metric_reduction` gives 0 there, which for HD95 reads as a perfect 0 mm.)
    """
    if name == "missing":
        return per_volume.sum(0)
    return torch.nanmean(per_volume, dim=0)


class SegmentationModule(pl.LightningModule):
    """Trains an `AttentionUNet` on patches and scores it on whole volumes.

    Training batches are `{"image": (N, C, *patch), "label": (N, 1, *patch)}`; validation and test batches hold
    one whole preprocessed volume each, predicted with MONAI's `sliding_window_inference` (Gaussian blending)
    and scored per class with Dice and HD95 (mm, on the preprocessed grid). A 2D model (`spatial_dims=2`)
    still validates on volumes: the sliding window takes `(H, W, 1)` slabs along the last axis. Under DDP the
    per-volume scores of all ranks are gathered and every case counted once, so the logged means are those of a
    single process.

    Scores of a class absent from the prediction or the label follow nnU-Net: Dice is NaN when the class is in
    neither (nothing to score, left out of the mean) and 0 when it is in only one (a missed class, or a false
    positive); HD95 is then undefined, NaN, left out of `hd95_<class>`, and the volume is counted in
    `<stage>/missing_<class>`. A mean over no defined volume is NaN, never 0.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (linked from the data: modalities).
        out_channels: classes with background (linked from the data's labels).
        channels: network width per level, finest first.
        strides: downsampling between levels; each an int or one per axis.
        cbam: CBAM in the encoder.
        gates: attention gates on the skips.
        deep_supervision: auxiliary losses on coarser decoder levels (weights 1, 1/2, 1/4, ...).
        downsample: "conv" (strided convolution) or "pool".
        decoder_convs: conv-norm-act layers per decoder level (1 as MONAI's AttentionUnet, 2 as nnU-Net).
        loss: "dice_ce" (MONAI DiceCELoss) or "dice" (DiceLoss).
        batch_dice: Dice over the whole batch as one volume (nnU-Net's batch Dice), steadier for small targets.
        optimizer: "adamw" or "sgd" (Nesterov, momentum 0.99 as in nnU-Net).
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        schedule: "poly" (`(1 - t)^0.9`), "cosine" or "constant", after a linear warm-up. `t` is the fraction of
            training done: by steps when `max_epochs`/`max_steps` bound it, by time when `max_time` does.
        warmup: fraction of training spent warming up linearly from 1% of `lr`.
        roi_size: sliding-window size (linked from the data's patch size).
        sw_overlap: overlap of neighbouring windows.
        sw_batch_size: windows per forward pass.
        class_names: foreground class names, for metric keys (linked from the data).
        hd95: also compute the 95th-percentile Hausdorff distance: "final" at the last validation of `fit` and in
            `seg validate/test` (the best checkpoint is chosen by Dice, so HD95 on the way is only a cost), true at
            every validation, false never.
        channels_last: channels-last memory format for the network (faster convolutions on recent GPUs).
        compile: `torch.compile` the network.
    """

    def __init__(
        self,
        spatial_dims: int = _D["spatial_dims"],
        in_channels: int = _D["in_channels"],
        out_channels: int = _D["out_channels"],
        channels: list[int] = _D["channels"],
        strides: list[int | list[int]] = _D["strides"],
        cbam: bool = _D["cbam"],
        gates: bool = _D["gates"],
        deep_supervision: bool = _D["deep_supervision"],
        downsample: Literal["conv", "pool"] = _D["downsample"],
        decoder_convs: int = _D["decoder_convs"],
        loss: Literal["dice_ce", "dice"] = "dice_ce",
        batch_dice: bool = True,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        schedule: Literal["poly", "cosine", "constant"] = "poly",
        warmup: float = 0.02,
        roi_size: list[int] | None = None,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 4,
        class_names: list[str] | None = None,
        hd95: bool | Literal["final"] = "final",
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # `seg fit` logs the whole nested config instead
        self.model = build_network(dict(self.hparams))  # the same construction inference uses on the checkpoint
        base = (DiceCELoss if loss == "dice_ce" else DiceLoss)(to_onehot_y=True, softmax=True, batch=batch_dice)
        self.loss_fn = DeepSupervisionLoss(base, weight_mode="exp") if deep_supervision else base
        self.class_names = list(class_names or [f"class_{i}" for i in range(1, out_channels)])
        # Scores from class-index volumes, never a one-hot: on a 512 x 512 x 400 CT a float one-hot is 0.4 GiB per
        # class, for prediction and label alike. Dice compares indices itself (`num_classes`); HD95 takes one
        # class's masks at a time (`hausdorff95`).
        self.dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True,
                               num_classes=out_channels)
        # What inference needs beyond the weights (spacing, orientation, normalisation, ...): given by the
        # datamodule at fit time, kept in every checkpoint under CHECKPOINT_KEY.
        self.preprocessing: dict | None = None
        self._memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}[spatial_dims] if channels_last else None
        # Set by the `GateOverlays` callback for the validation steps it exports: the step then returns the
        # gate (and CBAM) maps of the same sliding window as the logits, so no volume is predicted twice.
        self.export_gates = False
        self.export_cbam = False
        self._volume_scores: list[tuple[str, dict[str, torch.Tensor]]] = []  # (case_id, {"dice": (classes,), ...})

    # ---- set-up -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "preprocessing"):
            self.preprocessing = datamodule.preprocessing
        if stage == "fit" and hasattr(datamodule, "data_extent"):
            # before the first step: strides that a thin axis cannot take are a one-line error, not a wasted run
            check_strides(self.hparams.strides, self.roi_size[: self.hparams.spatial_dims], datamodule.data_extent,
                          spacing=getattr(datamodule, "patch_spacing", None))

    def configure_model(self) -> None:
        if self._memory_format is not None:
            self.model.to(memory_format=self._memory_format)
        if self.hparams.compile and not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": CHECKPOINT_FORMAT, "preprocessing": self.preprocessing,
                                      "class_names": self.class_names}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.preprocessing = checkpoint.get(CHECKPOINT_KEY, {}).get("preprocessing")

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._memory_format is not None:
            x = x.contiguous(memory_format=self._memory_format)
        return self.model(x)

    @property
    def roi_size(self) -> tuple[int, ...]:
        """The sliding window on a volume: the patch size, with a unit last axis for a 2D model."""
        return self.window_inference().window

    def window_inference(self) -> WindowInference:
        """The sliding-window engine over this module's network, as `seg predict` builds it from a checkpoint."""
        roi = list(self.hparams.roi_size or [96] * self.hparams.spatial_dims)
        return WindowInference(self.model, roi, self.hparams.out_channels, self.hparams.spatial_dims,
                               sw_batch_size=self.hparams.sw_batch_size, overlap=self.hparams.sw_overlap,
                               memory_format=self._memory_format)

    def predict_volume(self, image: torch.Tensor, with_gates: bool = False, sw_device=None, device=None,
                       with_cbam: bool = False):
        """Sliding-window prediction of whole volumes `(N, C, *S)` (`WindowInference.predict`).

        Returns logits `(N, out_channels, *S)`, or with `with_gates` a dict with "logits" and "gate_<level>"
        `(N, 1, *S)` (coarsest level first), plus with `with_cbam` CBAM's spatial maps "cbam_<level>" `(N, 1, *S)`
        (finest encoder level first). `sw_device`/`device` as in MONAI (windows on the GPU, stitching on the CPU
        for volumes too big for GPU memory).
        """
        out = self.window_inference().predict(image, gates=with_gates or with_cbam, cbam=with_cbam,
                                              sw_device=sw_device, device=device)
        return {"logits": out.pop("scores"), **out} if with_gates or with_cbam else out["scores"]

    def predict_labels(self, image: torch.Tensor, max_buffer_bytes: int | None = None, sw_device=None,
                       device=None) -> torch.Tensor:
        """Class indices `(N, 1, *S)` (uint8) of `predict_volume`'s logits, without holding them all when big.

        `max_buffer_bytes` caps the stitching buffers: a volume whose full-size logits would take more is done in
        slabs (`seg.inference.slabs`), with the same result. None: the whole volume at once.
        """
        return self.window_inference().labels(image, max_buffer_bytes=max_buffer_bytes, sw_device=sw_device,
                                              device=device)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        # the loss in float32 under bf16/fp16 autocast (`--trainer.precision bf16-mixed`): softmax and Dice sums
        logits = [t.float() for t in logits] if isinstance(logits, (list, tuple)) else logits.float()
        # MONAI's DeepSupervisionLoss resizes the label to each coarser output with F.interpolate, which has no
        # integer kernels on a CPU or a GPU: the class indices go in as float (exact up to 2^24)
        label = batch["label"].float() if self.hparams.deep_supervision else batch["label"]
        loss = self.loss_fn(logits, label)
        batch_size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
        # Dice on the training patches, beside the validation Dice: a run that plateaus shows here whether the
        # network stops fitting its training data (underfitting) or fits it ever better (overfitting).
        top = logits[0] if isinstance(logits, (list, tuple)) else logits
        for class_name, value in zip(self.class_names, patch_dice(top.detach(), batch["label"])):
            if not math.isnan(value):
                self.log(f"train/dice_{class_name}", float(value), on_step=False, on_epoch=True,
                         batch_size=batch_size)
        return loss

    def _score(self, batch: dict) -> dict | None:
        """Update Dice/HD95 with one volume; returns the `predict_volume` dict when `export_gates` is set."""
        outputs = None
        if self.export_gates:
            outputs = self.predict_volume(batch["image"], with_gates=True, with_cbam=self.export_cbam)
            prediction = class_indices(outputs["logits"])
        else:  # labels alone: a big volume's full-size logits are never held
            prediction = self.predict_labels(batch["image"], max_buffer_bytes=stitch_budget(batch["image"]))
        label = batch["label"]
        classes = range(1, self.hparams.out_channels)
        predicted, labelled = class_presence(prediction, classes), class_presence(label, classes)
        # MONAI's ignore_empty gives NaN whenever the label lacks the class; a false positive there is a 0 (nnU-Net)
        dice = torch.where(predicted & ~labelled, 0.0, self.dice(prediction, label).cpu().as_subclass(torch.Tensor))
        scores = {"dice": dice, "missing": (~(predicted & labelled)).float()}  # (N, classes): one row per volume
        if self.hparams.hd95 is True or (self.hparams.hd95 == "final" and
                                         (self._trainer is None or is_final_validation(self._trainer))):
            spacing = (self.preprocessing or {}).get("spacing")
            spacing = spacing if spacing and min(spacing) > 0 else None
            scores["hd95"] = torch.cat([hausdorff95(prediction == c, label == c, spacing=spacing)
                                        for c in classes], dim=1)
        case_ids = batch.get("case_id") or [f"volume_{self.global_rank}_{len(self._volume_scores) + i}"
                                            for i in range(len(scores["dice"]))]
        for i, case_id in enumerate(case_ids):
            # plain tensors: a MetaTensor logged as a metric would end up in checkpoints (best_model_score), which
            # then no longer load weights-only
            self._volume_scores.append((str(case_id), {k: v[i].detach().float().cpu().as_subclass(torch.Tensor)
                                                       for k, v in scores.items()}))
        return outputs

    def _gather_volume_scores(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every process's per-volume scores, once per case id, sorted by case id.

        With several processes, Lightning's DistributedSampler pads the validation set by repeating volumes so
        that every rank gets as many: a mean over the gathered rows would count those twice, and a mean of the
        per-rank means would weigh ranks, not volumes. Sorting fixes the summation order, so one process and
        many give the same numbers.
        """
        rows, self._volume_scores = self._volume_scores, []
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, rows)
            rows = [row for part in everyone for row in part]
        unique = dict(rows)  # a repeated volume has the same scores on every rank
        return {case_id: unique[case_id] for case_id in sorted(unique)}

    def _log_scores(self, prefix: str) -> None:
        volumes = self._gather_volume_scores()
        self.dice.reset()  # its buffer is not used: the scores are kept per case id above
        if not volumes:
            return
        for name in next(iter(volumes.values())):
            per_class = score_reduction(name, torch.stack([v[name] for v in volumes.values()]))
            per_class = per_class.to(self.device, torch.float32)
            # Every process holds the same gathered numbers: sync_dist's mean over ranks leaves them as they are.
            for class_name, value in zip(self.class_names, per_class):
                self.log(f"{prefix}/{name}_{class_name}", value, sync_dist=True)
            if name != "missing":
                self.log(f"{prefix}/{name}_mean", per_class.nanmean(), sync_dist=True, prog_bar=name == "dice")

    def validation_step(self, batch: dict, batch_idx: int) -> dict | None:
        return self._score(batch)  # the maps reach callbacks' on_validation_batch_end as `outputs`

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._score(batch)

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.99, nesterov=True,
                                        weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _training_progress(self, step: int) -> float:
        """Fraction of training done, in [0, 1]: by steps when bounded, by wall time under `max_time`."""
        trainer = self._trainer
        if trainer is None:
            return 0.0
        progress = 0.0
        total = trainer.estimated_stepping_batches
        if math.isfinite(total) and total > 0:
            progress = step / total
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is not None and timer._duration:
            progress = max(progress, timer.time_elapsed("train") / timer._duration)
        return min(progress, 1.0)

    def _lr_factor(self, step: int) -> float:
        hp = self.hparams
        t = self._training_progress(step)
        if hp.warmup > 0 and t < hp.warmup:
            return 0.01 + 0.99 * t / hp.warmup
        t = (t - hp.warmup) / max(1.0 - hp.warmup, 1e-8)
        if hp.schedule == "poly":
            return max(1.0 - t, 0.0) ** 0.9
        if hp.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0
