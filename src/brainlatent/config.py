"""Typed configuration: one frozen dataclass per `params.yaml` section.

`params.yaml` is the single source of truth. Every section is validated before any work starts: unknown
keys, wrong types and out-of-range values fail with a message naming the key (``data.shape[1]``) and what
was expected. Variants (Optuna trials, tests) are built with ``dataclasses.replace``, which re-validates.

Validation uses pydantic dataclasses (strict field types, ``extra="forbid"``) rather than hand-written
checks: the error messages already carry the field path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Shape3 = tuple[PositiveInt, PositiveInt, PositiveInt]
Vec3 = tuple[PositiveFloat, PositiveFloat, PositiveFloat]

# Strict: "160" is not an int and 1.5 is not a bool. Strict mode still accepts an int for a float field.
_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)

FAMILIES = ("ae", "vae", "gan", "stylegan")
Family = Literal["ae", "vae", "gan", "stylegan"]


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


# ----------------------------------------------------------------------------------------------- data
@dataclass(config=_STRICT)
class TemplateRecipeConfig:
    """``synth.recipe: template``: the MNI152 2009a T1 warped, keeping the template's own intensities.

    Effect sizes are deliberately larger than in real young adults so that they are detectable with
    ``n_subjects`` brains at the default coarse resolution (docs/synthetic_cohort.md).
    """

    # Sex: males ~10% larger brain volume on average (linear scale 1.10 ** (1/3)), overlapping distributions.
    male_volume_ratio: PositiveFloat = 1.10
    volume_sd: NonNegFloat = 0.05  # SD of log brain volume within each sex
    # Local sex effect, not explained by size: male / female volume ratio of the bilateral temporal poles
    # is 1 + local_sex_effect (negative: smaller in males); a shell around them gives way (~volume-neutral).
    local_sex_effect: Annotated[float, Field(gt=-1)] = 0.25
    # Age: relative lateral-ventricle volume increase per year, and relative cortical GM thinning per year.
    ventricle_growth_per_year: NonNegFloat = 0.06
    gm_thinning_per_year: NonNegFloat = 0.01
    # Nuisance.
    deformation_mm: NonNegFloat = 1.5  # RMS length of the smooth random displacement (~15 mm smooth)
    rotation_deg: NonNegFloat = 2.0  # RMS rotation angle of the rigid misalignment
    translation_mm: NonNegFloat = 2.0  # RMS translation length of the rigid misalignment
    intensity_sd: NonNegFloat = 0.05  # SD of the log global intensity scale
    bias_field: NonNegFloat = 0.1  # SD of the log multiplicative bias field (~40 mm smooth)
    noise_sd: NonNegFloat = 0.02  # Gaussian noise SD, in template units (WM ~ 0.87)


@dataclass(config=_STRICT)
class TissueRecipeConfig:
    """``synth.recipe: tissue``: T1 contrast rendered from the template's GM/WM/CSF probability maps with
    another scanner's tissue intensities, other anatomy variation and other planted effects
    (docs/synthetic_cohort.md, "The tissue cohort")."""

    # Contrast: pure-tissue intensities (scanner units; prepare's percentile normalisation removes the unit).
    # GM/WM 0.60 and CSF/WM 0.19 (the template's: 0.75 and 0.32).
    csf_intensity: PositiveFloat = 250.0
    gm_intensity: PositiveFloat = 780.0
    wm_intensity: PositiveFloat = 1300.0
    tissue_intensity_sd: NonNegFloat = 0.03  # per-subject SD of each tissue's log intensity (contrast drift)
    psf_fwhm_mm: NonNegFloat = 2.5  # partial-volume blur of the scanner's point-spread function
    # Anatomy: brains smaller than the template on average (like native HCP brains), volume-preserving
    # anisotropic head shapes and a right-frontal / left-occipital torque (petalia).
    mean_volume_ratio: PositiveFloat = 0.85  # geometric-mean brain volume / the template's
    male_volume_ratio: PositiveFloat = 1.08
    volume_sd: NonNegFloat = 0.06
    head_shape_sd: NonNegFloat = 0.03  # SD of each axis' log length, volume kept
    torque_mm: float = 2.0  # mean forward shift of the right hemisphere at x = 60 mm (left: backward)
    torque_sd_mm: NonNegFloat = 1.5
    deformation_mm: NonNegFloat = 2.5  # RMS length of the smooth random displacement (~25 mm smooth)
    # Sex, local and size-independent: the occipital poles grow in males by 1 + local_sex_effect (in volume),
    # pushing their surroundings outward, so the brain gains that volume (females unchanged).
    local_sex_effect: Annotated[float, Field(gt=-1)] = 0.30
    # Age: ventricles x exp(g * years); sulcal CSF widening (cortical GM -> CSF from the pial side, frontal
    # lobes ~3x the occipital rate); WM T1 darkening (GM/WM contrast lost per year).
    ventricle_growth_per_year: NonNegFloat = 0.035
    sulcal_widening_per_year: NonNegFloat = 0.008
    wm_contrast_loss_per_year: NonNegFloat = 0.01
    # Nuisance.
    rotation_deg: NonNegFloat = 4.0
    translation_mm: NonNegFloat = 4.0
    intensity_sd: NonNegFloat = 0.2  # SD of the log global intensity scale
    bias_field: NonNegFloat = 0.15  # SD of each term (linear, radial) of a coil-like log gain at 70 mm
    noise_sd: NonNegFloat = 0.03  # Rician noise SD, a fraction of the WM intensity

    @model_validator(mode="after")
    def _t1_contrast(self) -> "TissueRecipeConfig":
        if not self.csf_intensity < self.gm_intensity < self.wm_intensity:
            raise ValueError(
                f"expected T1 contrast csf_intensity < gm_intensity < wm_intensity, got {self.csf_intensity}, "
                f"{self.gm_intensity}, {self.wm_intensity}"
            )
        return self


# Keys that lived at the top of `synth` before the recipes (a clear error instead of "unexpected keyword").
_TEMPLATE_KEYS = frozenset(f.name for f in dataclasses.fields(TemplateRecipeConfig))


@dataclass(config=_STRICT)
class SynthConfig:
    """The synthetic HCP-like cohort (docs/synthetic_cohort.md), made by one of two recipes.

    ``recipe`` picks how brains are made; only that recipe's mapping (``template`` or ``tissue``) is read, and
    both are validated. The other fields are shared.
    """

    recipe: Literal["template", "tissue"] = "template"
    n_subjects: PositiveInt = 160
    out_dir: str = "data/raw/synthetic"
    voxel_mm: PositiveFloat = 2.0  # 0.7 gives HCP's 260x311x260 grid (benchmarks)
    male_fraction: Fraction = 0.5
    age_min: PositiveFloat = 22.0
    age_max: PositiveFloat = 37.0
    template: TemplateRecipeConfig = TemplateRecipeConfig()
    tissue: TissueRecipeConfig = TissueRecipeConfig()
    workers: PositiveInt = 2
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _legacy_layout(cls, values: Any) -> Any:
        # params files written before the recipes kept the template recipe's keys at the top of `synth`:
        # still read (with a warning) when there is no `template` mapping, refused when both are given.
        kwargs = getattr(values, "kwargs", None) or {}
        legacy = sorted(_TEMPLATE_KEYS & set(kwargs))
        if not legacy:
            return values
        if "template" in kwargs:
            raise ValueError(f"{', '.join(legacy)}: belong under synth.template, which is also given")
        logging.getLogger(__name__).warning(
            "synth: %s at the top of `synth` is the old layout; move them under synth.template", ", ".join(legacy)
        )
        rest = {k: v for k, v in kwargs.items() if k not in _TEMPLATE_KEYS}
        return ArgsKwargs(values.args, {**rest, "template": {k: kwargs[k] for k in legacy}})

    @field_validator("template", "tissue", mode="before")
    @classmethod
    def _recipe_mapping(cls, value: Any, info: ValidationInfo) -> Any:
        # Strict mode takes only instances for nested dataclasses; a YAML mapping is validated field by field.
        recipe = TemplateRecipeConfig if info.field_name == "template" else TissueRecipeConfig
        if isinstance(value, dict):
            return recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
        return value

    @model_validator(mode="after")
    def _ages(self) -> "SynthConfig":
        if self.age_max <= self.age_min:
            raise ValueError(f"age_max ({self.age_max}) must be greater than age_min ({self.age_min})")
        if self.tissue.wm_contrast_loss_per_year * (self.age_max - self.age_min) >= 1:
            raise ValueError(
                "tissue.wm_contrast_loss_per_year x (age_max - age_min) must stay below 1 (WM brighter than GM "
                f"at age_max), got {self.tissue.wm_contrast_loss_per_year} x {self.age_max - self.age_min}"
            )
        return self

    @property
    def recipe_config(self) -> TemplateRecipeConfig | TissueRecipeConfig:
        """The selected recipe's settings."""
        return self.template if self.recipe == "template" else self.tissue


@dataclass(config=_STRICT)
class DataConfig:
    """Where the cohort comes from and how `prepare` turns it into training volumes."""

    source: Literal["synthetic", "hcp", "manifest"] = "synthetic"
    # synthetic/hcp: the HCP-layout root folder; manifest: the CSV file.
    path: str = "data/raw/synthetic"
    # hcp only: the unrestricted-data CSV (Subject, Gender, Age, ...); relative to the project root.
    hcp_csv: str | None = None
    hcp_image: Literal["T1w", "MNINonLinear"] = "T1w"
    # Numeric columns of the manifest or the HCP CSV carried into subjects.csv under their own names, e.g.
    # [tiv] or [FS_IntraCranial_Vol]: a skull-based head size to use as directions.size_covariate.
    covariates: tuple[str, ...] = ()
    processed_dir: str = "data/processed"
    shape: Shape3 = (24, 32, 24)
    # Box in mm around each brain's centre of mass; must hold the largest brain (brainstem included).
    fov_mm: Vec3 = (176.0, 224.0, 176.0)
    # Stretch each brain's bounding box to fill the array. Erases head size (the largest sex difference
    # in real data): off by default, offered only for experiments that want it.
    fit_bbox: bool = False
    intensity_percentiles: tuple[NonNegFloat, NonNegFloat] = (0.5, 99.5)
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.7, 0.15, 0.15)
    max_rejected_fraction: Fraction = 0.1
    qc_subjects: PositiveInt = 8
    workers: PositiveInt = 2
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        lo, hi = self.intensity_percentiles
        if not lo < hi <= 100:
            raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {[lo, hi]}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must sum to 1 (train, val, test), got {list(self.split_fractions)}")
        if self.source == "hcp" and not self.hcp_csv:
            raise ValueError("source 'hcp' needs hcp_csv: the path of HCP's unrestricted-data CSV")
        if any(not c.strip() for c in self.covariates) or len(set(self.covariates)) != len(self.covariates):
            raise ValueError(f"covariates must be distinct, non-empty column names, got {list(self.covariates)}")
        return self


