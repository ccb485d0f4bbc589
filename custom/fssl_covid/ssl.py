"""The semi-supervised objective (Fed-Consist): confidence-filtered pseudo-labels and consistency training.

For an unlabeled batch ``x``:

1. the teacher predicts class probabilities on a weakly perturbed view ``weak(x)``;
2. a random geometric transform ``g`` (flips, in-plane rotation, scaling) and a strong intensity perturbation
   ``s`` are drawn per sample; the student sees ``g(s(x))``;
3. the teacher's probabilities are warped by the same ``g``; voxels whose confidence (max probability) is at
   least ``tau`` become pseudo-labels (arg-max), the others (and voxels warped in from outside) are ignored;
   with ``ssl.cutmix_prob`` a box of the next sample is first pasted into the student's view and into the warped
   teacher probabilities alike (CutMix);
4. the unsupervised loss is the masked cross-entropy (plus a masked soft Dice on the lesion class) between the
   student's prediction and the pseudo-labels — averaged per pseudo-class where the site's labels are scarce
   (``ssl.class_balanced``, :func:`class_balanced_at_site`) — or (``mse``) the squared difference of the
   student's and the teacher's probabilities on the confident voxels; ``ssl.lesion_weight`` weighs the voxels
   (classes) the teacher calls lesion, as ``train.lesion_ce_weight`` does in the supervised loss.

Perturbations run batched on the training device (GPU when present), so geometry is applied identically to the
image and to the teacher's output without a round trip through per-sample CPU transforms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from .networks import main_output


def sigmoid_rampup(t: float, warmup: float, length: float) -> float:
    """0 before ``warmup``, then exp(-5 (1 - p)^2) with p going 0 -> 1 over ``length`` (Laine & Aila, 2017)."""
    if t < warmup:
        return 0.0
    if length <= 0:
        return 1.0
    p = min(1.0, (t - warmup) / length)
    return float(math.exp(-5.0 * (1.0 - p) ** 2))


def unsup_weight(ssl_cfg: Mapping, epoch: float, total_epochs: float | None = None) -> float:
    """lambda(t): the weight of the unsupervised term at (global) epoch ``epoch`` of ``total_epochs`` (all rounds in
    FL); 0 in the last ``ssl.final_supervised_epochs`` of them (supervised fine-tuning at the end)."""
    if not ssl_cfg["enabled"]:
        return 0.0
    final = int(ssl_cfg["final_supervised_epochs"])
    if final > 0 and total_epochs is not None and epoch >= total_epochs - final:
        return 0.0
    return float(ssl_cfg["unsup_weight"]) * sigmoid_rampup(epoch, ssl_cfg["warmup_epochs"], ssl_cfg["rampup_epochs"])


@dataclass
class PerturbParams:
    """One draw of a batched perturbation: affine matrices for ``F.affine_grid`` and intensity factors."""

    theta: torch.Tensor | None  # (B, d, d+1) or None when the geometry is the identity
    scale: torch.Tensor  # (B,) intensity scale
    shift: torch.Tensor  # (B,) intensity shift
    noise_std: float
    gamma: torch.Tensor | None = None  # (B,) contrast exponent, or None when ``gamma`` is off


class Perturbation:
    """Random, batched perturbation of images: Gaussian noise, intensity scale/shift, flips, small affine.

    ``cfg`` keys: ``noise_std``, ``intensity_scale``, ``intensity_shift`` (uniform ranges around 1 and 0),
    ``flip_prob`` (per spatial axis), ``rotate_deg`` (in the plane of the first two spatial axes, i.e. the axial
    plane of RAS CT), ``scale`` (isotropic zoom range around 1), ``gamma`` (contrast: each image becomes
    ``x ** exp(u)``, u uniform in [-gamma, gamma], before the scale and shift; images are in [0, 1] there).
    """

    def __init__(self, cfg: Mapping, generator: torch.Generator | None = None):
        self.cfg = dict(cfg)
        self.generator = generator

    @property
    def has_geometry(self) -> bool:
        c = self.cfg
        return c.get("flip_prob", 0) > 0 or c.get("rotate_deg", 0) > 0 or c.get("scale", 0) > 0

    def _uniform(self, n: int, half_width: float) -> torch.Tensor:
        return (torch.rand(n, generator=self.generator) * 2.0 - 1.0) * half_width

    def sample(self, batch_size: int, spatial_dims: int) -> PerturbParams:
        c = self.cfg
        scale = 1.0 + self._uniform(batch_size, c.get("intensity_scale", 0.0))
        shift = self._uniform(batch_size, c.get("intensity_shift", 0.0))
        gamma = None
        if c.get("gamma", 0.0) > 0:  # drawn only when on, so the other draws keep their stream
            gamma = torch.exp(self._uniform(batch_size, c["gamma"]))
        theta = None
        if self.has_geometry:
            d = spatial_dims
            mats = torch.eye(d).repeat(batch_size, 1, 1)
            angle = self._uniform(batch_size, math.radians(c.get("rotate_deg", 0.0)))
            cos, sin = torch.cos(angle), torch.sin(angle)
            # affine_grid orders grid coordinates last-axis first: spatial axes 0 and 1 are grid comps d-1, d-2.
            a, b = d - 1, d - 2
            rot = torch.eye(d).repeat(batch_size, 1, 1)
            rot[:, a, a], rot[:, a, b], rot[:, b, a], rot[:, b, b] = cos, -sin, sin, cos
            zoom = 1.0 + self._uniform(batch_size, c.get("scale", 0.0))
            flips = torch.where(torch.rand(batch_size, d, generator=self.generator) < c.get("flip_prob", 0.0), -1.0, 1.0)
            mats = rot @ torch.diag_embed(flips) * zoom[:, None, None]
            theta = torch.cat([mats, torch.zeros(batch_size, d, 1)], dim=2)
        return PerturbParams(theta=theta, scale=scale, shift=shift, noise_std=float(c.get("noise_std", 0.0)),
                             gamma=gamma)

    def intensity(self, x: torch.Tensor, p: PerturbParams) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 1)
        if p.gamma is not None:
            x = x.clamp(min=0.0) ** p.gamma.to(x.device, x.dtype).view(shape)
        out = x * p.scale.to(x.device).view(shape) + p.shift.to(x.device).view(shape)
        if p.noise_std > 0:
            noise = torch.randn(x.shape, generator=self.generator).to(x.device)
            out = out + noise * p.noise_std
        return out

    @staticmethod
    def geometry(x: torch.Tensor, p: PerturbParams, mode: str = "bilinear") -> torch.Tensor:
        """Warp ``x`` (B, C, *spatial) by the sampled affine; outside the field of view becomes 0."""
        if p.theta is None:
            return x
        grid = F.affine_grid(p.theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)

    def __call__(self, x: torch.Tensor, label: torch.Tensor | None = None):
        """Perturb an image batch (and its label identically in geometry); returns (x', label')."""
        p = self.sample(x.shape[0], x.dim() - 2)
        x = self.geometry(self.intensity(x, p), p)
        if label is not None:
            label = self.geometry(label.float(), p, mode="nearest")
        return x, label


def pseudo_labels(teacher_probs: torch.Tensor, threshold: float,
                  class_adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence filter: returns (labels (B, *spatial) int64, mask (B, *spatial) float).

    ``mask`` is 1 where the teacher's max class probability is at least the threshold.  With ``class_adaptive``
    the threshold of class c is ``threshold * conf_c / max_k conf_k``, where ``conf_c`` is the teacher's mean
    confidence on the voxels it assigns to class c in this batch (self-adaptive thresholds in the spirit of
    FreeMatch, Wang et al. 2023): a rare, harder class (lesion) is not filtered out entirely while the easy
    background is held to ``threshold``.  Voxels with no probability mass (warped in from outside the image) are
    always ignored.
    """
    confidence, labels = teacher_probs.max(dim=1)
    valid = teacher_probs.sum(dim=1) > 0.5
    thresholds = torch.full((teacher_probs.shape[1],), float(threshold), device=teacher_probs.device)
    if class_adaptive and threshold > 0:
        means = torch.stack([confidence[valid & (labels == c)].mean() if (valid & (labels == c)).any()
                             else confidence.new_tensor(float("nan")) for c in range(teacher_probs.shape[1])])
        top = torch.nan_to_num(means, nan=0.0).max()
        if top > 0:
            thresholds = torch.where(torch.isnan(means), thresholds, threshold * means / top)
    mask = (confidence >= thresholds[labels]) & valid
    return labels, mask.float()


