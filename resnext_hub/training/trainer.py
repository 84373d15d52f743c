"""One fine-tuning run on this rank: ``Trainer`` (the model, its optimizer and schedule, the epochs,
validation, the files it saves and the state it resumes from), and the pieces only it uses. The recipe it
follows, and the checks before it is built, are :mod:`.loop`'s (:func:`~.loop.finetune`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..console import printable, progress_bar
from ..decoding import ImageListDataset, make_loader
from ..distributed import DistContext, agreed_precision, shard_batches
from ..metrics import DEFAULT_THRESHOLD, TopKMeter, f1_scores, f1_thresholds, mean_average_precision
from ..models import CheckpointError, ModelMeta, ResNet, WeightsUnavailableError, build_model
from ..models.blocks import Bottleneck
from ..models.builder import architecture_of_weights
from ..models.checkpoint import load_weights
from ..models.cpu import cpu_has_native_bf16
from ..models.finetuned import finetuned_checkpoint
from ..processing import ClassList, ImageClassification
from . import state
from .data import (
    AugmentedImages,
    FolderData,
    drop_unreadable,
    epoch_batches,
    scaled_preset,
    steps_per_epoch,
    train_transform,
)
from .state import FinetuneSettings

log = logging.getLogger(__name__)

LABEL_SMOOTHING = 0.1


def _model(
    settings: FinetuneSettings, classes: ClassList, ctx: DistContext, saved: Mapping | None, where: Path
) -> ResNet:
    """The architecture with its starting weights (``saved``'s, from ``where``), a head for ``classes``
    and their names."""
    torch.manual_seed(settings.seed)  # the same fresh head (or random network) on every rank and every run
    if saved is not None:  # the weights and preset come from last.pth: nothing to download or find again
        model = build_model(settings.model, pretrained=False, num_classes=len(classes))
        error = None
        try:
            preset = ImageClassification.from_dict(saved["preprocessing"])
        except (KeyError, TypeError, ValueError) as failed:
            error = state.unusable(where, "preprocessing", f"is not a preset ({failed})")
        else:
            model.meta = ModelMeta(settings.model, preset, classes)
            try:
                load_weights(
                    model,
                    saved["state_dict"],
                    source=f"--resume: {printable(where)}",
                    expected_classes=f"the run's {len(classes)} classes",
                )
            except CheckpointError as failed:
                other = architecture_of_weights(saved["state_dict"], other_than=settings.model)
                why = f"holds the weights of {other}, not {settings.model}"
                error = failed if other is None else state.unusable(where, "state_dict", why)
        ctx.raise_together(error)
        return model
    error = None
    with ctx.main_first():  # rank 0 downloads, the others then read the cache
        try:
            model = build_model(
                settings.model,
                pretrained=settings.pretrained,
                pretrained_from_file=settings.pretrained_from_file,
                # From a file, any head: only the backbone is needed (a fine-tuned file's own head is kept
                # when it has the same classes). A head that contradicts its own file is still refused.
                num_classes=len(classes) if settings.pretrained_from_file is not None else None,
                progress=ctx.is_main,
            )
        except (ValueError, WeightsUnavailableError) as failed:  # CheckpointError is a ValueError
            error = failed
    ctx.raise_together(error)  # rank 0's, if it failed: every rank stops with it
    if not settings.pretrained:
        # As timm's random init (zero_init_last): every residual block starts as the identity, which
        # trains from scratch far faster than BatchNorm's default gain of 1.
        for block in model.modules():
            if isinstance(block, Bottleneck):
                nn.init.zeros_(block.bn3.weight)
    if model.classes.names != classes.names:
        model.reset_classifier(len(classes), classes=classes)
    return model


def _optimizer_problem(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> str | None:
    """What makes ``saved`` (an optimizer's ``state_dict``) unusable for ``optimizer``: other parameter
    groups or counts, or moments of other shapes than the parameters'; None if it fits."""
    groups, states = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(states, Mapping):
        return "is not an optimizer's state (param_groups, state)"
    ours = optimizer.param_groups
    if len(groups) != len(ours) or any(
        not isinstance(g, Mapping) or len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, ours)
    ):
        counts = [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in groups]
        return f"has parameter groups of {counts} tensors, this model's optimizer {[len(o['params']) for o in ours]}"
    parameters = {i: p for g, o in zip(groups, ours) for i, p in zip(g["params"], o["params"])}
    for index, entry in states.items():
        if index not in parameters or not isinstance(entry, Mapping):
            return f"holds a state for parameter {index!r}, which the optimizer does not have"
        shape = tuple(parameters[index].shape)
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shape:
                return f"has {name} of shape {tuple(value.shape)} for a parameter of shape {shape} (another model)"
    return None


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None: fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR's multiplier of the peak rate at each step: linear warmup, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """One fine-tuning run on this rank: the model, its optimizer and schedule, the data, the outputs."""

    def __init__(
        self,
        folder: FolderData,
        out: Path,
        settings: FinetuneSettings,
        ctx: DistContext,
        *,
        workers: int,
        progress: bool,
        saved: Mapping[str, Any] | None = None,
    ) -> None:
        self.out, self.settings, self.ctx, self.workers, self.saved = out, settings, ctx, workers, saved
        self.progress = progress and ctx.is_main
        classes = ClassList.of(folder.classes)
        model = _model(settings, classes, ctx, saved, out / state.LAST)
        image_size = settings.image_size or model.preprocessing.crop_size
        preset = scaled_preset(model.preprocessing, image_size)
        model.meta = dataclasses.replace(model.meta, preprocessing=preset, weights=None)
        self.settings = settings = dataclasses.replace(settings, image_size=image_size)
        self.model = model

        train, bad_train = drop_unreadable(folder.train, ctx, workers)
        val, bad_val = drop_unreadable(folder.val, ctx, workers)
        if not len(val):
            raise ValueError(f"{folder.root}/val: none of its {len(folder.val)} images could be read")
        self.skipped = bad_train + bad_val
        self.skipped_folders = list(folder.skipped)
        if ctx.is_main:
            for entry in self.skipped_folders:
                log.warning("warning: %s", entry)
            for path, reason in self.skipped:
                log.warning("skipped unreadable image %s: %s", printable(path), printable(reason))
        self.per_rank = settings.batch_size // ctx.world_size
        self.steps = steps_per_epoch(len(train), self.per_rank, ctx.world_size)
        if self.steps == 0:
            raise ValueError(f"{len(train)} readable training images: fewer than one batch of {settings.batch_size}")
        self.train_set = AugmentedImages(train, train_transform(preset), settings.seed)
        # Validation decodes at the size its preset resizes to, as the engine does (evaluate's figures match);
        # training decodes every pixel: its random crops may zoom into a quarter of the photo.
        self.val_set = ImageListDataset(val.items, preset, val.targets, min_size=preset.resize_size)
        self.val_batches = shard_batches(len(val), self.per_rank, ctx.rank, ctx.world_size)
        self.counts = {"train_images": len(train), "val_images": len(val)}
        self.multi_label = folder.multi_label
        self.score = state.BEST_SCORE[self.multi_label]  # what makes an epoch the best
        # Multi-label: each image's 0/1 targets, by the row number its sample carries; the thresholds the
        # last validation chose (saved with the weights).
        self.train_rows = train.rows.to(ctx.device) if train.rows is not None else None
        self.val_rows = val.rows.to(ctx.device) if val.rows is not None else None
        self.thresholds: list[float] | None = [DEFAULT_THRESHOLD] * len(classes) if self.multi_label else None

        self.device = ctx.device
        self.amp = _amp_dtype(settings.precision, self.device)
        self.precision = agreed_precision(ctx, {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp])
        model.to(self.device, memory_format=torch.channels_last)
        if settings.freeze_backbone:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith("fc."))
        if settings.sync_bn and ctx.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": settings.weight_decay},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},  # biases, BatchNorm
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr)
        total = settings.epochs * self.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(max(1, round(settings.warmup * total)) if settings.warmup else 0, total)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.criterion = (
            nn.BCEWithLogitsLoss() if self.multi_label else nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        )
        self.net: nn.Module = model
        if ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.history: list[dict[str, Any]] = []
        self.best = {self.score: -1.0, "epoch": 0}
        self.epoch = 0
        if saved is not None:
            error = None
            try:
                self.load_state_dict(saved)
            except CheckpointError as failed:
                error = failed
            ctx.raise_together(error)

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the summary."""
        if self.saved is not None:
            self.saved = None  # loaded: free it
            failed = None
            if self.ctx.is_main:
                try:
                    state.write_metrics(self.out, self.history, append=False)  # drop lines of an epoch cut short
                except OSError as error:
                    failed = state.write_failure(self.out / state.METRICS, error, self.out)
                log.info("resuming %s after epoch %d of %d", self.out, self.epoch, self.settings.epochs)
            self.ctx.raise_together(failed)
        started = time.perf_counter()
        while self.epoch < self.settings.epochs:
            # Every epoch starts from (seed, epoch), whatever ran before it in this process.
            torch.manual_seed(self.settings.seed * 1_000_003 + self.epoch)
            record = {"epoch": self.epoch + 1, **self.train_epoch(), **self.validate()}
            self.epoch += 1
            self.history.append(record)
            improved = record[self.score] > self.best[self.score]
            if improved:
                self.best = {self.score: record[self.score], "epoch": record["epoch"]}
            failed = self.save(record, improved) if self.ctx.is_main else None
            self.ctx.raise_together(failed)  # every rank stops after a file could not be written
            if self.ctx.is_main and self.multi_label:
                log.info(
                    "epoch %d/%d: train loss %.4f, val loss %.4f, mAP %.2f%%, macro F1 %.2f%%, %.1f img/s, lr %.3g",
                    self.epoch, self.settings.epochs, record["train_loss"], record["val_loss"], record["val_map"],
                    record["val_f1"], record["images_per_second"], record["lr"],
                )  # fmt: skip
            elif self.ctx.is_main:
                log.info(
                    "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.2f%%, top-5 %.2f%%, %.1f img/s, lr %.3g",
                    self.epoch, self.settings.epochs, record["train_loss"], record["val_loss"], record["val_top1"],
                    record["val_top5"], record["images_per_second"], record["lr"],
                )  # fmt: skip
        self.ctx.barrier()  # the files are written when any rank returns
        return self.summary(time.perf_counter() - started)

    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.freeze_backbone:  # a frozen backbone keeps its BatchNorm statistics too
            self.model.eval()
            self.model.fc.train()

    def train_epoch(self) -> dict[str, float]:
        self._train_mode()
        self.train_set.epoch = self.epoch
        batches = epoch_batches(len(self.train_set), self.per_rank, self.ctx, self.settings.seed, self.epoch)
        bar = progress_bar(self.steps * self.settings.batch_size, self.progress)
        if bar is not None:
            bar.set_description(f"epoch {self.epoch + 1}/{self.settings.epochs}")
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss, top-1 hits
        count, lr = 0, math.nan
        started = time.perf_counter()
        for batch in make_loader(self.train_set, batches, self.workers, self.device):
            n = 0 if batch.images is None else len(batch.indices)
            if self.ctx.distributed:  # every rank steps, or none: a batch emptied by files broken since the check
                n = n if self.ctx.all_reduce_sum(torch.tensor([float(n == 0)])).item() == 0 else 0
            if n == 0:
                continue
            images = batch.images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = batch.targets.to(self.device, non_blocking=True)
            if self.train_rows is not None:
                targets = self.train_rows[targets]
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = self.net(images)
            loss = self.criterion(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            self.scheduler.step()
            sums[0] += loss.detach() * n
            if not self.multi_label:
                sums[1] += (logits.detach().argmax(1) == targets).sum()
            count += n
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
                bar.update(self.settings.batch_size)
        if bar is not None:
            bar.close()
        loss, hits, count = self.ctx.all_reduce_sum(torch.cat([sums.cpu(), torch.tensor([count])])).tolist()
        seconds, count = time.perf_counter() - started, max(count, 1)  # count 0: every batch broke mid-run
        return {
            "train_loss": loss / count,
            **({} if self.multi_label else {"train_top1": 100 * hits / count}),  # augmented, while the weights changed
            "lr": lr,
            "images_per_second": count / seconds,
            "train_seconds": seconds,
        }

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        if self.multi_label:
            return self.validate_multi_label()
        model = self.model.eval()  # the plain module: ranks run different numbers of batches here
        meter = TopKMeter(model.num_classes, device=self.device)
        for batch in make_loader(self.val_set, self.val_batches, self.workers, self.device):
            if batch.images is None:
                continue
            images = batch.images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = batch.targets.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = model(images)
            meter.update(logits, targets)
        totals = meter.merged(self.ctx)
        values = (totals.loss, totals.top1_percent, totals.topk_percent)  # None: no image could be read
        return dict(zip(("val_loss", "val_top1", "val_top5"), (math.nan if v is None else v for v in values)))

    @torch.no_grad()
    def validate_multi_label(self) -> dict[str, Any]:
        """Loss (binary cross-entropy), mAP and macro F1 (%) over every rank's images; chooses each label's
        threshold on them (:func:`~resnext_hub.metrics.f1_thresholds`), saved with the weights."""
        model = self.model.eval()
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in make_loader(self.val_set, self.val_batches, self.workers, self.device):
            if batch.images is None:
                continue
            images = batch.images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                logits = model(images)
            parts.append((logits.float().cpu(), self.val_rows[batch.targets.to(self.device)].cpu()))
        gathered = [part for rank in self.ctx.all_gather_object(parts) for part in rank]
        if not gathered:  # no image could be read
            return {"val_loss": math.nan, "val_map": math.nan, "val_f1": math.nan}
        logits = torch.cat([logits for logits, _ in gathered])
        targets = torch.cat([rows for _, rows in gathered])
        probabilities = logits.sigmoid()
        self.thresholds = f1_thresholds(probabilities, targets)
        f1 = f1_scores(probabilities >= torch.tensor(self.thresholds), targets)
        score = mean_average_precision(probabilities, targets)
        return {
            "val_loss": float(F.binary_cross_entropy_with_logits(logits, targets)),
            "val_map": math.nan if score is None else 100 * score,
            "val_f1": 100 * float(f1.mean()),
            "thresholds": [round(t, 6) for t in self.thresholds],
        }

    # -- outputs and resume ---------------------------------------------------------------------------

    def weights_file(self) -> dict[str, Any]:
        """The fine-tuned checkpoint content: weights, architecture, class names, preset."""
        return finetuned_checkpoint(
            self.model.state_dict(),
            architecture=self.settings.model,
            classes=self.model.classes,
            preprocessing=self.model.preprocessing,
            thresholds=self.thresholds,
        )

    def save(self, record: dict[str, Any], improved: bool) -> state.OutputWriteError | None:
        """Rank 0, after each epoch: best.pth if top-1 improved, last.pth, the metrics line and the curves.

        Returns the error for a file that could not be written (a full disk); what was written before
        is complete. Ctrl-C or SIGTERM while ``torch.save`` writes comes through as itself.
        """
        weights = self.weights_file()
        path = self.out / state.BEST
        try:
            if improved:
                state.atomic_save({**weights, "epoch": self.epoch, "metrics": record}, path)
            path = self.out / state.LAST
            state.atomic_save({**weights, **self.state_dict()}, path)
            path = self.out / state.METRICS
            state.write_metrics(self.out, self.history, append=True)
            path = self.out / state.CURVES
            state.plot_curves(self.history, path)
        except (OSError, RuntimeError) as error:
            interrupted = state.interruption(error)
            if interrupted is not None:
                raise interrupted from None
            return state.write_failure(path, error, self.out)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": state.rng_states(),
            "settings": self.settings.as_dict(),
            "history": list(self.history),
            "best": dict(self.best),
            "world_size": self.ctx.world_size,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """The training state of ``saved`` (checked by :func:`state.check_resume`; the weights are loaded
        already): ``CheckpointError`` naming a field this model, optimizer or schedule cannot take."""
        where = self.out / state.LAST
        try:
            problem = _optimizer_problem(self.optimizer, saved["optimizer"])
        except (TypeError, KeyError, AttributeError) as error:
            problem = f"is malformed ({type(error).__name__}: {error})"
        if problem:
            raise state.unusable(where, "optimizer state", problem)
        total = self.settings.epochs * self.steps
        step = saved["scheduler"].get("last_epoch")
        if not isinstance(step, int) or not 0 <= step <= total:
            raise state.unusable(where, "scheduler", f"is at step {step!r}, outside this run's 0..{total} steps")
        for field, load in (
            ("optimizer state", lambda: self.optimizer.load_state_dict(saved["optimizer"])),
            ("scheduler", lambda: self.scheduler.load_state_dict(saved["scheduler"])),
            ("grad scaler", lambda: saved.get("scaler") and self.scaler.load_state_dict(saved["scaler"])),
            ("rng", lambda: state.set_rng_states(saved["rng"])),
        ):
            try:
                load()
            except Exception as error:  # whatever torch raises for a state it cannot take: that field's fault
                raise state.unusable(where, field, f"does not fit ({type(error).__name__}: {error})") from error
        self.epoch, self.history, self.best = saved["epoch"], list(saved["history"]), dict(saved["best"])
        if self.multi_label:  # the thresholds its last validation chose (checked when its weights were read)
            self.thresholds = list(saved.get("thresholds") or self.thresholds)
        if saved.get("world_size") != self.ctx.world_size and self.ctx.is_main:
            log.warning(
                "resuming a run of %s process(es) with %d: same recipe, but not bit-identical to an uninterrupted run",
                saved.get("world_size"), self.ctx.world_size,
            )  # fmt: skip

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "model": self.settings.model,
            "classes": list(self.model.classes.names),
            "epochs": self.epoch,
            "best_epoch": self.best["epoch"],
            f"best_{self.score}": self.best[self.score],
            **({"multi_label": True, "thresholds": self.thresholds} if self.multi_label else {}),
            "last": self.history[-1] if self.history else None,
            "skipped": [{"input": path, "error": reason} for path, reason in self.skipped],
            "skipped_folders": [entry._asdict() for entry in self.skipped_folders],
            **self.counts,
            "world_size": self.ctx.world_size,
            "precision": self.precision,
            "seconds": seconds,
            "settings": self.settings.as_dict(),
        }
