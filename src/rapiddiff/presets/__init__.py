"""The real checkpoints' configs (and the SD 1.5 CLIP tokenizer) shipped with the package; see PROVENANCE.md."""

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent
