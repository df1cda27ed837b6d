"""Predict with a trained CARN on your own conversations, or stream a live one.

    python -m carn.predict RUN_DIR talk.npz [more.npz | GCNET_FOLDER ...] [--out FILE] [--format csv|json]
    python -m carn.predict RUN_DIR --stream < utterances.jsonl

Formats: see :mod:`mer.predict`. A run trained with ``--encoder-mask causal`` streams at a cost per utterance flat
in the dialogue's length (its prediction at utterance t is the offline one); with the default non-causal encoders
the stream re-encodes the history at every utterance (:class:`carn.stream.CarnStream`).
"""
from __future__ import annotations

import sys

from mer.cli import run_command
from mer.predict import RunModel, load_trained, output_names, run_predict

from .evaluate import load_model

MODULE = "carn.predict"


def load_run(path, device="cpu") -> RunModel:
    """The CARN of a run folder (its checkpoints/last.pt) or checkpoint file ``path``, loaded without running code,
    on ``device``, as a :class:`mer.predict.RunModel` (``.model.stream()``, ``.class_names``)."""
    state, model = load_trained(path, device, load_model, "carn.train")
    config = model.config

    def outputs(features, present, speakers, valid):
        return model(features, present, valid).logits

    return RunModel("CARN", model, dict(config.dims), config.task,
                    output_names(config.task, config.num_classes, state["data"]["dataset"]), config.predicts_score,
                    outputs, device)


def main(argv=None) -> int:
    return run_predict(argv, module=MODULE, model="carn", doc=__doc__, load=load_run)


def cli(argv=None) -> int:
    """Console script ``carn-predict``."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