# ------------------------------------------------------------------------------------------ training
@dataclass(config=_STRICT)
class TrainConfig:
    """Settings every family's training shares."""

    checkpoint_dir: str = "checkpoints"
    artifact_every: PositiveInt = 5  # log reconstructions / samples every N epochs (and at the end)
    n_fixed: PositiveInt = 4  # fixed validation subjects shown in reconstruction artifacts
    n_samples: PositiveInt = 4  # random samples shown for generative families
    bf16: bool = False  # bf16 autocast (CUDA, and CPUs with fast bf16)
    channels_last: bool = True  # channels_last_3d: avoids a ~15x slower NCDHW conv3d backward on CPU
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU)


class _FamilyConfig:
    """Mixin: split a flat family section into constructor arguments and training settings."""

    MODEL_KEYS: tuple[str, ...] = ()

    def model_kwargs(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.MODEL_KEYS}


_AE_MODEL_KEYS = ("latent_dim", "arch", "hidden", "base_channels", "max_channels", "min_bottleneck", "norm")


@dataclass(config=_STRICT)
class AEConfig(_FamilyConfig):
    """Vanilla 3D autoencoder (models/autoencoder.py): dense or convolutional."""

    MODEL_KEYS = _AE_MODEL_KEYS
    latent_dim: PositiveInt = 64
    arch: Literal["conv", "dense"] = "dense"  # dense at the CPU-budget grid, conv at research scale (measured)
    hidden: tuple[PositiveInt, ...] = (256,)  # dense: hidden widths; [] = linear
    base_channels: PositiveInt = 8
    max_channels: PositiveInt = 64
    min_bottleneck: PositiveInt = 4
    norm: Literal["group", "layer", "none"] = "group"
    epochs: PositiveInt = 40  # 20 underfits (docs/architecture.md)
    batch_size: PositiveInt = 4
    lr: PositiveFloat = 2e-3
    weight_decay: NonNegFloat = 0.0
    lr_min_ratio: Fraction = 0.05  # cosine decay to lr * lr_min_ratio over the run


