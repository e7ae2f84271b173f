"""The configuration tree: one dataclass per concern, presets, dotted overrides and validation.

One override syntax (`rlc.tau=0.8`) serves the CLI, Ray Tune's flat `param_space` keys and ablation variants.
Unknown keys raise with the closest valid key; bad values raise naming the key, the value and the allowed range.
Derived quantities (class splits, effective step counts) are computed where they are used, never written back here.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from comic._io import UserError, absolute_path, stable_hash
from comic.presets import PRESETS

Check = Callable[[Any], str | None]


def _interval(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A check that a number lies in an interval; returns the message on failure."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    text = f"must be in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(value: Any) -> str | None:
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        return text if too_low or too_high else None

    return check


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _spec(default: Any, check: Check | None = None, help: str = "") -> Any:
    """A dataclass field carrying its validation rule and a one-line description."""
    factory = (lambda d=default: copy.deepcopy(d)) if isinstance(default, (dict, list)) else None
    meta = {"check": check, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


PROB = _interval(0, 1, lo_open=True, hi_open=True)
NONNEG = _interval(0)
POS = _interval(0, lo_open=True)
POS_INT = _interval(1)
NONNEG_INT = _interval(0)


@dataclass
class DataConfig:
    benchmark: str = _spec("synthetic", _one_of("synthetic", "plt-voc", "plt-coco", "coco-format", "voc"),
                           "which benchmark to build or read")
    root: str = _spec("", None, "source data: VOC devkit / COCO root / COCO-format root, or a built benchmark "
                                "directory holding card.json (empty: the synthetic source is generated)")
    voc_year: int = _spec(2007, _interval(2007, 2012), "benchmark voc: the VOC<year> folder of the devkit")
    voc_train_set: str = _spec("trainval", None, "benchmark voc: ImageSets/Main set of the train pool")
    voc_test_set: str = _spec("test", None, "benchmark voc: ImageSets/Main set of the test images")
    cache_dir: str = _spec("comic_data", None, "where built benchmarks and image caches are kept")
    longtail: str = _spec("pareto", _one_of("pareto", "none"), "Pareto long-tail subsampling or keep the source")
    max_count: int = _spec(1400, POS_INT, "Pareto sampler: images of the largest class")
    min_count: int = _spec(1, POS_INT, "Pareto sampler: images of the smallest class")
    pareto_b: float = _spec(12.0, POS, "Pareto shape b (PLT-VOC 12, PLT-COCO 10)")
    missing_rate: float = _spec(0.4, _interval(0, 1, hi_open=True), "probability of dropping each positive")
    split_seed: int = _spec(0, NONNEG_INT, "fixes the benchmark: subsample, missing labels, val split")
    val_size: int = _spec(2000, NONNEG_INT, "validation images drawn from source images not used for training")
    folds: int = _spec(0, NONNEG_INT, "k >= 2: k disjoint test folds of the pool and test images (0: no folds)")
    fold: int = _spec(0, NONNEG_INT, "with data.folds = k: the test fold (0 .. k-1) of this benchmark")
    image_size: int = _spec(224, _interval(16), "training crop / evaluation crop side")
    crop_scale_min: float = _spec(0.08, _interval(0, 1, lo_open=True), "RandomResizedCrop: smallest crop area fraction")
    num_workers: int = _spec(2, NONNEG_INT, "DataLoader worker processes")
    feature_views: int = _spec(4, POS_INT, "profile frozen: augmented views per training image in the feature cache")
    skip_bad_images: bool = _spec(False, None, "skip (and count) missing or corrupt images instead of failing")
    synthetic_images: int = _spec(1200, _interval(8), "synthetic source: number of train-pool images")
    synthetic_test_images: int = _spec(400, _interval(8), "synthetic source: number of test images")
    synthetic_classes: int = _spec(20, _interval(2, 80), "synthetic source: number of classes")


@dataclass
class ModelConfig:
    backbone: str = _spec("resnet50", None, "trunk: a torchvision classification model (resnet50, mobilenet_v2, ...), "
                                          "timm/<any timm model> (timm/tf_efficientnet_lite2) or 'tiny' (CPU demos)")
    weights: str = _spec("imagenet", None, "'none', 'imagenet' (torchvision's; timm's: the hub) or a state dict file")
    profile: str = _spec("released", _one_of("released", "finetune", "frozen"),
                         "released: one frozen trunk (train-mode BatchNorm) shared by the models + trainable feature "
                         "layers; finetune: everything trains; frozen: trunk features cached once (eval-mode "
                         "BatchNorm), only the heads train")
    feat_dim: int = _spec(1024, POS_INT, "feature layer width (paper: 1024)")
    log_softmax_feature: bool = _spec(True, None, "LogSoftmax on the feature (released code, profile R)")
    normalized_classifier: bool = _spec(True, None, "Eq. 9 normalized classifier (NC); off: plain linear")
    rho: float = _spec(16.0, POS, "Eq. 9 classifier scale")
    eta: float = _spec(1 / 32, NONNEG, "Eq. 9 baseline energy in the weight norm")
    groups: int = _spec(1, POS_INT, "Eq. 9 classifier groups N_g")
    moving_vector: bool = _spec(True, None, "Eq. 7 moving average vector e (AMV); off: z_hat = z")
    mu: float = _spec(0.9, _interval(0, 1, hi_open=True), "Eq. 7 decay of e")
    alpha_tde: float = _spec(2.0, NONNEG, "Eq. 10 tail-side coefficient on e (head side: 1)")
    label_embeddings: str = _spec("", None, "ml-gcn: path to a [C, E] .npy of label word vectors (rows in class "
                                           "order), or 'random' for a fixed-seed stand-in")
    attention: bool = _spec(True, None, "Eq. 8 additive attention of the balanced model over head/tail features")
    attention_residual: float = _spec(1.0, NONNEG, "Eq. 8 residual coefficient (released code: 0.1)")
    attention_dropout: float = _spec(0.1, _interval(0, 1, hi_open=True), "dropout on the attention weights")
    attention_in_training: bool = _spec(True, None, "Eq. 8 attention in training too (paper); false: at evaluation "
                                                    "only (released code)")


@dataclass
class MFMConfig:
    enabled: bool = _spec(True, None, "MFM loss (Eq. 5-6); off: plain BCE in its place")
    gamma_pos: float = _spec(0.0, NONNEG, "P-N focusing exponent for positives")
    gamma_neg: float = _spec(3.0, NONNEG, "P-N focusing exponent for negatives")
    use_pn: bool = _spec(True, None, "P-N factor (gamma_pos / gamma_neg); off: those exponents are 0")
    use_ht: bool = _spec(True, None, "H-T factor gamma_ht and class weight w_c; off: w_c = 1, no gamma_ht")
    class_weight: bool = _spec(True, None, "multiply both terms by w_c = gamma_ht (released code; not in the paper)")
    ht_weight_pos: float = _spec(0.0, NONNEG, "Eq. 5 w+: gamma_ht's share of the positive exponent (code: 0)")
    ht_weight_neg: float = _spec(1.0, NONNEG, "Eq. 5 w-: gamma_ht's share of the negative exponent (code: 1)")
    ht_exponent: float = _spec(1 / 3, POS, "gamma_ht = (1 - ln(n_c / n_max)) ** ht_exponent")
    clip: float = _spec(0.05, _interval(0, 1, hi_open=True), "negative probability margin (ASL clip)")
    cooccurrence_prior: bool = _spec(False, None, "released-code co-occurrence prior (not in the paper)")


@dataclass
class RLCConfig:
    enabled: bool = _spec(True, None, "Reflective Label Corrector (Eq. 2-3)")
    tau: float = _spec(0.7, PROB, "confidence threshold")
    margin: float = _spec(1.0, NONNEG, "logit margin subtracted on observed positives")
    distribution: str = _spec("dynamic", _one_of("dynamic", "static"), "class distribution for gamma_ht")
    class_mean: str = _spec("batch", _one_of("batch", "running"), "P_c: batch mean or running mean of p_c")
    normalizer: str = _spec("positives", _one_of("positives", "corrected"),
                            "B_s / N_pos (code) or B_s / N_t, the number of corrections (paper)")
    exponent: float = _spec(1 / 6, POS, "exponent of the dynamic class weight")
    start_epoch: int = _spec(1, POS_INT, "first epoch (1-based) in which labels are corrected")


@dataclass
class HTBConfig:
    enabled: bool = _spec(True, None, "Head-Tail Balancer distillation (Eq. 11)")
    alpha: float = _spec(2.0, POS, "exponent of the kappa weights")
    variant: str = _spec("kd", _one_of("kd", "mfm", "literal"), "distillation D: kd (soft-target BCE), mfm (the soft "
                                                                "targets through the classification loss), literal "
                                                                "(released code)")
    kappa: str = _spec("paper", _one_of("paper", "inverse", "per-sample", "head", "tail"),
                       "teacher weights: paper (the higher-loss teacher weighs more), inverse, per-sample, head / "
                       "tail (one teacher)")


@dataclass
class LossConfig:
    lambda_m: float = _spec(1.0, NONNEG, "weight of MFM (Eq. 1)")
    lambda_c: float = _spec(0.2, NONNEG, "weight of RLC (Eq. 1)")
    lambda_b: float = _spec(0.5, NONNEG, "weight of HTB (Eq. 1)")
    baseline: dict = _spec({}, None, "keyword hyperparameters of a baseline method's loss")


@dataclass
class OptimConfig:
    lr_feature: float = _spec(1e-3, POS, "feature layer (and trunk in profile released: frozen)")
    lr_trunk: float = _spec(1e-4, POS, "trunk learning rate in profile finetune")
    lr_attention: float = _spec(1e-3, POS, "additive attention")
    lr_classifier: float = _spec(1e-4, POS, "classifiers")
    weight_decay: float = _spec(1e-4, NONNEG, "coupled L2 (Adam, not AdamW)")
    beta1: float = _spec(0.9, _interval(0, 1, hi_open=True), "Adam beta1 (the paper's momentum)")
    decay_gamma: float = _spec(0.1, PROB, "StepLR factor")
    per_model_decay: bool = _spec(True, None, "different LR decays per model (DL); off: all follow the balanced one")
    step_head: int = _spec(24, POS_INT, "StepLR step (epochs) of the head model")
    step_tail: int = _spec(12, POS_INT, "StepLR step (epochs) of the tail model")
    step_balanced_feature: int = _spec(12, POS_INT, "StepLR step of the balanced feature layer")
    step_balanced_other: int = _spec(18, POS_INT, "StepLR step of the balanced attention and classifier")
    grad_clip: float = _spec(0.0, NONNEG, "per-model gradient norm clip; 0 disables")


@dataclass
class TrainConfig:
    epochs: int = _spec(40, POS_INT, "training epochs")
    batch_size: int = _spec(32, POS_INT, "images per step (the last partial batch is dropped)")
    log_interval: int = _spec(20, POS_INT, "steps between reads of the on-device metric accumulators")
    test_every_epoch: bool = _spec(False, None, "evaluate the test set every epoch (curves); by default only when "
                                                "val/map improves: the best-on-val test metrics are the same")
    checkpoint_every_s: float = _spec(60.0, NONNEG, "seconds between checkpoints (0: every epoch); always at the last "
                                                    "epoch and on an interrupt. 60: a crash costs at most a minute, "
                                                    "writes cost < 1 % (benchmarks/README.md)")


@dataclass
class EngineConfig:
    device: str = _spec("auto", None, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    amp: str = _spec("auto", _one_of("auto", "bf16", "off"), "auto: bf16 autocast on CUDA, off on CPU")
    compile: str = _spec("none", _one_of("none", "default", "reduce-overhead"), "torch.compile mode")
    channels_last: bool = _spec(True, None, "channels_last memory format on CUDA")
    deterministic: bool = _spec(False, None, "deterministic algorithms (exact resume on CPU)")
    threads: int = _spec(0, NONNEG_INT, "torch CPU threads; 0: the CPUs this process owns (a Ray trial's CPUs, the "
                                        "affinity / cgroup limit) less the DataLoader workers")
    progress: bool = _spec(True, None, "progress bars (off inside Ray trials)")


@dataclass
class Config:
    method: str = _spec("comic", None, "registry name (see comic.methods)")
    seed: int = _spec(0, NONNEG_INT, "varies weight init and data order per repeat")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mfm: MFMConfig = field(default_factory=MFMConfig)
    rlc: RLCConfig = field(default_factory=RLCConfig)
    htb: HTBConfig = field(default_factory=HTBConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


class ConfigError(UserError, ValueError):
    """A bad key or value in a configuration or override."""


def field_specs(cfg: Any = None, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Flat map of dotted key -> dataclass field, for every leaf of the tree."""
    cls = type(cfg) if cfg is not None else Config
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.default_factory, type)
                                                and dataclasses.is_dataclass(f.default_factory)):
            out.update(field_specs(f.default_factory(), key + "."))
        else:
            out[key] = f
    return out


