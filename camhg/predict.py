"""Predict with a trained CaM-HG on your own conversations, or stream a live one.

    python -m camhg.predict RUN_DIR talk.npz [more.npz | GCNET_FOLDER ...] [--out FILE] [--format csv|json]
    python -m camhg.predict RUN_DIR --stream < utterances.jsonl

Every attention of CaM-HG looks back only: the streamed prediction at utterance t is the offline one, at a cost per
utterance flat in the dialogue's length (:class:`camhg.stream.CaMHGStream`).
"""
from __future__ import annotations

import sys

from mer.cli import run_command
from mer.predict import RunModel, load_trained, output_names, run_predict

from .evaluate import load_model

MODULE = "camhg.predict"


def load_run(path, device="cpu") -> RunModel:
    """The CaM-HG of a run folder (its checkpoints/last.pt) or checkpoint file ``path``, loaded without running code,
    on ``device``, as a :class:`mer.predict.RunModel` (``.model.stream()``, ``.class_names``)."""
    state, (model, config) = load_trained(path, device, load_model, "camhg.train")
    info = state["info"]
    names = output_names(info["task"], model.num_classes, info["name"]) if info["task"] == "regression" \
        else list(info["class_names"])

    def outputs(features, present, speakers, valid):
        logits = model(features, present, speakers, valid=valid).logits
        return logits[..., 0] if config.predicts_score(info["task"]) else logits

    return RunModel("CaM-HG", model, dict(model.dims), info["task"], names, config.predicts_score(info["task"]),
                    outputs, device)


def main(argv=None) -> int:
    return run_predict(argv, module=MODULE, model="camhg", doc=__doc__, load=load_run)


def cli(argv=None) -> int:
    """Console script ``camhg-predict``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