@dataclass(config=_STRICT)
class VAEConfig(_FamilyConfig):
    """Variational autoencoder (models/vae.py): beta-weighted KL with a linear warm-up."""

    MODEL_KEYS = (*_AE_MODEL_KEYS, "beta", "kl_warmup_epochs", "recon_sigma")
    latent_dim: PositiveInt = 64
    arch: Literal["conv", "dense"] = "dense"
    hidden: tuple[PositiveInt, ...] = (256,)
    base_channels: PositiveInt = 8
    max_channels: PositiveInt = 64
    min_bottleneck: PositiveInt = 4
    norm: Literal["group", "layer", "none"] = "group"
    beta: NonNegFloat = 1.0
    kl_warmup_epochs: NonNegFloat = 8.0  # KL weight ramps linearly from 0 to beta over this many epochs
    recon_sigma: PositiveFloat = 0.1  # Gaussian likelihood SD in normalised intensity units
    epochs: PositiveInt = 50  # the KL term slows fitting (docs/architecture.md)
    batch_size: PositiveInt = 4
    lr: PositiveFloat = 2e-3
    weight_decay: NonNegFloat = 0.0
    lr_min_ratio: Fraction = 0.05


def _known_augment(value: str) -> str:
    from brainlatent.train.augment import parse_policy

    parse_policy(value)  # ValueError naming the unknown transform; pydantic names the field
    return value


# Differentiable augmentation of what a critic sees: "" or a comma-separated subset of train/augment.POLICIES.
AugmentPolicy = Annotated[str, AfterValidator(_known_augment)]


@dataclass(config=_STRICT)
class GANConfig(_FamilyConfig):
    """DCGAN-style 3D GAN (models/gan.py) with WGAN-GP or non-saturating + R1 and a generator EMA."""

    MODEL_KEYS = ("latent_dim", "g_base_channels", "g_max_channels", "d_base_channels", "d_max_channels",
                  "min_bottleneck", "g_norm", "d_norm", "d_mbstd_group_size", "template")
    latent_dim: PositiveInt = 64
    g_base_channels: PositiveInt = 8
    g_max_channels: PositiveInt = 64
    d_base_channels: PositiveInt = 8
    d_max_channels: PositiveInt = 64
    min_bottleneck: PositiveInt = 4
    g_norm: Literal["group", "layer", "none"] = "group"
    d_norm: Literal["group", "layer", "none"] = "layer"
    d_mbstd_group_size: NonNegInt = 4  # minibatch-std feature in the critic (ProGAN; 0: none): catches mode collapse
    # The generator predicts the deviation (in logit space) from the mean training volume (models/gan.py).
    template: bool = False
    loss: Literal["wgan-gp", "ns-r1"] = "ns-r1"
    gp_weight: NonNegFloat = 10.0
    r1_gamma: NonNegFloat = 1.0
    r1_every: PositiveInt = 4  # lazy R1: the penalty (x r1_every) every r1_every discriminator steps
    n_critic: PositiveInt = 1  # discriminator steps per generator step
    ema_decay: Fraction = 0.99
    # Differentiable augmentation of what the discriminator sees (train/augment.py): "" or a comma-separated
    # subset of gain, translation, cutout.
    augment: AugmentPolicy = ""
    epochs: PositiveInt = 24
    batch_size: PositiveInt = 4
    lr_g: PositiveFloat = 1e-3
    lr_d: PositiveFloat = 1e-3


@dataclass(config=_STRICT)
class StyleGANConfig(_FamilyConfig):
    """StyleGAN v1 in 3D (models/stylegan.py): mapping network, AdaIN, noise, progressive growing, style
    mixing, truncation, generator EMA."""

    MODEL_KEYS = ("z_dim", "w_dim", "n_mapping", "mapping_lr_mul", "n_levels", "base_channels", "max_channels",
                  "blur", "mbstd_group_size", "truncation_psi", "truncation_cutoff", "inversion_steps",
                  "inversion_lr", "template")
    z_dim: PositiveInt = 64
    w_dim: PositiveInt = 64
    n_mapping: PositiveInt = 8
    mapping_lr_mul: PositiveFloat = 0.01
    n_levels: PositiveInt | None = None  # None: as many levels as keep the base axis >= 4
    base_channels: PositiveInt = 8
    max_channels: PositiveInt = 32
    blur: bool = True
    template: bool = True  # each level's output is a deviation from the mean training volume (models/stylegan.py)
    mbstd_group_size: PositiveInt = 4
    truncation_psi: Annotated[float, Field(ge=0, le=1)] = 1.0
    truncation_cutoff: PositiveInt | None = None
    inversion_steps: PositiveInt = 50
    inversion_lr: PositiveFloat = 0.05
    loss: Literal["wgan-gp", "ns-r1"] = "ns-r1"
    gp_weight: NonNegFloat = 10.0
    r1_gamma: NonNegFloat = 1.0
    r1_every: PositiveInt = 4  # lazy R1 (StyleGAN2): the penalty (x r1_every) every r1_every D steps
    n_critic: PositiveInt = 1
    mixing_prob: Fraction = 0.9
    w_avg_beta: Fraction = 0.995
    ema_decay: Fraction = 0.99
    augment: AugmentPolicy = ""  # as gan.augment (train/augment.py)
    # Progressive growing: epochs at each resolution level (fractional for tuning trials, which compress the
    # schedule into tune.epochs: tuning.trial_family_config), the first fade_fraction of them fading it in.
    epochs_per_level: PositiveFloat = 3
    fade_fraction: Fraction = 0.5  # share of a new level's epochs spent fading it in
    epochs: PositiveInt = 24  # must reach and train the full resolution: >= levels * epochs_per_level
    batch_size: PositiveInt = 4
    lr_g: PositiveFloat = 2e-3
    lr_d: PositiveFloat = 2e-3

    def levels(self, volume_shape: tuple[int, int, int]) -> int:
        """Resolution levels for volumes of ``volume_shape`` (``n_levels``, or the default for that shape)."""
        from brainlatent.models.stylegan import default_n_levels

        return default_n_levels(volume_shape) if self.n_levels is None else self.n_levels

    def schedule_problem(self, n_levels: int, epochs: float, source: str = "") -> str | None:
        """Why ``epochs`` cannot train the full resolution with ``n_levels`` levels, or None.

        Level ``l`` starts at epoch ``l * epochs_per_level`` (train/adversarial.py), so the last one starts at
        ``(n_levels - 1) * epochs_per_level`` and is faded in over ``fade_fraction * epochs_per_level``. Fewer
        epochs than that never train the full resolution at all (with exactly that many the last level is
        never entered); we ask, as progressive growing does, that the last level get at least a whole level's
        budget: ``epochs >= n_levels * epochs_per_level``. ``source`` names where ``n_levels`` came from.
        """
        need = n_levels * self.epochs_per_level
        if epochs >= need - 1e-9:
            return None
        last = (n_levels - 1) * self.epochs_per_level
        return (f"{epochs:g} epochs cannot train StyleGAN's full resolution: with stylegan.n_levels = {n_levels}"
                f"{source} and stylegan.epochs_per_level = {self.epochs_per_level:g} the last level starts at epoch "
                f"{last:g} and fades in until epoch {last + self.fade_fraction * self.epochs_per_level:g}; need "
                f">= {need:g} epochs (n_levels * epochs_per_level), or fewer levels / a smaller epochs_per_level")

    def check_schedule(self, volume_shape: tuple[int, int, int], epochs: float | None = None,
                       key: str = "stylegan.epochs") -> None:
        """ValueError naming ``key`` (and the schedule's keys) when ``epochs`` (default ``self.epochs``) cannot
        train the last level for volumes of ``volume_shape`` (n_levels null: the default for that shape)."""
        source = "" if self.n_levels is not None else f" (null: the default for data.shape {list(volume_shape)})"
        problem = self.schedule_problem(self.levels(volume_shape), self.epochs if epochs is None else epochs,
                                        source)
        if problem:
            raise ValueError(f"{key}: {problem}")

    @model_validator(mode="after")
    def _schedule(self) -> "StyleGANConfig":
        if self.n_levels is not None:  # null: needs data.shape (check_schedule, called by train and tune)
            problem = self.schedule_problem(self.n_levels, self.epochs)
            if problem:
                raise ValueError(f"epochs: {problem}")
        return self


