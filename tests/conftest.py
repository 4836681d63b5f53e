"""Shared fixtures: offline hub, the shared data folder, tiny saved models, a calibration text file."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

# Never touch the network: set before transformers / huggingface_hub / datasets are imported.
os.environ["HF_HUB_OFFLINE"] = "1"

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more can about "
    "time people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night "
    "point home water room mother area money story fact month lot right study book eye job word business "
    "issue side kind head house service friend father power hour game line end member law car city "
    "community name president team minute idea kid body information back parent face others level office "
    "door health person art war history party result change morning reason research girl guy moment air "
    "teacher force education river mountain forest bridge harbour engine signal garden letter winter "
    "summer village market castle railway island valley"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randint(1, len(words) - 1), str(rng.randint(2, 1999)))
    text = " ".join(words)
    if rng.random() < 0.25:
        cut = rng.randint(2, len(text) - 2)
        cut = text.find(" ", cut)
        if cut > 0:
            text = text[:cut] + "," + text[cut:]
    return text + rng.choice((".", ".", ".", "!", "?", ";"))


def tiny_text_lines(n_lines: int = 200, seed: int = 0, min_chars: int = 120) -> list[str]:
    """Deterministic English-like lines, each at least ``min_chars`` characters (= tiny tokens)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        line = _sentence(rng)
        while len(line) < min_chars:
            line += " " + _sentence(rng)
        lines.append(line)
    return lines


@pytest.fixture
def shared_data_dir() -> Path:
    """The shared data folder beside the repository (``<repo>/../shared/data``); skip if absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)``: a saved tiny model + tokenizer directory, saved once per session."""
    from ppframework.testing.tiny import save_tiny_model

    saved: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in saved:
            saved[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}") / family, family)
        return saved[family]

    return get


@pytest.fixture
def tiny_text_file(tmp_path: Path) -> Path:
    """A .txt file of 200 varied lines, each longer than 64 tiny-tokenizer tokens (one per character)."""
    path = tmp_path / "tiny_corpus.txt"
    path.write_text("\n".join(tiny_text_lines()) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``PPF_CACHE_DIR`` at a fresh temporary folder (not autouse)."""
    cache = tmp_path / "ppf-cache"
    cache.mkdir()
    monkeypatch.setenv("PPF_CACHE_DIR", str(cache))
    return cache
