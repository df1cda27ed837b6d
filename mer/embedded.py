"""The embedded dataset: dyadic conversations generated from a seed in seconds, with a planted causal process.

Why: the published features cannot be fetched here or on a first run, and a dataset whose causes are known says
what a result means. Three names (:func:`generate_embedded`): ``"embedded"`` (IEMOCAP-4 like: happy (+excited),
sad, neutral, angry), ``"embedded6"`` (IEMOCAP-6 order: hap, sad, neu, ang, exc, fru) and ``"embedded-sentiment"``
(MOSI-like signed score in [-3, 3], positive vs negative).

What is planted, per dialogue (lengths 8-110 utterances, mean about 50; two speakers who mostly alternate):

1. **Causes from earlier turns.** Each speaker has a latent mood; utterance i's *cause emotion* is its speaker's
   mood after one rule fires, in this order:
   - *trigger*: some utterances carry a trigger event (bad news, a joke, an insult: a trigger type = an emotion);
     the listener's mood becomes that emotion at their first turn ``lag`` = 2-4 turns later;
   - *reaction* (probability ``reaction_rate``): the speaker reacts to the other speaker's last expressed
     emotion (contagion: happy -> happy, angry -> angry, sad -> neutral comfort; 6 classes: hap <-> exc,
     ang <-> fru);
   - *persistence* (``persistence_rate``): the mood stays;
   - *drift*: a fresh mood, drawn from the class prior (unpredictable from context).
   The label is the cause emotion, replaced by a uniform class with probability ``label_noise`` (annotators).
2. **Modality channels.** Each modality carries the *label* through its own noisy channel (a latent block plus
   Gaussian noise, embedded in the feature space by a fixed random isometry, plus ambient noise):
   text sees the class identity (strongest, ``noise["t"]`` smallest, like the real data), audio sees arousal
   strongly and valence weakly, video sees valence strongly and arousal weakly. So sad vs angry (same valence)
   is separable in audio but not video, neutral vs sad (same arousal, roughly) in video more than audio:
   cues visible in one modality only. The trigger event is visible only in the text of the trigger utterance.
   Audio and video also carry a per-dialogue speaker style (a nuisance).
3. **A spurious feature.** Audio and video carry a "recording condition" code that equals the label's class with
   probability ``spurious_rate`` in train and valid (so it predicts the label there), but in test (when
   ``shift=True``, the default) it equals the *next* class instead: a correlation-only model loses under shift.

What results mean on it:
- a context-free model (one utterance's features) is bounded by the channel noise; a model that uses earlier
  turns (the trigger cue several turns back, the other speaker's reaction, the speaker's own last emotion) scores
  higher; an oracle that sees the cause emotion scores higher still. Logistic regression on dims="small", seed 0,
  valid accuracy: context-free 0.67, stacked with the previous turns' predictions and lagged text 0.70, with the
  cause 0.94 (``tests/test_data_embedded.py`` checks context-free < oracle - 0.15 on a smaller set);
- the gap between valid (IID) and test (shifted) scores measures reliance on the spurious feature;
- hiding text costs most (its channel is the cleanest and it alone carries the trigger cue); a model that
  reconstructs a missing modality from context can recover part of it, since the causes live in other turns.

Knobs (keyword options of :func:`generate_embedded` / ``mer.data.load_dataset``): ``dims`` ("full": a 512,
t 1024, v 1024, the published sizes; "small": a 32, t 48, v 40; or a dict), ``num_dialogues`` (int: train count,
valid and test scaled 1/4 and 1/3 of it; or a (train, valid, test) tuple; default (120, 30, 40), about 9,400
utterances, so that a CPU epoch of a small model takes seconds), ``shift``, and the :class:`EmbeddedConfig`
fields (rates and noise levels).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from mer.dialogues import MODALITIES, DatasetInfo, DatasetSplits, Dialogue, DialogueDataset

FULL_DIMS = {"a": 512, "t": 1024, "v": 1024}
SMALL_DIMS = {"a": 32, "t": 48, "v": 40}
DEFAULT_NUM_DIALOGUES = (120, 30, 40)

# Per emotion: (class name, arousal, valence, reaction class name). Order = class ids.
_EMOTIONS_4 = (  # the 6-class ids with excited merged into happy and frustrated dropped
    ("happy", 0.7, 1.0, "happy"),
    ("sad", -0.8, -1.0, "neutral"),
    ("neutral", 0.0, 0.0, "neutral"),
    ("angry", 1.0, -1.0, "angry"),
)
_EMOTIONS_6 = (  # IEMOCAP-6 order {hap 0, sad 1, neu 2, ang 3, exc 4, fru 5}
    ("hap", 0.4, 1.0, "exc"),
    ("sad", -0.8, -1.0, "sad"),
    ("neu", 0.0, 0.0, "neu"),
    ("ang", 1.0, -1.0, "fru"),
    ("exc", 1.0, 0.8, "hap"),
    ("fru", 0.4, -0.7, "ang"),
)
# embedded-sentiment runs the 4-class process; the score's centre per class (happy, sad, neutral, angry).
_SENTIMENT_CENTRES = np.array([1.8, -1.4, 0.0, -2.0])
_NEUTRAL_4 = 2

RULES = ("trigger", "reaction", "persistence", "drift")  # codes of ConversationTrace.rule


@dataclass
class EmbeddedConfig:
    """The generator's knobs (see the module docstring for what each plants)."""

    min_length: int = 8
    max_length: int = 110
    mean_length: float = 50.0
    speaker_switch_rate: float = 0.85  # the next utterance is by the other speaker
    trigger_rate: float = 0.12  # an utterance carries a trigger event
    trigger_lags: tuple[int, ...] = (2, 3, 4)
    reaction_rate: float = 0.35
    persistence_rate: float = 0.8  # of the remaining probability after reaction
    label_noise: float = 0.08
    # Latent-channel noise std per modality (signal norm ~1): text cleanest, video noisiest, like the real data.
    noise: dict[str, float] = field(default_factory=lambda: {"a": 1.2, "t": 1.0, "v": 1.4})
    ambient_noise: float = 0.5  # per feature dimension, after the embedding
    trigger_strength: float = 1.5
    spurious_rate: float = 0.7
    spurious_strength: float = 0.8
    speaker_style_strength: float = 0.5
    emotion_block_dim: int = 8
    trigger_block_dim: int = 4
    spurious_block_dim: int = 4


