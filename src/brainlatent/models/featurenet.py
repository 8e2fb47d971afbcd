"""Feature networks behind 3D FID / KID / MMD and the sex / age predictions on generated volumes.

Two backbones share the :class:`FeatureExtractor` interface (``features(x) -> (B, F)``):

* :class:`FeatureNet`, a small 3D CNN trained here on the prepared data to predict sex (binary) and HCP age
  group (4 classes); its penultimate vector (``feature_dim``) is the feature space. It sees the data the
  generators learn from at their resolution, which no public 3D network does.
* :func:`load_medicalnet`, a Tencent MedicalNet ResNet-10/18 (Chen et al., 2019) built with MONAI and
  loaded from a user-provided weights file (nothing is downloaded): 512-d globally pooled features.

Metrics from different backbones, weights or input shapes are not comparable (docs/metrics.md).
Volumes are ``(N, 1, X, Y, Z)`` float tensors in [0, 1]; a ``(N, X, Y, Z)`` array (the layout of
data/processed/volumes.npy, float16 allowed) is accepted wherever volumes are read in batches.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import resnet10, resnet18
from monai.networks.nets.resnet import ResNet, get_medicalnet_pretrained_resnet_args
from sklearn.metrics import roc_auc_score
from torch import nn

from brainlatent.data.cohort import AGE_GROUPS, SEXES
from brainlatent.models.layers import as_shape3
from brainlatent.train.device import resolve_device

N_AGE_GROUPS = len(AGE_GROUPS)
_ACT = ("leakyrelu", {"negative_slope": 0.2})
_NORM = "batch"  # eval mode uses running statistics, so a volume's features do not depend on its batch


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything mapping volumes (B, 1, X, Y, Z) to feature vectors (B, F) for the generative metrics."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


# -------------------------------------------------------------------------------------------- inputs
def _volume_batch(volumes: np.ndarray | torch.Tensor, name: str = "volumes") -> torch.Tensor:
    """(N, 1, X, Y, Z) or (N, X, Y, Z) array/tensor -> (N, 1, X, Y, Z) tensor (dtype kept, no copy if possible)."""
    t = volumes if isinstance(volumes, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volumes))
    if t.ndim == 4:
        t = t.unsqueeze(1)
    if t.ndim != 5 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected volumes (N, 1, X, Y, Z) or (N, X, Y, Z), got shape {tuple(t.shape)}")
    return t


def encode_sex(values: Sequence[str]) -> torch.Tensor:
    """``["F", "M", ...]`` -> float tensor (N,), 1 = male (the positive class of ``sex_auc``)."""
    bad = sorted({v for v in values if v not in SEXES})
    if bad:
        raise ValueError(f"sex: unknown value(s) {bad}; expected {list(SEXES)}")
    return torch.tensor([v == "M" for v in values], dtype=torch.float32)


def encode_age_group(values: Sequence[str]) -> torch.Tensor:
    """``["22-25", "36+", ...]`` -> long tensor (N,) of indices into ``AGE_GROUPS``."""
    bad = sorted({v for v in values if v not in AGE_GROUPS})
    if bad:
        raise ValueError(f"age_group: unknown value(s) {bad}; expected {list(AGE_GROUPS)}")
    return torch.tensor([AGE_GROUPS.index(v) for v in values], dtype=torch.long)


def _labels(sex: Any, age: Any, n: int, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(np.asarray(sex), dtype=torch.float32).reshape(-1)
    a = torch.as_tensor(np.asarray(age), dtype=torch.long).reshape(-1)
    if len(s) != n or len(a) != n:
        raise ValueError(f"{n} volumes but {len(s)} {prefix}sex and {len(a)} {prefix}age_group_idx labels")
    if not torch.isin(s, torch.tensor([0.0, 1.0])).all():
        raise ValueError(f"{prefix}sex: expected 0 (F) / 1 (M); use encode_sex() on 'F'/'M' strings")
    if a.min() < 0 or a.max() >= N_AGE_GROUPS:
        raise ValueError(f"{prefix}age_group_idx: expected integers in [0, {N_AGE_GROUPS - 1}] (AGE_GROUPS index)")
    return s, a


# ----------------------------------------------------------------------------------------- FeatureNet
class FeatureNet(nn.Module):
    """Small 3D CNN: conv stages -> global average pool -> ``feature_dim`` embedding -> sex / age heads.

    Stage 0 is one 3x3x3 conv + batch norm + LeakyReLU at full resolution with ``channels[0]`` channels;
    every later stage ``i`` is two such layers with ``channels[i]`` channels, the first with stride 2.
    Batch norm, not instance norm: per-volume normalisation would erase global magnitudes such as brain
    size. Global average pooling makes the trunk shape-agnostic, but ``volume_shape`` is fixed and checked
    so features are always computed at the resolution trained on.

    Args:
        volume_shape: (X, Y, Z) of the input volumes.
        channels: channels per stage, e.g. (8, 16, 32, 64).
        feature_dim: size of the feature vector used by FID / KID / MMD.
        dropout: dropout on the features before the heads (training only).
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        channels: Sequence[int] = (8, 16, 32, 64),
        feature_dim: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        shape = as_shape3(volume_shape)
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels: expected a non-empty sequence of positive integers, got {channels}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim: expected a positive integer, got {feature_dim}")
        if min(shape) < 2 ** (len(channels) - 1):
            raise ValueError(
                f"volume_shape {shape} is too small for {len(channels)} stages: every axis needs >= "
                f"{2 ** (len(channels) - 1)} voxels"
            )
        self.volume_shape = shape
        self.config: dict[str, Any] = {
            "volume_shape": list(shape), "channels": list(channels), "feature_dim": int(feature_dim),
            "dropout": float(dropout),
        }
        layers: list[nn.Module] = []
        c_in = 1
        for i, c in enumerate(channels):
            layers.append(Convolution(3, c_in, c, strides=1 if i == 0 else 2, kernel_size=3, act=_ACT, norm=_NORM))
            if i > 0:  # a second full-resolution conv would cost more than all later stages together
                layers.append(Convolution(3, c, c, strides=1, kernel_size=3, act=_ACT, norm=_NORM))
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, feature_dim), nn.LeakyReLU(0.2)
        )
        self.dropout = nn.Dropout(dropout)
        self.sex_head = nn.Linear(feature_dim, 1)
        self.age_head = nn.Linear(feature_dim, N_AGE_GROUPS)

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, feature_dim)."""
        if x.ndim != 5 or x.shape[1] != 1 or tuple(x.shape[2:]) != self.volume_shape:
            expected = ", ".join(map(str, self.volume_shape))
            raise ValueError(f"FeatureNet expects (B, 1, {expected}) volumes, got {tuple(x.shape)}")
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, Z) -> (sex_logit (B,), age_logits (B, 4)); sex logit > 0 means male."""
        h = self.dropout(self.features(x))
        return self.sex_head(h).squeeze(1), self.age_head(h)


