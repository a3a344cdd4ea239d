"""Files shipped inside the package, in this directory: the embedded CLIP's shapes-pretrained weights
(``scadfast-tiny-shapes.pt``, :mod:`scadfast.models.clip`) and the shapes attribute classifier
(``shapes-classifier.pt``, :mod:`scadfast.shapes_classifier`), each with a JSON beside it that
records how it was made and what it scored.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(name: str, rebuild: str | None = None) -> str:
    """Absolute path of the shipped file ``name``.

    With ``rebuild`` (the command that recreates the file; ``{path}`` in it is replaced by the path),
    a missing file raises ``FileNotFoundError`` that says so; without it the path is returned whether
    or not the file exists (for callers that fall back to something else).
    """
    path = ASSETS_DIR / name
    if rebuild is not None and not path.is_file():
        raise FileNotFoundError(f"the shipped file {path} is missing from this install; rebuild it with "
                                f"`{rebuild.format(path=path)}`")
    return str(path)
