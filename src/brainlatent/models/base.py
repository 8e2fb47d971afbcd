"""The family-agnostic latent-model interface and the family registry.

Everything downstream of training (latent directions, traversals, reconstructions) talks to a
:class:`LatentModel` only: ``encode`` maps volumes to flat vectors, ``decode`` maps vectors back to volumes.
Families whose ``encode`` is an optimisation (``inverts``: the GANs) take its options through the same call.
A checkpoint is ``{"family", "config", "state_dict"}``; :func:`build_model` rebuilds the module from the
JSON-able config (the constructor's keyword arguments) without pickling code.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from brainlatent.models.layers import Shape3

# Family name -> module that registers it on import (so build_model works without importing every family).
_FAMILY_MODULES = {
    "ae": "brainlatent.models.autoencoder",
    "vae": "brainlatent.models.vae",
    "gan": "brainlatent.models.gan",
    "stylegan": "brainlatent.models.stylegan",
}

MODEL_FAMILIES: dict[str, type["LatentModel"]] = {}


class LatentModel(nn.Module, abc.ABC):
    """A model with a vector latent space for 3D volumes.

    Subclasses set the class attribute ``family`` and the instance attributes ``latent_dim`` and
    ``volume_shape`` (X, Y, Z), and implement :meth:`encode`, :meth:`decode` and :meth:`config_dict`.
    Generative families (``generative = True``) also implement :meth:`sample`. Families whose ``encode`` is an
    inversion (``inverts = True``) take its options in ``encode``; families with several latent spaces list
    them in ``latent_spaces``, the default first.
    """

    family: ClassVar[str]
    generative: ClassVar[bool] = False
    inverts: ClassVar[bool] = False
    latent_spaces: ClassVar[tuple[str, ...]] = ("z",)
    latent_dim: int
    volume_shape: Shape3

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, *, space: str | None = None, **inversion_kwargs: Any) -> torch.Tensor:
        """(B, 1, X, Y, Z) volumes in [0, 1] -> (B, D) flat latent vectors, in the same call for every family.

        ``space``: one of :attr:`latent_spaces` (None: the first), e.g. StyleGAN's ``"w"`` (D = w_dim) or
        ``"w+"`` (D = n_layers * w_dim, flattened). A family that does not invert encodes in one pass,
        deterministically, and refuses inversion options; one that inverts (``inverts``) optimises the latent,
        ``inversion_kwargs`` (``steps``, ``lr``, ``compute_ssim``, ...) going to
        :func:`brainlatent.inversion.invert`. Check both with :meth:`check_encode_options`.
        """

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) latent vectors -> (B, 1, X, Y, Z) volumes in [0, 1]."""

    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The constructor's keyword arguments, JSON-serialisable: ``build_model(family, config)`` rebuilds."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes (n, 1, X, Y, Z) drawn from the model; only for generative families."""
        raise NotImplementedError(f"family {self.family!r} is not generative: it has no sample()")

    # -- helpers shared by the families ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_volumes(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, 1, *volume_shape)."""
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, *self.volume_shape):
            raise ValueError(
                f"{type(self).__name__}: expected volumes of shape (B, 1, {', '.join(map(str, self.volume_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def check_encode_options(self, space: str | None, inversion_kwargs: Mapping[str, Any]) -> str:
        """The latent space :meth:`encode` was asked for (None: the family's default, ``latent_spaces[0]``).

        Raises ValueError for a space the family does not have, or inversion options given to a family that
        does not invert.
        """
        name = type(self).__name__
        space = self.latent_spaces[0] if space is None else space
        if space not in self.latent_spaces:
            raise ValueError(f"{name}.encode: space {space!r} is not one of this family's {list(self.latent_spaces)}")
        if inversion_kwargs and not self.inverts:
            raise ValueError(
                f"{name}.encode: family {self.family!r} encodes in one pass; it takes no inversion options, "
                f"got {sorted(inversion_kwargs)}"
            )
        return space

    def check_latents(self, z: torch.Tensor) -> None:
        """Raise ValueError unless ``z`` is (B, latent_dim)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{type(self).__name__}: expected latents of shape (B, {self.latent_dim}), got {tuple(z.shape)}"
            )

    def prior_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, latent_dim) draws from N(0, I) on the model's device.

        Drawn on the generator's device, then moved: a seeded CPU generator gives the same samples
        whatever device the model lives on.
        """
        if n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n}")
        return randn_on(generator, (n, self.latent_dim), self.device)