FAMILY_CONFIGS: dict[str, type] = {"ae": AEConfig, "vae": VAEConfig, "gan": GANConfig, "stylegan": StyleGANConfig}


# -------------------------------------------------------------------------------------------- tuning
@dataclass(config=_STRICT)
class TuneConfig:
    """Optuna studies per family (tuning.py). ``space`` maps family -> parameter -> spec, where a spec is
    ``{low, high, log}`` (float), ``{low, high, step}`` (int when low/high are ints) or ``{choices: [...]}``;
    the parameter must be a field of that family's section."""

    families: tuple[Family, ...] = ("ae", "vae", "gan", "stylegan")  # tuned in the pipeline; others use params as is
    n_trials: PositiveInt = 3
    epochs: PositiveInt = 1  # epochs per trial
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: NonNegInt = 0
    # Optuna storage URL; None -> sqlite:///<project>/optuna.db. BRAINLATENT_OPTUNA_STORAGE overrides (e.g. a
    # PostgreSQL URL with a password, which never belongs in params.yaml).
    storage: str | None = None
    study_prefix: str = "brainlatent"
    seed: int = 0
    space: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    # Per family, the keys trained with the params.yaml value and never searched (a value a user sets, e.g.
    # `dvc exp run -S vae.beta=0.5 -S 'tune.pinned.vae=[beta]'`, is otherwise replaced by the tuned one, loudly:
    # tuning.resolve_tuned). One list per family because dvc.yaml's tune@/train@<family> depend on
    # tune.pinned.<family> only: pinning a VAE key re-runs the VAE's stages, not every family's.
    pinned: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {f: () for f in FAMILIES})

    @field_validator("pinned", mode="before")
    @classmethod
    def _pinned_per_family(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and not value:  # `pinned: []` of earlier releases: nothing pinned
            return {}
        if isinstance(value, (list, tuple)):
            example = (value[0] if value and isinstance(value[0], str) else "vae.beta").partition(".")
            raise ValueError(f"expected one list per family, e.g. {{{example[0]}: [{example[2]}]}} "
                             f"(`-S 'tune.pinned.{example[0]}=[{example[2]}]'`), got the list {list(value)}")
        if isinstance(value, dict):  # YAML lists -> the tuples the strict schema holds
            return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check_pinned(self) -> "TuneConfig":
        for family, keys in self.pinned.items():
            if family not in FAMILY_CONFIGS:
                raise ValueError(f"pinned: unknown model family {family!r}; expected some of {list(FAMILIES)}")
            fields = {f.name for f in dataclasses.fields(FAMILY_CONFIGS[family])}
            for key in keys:
                if key not in fields:
                    raise ValueError(f"pinned.{family}: {family} has no parameter {key!r}; expected one of {sorted(fields)}")
        object.__setattr__(self, "pinned", {f: tuple(self.pinned.get(f, ())) for f in FAMILIES})  # frozen
        return self

    def pinned_keys(self, family: str) -> tuple[str, ...]:
        """The keys of ``family`` trained with their params.yaml value (``pinned.<family>``)."""
        return self.pinned.get(family, ())

# ---------------------------------------------------------------------------------------- evaluation
@dataclass(config=_STRICT)
class FeatureNetConfig:
    """The feature network behind 3D FID/KID/MMD (models/featurenet.py), trained on the prepared data.

    ``backbone: medicalnet`` uses user-provided MedicalNet ResNet weights (``medicalnet_path``) instead;
    FIDs from different backbones are not comparable (docs/metrics.md)."""

    backbone: Literal["featurenet", "medicalnet"] = "featurenet"
    medicalnet_path: str | None = None
    medicalnet_depth: Literal[10, 18] = 10
    channels: tuple[PositiveInt, ...] = (8, 16, 32, 64)
    feature_dim: PositiveInt = 64
    dropout: Fraction = 0.2
    epochs: PositiveInt = 8
    lr: PositiveFloat = 3e-3
    weight_decay: NonNegFloat = 1e-4
    batch_size: PositiveInt = 8
    age_weight: NonNegFloat = 1.0
    augment: bool = True

    @model_validator(mode="after")
    def _check(self) -> "FeatureNetConfig":
        if self.backbone == "medicalnet" and not self.medicalnet_path:
            raise ValueError("backbone 'medicalnet' needs medicalnet_path: the path of the MedicalNet weights file")
        return self


@dataclass(config=_STRICT)
class EvaluateConfig:
    """`evaluate@model`: how many samples, which split the metrics use, and the champion rule."""

    n_samples: PositiveInt = 64  # generated volumes for FID/KID/MMD/MS-SSIM/anatomy
    # The split the metrics and the champion decision use: the validation split, which selection may see; the
    # test split is kept untouched for the directions' held-out numbers (docs/metrics.md, "Splits").
    split: Literal["val", "test"] = "val"
    ms_ssim_pairs: PositiveInt = 50
    kid_subset_size: PositiveInt = 32
    inversion_steps: PositiveInt = 50  # GAN families: reconstruction through inversion
    # The quality gate (evaluation.quality_gate): samples are "not brains" when their in-head intensity
    # distribution is more than this many times further from the reals than other real scans are, or when they
    # cover less than this share of the real scans. Such a version never takes the champion alias.
    gate_intensity_ratio: PositiveFloat = 10.0
    gate_min_coverage: Fraction = 0.25
    # The champion rule: per family, the evaluation metric a new version must beat (direction from
    # metrics.registry) to take alias `champion` (champion.py).
    champion_metric: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"ae": "mse", "vae": "intensity_w1", "gan": "intensity_w1", "stylegan": "intensity_w1"}
    )

    @model_validator(mode="after")
    def _check_champion(self) -> "EvaluateConfig":
        from brainlatent.metrics.registry import metric_direction

        missing = sorted(set(FAMILIES) - set(self.champion_metric))
        unknown = sorted(set(self.champion_metric) - set(FAMILIES))
        if missing or unknown:
            raise ValueError(f"champion_metric: expected one metric per family {list(FAMILIES)}; "
                             f"missing {missing}, unknown {unknown}")
        for family, metric in self.champion_metric.items():
            try:
                metric_direction(metric)
            except ValueError as err:
                raise ValueError(f"champion_metric.{family}: {err}") from None
        return self