@dataclass
class ConversationTrace:
    """The latent causes of one generated dialogue (all (L,) int64): what an oracle may see.

    cause: the cause emotion (the label before annotator noise); rule: index into :data:`RULES`;
    trigger: trigger type carried by the utterance, -1 if none; spurious: the spurious code's class.
    """

    cause: np.ndarray
    rule: np.ndarray
    trigger: np.ndarray
    spurious: np.ndarray


@dataclass
class _World:
    """Fixed per seed: each modality's class codes and embeddings."""

    emotion_codes: dict[str, np.ndarray]  # modality -> (C, emotion_block_dim)
    trigger_codes: np.ndarray  # (C, trigger_block_dim)
    spurious_codes: np.ndarray  # (C, spurious_block_dim)
    embeddings: dict[str, np.ndarray]  # modality -> (latent_dim_m, d_m), orthonormal rows scaled
    reaction: np.ndarray  # (C,) class -> reaction class


def _resolve_dims(dims) -> dict[str, int]:
    if dims == "full":
        return dict(FULL_DIMS)
    if dims == "small":
        return dict(SMALL_DIMS)
    if isinstance(dims, dict) and set(dims) == set(MODALITIES) and all(int(d) > 0 for d in dims.values()):
        return {m: int(dims[m]) for m in MODALITIES}
    raise ValueError(f'dims must be "full", "small" or a dict of positive sizes for {MODALITIES}, got {dims!r}')


