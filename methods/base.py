"""The LightningModule every method shares: encode, gather across ranks, sum the named loss terms, log, optimize.

A method subclass overrides only what it changes: `extra_fields` (what it asks of the DataModule), its
`Config` (its loss weights and switches) and `loss_terms` (its terms; keys ending in `_loss` are summed,
the others are only logged).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from configs.registry import Registry
from datamodules.fields import PROBE_KINDS
from datamodules.graph import SceneGraph
from methods import towers
from methods.backbone import compile_towers, create_backbone
from methods.guard import NonFiniteSteps
from methods.losses import contrastive_loss


METHODS: Registry[type["ContrastiveMethod"]] = Registry("method")


def dist_info() -> tuple[int, int]:
    """(global rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's `x` concatenated in rank order, (W*B, ...), with gradients flowing back to each rank."""
    rank, world = dist_info()
    if world == 1:
        return x
    # an autograd-aware gather: its backward sums every rank's gradient for x (traceable by torch.compile);
    # all_gather_single_autograd where torch has it (its older name warns that it is deprecated from 2.14)
    import torch.distributed._functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    return gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


class ContrastiveMethod(L.LightningModule):
    """CLIP fine-tuning shared by every method (vanilla CLIP is this class with its defaults)."""

    @dataclass
    class Config:
        name: str = "clip"

    extra_fields: ClassVar[tuple[str, ...]] = ()  # per-sample fields asked of the DataModule (datamodules/fields.py)
    trim_safe: ClassVar[bool] = True  # the loss reads only pooled text features (see trims_text)

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})  # plain containers: the checkpoint loads with weights_only=True
        self.cfg = OmegaConf.create(cfg)
        self.mcfg = self.cfg.method  # this method's own options (its Config)
        self.model, self.preprocess_train, self.preprocess_val, self.tokenizer = create_backbone(self.cfg.model)
        self._encode_image = self.model.encode_image
        # open_clip's built-in text tower through towers.encode_text_tokens, which takes texts cut to fewer
        # columns than the context (the loader's trim_text); another text tower through its own encode_text
        self._encode_text = self._text_features if hasattr(self.model, "token_embedding") else self.model.encode_text
        if self.cfg.model.compile:
            # the towers in place, so a method's own path through them is compiled too; the text tower's
            # embedding, pooling and projection around its stack join the graph through encode_text
            compile_towers(self.model, self.cfg.model.compile_backend)
            self._encode_text = torch.compile(self._encode_text, backend=self.cfg.model.compile_backend)
        self.bad_steps = NonFiniteSteps()

    def compile_modules(self, *modules: nn.Module | None) -> None:
        """With `model.compile`, a method's own modules (Structure-CLIP's knowledge encoder, SmartCLIP's mask
        network) are compiled in place like the towers; None is passed over."""
        if self.cfg.model.compile:
            for module in modules:
                if module is not None:
                    module.compile(backend=self.cfg.model.compile_backend)

    # -- what the method asks of the data --------------------------------------------------------------
    def trims_text(self) -> bool:
        """Whether the loader may cut caption tokens after the batch's longest text: the text features do not
        change (towers.exact_trim) and the method reads nothing at the cut columns (SmartCLIP's mask network
        reads every position, so it says no)."""
        return self.trim_safe and towers.exact_trim(self.model)

    def fields(self) -> tuple[str, ...]:
        """The extra per-sample fields this run needs (a method may drop some when a switch is off)."""
        return self.extra_fields

    def field_options(self) -> dict[str, Any]:
        """Options the field builders read (e.g. which negative kinds are allowed)."""
        return {}

    def prepare_fields(self, datamodule: Any) -> None:
        """Work done once before training that the fields need (e.g. a neighbour table); none by default."""

    # -- encoding ----------------------------------------------------------------------------------
    def encode_image_tensor(self, images: Tensor) -> Tensor:
        return self._encode_image(images, normalize=True)  # (B, D)

    def encode_text_tokens(self, tokens: Tensor) -> Tensor:
        return self._encode_text(tokens, normalize=True)  # (B, D)

    def _text_features(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        features = towers.encode_text_tokens(self.model, tokens)[0]  # (B, L <= context) -> (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The features the training loss needs; a method that adds negatives encodes them here too."""
        return self.encode_pairs(batch)

    def encode_pairs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Normalised features of the batch's images and captions, and the learned temperature."""
        return {
            "image_features": self.encode_image_tensor(batch["image"]),
            "text_features": self.encode_text_tokens(batch["text"]),
            "logit_scale": self.model.logit_scale.exp(),
        }

    def gather(self, x: Tensor) -> Tensor:
        return gather_with_grad(x)

    # -- loss --------------------------------------------------------------------------------------
    def loss_terms(self, batch: dict[str, Any], feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Named loss terms; keys ending in `_loss` are summed into the training loss."""
        rank, _ = dist_info()
        img, txt = feats["image_features"], feats["text_features"]
        return {"contrastive_loss": contrastive_loss(img, txt, self.gather(img), self.gather(txt), feats["logit_scale"],
                                                     rank, same=self.same_captions(batch))}

    def same_captions(self, batch: dict[str, Any]) -> Tensor | None:
        """(B, W*B) pairs known to be true matches besides each positive, left out of the negatives; None: none."""
        return None

    def training_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.encode(batch)
        # the loss terms in float32 on float32 features: under bf16 autocast a logit near 100 (the scale's cap)
        # would be rounded to a multiple of 0.5; the towers stay in autocast, and the terms' matrices are small
        with torch.autocast(batch["image"].device.type, enabled=False):
            feats = {k: v.float() if torch.is_tensor(v) and v.dtype in (torch.float16, torch.bfloat16) else v
                     for k, v in feats.items()}  # float64 (a check's) stays float64
            terms = self.loss_terms(batch, feats)
        loss = sum(v for k, v in terms.items() if k.endswith("_loss"))
        return loss, terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, terms = self.training_loss(batch)
        self.loss_is_finite = torch.isfinite(loss.detach())  # read by the non-finite guard before the step
        b = batch["image"].shape[0]
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=b)
        # not prog_bar: Lightning turns progress-bar values into numbers whenever its metrics are read (every
        # step), a host-device sync; methods/callbacks.LossBar shows the loss when the bar refreshes instead
        self.log("train/loss", loss.detach(), batch_size=b)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out contrastive loss and in-batch retrieval accuracy (no collectives: batches may differ in size).
        Under DDP each rank validates every W-th item (each once), so these in-batch figures group items otherwise
        than on one process (and best.ckpt, chosen on val/loss, follows them); the swap accuracies below count each
        item once and equal one process's."""
        feats = self.encode_pairs(batch)  # the same held-out measure for every method
        img, txt = feats["image_features"], feats["text_features"]
        loss = contrastive_loss(img, txt, img, txt, feats["logit_scale"])
        sims = img @ txt.T  # (B, B)
        target = torch.arange(len(img), device=img.device)
        b = len(img)
        self.log("val/loss", loss, sync_dist=True, batch_size=b, prog_bar=True)
        self.log("val/i2t_acc", (sims.argmax(1) == target).float().mean(), sync_dist=True, batch_size=b)
        self.log("val/t2i_acc", (sims.argmax(0) == target).float().mean(), sync_dist=True, batch_size=b)
        if "swap_text" in batch:  # (B, K, L): the caption's relation and attribute swaps (datamodules.fields)
            k = batch["swap_text"].shape[1]
            swaps = self.encode_text_tokens(batch["swap_text"].flatten(0, 1)).view(b, k, -1)  # (B, K, D)
            scores = torch.einsum("bd,bkd->bk", img, torch.cat([txt[:, None], swaps], 1))  # (B, 1 + K), one op
            right = scores[:, 1:] < scores[:, :1]  # a tie is wrong
            valid = batch["swap_valid"]
            counts = torch.stack([(right & valid).sum(0), valid.sum(0)])  # (2, K): right, asked
            self.swap_counts = counts if getattr(self, "swap_counts", None) is None else self.swap_counts + counts

    def on_validation_epoch_start(self) -> None:
        self.swap_counts: Tensor | None = None

    def on_validation_epoch_end(self) -> None:
        """val/<kind>_swap_acc: how often a held-out image scores its caption above the caption's swap of that kind
        (ties wrong), over the whole validation split (every rank's counts summed; one sync an epoch)."""
        counts = getattr(self, "swap_counts", None)
        if counts is None:
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        for kind, (right, asked) in zip(PROBE_KINDS, counts.T.tolist()):
            if asked:
                self.log(f"val/{kind}_swap_acc", right / asked, sync_dist=False, rank_zero_only=False)
        self.swap_counts = None

    # -- optimisation ------------------------------------------------------------------------------
    def own_param_groups(self) -> dict[str, dict[str, Any]]:
        """Named parameter groups with optimiser settings of their own (e.g. SmartCLIP's mask network at its own
        learning rate): name -> {"params": [...], and any of "lr", "weight_decay", "warmup_steps"}; a setting left
        out takes the run's `optim` value. Their parameters leave the shared groups. None by default."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """No weight decay on gains, biases, embeddings' 1-d vectors and the logit scale (open_clip's rule; with
        `optim.decay_all`, decay on every parameter, as a plain `AdamW(model.parameters())`); then the method's
        own groups (`own_param_groups`), each with its name (LearningRateMonitor logs it)."""
        own = self.own_param_groups()
        claimed = {id(p) for g in own.values() for p in g["params"]}
        decay, no_decay = [], []
        o = self.cfg.optim
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in claimed:
                continue
            (no_decay if not o.decay_all and (p.ndim < 2 or "logit_scale" in name) else decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        for name, g in own.items():
            groups.append({"name": name, "lr": o.lr, "weight_decay": o.weight_decay, "warmup_steps": o.warmup_steps} | g)
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        groups = self.param_groups()
        warmups = [g.pop("warmup_steps", o.warmup_steps) for g in groups]  # per group; AdamW has no such key
        # fused AdamW (one kernel for every tensor, on CPUs and GPUs); it also skips a non-finite step on the device
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [lr_lambda(o.schedule, w, total, o.min_lr_ratio) for w in warmups])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Non-finite guard: a step whose loss or gradients are not finite is skipped (AdamW leaves every weight
        and its moments as they were) and counted; `optim.max_bad_steps` in a row stop the run with a checkpoint
        of the last good state. No host-device sync: the check and the skip happen on the device
        (`NonFiniteSteps`), and on a GPU the count of bad steps in a row is read one step late. Under DDP the
        verdict is all-reduced on the device: every rank skips if any rank's loss was bad (the gradients are
        already averaged, the losses are not), so the replicas never diverge."""
        limit = self.cfg.optim.max_bad_steps
        if limit <= 0:
            return
        total, in_a_row = self.bad_steps.check(optimizer, list(self.parameters()), getattr(self, "loss_is_finite", None))
        if total is not None:
            self.log("train/skipped_steps", total, on_step=True, on_epoch=False, batch_size=1)
        if in_a_row is not None and in_a_row >= limit:
            self.stop_for_bad_steps(in_a_row)

    def stop_for_bad_steps(self, in_a_row: float) -> None:
        """Write last-good.ckpt (the bad steps changed nothing: the last good state, resumable) and stop the run."""
        path = Path(self.trainer.default_root_dir) / "checkpoints" / "last-good.ckpt"
        self.trainer.save_checkpoint(path, weights_only=False)
        raise FloatingPointError(
            f"{int(in_a_row)} steps in a row had a non-finite loss or gradient (step {self.global_step}); stopped. "
            f"The last good weights are in {path}. Lower optim.lr, check the data, or raise optim.max_bad_steps.")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """`trainer.gradient_clip_val`, clipped here: Lightning's own clipping refuses fused AdamW under bf16-mixed
        (it supposes a gradient scaler, which bf16 has none of, and float16's is refused by the config checks).
        No host sync: the norm and the factor stay on the device."""
        if not gradient_clip_val:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def on_train_end(self) -> None:
        """On a GPU the count of bad steps in a row is read one step late: bad steps to the limit at the run's very
        end would finish it as a success. Read once more here (one sync, once a run)."""
        limit, in_a_row = self.cfg.optim.max_bad_steps, self.bad_steps.in_a_row
        if limit > 0 and in_a_row is not None and float(in_a_row) >= limit:
            self.stop_for_bad_steps(float(in_a_row))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bad_steps"] = self.bad_steps.state()  # [in a row, in all]: a resumed run keeps counting

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.bad_steps.load(checkpoint.get("bad_steps", [0, 0]))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # the temperature stays in [1, logit_scale_max]
            self.model.logit_scale.clamp_(0, math.log(self.cfg.optim.logit_scale_max))

    # -- what benchmarks see (benchmarks.scoring.Encoder) --------------------------------------------
    def eval_variants(self) -> dict[str, dict[str, Any]]:
        """Named ways to evaluate this model (suffix -> settings for `set_eval_variant`); one by default."""
        return {"": {}}

    def set_eval_variant(self, **settings: Any) -> None:
        """Switch the evaluation behaviour (e.g. Structure-CLIP with or without its knowledge encoder)."""

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        return self.encode_image_tensor(images.to(self.device)).float()

    @torch.no_grad()
    def encode_captions(self, texts: list[str], graphs: list[SceneGraph | None] | None = None) -> Tensor:
        """Caption features; `graphs` (each caption's scene graph) is for methods that read them."""
        return self.encode_text_tokens(self.tokenizer(texts).to(self.device)).float()


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Linear warmup over `warmup` steps, then cosine down to `min_ratio` at `total` (or constant)."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got '{schedule}'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