@dataclass(config=_STRICT)
class DirectionsConfig:
    """`directions@model`: probes, directions and traversals for one registered model (docs/directions_method.md)."""

    latent_space: Literal["w", "w+"] = "w"  # StyleGAN inversion space (W+ probes are per-layer concatenations)
    inversion_steps: PositiveInt = 40  # GAN families: latents of real scans by inversion
    # Probe regularisation: a fixed C keeps `make repro` fast; null selects C by nested CV (research runs).
    probe_C: PositiveFloat | None = 0.1
    n_splits: Annotated[int, Field(ge=2)] = 5
    n_repeats: PositiveInt = 2
    n_bootstrap: PositiveInt = 500
    n_permutations: NonNegInt = 50
    pca_components: PositiveInt = 20
    # Traversal direction from a probe: its gradient, or its activation pattern Cov(z) w (Haufe et al. 2014).
    direction: Literal["gradient", "pattern"] = "gradient"
    max_step_sd: PositiveFloat = 2.0  # traversal grid: symmetric, in SDs of the latent projection
    n_steps: Annotated[int, Field(ge=3)] = 5
    n_traversal_subjects: PositiveInt = 8  # test subjects traversed (strips/GIFs for the first few)
    n_strip_subjects: PositiveInt = 2
    # Size control: the subjects.csv column regressed out of the latents of the size-controlled probes. Best a
    # skull-based head size given with the cohort (HCP's FS_IntraCranial_Vol, a manifest's `tiv`, through
    # data.covariates; params.yaml uses it): a local effect that adds tissue cannot move it. The fallback,
    # prepare's eTIV from the affine registration of the skull-stripped brain, moves with such an effect as much
    # as the native brain-mask volume does (docs/synthetic_cohort.md, "Head size"), so it is only as good as a
    # cohort without one allows.
    size_covariate: str = "etiv_mm3"
    size_control: Literal["linear", "spline"] = "linear"  # spline: a cubic spline in the covariate (4 knots)
    # within: the covariate's slope fitted within each label group (an ANCOVA), so that a size-independent
    # group effect is not taken for size; pooled: one slope across groups (docs/directions_method.md)
    size_control_fit: Literal["within", "pooled"] = "within"
    # The latent head-size axis the size-controlled directions are made orthogonal to. scaling: the model's own
    # latent tangent of an isotropic rescaling of the volumes (a local effect cannot move it; costs
    # 2 x size_axis_subjects encodings, inversions for GAN families); covariate: a ridge regression of
    # size_covariate on the latents within each label group, the earlier behaviour. scaling recovers the planted
    # local effects as well or better on both cohorts (docs/directions_method.md, "Size control")
    size_axis: Literal["scaling", "covariate"] = "scaling"
    size_axis_subjects: PositiveInt = 32  # fitting subjects (seeded) the scaling axis is averaged over
    # Refits of the raw and size-controlled probes on resampled subjects for intervals on their map comparison
    # (directions/refit.py; ground-truth cohorts only). 0: off. Costs 4 x n_traversal_subjects decodings each
    map_bootstrap: NonNegInt = 0
    # Effectiveness check: add the registered feature network's P(male) / expected age group to what is
    # measured along every traversal (counterfactual.py); skipped with a warning when none is registered.
    effectiveness_featurenet: bool = True

    @field_validator("size_covariate")
    @classmethod
    def _covariate_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected the name of a numeric subjects.csv column, e.g. etiv_mm3")
        return value


