"""Rewrite a cascade saved by cascadev < 0.2 in diffusers' pipeline layout (``cascadev convert OLD NEW``).

The previous layout: ``pipeline.json`` (Stage A settings and the sampler the weights were tuned for),
``dit/``, ``semantic_encoder/``, ``previewer/`` (``config.json`` + ``model.safetensors`` each, released key
names) and ``stage_a/`` (a diffusers autoencoder). The new one is what ``CascadeVPipeline.save_pretrained``
writes: ``model_index.json``, one diffusers folder per component and ``scheduler/``. Same weights, same output.
"""

from __future__ import annotations

import json
from pathlib import Path

from cascadev.config import from_dict
from cascadev.errors import first_line
from cascadev.pipelines.cascade import (LEGACY_PIPELINE_FILE, RELEASE_STEPS, CascadeVPipeline, is_legacy_cascade,
                                        load_vae, stage_a_settings)
from cascadev.pipelines.sampling import make_scheduler
from cascadev.pipelines.text_to_video import TextToVideoPipeline, is_legacy_text_to_video
from cascadev.pipelines.text_encoder import TextEncoder
from dit.text_dit import TextDiT
from dit.video_dit import VideoDiT
from vae.previewer import Previewer
from vae.semantic_encoder import SemanticEncoder
from vae.stage_a import StageAConfig


def load_legacy_cascade(folder: str | Path) -> CascadeVPipeline:
    """A cascade in the previous layout, as a ``CascadeVPipeline``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    if not is_legacy_cascade(folder):
        raise FileNotFoundError(f"{folder}: not a cascade in the previous format (expected {LEGACY_PIPELINE_FILE} "
                                "and no model_index.json)")
    file = folder / LEGACY_PIPELINE_FILE
    try:          # its settings, checked in one line naming it: not JSON, a section missing or of the wrong type
        meta = json.loads(file.read_text())
        demo = dict(meta.get("demo") or {})
        stage_a = from_dict(StageAConfig, {**meta["stage_a"], "pretrained": None, "subfolder": None})
        scheduler = make_scheduler(demo.pop("scheduler", "euler_a"), demo.pop("scheduler_config", None))
    except (UnicodeDecodeError, ValueError, TypeError, LookupError, AttributeError, RecursionError) as e:
        raise ValueError(f"{file}: not the settings of a cascade in the previous format ({first_line(e)})") from None
    return CascadeVPipeline(
        dit=VideoDiT.from_legacy_folder(folder / "dit"),
        semantic_encoder=SemanticEncoder.from_legacy_folder(folder / "semantic_encoder"),
        vae=load_vae(folder / "stage_a"),
        scheduler=scheduler,
        previewer=Previewer.from_legacy_folder(folder / "previewer") if (folder / "previewer").is_dir() else None,
        stage_a=stage_a_settings(stage_a),
        num_inference_steps=demo.pop("steps", RELEASE_STEPS),
        colour_fix=demo.pop("colour_fix", None),
        demo=demo or None,                      # what is left: the clips the demo shows (kind, size)
    )


def load_legacy_text_to_video(folder: str | Path):
    """A text-to-video folder in the previous layout (``text_to_video.json``: ``text_encoder/``, ``base_dit/``,
    ``cascade/``), as a ``TextToVideoPipeline``."""
    folder = Path(folder)
    return TextToVideoPipeline.from_parts(TextEncoder.from_legacy_folder(folder / "text_encoder"),
                                          TextDiT.from_legacy_folder(folder / "base_dit"),
                                          load_legacy_cascade(folder / "cascade"))


def convert(old: str | Path, new: str | Path):
    """Load ``old`` (a cascade or a text-to-video folder in the previous layout) and write it to ``new`` with
    ``save_pretrained``. Returns the pipeline."""
    if Path(new).exists() and any(Path(new).iterdir()):
        raise FileExistsError(f"{new} exists and is not empty: choose a new folder")
    pipe = load_legacy_text_to_video(old) if is_legacy_text_to_video(old) else load_legacy_cascade(old)
    pipe.save_pretrained(str(new))
    return pipe
