"""Bad model-side input is a ValueError naming the thing (issue #10): corrupt or mismatched checkpoints and
registered models, model URIs and versions that do not exist, latents of the wrong size, and scans or
settings `traverse` cannot handle. A scan of another shape or orientation is not an error: it is
preprocessed onto the model's grid like `prepare` does, which the last test checks.

Complements test_security.py (pickles, truncated checkpoints), test_train.py (unknown model name, malformed
URI) and test_directions_stage.py (unknown / mismatched directions, 4D scans, unset alias)."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_SHAPE

from brainlatent import registry, tracking
from brainlatent.directions import Direction
from brainlatent.directions.scan import traverse_scan
from brainlatent.models.base import build_model, load_model, model_checkpoint
from brainlatent.train.checkpoint import load_checkpoint, save_atomic

AE_CONFIG = {"latent_dim": 4, "volume_shape": list(TINY_SHAPE), "base_channels": 2, "max_channels": 4}
FAMILY_CONFIGS = {
    "ae": AE_CONFIG,
    "vae": AE_CONFIG,
    "gan": {"latent_dim": 4, "volume_shape": list(TINY_SHAPE), "g_base_channels": 2, "g_max_channels": 4,
            "d_base_channels": 2, "d_max_channels": 4},
    "stylegan": {"volume_shape": list(TINY_SHAPE), "z_dim": 4, "w_dim": 4, "n_mapping": 1, "base_channels": 4,
                 "max_channels": 4},
}
WIDER = {**AE_CONFIG, "latent_dim": 8}
URI = "models:/brainlatent-ae/1"


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_errors_name_the_file_and_the_problem(tmp_path):
    model = build_model("ae", AE_CONFIG)
    cases = {
        "number.pt": (lambda p: torch.save(5, p), r"number\.pt holds a 'int', not a brainlatent training"),
        "tensor.pt": (lambda p: torch.save(torch.ones(3), p), r"tensor\.pt holds a 'Tensor'"),
        # A registered model's weights.pt is a bare state_dict, not a resumable training checkpoint.
        "weights.pt": (lambda p: torch.save(model.state_dict(), p),
                       r"weights\.pt lacks \['config', 'epoch', 'family', 'model'\]"),
        "empty.pt": (lambda p: p.write_bytes(b""), r"empty\.pt is corrupt or not a brainlatent checkpoint"),
    }
    for name, (write, message) in cases.items():
        write(tmp_path / name)
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="gone.pt does not exist"):
        load_checkpoint(tmp_path / "gone.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(FileNotFoundError, match="folder.pt is not a file"):
        load_checkpoint(tmp_path / "folder.pt")
    # The well-formed checkpoint still loads.
    save_atomic({"model": model.state_dict(), "epoch": 1, "config": {}, "family": "ae"}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["epoch"] == 1


def test_model_checkpoint_that_does_not_match_its_config_is_named():
    checkpoint = model_checkpoint(build_model("ae", AE_CONFIG))
    with pytest.raises(ValueError, match=r"(?s)the ae weights do not match its config .*size mismatch for encoder"):
        load_model({**checkpoint, "config": WIDER})
    with pytest.raises(ValueError, match=r"the vae weights do not match its config"):
        load_model({**checkpoint, "family": "vae"})  # another family's architecture
    with pytest.raises(ValueError, match=r"ae model config: expected a mapping of constructor arguments"):
        load_model({**checkpoint, "config": [1, 2]})
    with pytest.raises(ValueError, match=r"ae model config \{'latent_dim': 'eight'"):
        load_model({**checkpoint, "config": {**AE_CONFIG, "latent_dim": "eight"}})
    with pytest.raises(ValueError, match=r"state_dict must map names to tensors, got a Tensor"):
        load_model({**checkpoint, "state_dict": torch.ones(3)})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['state_dict'\]"):
        load_model({"family": "ae", "config": AE_CONFIG})


# ------------------------------------------------------------------------------------- latents
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_latents_and_volumes_of_the_wrong_size_name_the_expected_shape(family):
    model = build_model(family, FAMILY_CONFIGS[family]).eval()
    d = model.latent_dim
    for bad in (torch.zeros(2, d + 1), torch.zeros(d)):
        got = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=rf"expected (W )?latents (of shape )?\(B, {d}\).*got {got}"):
            model.decode(bad)
    with pytest.raises(ValueError, match=r"expected volumes of shape \(B, 1, 16, 16, 16\), got \(1, 1, 8, 8, 8\)"):
        model.encode(torch.zeros(1, 1, 8, 8, 8))


# -------------------------------------------------------------------------------- registered models
@pytest.fixture
def registered(project) -> Path:
    """A tiny ae registered as brainlatent-ae version 1 (alias candidate); returns its artifact folder."""
    tracking.configure(project)
    model = build_model("ae", AE_CONFIG)
    with mlflow.start_run(experiment_id=tracking.experiment_id("bad-input", project)):
        registry.log_and_register(model, "ae", model.config_dict(), {"val/mse": 0.1})
    (weights,) = project.glob("mlartifacts/**/artifacts/weights.pt")
    return weights.parent


def _meta(folder: Path, **changes) -> str:
    return json.dumps({**json.loads((folder / "config.json").read_text()), **changes})


TAMPERED = {
    "truncated weights": ("weights.pt", lambda f: (f / "weights.pt").read_bytes()[:200],
                          r"weights\.pt: not a valid weights file"),
    "weights of another size": ("weights.pt", lambda f: _torch_bytes(build_model("ae", WIDER).state_dict()),
                                r"weights do not match its config\.json .*size mismatch"),
    "a tensor, not a state_dict": ("weights.pt", lambda f: _torch_bytes(torch.ones(3)),
                                   r"weights\.pt: expected a state_dict \(names -> tensors\), got a Tensor"),
    "broken JSON": ("config.json", lambda f: "{family: ae", r"config\.json is not valid JSON"),
    "no family": ("config.json", lambda f: json.dumps({"format_version": 1, "config": AE_CONFIG}),
                  r"config\.json must hold an object with 'family'"),
    "unknown family": ("config.json", lambda f: _meta(f, family="transformer"),
                       r"model family: unknown 'transformer'"),
    "newer format": ("config.json", lambda f: _meta(f, format_version=2),
                     r"config\.json has format_version 2; this brainlatent reads format 1"),
    "bad config value": ("config.json", lambda f: _meta(f, config={**AE_CONFIG, "latent_dim": "4"}),
                         r"ae model config .*'latent_dim': '4'"),
}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_tampered_registered_model_names_the_uri_version_and_file(registered):
    assert str(registry.load_model(URI).version) == "1"  # intact, it loads
    for case, (name, content, message) in TAMPERED.items():
        path = registered / name
        original = path.read_bytes()
        new = content(registered)
        path.write_bytes(new if isinstance(new, bytes) else new.encode())
        try:
            with pytest.raises(ValueError, match=rf"(?s)^model '{URI}' \(version 1\): .*{message}") as err:
                registry.load_model(URI)
        finally:
            path.write_bytes(original)
        assert "Traceback" not in str(err.value), case
    (registered / "weights.pt").unlink()
    with pytest.raises(ValueError, match=rf"model '{URI}' \(version 1\): artifact weights.pt is missing"):
        registry.load_model(URI)


def test_uri_version_and_alias_that_do_not_exist(registered):
    with pytest.raises(ValueError, match=r"'brainlatent-ae' has no version 7"):
        registry.load_model("models:/brainlatent-ae/7")
    with pytest.raises(ValueError, match=r"alias 'gold' is not set on 'brainlatent-ae' \(aliases set: \['candidate'\]\)"):
        registry.load_model("models:/brainlatent-ae@gold")
    with pytest.raises(ValueError, match=r"no registered model named 'brainlatent-vae' in the store sqlite:///.*; "
                                         r"registered: \['brainlatent-ae"):
        registry.load_model("models:/brainlatent-vae@champion")


# ------------------------------------------------------------------------------------- traverse
def _ellipsoid_ras(shape=(40, 48, 40), voxel=4.0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-extracted phantom with a left-right intensity gradient on a RAS grid centred near 0."""
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(shape) - 1) / 2 + (3.0, -10.0, 12.0)
    idx = np.moveaxis(np.indices(shape, dtype=float), 0, -1) - (np.asarray(shape) - 1) / 2
    inside = ((idx / (0.35 * np.asarray(shape))) ** 2).sum(-1) <= 1
    return np.where(inside, 100.0 + idx[..., 0], 0.0).astype(np.float32), affine