# ------------------------------------------------------------------------------------------- loading
SECTIONS: dict[str, type] = {
    "synth": SynthConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "featurenet": FeatureNetConfig,
    "evaluate": EvaluateConfig,
    "directions": DirectionsConfig,
    **FAMILY_CONFIGS,
}


def _format_error(section: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = section
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else f".{part}"
        got = e.get("input")
        # Whole-section validators get the section's arguments as input: not worth echoing.
        got_txt = f" (got {got!r})" if isinstance(got, (int, float, str, bool, list, tuple)) else ""
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}{got_txt}")
    return "\n".join(lines)


def build_section(section: str, values: dict[str, Any] | None, source: str = "params.yaml") -> Any:
    """Validate one section's mapping into its dataclass; raise ConfigError naming the key."""
    cls = SECTIONS[section]
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(values).__name__}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid value(s):\n{_format_error(section, err)}") from None
    except TypeError as err:  # pragma: no cover - pydantic reports unknown keys itself
        raise ConfigError(f"{source}: section '{section}': {err}") from None


@dataclasses.dataclass(frozen=True)
class Params:
    """All of params.yaml, validated. Attribute per section."""

    synth: SynthConfig
    data: DataConfig
    train: TrainConfig
    tune: TuneConfig
    featurenet: FeatureNetConfig
    evaluate: EvaluateConfig
    directions: DirectionsConfig
    ae: AEConfig
    vae: VAEConfig
    gan: GANConfig
    stylegan: StyleGANConfig
    seed: int = 0
    device: str = "auto"


    def family(self, name: str) -> Any:
        if name not in FAMILY_CONFIGS:
            raise ConfigError(f"unknown model family {name!r}; expected one of {sorted(FAMILY_CONFIGS)}")
        return getattr(self, name)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml (every section) before any work starts.

    ``overrides`` maps dotted keys (``"data.shape"``) to values, applied before validation.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params_from_dict(raw, source=str(path))


def params_from_dict(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    known = set(SECTIONS) | {"seed", "device"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; expected some of {sorted(known)}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{source}: seed: expected an integer, got {seed!r}")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda", "mps") and not str(device).startswith("cuda:"):
        raise ConfigError(f"{source}: device: expected one of auto, cpu, cuda, cuda:N, mps; got {device!r}")
    sections = {name: build_section(name, raw.get(name), source) for name in SECTIONS}
    return Params(seed=seed, device=device, **sections)


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) config dataclass into ``{"section.key": value}`` for MLflow params."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(to_flat_dict(value, prefix=f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out