def lesion_weights(labels: torch.Tensor, lesion_weight: float) -> torch.Tensor:
    """Per-voxel weights of a pseudo-label map: ``lesion_weight`` where the label is a lesion class, 1 elsewhere."""
    return torch.where(labels > 0, float(lesion_weight), 1.0).to(labels.device)


def masked_consistency_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                            with_dice: bool = True, class_balanced: bool = True, lesion_weight: float = 1.0,
                            eps: float = 1e-5) -> torch.Tensor:
    """Class-balanced cross-entropy on confident voxels, plus optionally a soft Dice on the lesion class.

    The cross-entropy is averaged within each pseudo-class and then over the classes present, so the abundant,
    confidently predicted background cannot drown the few lesion voxels (which would teach an unlabeled site to
    erase lesions).  Each class term is scaled by the confident share of the voxels, so a batch with few confident
    voxels gives a small loss.  The Dice term covers the batch's confident voxels jointly.  ``lesion_weight``
    weighs the lesion classes against background (their class terms, or their voxels without class balancing).
    """
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    coverage = mask.mean()
    if not class_balanced:
        loss = (ce * mask * lesion_weights(labels, lesion_weight)).sum() / mask.numel()
        terms, weights = [loss], [1.0]
        coverage = 1.0
    else:
        terms, weights = [], []
    for c in range(student_logits.shape[1]) if class_balanced else ():
        m = mask * (labels == c).float()
        if m.sum() > 0:
            terms.append((ce * m).sum() / m.sum())
            weights.append(1.0 if c == 0 else float(lesion_weight))
    if not terms:
        return (student_logits.float() * 0.0).sum()
    w = torch.tensor(weights, device=student_logits.device)
    loss = coverage * (torch.stack(terms) * w).sum() / w.sum()
    if with_dice:
        probs = torch.softmax(student_logits.float(), dim=1)[:, 1:]
        onehot = F.one_hot(labels, student_logits.shape[1]).movedim(-1, 1)[:, 1:].float()
        m = mask.unsqueeze(1)
        if (onehot * m).sum() > 0:  # Dice only where the teacher found (confident) lesion
            inter = (probs * onehot * m).sum()
            denom = ((probs + onehot) * m).sum()
            loss = loss + coverage * (1.0 - (2.0 * inter + eps) / (denom + eps))
    return loss


