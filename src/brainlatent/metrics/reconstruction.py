"""Reconstruction metrics (MSE, PSNR, 3D SSIM) of volumes in [0, 1], computed with MONAI.

Inputs are ``(B, 1, X, Y, Z)`` tensors or arrays (reconstructions, targets). Per-volume values come from
:func:`reconstruction_per_volume`; the registry functions :func:`mse`, :func:`psnr`, :func:`ssim` return
the mean over volumes. ``data_range`` is 1 (the processed-volume contract); values outside [0, 1] are not
clipped, so a decoder that overshoots is penalised rather than hidden.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import MSEMetric, PSNRMetric, SSIMMetric

DATA_RANGE = 1.0


def ssim_window(shape: tuple[int, ...]) -> tuple[int, float]:
    """(window size, Gaussian sigma) for 3D SSIM: the standard 11/1.5 when every axis has >= 11 voxels, 7/1.0
    on smaller volumes (MONAI's SSIM uses a 'valid' convolution, so the window must fit the volume)."""
    smallest = min(int(s) for s in shape)
    if smallest >= 11:
        return 11, 1.5
    if smallest >= 7:
        return 7, 1.0
    raise ValueError(f"SSIM: volume shape {tuple(shape)} is too small; every axis needs at least 7 voxels")


def _pair(
    reconstructions: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for name, x in (("reconstructions", reconstructions), ("targets", targets)):
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.ndim != 5 or t.shape[1] != 1:
            raise ValueError(f"{name}: expected volumes of shape (B, 1, X, Y, Z), got {tuple(t.shape)}")
        t = t.float().cpu()
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: volumes contain NaN or inf")
        out.append(t)
    if out[0].shape != out[1].shape:
        raise ValueError(
            "reconstructions and targets must have the same shape, "
            f"got {tuple(out[0].shape)} and {tuple(out[1].shape)}"
        )
    return out[0], out[1]


def _metric(name: str, shape: tuple[int, ...]):
    if name == "mse":
        return MSEMetric(reduction="none")
    if name == "psnr":
        return PSNRMetric(max_val=DATA_RANGE, reduction="none")
    win, sigma = ssim_window(shape)
    return SSIMMetric(spatial_dims=3, data_range=DATA_RANGE, win_size=win, kernel_sigma=sigma, reduction="none")


def reconstruction_per_volume(
    reconstructions: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
    names: tuple[str, ...] = ("mse", "psnr", "ssim"),
    batch_size: int = 16,
) -> dict[str, np.ndarray]:
    """Per-volume MSE, PSNR (dB, data_range 1; inf for a perfect reconstruction) and 3D SSIM.

    Args:
        reconstructions, targets: (B, 1, X, Y, Z) in [0, 1].
        names: which of ``mse``, ``psnr``, ``ssim`` to compute.
        batch_size: volumes per chunk (bounds the memory of SSIM's five 3D convolutions).

    Returns:
        ``{name: (B,) float64 array}`` for each requested name.
    """
    unknown = sorted(set(names) - {"mse", "psnr", "ssim"})
    if unknown:
        raise ValueError(f"reconstruction_per_volume: unknown metric(s) {unknown}; expected mse, psnr, ssim")
    pred, target = _pair(reconstructions, targets)
    metrics = {name: _metric(name, tuple(pred.shape[2:])) for name in names}
    out: dict[str, list[torch.Tensor]] = {k: [] for k in metrics}
    with torch.no_grad():
        for start in range(0, pred.shape[0], batch_size):
            p, t = pred[start : start + batch_size], target[start : start + batch_size]
            for name, metric in metrics.items():
                out[name].append(metric(p, t).reshape(-1))
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def mse(reconstructions: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> dict[str, float]:
    """``{"mse": mean over volumes of the voxel-wise mean squared error}``."""
    return {"mse": float(reconstruction_per_volume(reconstructions, targets, ("mse",))["mse"].mean())}


def psnr(reconstructions: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> dict[str, float]:
    """``{"psnr": mean over volumes of per-volume PSNR in dB}`` (data_range 1; inf if any volume is exact)."""
    return {"psnr": float(reconstruction_per_volume(reconstructions, targets, ("psnr",))["psnr"].mean())}


def ssim(reconstructions: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> dict[str, float]:
    """``{"ssim": mean over volumes of 3D SSIM}`` (Gaussian window, see :func:`ssim_window`)."""
    return {"ssim": float(reconstruction_per_volume(reconstructions, targets, ("ssim",))["ssim"].mean())}