def _resolve_num_dialogues(num_dialogues) -> tuple[int, int, int]:
    if num_dialogues is None:
        return DEFAULT_NUM_DIALOGUES
    if isinstance(num_dialogues, (int, np.integer)) and num_dialogues > 0:
        return int(num_dialogues), max(1, int(num_dialogues) // 4), max(1, int(num_dialogues) // 3)
    if isinstance(num_dialogues, (tuple, list)) and len(num_dialogues) == 3 and all(n > 0 for n in num_dialogues):
        return tuple(int(n) for n in num_dialogues)
    raise ValueError(f"num_dialogues must be a positive int or a (train, valid, test) tuple, got {num_dialogues!r}")


def _make_world(rng: np.random.Generator, emotions, dims: dict[str, int], config: EmbeddedConfig) -> _World:
    num_classes = len(emotions)
    arousal = np.array([e[1] for e in emotions])
    valence = np.array([e[2] for e in emotions])
    names = [e[0] for e in emotions]
    reaction = np.array([names.index(e[3]) for e in emotions])

    def directions(num: int, dim: int) -> np.ndarray:
        """``num`` random unit vectors of size ``dim``."""
        vectors = rng.standard_normal((num, dim))
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    k = config.emotion_block_dim
    # Text: one direction per class (identity); audio: arousal strong, valence weak; video: the other way round.
    arousal_dir, valence_dir = directions(2, k)
    audio = 1.0 * arousal[:, None] * arousal_dir + 0.3 * valence[:, None] * valence_dir
    arousal_dir, valence_dir = directions(2, k)
    video = 0.3 * arousal[:, None] * arousal_dir + 1.0 * valence[:, None] * valence_dir
    text = directions(num_classes, k)
    emotion_codes = {"a": audio, "t": text, "v": video}
    embeddings = {}
    for m in MODALITIES:
        latent_dim = _latent_dim(m, config)
        if dims[m] >= latent_dim:
            q, _ = np.linalg.qr(rng.standard_normal((dims[m], latent_dim)))
            embedding = q.T  # orthonormal rows: the latent noise stays isotropic
        else:
            embedding = rng.standard_normal((latent_dim, dims[m])) / np.sqrt(dims[m])
        embeddings[m] = embedding * np.sqrt(dims[m] / latent_dim)  # about unit variance per feature
    return _World(
        emotion_codes=emotion_codes,
        trigger_codes=config.trigger_strength * directions(num_classes, config.trigger_block_dim),
        spurious_codes=config.spurious_strength * directions(num_classes, config.spurious_block_dim),
        embeddings=embeddings,
        reaction=reaction,
    )


def _latent_dim(modality: str, config: EmbeddedConfig) -> int:
    """Latent blocks: emotion, then the trigger cue (text) or spurious code + speaker style (audio, video)."""
    if modality == "t":
        return config.emotion_block_dim + config.trigger_block_dim
    return config.emotion_block_dim + 2 * config.spurious_block_dim


def _simulate_conversation(rng, world: _World, prior: np.ndarray, config: EmbeddedConfig, shift: bool):
    """Speakers, labels and the trace of one dialogue (the planted causal process)."""
    num_classes = len(prior)
    length = int(np.clip(round(rng.gamma(4.0, config.mean_length / 4.0)), config.min_length, config.max_length))
    switches = rng.random(length) < config.speaker_switch_rate
    switches[0] = rng.random() < 0.5  # who opens
    speakers = (np.cumsum(switches) % 2).astype(np.int64)
    mood = rng.choice(num_classes, size=2, p=prior)
    pending: list[tuple[int, int, int]] = []  # (due turn, listener, emotion)
    labels = np.empty(length, dtype=np.int64)
    cause, rule = np.empty(length, dtype=np.int64), np.empty(length, dtype=np.int64)
    trigger = np.full(length, -1, dtype=np.int64)
    for i in range(length):
        s = speakers[i]
        due = [p for p in pending if p[1] == s and p[0] <= i]
        if due:
            mood[s] = due[-1][2]
            pending = [p for p in pending if p not in due]
            rule[i] = RULES.index("trigger")
        elif i > 0 and speakers[i - 1] != s and rng.random() < config.reaction_rate:
            mood[s] = world.reaction[labels[i - 1]]
            rule[i] = RULES.index("reaction")
        elif rng.random() < config.persistence_rate:
            rule[i] = RULES.index("persistence")
        else:
            mood[s] = rng.choice(num_classes, p=prior)
            rule[i] = RULES.index("drift")
        cause[i] = mood[s]
        labels[i] = rng.integers(num_classes) if rng.random() < config.label_noise else cause[i]
        if rng.random() < config.trigger_rate:
            trigger[i] = rng.integers(num_classes)
            pending.append((i + int(rng.choice(config.trigger_lags)), 1 - s, int(trigger[i])))
    correlated = rng.random(length) < config.spurious_rate
    spurious_class = (labels + 1) % num_classes if shift else labels
    spurious = np.where(correlated, spurious_class, rng.integers(num_classes, size=length))
    return speakers, labels, ConversationTrace(cause=cause, rule=rule, trigger=trigger, spurious=spurious)


def _features(rng, world: _World, labels, speaker_slots, trace: ConversationTrace, dims, config: EmbeddedConfig):
    """Each modality's (N, d_m) float32 features of a split's N utterances: latent blocks -> embedding -> ambient
    noise. ``speaker_slots`` (N,) numbers each (dialogue, speaker) pair, which gets its own style vector."""
    num_utterances = len(labels)
    features = {}
    for m in MODALITIES:
        blocks = [world.emotion_codes[m][labels]]
        if m == "t":
            has_trigger = trace.trigger[:, None] >= 0
            blocks.append(np.where(has_trigger, world.trigger_codes[np.maximum(trace.trigger, 0)], 0.0))
        else:
            styles = rng.standard_normal((int(speaker_slots.max()) + 1, config.spurious_block_dim))
            blocks += [world.spurious_codes[trace.spurious], config.speaker_style_strength * styles[speaker_slots]]
        latent = np.concatenate(blocks, axis=1).astype(np.float32)
        latent += config.noise[m] * rng.standard_normal(latent.shape, dtype=np.float32)
        x = latent @ world.embeddings[m].astype(np.float32)
        x += config.ambient_noise * rng.standard_normal((num_utterances, dims[m]), dtype=np.float32)
        features[m] = x
    return features


def generate_embedded(
    name: str = "embedded",
    *,
    seed: int = 0,
    dims="full",
    num_dialogues=None,
    shift: bool = True,
    **config_overrides,
) -> tuple[DatasetSplits, dict[str, list[ConversationTrace]]]:
    """The embedded dataset ``name`` generated from ``seed``, and the latent traces of each split's dialogues.

    Identical for a seed; each split has its own random stream, so changing one split's size leaves the others'
    dialogues unchanged. ``shift`` draws the test split's spurious feature against the label (see module doc).
    """
    if name == "embedded":
        emotions, task = _EMOTIONS_4, "classification"
    elif name == "embedded6":
        emotions, task = _EMOTIONS_6, "classification"
    elif name == "embedded-sentiment":
        emotions, task = _EMOTIONS_4, "regression"
    else:
        raise ValueError(f'name must be "embedded", "embedded6" or "embedded-sentiment", got {name!r}')
    unknown = set(config_overrides) - {f.name for f in dataclasses.fields(EmbeddedConfig)}
    if unknown:
        raise TypeError(f"unknown embedded dataset options: {sorted(unknown)}")
    config = EmbeddedConfig(**config_overrides)
    dims = _resolve_dims(dims)
    sizes = _resolve_num_dialogues(num_dialogues)
    world = _make_world(np.random.default_rng([seed, 0]), emotions, dims, config)
    prior = np.full(len(emotions), 1.0 / len(emotions))
    if task == "classification":
        info = DatasetInfo(name, task, len(emotions), [e[0] for e in emotions], dims)
    else:
        info = DatasetInfo(name, task, 1, ["sentiment"], dims)
    datasets, traces = {}, {}
    for index, (split, size) in enumerate(zip(("train", "valid", "test"), sizes), start=1):
        rng = np.random.default_rng([seed, index])
        conversations = [
            _simulate_conversation(rng, world, prior, config, shift and split == "test") for _ in range(size)
        ]
        split_traces = [trace for _, _, trace in conversations]
        labels = np.concatenate([labels for _, labels, _ in conversations])
        speaker_slots = np.concatenate([2 * number + speakers for number, (speakers, _, _) in enumerate(conversations)])
        joined = ConversationTrace(
            *(np.concatenate([getattr(t, f.name) for t in split_traces]) for f in dataclasses.fields(ConversationTrace))
        )
        features = _features(rng, world, labels, speaker_slots, joined, dims, config)
        if task == "regression":
            labels = _sentiment_scores(rng, labels)
        bounds = np.cumsum([0] + [len(speakers) for speakers, _, _ in conversations])
        dialogues = [
            Dialogue(
                f"{name}-{seed}-{split}-{number:04d}",
                {m: features[m][start:end] for m in MODALITIES},
                speakers,
                labels[start:end],
            )
            for number, ((speakers, _, _), start, end) in enumerate(zip(conversations, bounds[:-1], bounds[1:]))
        ]
        datasets[split] = DialogueDataset(dialogues, info)
        traces[split] = split_traces
    return DatasetSplits(datasets["train"], datasets["valid"], datasets["test"], info), traces


def _sentiment_scores(rng, labels: np.ndarray) -> np.ndarray:
    """Signed scores in [-3, 3] on a 0.2 grid (annotator averages): the class centre plus spread; neutral
    utterances are exactly 0 half of the time, as many MOSI/MOSEI labels are."""
    scores = _SENTIMENT_CENTRES[labels] + 0.6 * rng.standard_normal(len(labels))
    neutral = labels == _NEUTRAL_4
    scores[neutral] = np.where(rng.random(int(neutral.sum())) < 0.5, 0.0, scores[neutral])
    return (np.round(np.clip(scores, -3.0, 3.0) * 5.0) / 5.0).astype(np.float32)