def _parse(text: str) -> Any:
    """Command-line values are read as YAML scalars (`0.8`, `true`, `[1, 2]`); an empty value is an empty string."""
    return yaml.safe_load(text) if text else ""


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: must be true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}={value!r}: must be an integer")
        return int(value)
    if isinstance(default, float):
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: must be a number")
        return float(value)
    if isinstance(default, str):
        return "none" if value is None else str(value)
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: must be a mapping")
        return dict(value)
    return value


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it plainly is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _unknown_key(key: str, valid: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = getattr(node, part)
    setattr(node, parts[-1], value)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | Iterable[str]) -> Config:
    """Return a copy of `cfg` with dotted overrides applied and validated.

    `overrides` is a mapping (`{"rlc.tau": 0.8}`) or strings (`["rlc.tau=0.8"]`). Keys under a dict-valued field
    (`loss.baseline.gamma_neg=4`) set an entry of that dict.
    """
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [(key, _parse(text)) for key, text in map(_split, overrides)]
    out = copy.deepcopy(cfg)
    specs = field_specs()
    for key, value in items:
        if key in specs:
            _set(out, key, _coerce(key, value, _get(out, key)))
            continue
        parent = next((k for k in specs if key.startswith(k + ".") and isinstance(_get(out, k), dict)), None)
        if parent is None:
            raise _unknown_key(key, specs)
        _get(out, parent)[key[len(parent) + 1:]] = value
    validate(out)
    return out


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (for example rlc.tau=0.8)")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first key whose value breaks its rule."""
    for key, spec in field_specs().items():
        check = spec.metadata.get("check")
        value = _get(cfg, key)
        message = check(value) if check is not None else None
        if message:
            raise ConfigError(f"{key}={value!r}: {message}")
    if cfg.data.max_count < cfg.data.min_count:
        raise ConfigError(f"data.max_count={cfg.data.max_count}: must be >= data.min_count={cfg.data.min_count}")
    if cfg.data.folds == 1 or cfg.data.fold >= max(cfg.data.folds, 1):
        raise ConfigError(f"data.folds={cfg.data.folds}, data.fold={cfg.data.fold}: folds is 0 (the source's own "
                          "test set) or k >= 2, and fold is in 0 .. k-1")


def load_config(preset: str = "synthetic", overrides: Mapping[str, Any] | Iterable[str] = (),
                path: str | None = None) -> Config:
    """Build a config: defaults, then a preset, then an optional YAML file of dotted keys, then overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; valid presets: {', '.join(sorted(PRESETS))}")
    cfg = apply_overrides(Config(), PRESETS[preset])
    if path is not None:
        cfg = apply_overrides(cfg, _read_yaml(path))
    return apply_overrides(cfg, overrides)


def read_yaml_mapping(path: str | os.PathLike[str], what: str = "config keys") -> dict[str, Any]:
    """A YAML file holding one mapping; ConfigError naming the file when it is not valid YAML or not a mapping."""
    with open(path) as fh:
        try:
            loaded = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}, got {type(loaded).__name__}")
    return loaded


def _read_yaml(path: str) -> dict[str, Any]:
    return flatten(read_yaml_mapping(path))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys; dict-valued config fields stay whole."""
    specs = field_specs()
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in specs:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with absolute paths (data, ML-GCN's word vectors): Ray trials and resumed runs start in other working
    directories."""
    overrides = {"data.cache_dir": str(absolute_path(cfg.data.cache_dir))}
    if cfg.data.root:
        overrides["data.root"] = str(absolute_path(cfg.data.root))
    if cfg.model.label_embeddings not in ("", "random"):
        overrides["model.label_embeddings"] = str(absolute_path(cfg.model.label_embeddings))
    return apply_overrides(cfg, overrides)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a nested plain dict (saved with every run)."""
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys -> values (MLflow params, Tune param_space keys)."""
    return {key: _get(cfg, key) for key in field_specs()}


def from_dict(tree: Mapping[str, Any]) -> Config:
    """Inverse of `to_dict` (and accepts flat dotted dicts); validates."""
    return apply_overrides(Config(), flatten(tree))


# --------------------------------------------------------------------------------------------- run identity

# Keys that change how a run executes, never what it computes: where data lives, how many workers and threads,
# which device and kernels, progress and logging cadence. A run's identity leaves them out.
EXECUTION_KEYS = ("data.root", "data.cache_dir", "data.num_workers", "engine.device", "engine.compile",
                  "engine.channels_last", "engine.deterministic", "engine.threads", "engine.progress",
                  "train.log_interval", "train.test_every_epoch", "train.checkpoint_every_s")
# Keys a resumed run may change as well: a longer schedule, another autocast precision.
RESUME_KEYS = ("train.epochs", "engine.amp")
# Keys only some methods read (ML-GCN's word vectors). For any other method they change nothing it computes, so
# their identity holds the default: a table passes them once for every arm and the other arms' cells stay the same.
METHOD_KEYS = {"model.label_embeddings": ("ml-gcn",)}


def identity(cfg: Config, *, resumable: bool = False) -> dict[str, Any]:
    """THE definition of what a run computes: dotted key -> value of every key but EXECUTION_KEYS (and, with
    `resumable`, RESUME_KEYS; METHOD_KEYS at their default for methods that don't read them). The resume check, the
    ablation cell key, the work-directory name and the MLflow params/tags split all use it; the data itself is
    identified by the benchmark's content digest, not its path."""
    skip = EXECUTION_KEYS + (RESUME_KEYS if resumable else ())
    flat = {key: value for key, value in to_flat_dict(cfg).items() if key not in skip}
    for key, readers in METHOD_KEYS.items():
        if cfg.method not in readers:
            flat[key] = _get(Config(), key)
    return flat


def identity_hash(cfg: Config, *, resumable: bool = False, **extra: Any) -> str:
    """Stable hash of `identity(cfg)` plus `extra` parts (the dataset digest, a code version)."""
    return stable_hash({"config": identity(cfg, resumable=resumable), **extra})


def describe(cfg: Config | None = None) -> str:
    """One line per key: dotted name, value in `cfg` (default: the defaults), help. For `--list-keys`."""
    cfg = cfg if cfg is not None else Config()
    lines = []
    for key, spec in field_specs().items():
        lines.append(f"  {key} = {_get(cfg, key)!r}  # {spec.metadata.get('help', '')}")
    return "\n".join(lines)