def _direction(tmp_path: Path, dim: int = 4) -> Path:
    return Direction("sex", np.eye(dim)[0], step_sd=1.0, center=0.0, positive="male", logit_per_sd=1.0,
                     metadata={"model_name": "brainlatent-ae", "model_version": "1"}).save(tmp_path / "sex.json")


def _scan(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _singular(path: Path) -> Path:
    """A file whose sform is singular (nibabel will not build such an image, but files like it exist)."""
    data, _ = _ellipsoid_ras()
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = np.diag([4.0, 0.0, 4.0, 1.0])[:3]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    return path


def test_traverse_names_what_it_cannot_handle(registered, tiny_params, project, tmp_path):
    direction = str(_direction(tmp_path))
    data, affine = _ellipsoid_ras()
    good = _scan(tmp_path / "good.nii.gz", data, affine)
    run = dict(params=tiny_params, root=project)
    out = tmp_path / "out"

    bad_scans = {
        "singular.nii.gz": (_singular, r"singular\.nii\.gz: cannot preprocess .*invalid affine \(singular"),
        "slice.nii.gz": (lambda p: _scan(p, data[:, :, 20], affine), r"slice\.nii\.gz: cannot preprocess .*"
                                                                      r"image of shape \(40, 48\); expected a 3D"),
        "nan.nii.gz": (lambda p: _scan(p, np.where(data > 0, data, np.nan), affine),
                       r"nan\.nii\.gz: cannot preprocess .*NaN/Inf voxel"),
        "empty.nii.gz": (lambda p: _scan(p, -np.abs(data), affine), r"empty\.nii\.gz: .*no positive voxels"),
    }
    for name, (make, message) in bad_scans.items():
        with pytest.raises(ValueError, match=message):
            traverse_scan(URI, make(tmp_path / name), direction, [1.0], out, **run)
    with pytest.raises(ValueError, match=r"input scan not found: .*nowhere\.nii\.gz"):
        traverse_scan(URI, tmp_path / "nowhere.nii.gz", direction, [1.0], out, **run)
    with pytest.raises(ValueError, match=r"direction file not found: .*missing\.json"):
        traverse_scan(URI, good, str(tmp_path / "missing.json"), [1.0], out, **run)
    with pytest.raises(ValueError, match=r"steps: expected one or more finite numbers"):
        traverse_scan(URI, good, direction, [1.0, float("nan")], out, **run)
    # The model's grid and the params' grid disagree: preprocessing would feed the model the wrong shape.
    other = dataclasses.replace(tiny_params, data=dataclasses.replace(tiny_params.data, shape=(16, 16, 24)))
    with pytest.raises(ValueError, match=r"models:/brainlatent-ae/1 expects volumes of shape \(16, 16, 16\), but "
                                         r"params data.shape is \(16, 16, 24\)"):
        traverse_scan(URI, good, direction, [1.0], out, params=other, root=project)
    # A direction fitted in another latent space (here 6-D) cannot move a 4-D latent.
    (tmp_path / "wrong").mkdir()
    wrong = _direction(tmp_path / "wrong", dim=6)
    with pytest.raises(ValueError, match=r"direction 'sex' has 6 dimensions but .*ae z \(4 dimensions\)"):
        traverse_scan(URI, good, str(wrong), [1.0], out, **run)
    assert not out.exists()  # every check ran before anything was written


def test_traverse_preprocesses_a_scan_of_another_shape_and_orientation(registered, tiny_params, project, tmp_path):
    """Not an error: the same brain stored with permuted, flipped axes (another array shape) gives the same
    preprocessed input and the same decoded steps."""
    data, affine = _ellipsoid_ras()
    ras = _scan(tmp_path / "ras.nii.gz", data, affine)
    o = np.array([[1, -1], [2, 1], [0, -1]], dtype=float)  # array axes -> (A flipped, S, R flipped)
    restored = nib.orientations.apply_orientation(data, o)
    assert restored.shape != data.shape
    other = _scan(tmp_path / "psl.nii.gz", restored, affine @ nib.orientations.inv_ornt_aff(o, data.shape))
    direction = str(_direction(tmp_path))
    outs = []
    for scan in (ras, other):
        out = tmp_path / scan.name.split(".")[0]
        traverse_scan(URI, scan, direction, [-1.0, 1.0], out, params=tiny_params, root=project)
        outs.append(out)
    a, b = (nib.load(o / "input.nii.gz") for o in outs)
    assert a.shape == b.shape == TINY_SHAPE
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-3)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    assert a.get_fdata().max() > 0.9  # the brain is there, normalised
    for step in ("sex_step00_-1.00sd.nii.gz", "sex_step01_+1.00sd.nii.gz"):
        np.testing.assert_allclose(nib.load(outs[0] / step).get_fdata(), nib.load(outs[1] / step).get_fdata(),
                                   atol=1e-3)