def teacher_probabilities(teacher: torch.nn.Module, x: torch.Tensor, flips: bool, autocast,
                          average_logits: bool = False) -> torch.Tensor:
    """Class probabilities of the teacher; with ``flips`` averaged over the image and its flips along each spatial
    axis (test-time augmentation: pseudo-labels a little better than one prediction, for 1 + dims forwards).
    ``average_logits``: the softmax of the views' mean logits (their normalized geometric mean) instead of the mean
    of their probabilities.  ``teacher`` is any callable returning logits; inference's TTA uses it too."""
    views = [()] + ([(2 + d,) for d in range(x.dim() - 2)] if flips else [])
    total = None
    for axes in views:
        with autocast():
            logits = teacher(torch.flip(x, axes) if axes else x).float()
        p = torch.log_softmax(logits, dim=1) if average_logits else torch.softmax(logits, dim=1)
        p = torch.flip(p, axes) if axes else p
        total = p if total is None else total + p
    return torch.softmax(total / len(views), dim=1) if average_logits else total / len(views)


def cutmix_boxes(batch: int, spatial: tuple[int, ...], prob: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(batch, 1, *spatial) boolean boxes: with probability ``prob`` a sample gets one random box covering a fifth
    to three fifths of the image, else none."""
    box = torch.zeros((batch, 1, *spatial), dtype=torch.bool)
    for i in range(batch):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        side = float(0.2 + 0.4 * torch.rand((), generator=generator)) ** (1.0 / len(spatial))
        region = [slice(None)]  # the channel axis of box[i]
        for n in spatial:
            length = max(1, round(side * n))
            start = int(torch.randint(0, n - length + 1, (), generator=generator))
            region.append(slice(start, start + length))
        box[i][tuple(region)] = True
    return box


def cutmix(x: torch.Tensor, target: torch.Tensor, prob: float,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix of a batch with itself: each sample's box (see :func:`cutmix_boxes`) is taken from the next sample,
    in the image ``x`` and its ``target`` (labels or probabilities, same spatial shape) alike."""
    if prob <= 0 or x.shape[0] < 2:
        return x, target
    box = cutmix_boxes(x.shape[0], tuple(x.shape[2:]), prob, generator).to(x.device)
    other = torch.roll(torch.arange(x.shape[0], device=x.device), -1)
    return torch.where(box, x[other], x), torch.where(box, target[other], target)


def class_balanced_at_site(ssl_cfg: Mapping, n_labeled: int, n_unlabeled: int) -> bool:
    """Whether a site with ``n_labeled`` labeled and ``n_unlabeled`` unlabeled training cases balances the
    pseudo-label cross-entropy per class: ``ssl.class_balanced`` when true or false; with ``"auto"``, where its
    unlabeled cases are at least ``ssl.class_balanced_min_ratio`` times its labeled ones (always without labels),
    i.e. where labels are scarce — the balanced term is what carries lesion signal from the unlabeled scans, and it
    helps there and costs Dice where labels suffice (``config.py`` has the measurements)."""
    setting = ssl_cfg["class_balanced"]
    if setting != "auto":
        return bool(setting)
    return n_labeled == 0 or n_unlabeled >= float(ssl_cfg["class_balanced_min_ratio"]) * n_labeled


class ConsistencyObjective:
    """Computes the unsupervised loss of a student against a teacher on one unlabeled batch.

    ``class_balanced``: the site's choice (:func:`class_balanced_at_site`); required where ``ssl.class_balanced``
    is ``"auto"`` (it depends on the site's data) and the loss uses it (not ``"mse"``)."""

    def __init__(self, ssl_cfg: Mapping, generator: torch.Generator | None = None,
                 class_balanced: bool | None = None):
        if class_balanced is None:
            if ssl_cfg["class_balanced"] == "auto" and ssl_cfg["unsup_loss"] != "mse":
                raise ValueError('ssl.class_balanced "auto" depends on the site\'s case counts: pass class_balanced '
                                 "(class_balanced_at_site)")
            class_balanced = ssl_cfg["class_balanced"] is True
        self.class_balanced = class_balanced
        self.cfg = ssl_cfg
        self.weak = Perturbation(ssl_cfg["weak"], generator)
        self.strong = Perturbation(ssl_cfg["strong"], generator)

    def cutmix(self, xs: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CutMix between unlabeled samples (French et al., BMVC 2020): with probability ``ssl.cutmix_prob`` a
        sample's random box is replaced by the next sample's, in the student's input and in the teacher's
        probabilities alike, so the student must segment a scene no single image shows."""
        return cutmix(xs, probs, self.cfg["cutmix_prob"], self.strong.generator)

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor,
                 autocast=None) -> tuple[torch.Tensor, dict]:
        dims = x.dim() - 2
        with torch.no_grad():
            xw = self.weak.intensity(x, self.weak.sample(x.shape[0], dims))  # weak view: intensity only
            probs = teacher_probabilities(teacher, xw, flips=bool(self.cfg["teacher_flip_tta"]), autocast=autocast)
        p = self.strong.sample(x.shape[0], dims)
        xs = self.strong.geometry(self.strong.intensity(x, p), p)
        probs = self.strong.geometry(probs, p)
        xs, probs = self.cutmix(xs, probs)
        labels, mask = pseudo_labels(probs, self.cfg["confidence_threshold"], self.cfg["class_adaptive_threshold"])
        with autocast():
            logits = main_output(student(xs), xs)  # a deeply supervised student: its main head
        if self.cfg["unsup_loss"] == "mse":
            # Mean-Teacher style soft consistency on confident voxels
            diff = (torch.softmax(logits.float(), dim=1) - probs).pow(2).sum(dim=1)
            loss = (diff * mask * lesion_weights(labels, self.cfg["lesion_weight"])).sum() / mask.numel()
        else:
            loss = masked_consistency_loss(logits, labels, mask, with_dice=self.cfg["unsup_loss"] == "dice_ce",
                                           class_balanced=self.class_balanced,
                                           lesion_weight=self.cfg["lesion_weight"])
        stats = {"confident_fraction": float(mask.mean()),
                 "pseudo_lesion_fraction": float((labels > 0).float().mul(mask).sum() / mask.sum().clamp(min=1))}
        return loss, stats
