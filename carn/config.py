"""CARN configuration: model sizes, ablation switches, training settings, and presets per dataset.

The paper (section 4.2) fixes Adam, learning rate 1e-4, dropout 0.5 and 200 epochs; it gives no layer sizes, so
the published-feature presets use a 256-wide model. The embedded presets are sized so that ``python -m carn.train``
trains and evaluates in a few minutes on a laptop CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mer.precision import check_precision

ATTENTION_KINDS = ("causal_entmax", "vanilla")
CSS_KINDS = ("infonce", "mse", "none")


@dataclass
class ModelConfig:
    """What the network looks like. ``dims`` maps each modality ("a", "t", "v") to its input feature size."""

    dims: dict[str, int]
    num_classes: int  # 1 for sentiment regression
    task: str = "classification"  # or "regression"
    hidden: int = 256  # width of each modality's pipeline; the fused representation is 3 * hidden
    encoder_layers: int = 1  # Transformer encoder layers per modality (eq. 9)
    decoder_layers: int = 1  # Transformer encoder layers of the reconstruction decoder (eq. 13)
    num_heads: int = 4  # heads of those Transformer encoders; the causal-cue attention has one head
    dropout: float = 0.5
    css_dim: int = 128  # latent size of the projections F and G (eq. 16)
    css_temperature: float = 0.1  # tau of eq. 17
    # Ablation switches (paper Table 2).
    use_cce: bool = True  # False: "w/o CCE", only the Transformer encoder per modality (implies no CSS)
    css: str = "infonce"  # "infonce" (eq. 17), "mse" ("w/ MSE"), "none" ("w/o CSS")
    attention: str = "causal_entmax"  # or "vanilla": softmax, no causal mask ("w/ vanilla attention")

    def __post_init__(self):
        if set(self.dims) != {"a", "t", "v"} or any(int(d) <= 0 for d in self.dims.values()):
            raise ValueError(f"dims must map 'a', 't', 'v' to positive sizes, got {self.dims}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {self.task!r}")
        if self.task == "regression" and self.num_classes != 1:
            raise ValueError(f"num_classes must be 1 for regression (one sentiment score), got {self.num_classes}")
        if self.task == "classification" and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for classification, got {self.num_classes}")
        if self.css not in CSS_KINDS:
            raise ValueError(f"css must be one of {CSS_KINDS}, got {self.css!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if (3 * self.hidden) % self.num_heads or self.hidden % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden={self.hidden} (and 3 * hidden)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.css_temperature <= 0:
            raise ValueError(f"css_temperature must be positive, got {self.css_temperature}")

    @property
    def uses_css(self) -> bool:
        """The CSS loss needs the causal-cue attention, so "w/o CCE" has none either."""
        return self.use_cce and self.css != "none"


@dataclass
class TrainConfig:
    """How to train: the two stages of section 3.4 and their optimizer."""

    epochs_stage1: int = 100  # full modalities: per-modality CE + CSS (eq. 18-20)
    epochs_stage2: int = 100  # missing modalities: fused CE + reconstruction MSE (eq. 21-23)
    batch_size: int = 16  # dialogues per batch
    lr: float = 1e-4
    weight_decay: float = 0.0
    missing_rate: float = 0.5  # eta of GCNet's random-mask protocol in stage 2
    css_weight: float = 1.0
    rec_weight: float = 1.0
    grad_clip: float = 0.0  # 0 disables clipping
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 adds a GradScaler), mer.precision

    def __post_init__(self):
        if self.epochs_stage1 < 0 or self.epochs_stage2 < 0 or self.epochs_stage1 + self.epochs_stage2 == 0:
            raise ValueError("epochs_stage1 and epochs_stage2 must be >= 0 and not both 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.missing_rate < 1.0:
            raise ValueError(f"missing_rate must be in [0, 1), got {self.missing_rate}")
        check_precision(self.precision)

    @property
    def epochs(self) -> int:
        return self.epochs_stage1 + self.epochs_stage2

    def stage_of(self, epoch: int) -> int:
        """Stage (1 or 2) of the 1-based ``epoch``."""
        return 1 if epoch <= self.epochs_stage1 else 2


# Paper Table 2 rows -> ModelConfig overrides.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_cce": {"use_cce": False},
    "no_css": {"css": "none"},
    "css_mse": {"css": "mse"},
    "vanilla_attention": {"attention": "vanilla"},
}
ABLATION_TITLES = {
    "full": "CARN",
    "no_cce": "w/o CCE",
    "no_css": "w/o CSS",
    "css_mse": "w/ MSE",
    "vanilla_attention": "w/ vanilla attention",
}


@dataclass
class Preset:
    """Per-dataset defaults: options for ``mer.data.load_dataset`` and model/training overrides."""

    dataset_options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)


_EMBEDDED_MODEL = {"hidden": 64, "num_heads": 4, "css_dim": 64}
_EMBEDDED_TRAIN = TrainConfig(epochs_stage1=5, epochs_stage2=8, batch_size=8, lr=1e-3)
PRESETS: dict[str, Preset] = {
    # The embedded data is small and synthetic: a larger learning rate than the paper's 1e-4 reaches a
    # trained model in the few-minute budget of the default command.
    "embedded": Preset({"dims": "small"}, _EMBEDDED_MODEL, _EMBEDDED_TRAIN),
    "embedded6": Preset({"dims": "small"}, _EMBEDDED_MODEL, _EMBEDDED_TRAIN),
    "embedded-sentiment": Preset({"dims": "small"}, _EMBEDDED_MODEL, _EMBEDDED_TRAIN),
    "iemocap4": Preset({}, {"hidden": 256}, TrainConfig(batch_size=16)),
    "iemocap6": Preset({}, {"hidden": 256}, TrainConfig(batch_size=16)),
    "mosi": Preset({}, {"hidden": 256}, TrainConfig(batch_size=32)),
    "mosei": Preset({}, {"hidden": 256}, TrainConfig(batch_size=32)),
}


def preset(dataset: str) -> Preset:
    if dataset not in PRESETS:
        raise ValueError(f"no CARN preset for dataset {dataset!r}; known: {sorted(PRESETS)}")
    return PRESETS[dataset]


def model_config_for(info, dataset: str, *, ablation: str = "full", **overrides) -> ModelConfig:
    """The ModelConfig for a loaded dataset (``mer.data.DatasetInfo``), its preset, an ablation and overrides."""
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}")
    values = {**preset(dataset).model, **ABLATIONS[ablation], **overrides}
    return ModelConfig(dims=dict(info.dims), num_classes=info.num_classes, task=info.task, **values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