def constructor_config(model: "LatentModel", arguments: Mapping[str, Any]) -> dict[str, Any]:
    """What :meth:`LatentModel.config_dict` returns, captured once: the registered class's constructor arguments
    (``arguments`` is ``locals()`` at the end of its ``__init__``), each taken from the model attribute of the
    same name when there is one (the validated value, e.g. ``volume_shape`` as a tuple of ints), sequences as
    lists so that the config is JSON-able."""
    out: dict[str, Any] = {}
    for name in inspect.signature(type(model).__init__).parameters:
        if name == "self":
            continue
        value = getattr(model, name, arguments[name])
        out[name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def randn_on(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """N(0, 1) draws of ``shape`` on ``device``, made on the generator's own device and then moved: a seeded CPU
    generator gives the same numbers whatever device the model lives on (no generator: drawn on ``device``)."""
    return _drawn_on(torch.randn, generator, shape, device)


def rand_on(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """U[0, 1) draws of ``shape`` on ``device``, made on the generator's device like :func:`randn_on`."""
    return _drawn_on(torch.rand, generator, shape, device)


def _drawn_on(draw: Callable[..., torch.Tensor], generator: torch.Generator | None, shape: tuple[int, ...],
              device: torch.device | str) -> torch.Tensor:
    draw_on = generator.device if generator is not None else device
    return draw(shape, generator=generator, device=draw_on).to(device)


def register_family(cls: type[LatentModel]) -> type[LatentModel]:
    """Class decorator: add ``cls`` to :data:`MODEL_FAMILIES` under ``cls.family``."""
    name = getattr(cls, "family", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}: a registered LatentModel needs a class attribute 'family'")
    existing = MODEL_FAMILIES.get(name)
    # Same qualified name: a module reload (e.g. importlib.reload in a notebook), not a clash.
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"family {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    MODEL_FAMILIES[name] = cls
    return cls


def get_family(family: str) -> type[LatentModel]:
    """The LatentModel class of ``family``, importing its module on first use."""
    if family not in MODEL_FAMILIES and family in _FAMILY_MODULES:
        importlib.import_module(_FAMILY_MODULES[family])
    if family not in MODEL_FAMILIES:
        known = sorted(set(MODEL_FAMILIES) | set(_FAMILY_MODULES))
        raise ValueError(f"model family: unknown {family!r}; expected one of {known}")
    return MODEL_FAMILIES[family]


def build_model(family: str, config: Mapping[str, Any]) -> LatentModel:
    """Instantiate ``family`` from its ``config_dict()`` (e.g. read back from a JSON checkpoint)."""
    cls = get_family(family)
    if not isinstance(config, Mapping):
        raise ValueError(f"{family} model config: expected a mapping of constructor arguments, got {config!r}")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(config) - set(params) - {"self"})
    if unknown:
        expected = [p for p in params if p != "self"]
        raise ValueError(f"{family} model config: unknown key(s) {unknown}; expected some of {expected}")
    try:
        return cls(**dict(config))
    except TypeError as err:  # a value of the wrong type (read from a file), e.g. latent_dim "8"
        raise ValueError(f"{family} model config {dict(config)}: {err}") from None


def model_checkpoint(model: LatentModel) -> dict[str, Any]:
    """``{"family", "config", "state_dict"}``: everything :func:`load_model` needs, no code pickled."""
    return {"family": model.family, "config": model.config_dict(), "state_dict": model.state_dict()}


def load_model(checkpoint: Mapping[str, Any], map_location: str | torch.device | None = "cpu") -> LatentModel:
    """Rebuild a model from :func:`model_checkpoint`'s dict and load its weights (eval mode)."""
    missing = [k for k in ("family", "config", "state_dict") if k not in checkpoint]
    if missing:
        raise ValueError(f"model checkpoint: missing key(s) {missing}; expected family, config, state_dict")
    model = build_model(checkpoint["family"], checkpoint["config"])
    if not isinstance(checkpoint["state_dict"], Mapping):
        got = type(checkpoint["state_dict"]).__name__
        raise ValueError(f"model checkpoint: state_dict must map names to tensors, got a {got}")
    state = {k: v.to(map_location) if map_location is not None else v for k, v in checkpoint["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing / unexpected keys, size mismatches: torch lists them all
        family = checkpoint["family"]
        raise ValueError(f"model checkpoint: the {family} weights do not match its config ({err})") from None
    if map_location is not None:
        model.to(map_location)
    return model.eval()
