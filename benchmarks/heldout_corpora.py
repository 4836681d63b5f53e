"""Write the held-out evaluation corpora of the Beyond-PP study (docs/results.md, "Beyond PP").

Two files of documents, one ``{"text": ...}`` object per line, that ``data.name`` can point at:

- ``c4-heldout.jsonl``: the C4 validation documents that the calibration draw never touched. The
  calibration (``calibration.dataset: c4``, ``n_samples``, ``seq_len``, ``seed``) is replayed with a
  tokenizer that records every document it encodes; those documents (the ones the windows came from
  and the short ones it rejected) are left out, so no evaluation window shares text with calibration.
- ``xsum-documents.jsonl``: the news articles of the XSum test split (``generation/xsum``), a corpus
  no method here was developed on.

``python benchmarks/heldout_corpora.py --out runs/corpora`` (the configs of the study read from
there).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ppframework import data as data_mod
from ppframework.models import load_model

logger = logging.getLogger("heldout_corpora")


class _RecordingTokenizer:
    """Wraps a tokenizer and records the texts it is asked to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.seen: set[str] = set()

    def __call__(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.seen.add(text)
        return self._tokenizer(text, *args, **kwargs)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self.seen.add(text)
        return self._tokenizer.encode(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def c4_heldout(model_name: str, n_samples: int, seq_len: int, seed: int, data_dir: str | None) -> list[str]:
    """The C4 validation documents the calibration draw (these settings) never encoded."""
    _, tokenizer = load_model(model_name, device="cpu")
    documents = data_mod.load_documents("c4", "validation", data_dir)
    recorder = _RecordingTokenizer(tokenizer)
    data_mod.calibration_windows(documents, recorder, n_samples, seq_len, seed)
    kept = [doc for doc in documents if doc not in recorder.seen]
    logger.info("C4: %d documents, %d touched by calibration, %d held out", len(documents),
                len(documents) - len(kept), len(kept))
    return kept


def xsum_documents(data_dir: str | None) -> list[str]:
    """The articles of the XSum test split."""
    root = data_mod.resolve_data_dir(data_dir)
    if root is None:
        raise SystemExit("no local data folder: set PPF_DATA_DIR to the folder holding generation/xsum")
    path = root / "generation" / "xsum" / "test.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["document"] for line in handle if line.strip()]


def write_jsonl(path: Path, documents: list[str]) -> None:
    """One ``{"text": document}`` per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"text": doc}) + "\n")
    print(f"wrote {path} ({len(documents)} documents)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/corpora", help="folder to write the .jsonl files to")
    parser.add_argument("--model", default="smollm2-135m", help="the model whose tokenizer calibrates")
    parser.add_argument("--n-samples", type=int, default=128, help="calibration.n_samples to exclude")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    parser.add_argument("--seed", type=int, default=0, help="calibration.seed")
    parser.add_argument("--data-dir", default=None, help="data folder (default: PPF_DATA_DIR / shared)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    write_jsonl(out / "c4-heldout.jsonl", c4_heldout(args.model, args.n_samples, args.seq_len, args.seed,
                                                     args.data_dir))
    write_jsonl(out / "xsum-documents.jsonl", xsum_documents(args.data_dir))


if __name__ == "__main__":
    main()