def save_featurenet(model: FeatureNet, path: str | Path) -> None:
    """Write config + weights (loadable with ``torch.load(weights_only=True)``)."""
    torch.save({"config": model.config, "state_dict": model.state_dict()}, Path(path))


def load_featurenet(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Inverse of :func:`save_featurenet`; returns the model in eval mode on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: feature-net checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path}: not a FeatureNet checkpoint (expected keys 'config' and 'state_dict')")
    model = FeatureNet(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------- training
def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Small label-preserving perturbations of a batch (B, 1, X, Y, Z): left-right flip (axis X is R-L in
    RAS; brains are near-symmetric), integer shifts of up to ``max_shift`` voxels per axis, and intensity
    ``scale * x ** gamma`` (keeps background at 0). No spatial scaling: size carries the sex signal.
    Hand-written rather than MONAI transforms to act on whole batches on the device, from one generator."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 3), generator=gen)
    scale = 0.95 + 0.1 * torch.rand(b, generator=gen)
    gamma = 0.95 + 0.1 * torch.rand(b, generator=gen)
    out = torch.where(flip.to(x.device).view(b, 1, 1, 1, 1), x.flip(2), x)
    # Background is ~0 near the box edges, so the wrap-around of roll is harmless for small shifts.
    out = torch.stack([torch.roll(out[i], shifts=tuple(shifts[i].tolist()), dims=(1, 2, 3)) for i in range(b)])
    out = out.clamp_min(0) ** gamma.to(x.device).view(b, 1, 1, 1, 1)
    return out * scale.to(x.device).view(b, 1, 1, 1, 1)


def _loss(model: FeatureNet, x: torch.Tensor, s: torch.Tensor, a: torch.Tensor, age_weight: float) -> torch.Tensor:
    sex_logit, age_logits = model(x)
    return F.binary_cross_entropy_with_logits(sex_logit, s) + age_weight * F.cross_entropy(age_logits, a)


def fit_featurenet(
    train_volumes: np.ndarray | torch.Tensor,
    sex: Any,
    age_group_idx: Any,
    val_volumes: np.ndarray | torch.Tensor | None = None,
    val_sex: Any = None,
    val_age_group_idx: Any = None,
    *,
    channels: Sequence[int] = (8, 16, 32, 64),
    feature_dim: int = 64,
    dropout: float = 0.2,
    epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 8,
    age_weight: float = 1.0,
    seed: int = 0,
    augment: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[FeatureNet, list[dict[str, float]]]:
    """Train a :class:`FeatureNet` on sex (BCE) + ``age_weight`` x age group (cross-entropy), AdamW.

    Args:
        train_volumes: (N, 1, X, Y, Z) (or (N, X, Y, Z)) volumes in [0, 1]; kept in their dtype, cast per batch.
        sex: (N,) 0 = F, 1 = M (see :func:`encode_sex`); age_group_idx: (N,) indices into ``AGE_GROUPS``.
        val_*: optional validation set; when given, the weights of the epoch with the lowest validation loss
            are returned (a cheap early stopping for small cohorts).
        seed: seeds initialisation, batch order, augmentation and dropout (torch's global RNG is restored
            afterwards). Same seed, data and device -> identical weights.

    Returns:
        (model in eval mode on ``device``, history: one dict per epoch with ``epoch``, ``train_loss`` and,
        with a validation set, ``val_loss``, ``val_sex_auc``, ``val_age_acc``).
    """
    x_train = _volume_batch(train_volumes, "train_volumes")
    s_train, a_train = _labels(sex, age_group_idx, len(x_train), "")
    has_val = val_volumes is not None
    if has_val:
        x_val = _volume_batch(val_volumes, "val_volumes")
        s_val, a_val = _labels(val_sex, val_age_group_idx, len(x_val), "val_")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"fit_featurenet: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    dev = resolve_device(str(device))
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        # channels_last_3d: NCDHW conv3d backward with 8 channels is ~15x slower on CPU (BENCHMARKS.md).
        model = FeatureNet(tuple(x_train.shape[2:]), channels, feature_dim, dropout).to(dev)
        model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        history: list[dict[str, float]] = []
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for epoch in range(1, epochs + 1):
            model.train()
            batches = torch.randperm(len(x_train), generator=gen).split(batch_size)
            if len(batches) > 1 and len(batches[-1]) < 2:
                batches = batches[:-1]  # a one-volume batch gives batch norm degenerate statistics
            total, seen = 0.0, 0
            for idx in batches:
                xb = x_train[idx].to(dev, torch.float32)
                if augment:
                    xb = _augment(xb, gen)
                loss = _loss(model, xb, s_train[idx].to(dev), a_train[idx].to(dev), age_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
            row: dict[str, float] = {"epoch": float(epoch), "train_loss": total / seen}
            if has_val:
                ev = evaluate_featurenet(model, x_val, s_val, a_val, device=dev, age_weight=age_weight)
                row.update({"val_loss": ev["loss"], "val_sex_auc": ev["sex_auc"], "val_age_acc": ev["age_acc"]})
                if best is None or ev["loss"] < best[0]:
                    best = (ev["loss"], copy.deepcopy(model.state_dict()))
            history.append(row)
        if best is not None:
            model.load_state_dict(best[1])
    return model.eval(), history


# ------------------------------------------------------------------------------------ inference, eval
@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    volumes: np.ndarray | torch.Tensor,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Features of ``volumes`` ((N, 1, X, Y, Z) or (N, X, Y, Z), any float dtype) in batches -> (N, F) float64.

    An ``nn.Module`` extractor is put in eval mode (batch-norm running stats, no dropout) and moved to ``device``.
    """
    if not isinstance(extractor, FeatureExtractor):
        raise ValueError(f"extractor: {type(extractor).__name__} has no features(x) method")
    dev = torch.device(device)
    if isinstance(extractor, nn.Module):
        extractor.eval().to(dev)
    n = len(volumes)
    if n == 0:
        raise ValueError("extract_features: no volumes")
    chunks = [
        extractor.features(_volume_batch(volumes[i : i + batch_size]).to(dev, torch.float32)).double().cpu()
        for i in range(0, n, batch_size)
    ]
    return torch.cat(chunks).numpy()


@dataclass(frozen=True)
class AttributePredictions:
    """Feature-net predictions for N volumes."""

    p_male: np.ndarray  # (N,) probability of male
    age_probs: np.ndarray  # (N, 4) probabilities over AGE_GROUPS

    @property
    def predicted_male(self) -> np.ndarray:
        return self.p_male > 0.5

    @property
    def predicted_age_group(self) -> np.ndarray:
        return self.age_probs.argmax(1)


@torch.no_grad()
def predict_attributes(
    model: FeatureNet, volumes: np.ndarray | torch.Tensor, batch_size: int = 16, device: str | torch.device = "cpu"
) -> AttributePredictions:
    """Sex and age-group probabilities for ``volumes`` ((N, 1, X, Y, Z) or (N, X, Y, Z))."""
    dev = torch.device(device)
    model.eval().to(dev)
    sex, age = [], []
    for i in range(0, len(volumes), batch_size):
        s, a = model(_volume_batch(volumes[i : i + batch_size]).to(dev, torch.float32))
        sex.append(torch.sigmoid(s).double().cpu())
        age.append(torch.softmax(a, dim=1).double().cpu())
    return AttributePredictions(torch.cat(sex).numpy(), torch.cat(age).numpy())


def evaluate_featurenet(
    model: FeatureNet,
    volumes: np.ndarray | torch.Tensor,
    sex: Any,
    age_group_idx: Any,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    age_weight: float = 1.0,
) -> dict[str, float]:
    """Held-out performance: ``loss`` (training objective), ``sex_auc`` (NaN if one sex only), ``sex_acc``,
    ``age_acc`` (4-class accuracy) and ``age_mae_groups`` (mean |predicted - true| group index)."""
    x = _volume_batch(volumes)
    s, a = _labels(sex, age_group_idx, len(x), "")
    pred = predict_attributes(model, x, batch_size, device)
    eps = 1e-7
    p = np.clip(pred.p_male, eps, 1 - eps)
    s_np, a_np = s.numpy().astype(np.float64), a.numpy()
    bce = -np.mean(s_np * np.log(p) + (1 - s_np) * np.log(1 - p))
    ce = -np.mean(np.log(np.clip(pred.age_probs[np.arange(len(a_np)), a_np], eps, None)))
    return {
        "loss": float(bce + age_weight * ce),
        "sex_auc": float(roc_auc_score(s_np, pred.p_male)) if len(np.unique(s_np)) == 2 else float("nan"),
        "sex_acc": float(np.mean(pred.predicted_male == (s_np == 1))),
        "age_acc": float(np.mean(pred.predicted_age_group == a_np)),
        "age_mae_groups": float(np.mean(np.abs(pred.predicted_age_group - a_np))),
    }


# ------------------------------------------------------------------------------------------ MedicalNet
MEDICALNET_DEPTHS: tuple[int, ...] = (10, 18)
# Heads of MedicalNet's segmentation / classification checkpoints; not part of the feature extractor.
_HEAD_PREFIXES = ("conv_seg.", "fc.")


def _dilate_like_medicalnet(net: ResNet) -> None:
    """MedicalNet keeps layer3/layer4 at layer2's resolution (stride 1, dilation 2 and 4) where MONAI's
    ResNet downsamples; patch the convolutions in place (same weight shapes, so same state_dict)."""
    for layer, d in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            block.conv1.stride = (1, 1, 1)
            block.stride = 1
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (d, d, d), (d, d, d)
            ds = block.downsample
            if isinstance(ds, nn.Sequential):  # shortcut B: 1x1x1 conv + norm
                ds[0].stride = (1, 1, 1)
            elif isinstance(ds, functools.partial):  # shortcut A: strided average pool + zero channels
                block.downsample = functools.partial(ds.func, *ds.args, **{**ds.keywords, "stride": 1})


def medicalnet_resnet(depth: int = 10, dilated: bool = True) -> ResNet:
    """A MedicalNet-shaped 3D ResNet (randomly initialised): conv1 7^3 stride 2, BN, ReLU, max-pool,
    layer1-4, global average pooling, no head -> (B, 512). Shortcut type and downsample bias follow
    MedicalNet's released weights (ResNet-10: B without bias; ResNet-18: A). ``dilated`` reproduces
    MedicalNet's stride-1 dilated layer3/layer4; False gives MONAI's classification layout."""
    if depth not in MEDICALNET_DEPTHS:
        raise ValueError(f"MedicalNet depth must be one of {MEDICALNET_DEPTHS}, got {depth}")
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    build = {10: resnet10, 18: resnet18}[depth]
    net = build(
        spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, feed_forward=False,
        shortcut_type=shortcut_type, bias_downsample=bias_downsample,
    )
    if dilated:
        _dilate_like_medicalnet(net)
    return net


class MedicalNetFeatures(nn.Module):
    """:class:`FeatureExtractor` around a MedicalNet ResNet: (B, 1, X, Y, Z) -> (B, 512).

    With ``normalize`` each volume is z-scored over its voxels > 0, as MedicalNet's preprocessing does; the
    background is set to 0 (MedicalNet fills it with N(0, 1) noise: 0 is its deterministic mean).
    """

    def __init__(self, backbone: ResNet, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.normalize = normalize

    @staticmethod
    def zscore_foreground(x: torch.Tensor) -> torch.Tensor:
        fg = (x > 0).to(x.dtype)
        n = fg.flatten(1).sum(1).clamp_min(1).view(-1, 1, 1, 1, 1)
        mean = (x * fg).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / n
        var = (((x - mean) * fg) ** 2).flatten(1).sum(1).view(-1, 1, 1, 1, 1) / n
        return (x - mean) / var.sqrt().clamp_min(1e-6) * fg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"MedicalNet expects (B, 1, X, Y, Z) volumes, got {tuple(x.shape)}")
        return self.backbone(self.zscore_foreground(x) if self.normalize else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_medicalnet(
    path: str | Path, depth: int = 10, dilated: bool = True, normalize: bool = True
) -> MedicalNetFeatures:
    """Load MedicalNet weights (e.g. ``resnet_10_23dataset.pth``) from a local file into a feature extractor.

    Accepts a checkpoint ``{"state_dict": ...}`` or a bare state dict; strips DataParallel's ``module.``
    prefix and drops head weights (``conv_seg.*``, ``fc.*``). Every remaining key must match the backbone
    exactly (names and shapes; absent BN ``num_batches_tracked`` counters are tolerated), otherwise
    ValueError. Loaded with ``torch.load(weights_only=True)``.

    Returns:
        :class:`MedicalNetFeatures` in eval mode on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: MedicalNet weights file not found (download resnet_{depth}*.pth yourself)")
    net = medicalnet_resnet(depth, dilated)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling / zip errors have many types
        raise ValueError(f"{path}: not a loadable PyTorch weights file ({type(err).__name__}: {err})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (or {{'state_dict': ...}}) of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = net.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 have no BN step counters; they only matter in training.
    state.update({k: v for k, v in expected.items() if k.endswith("num_batches_tracked") and k not in state})
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:

        def some(keys: list[str]) -> str:
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"

        raise ValueError(
            f"{path}: keys do not match a MedicalNet ResNet-{depth}: missing {some(missing)}, unexpected "
            f"{some(unexpected)}, wrong shape {some(wrong)} (is depth={depth} right?)"
        )
    net.load_state_dict(state, strict=True)
    return MedicalNetFeatures(net, normalize).eval()
