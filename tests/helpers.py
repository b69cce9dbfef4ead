"""Helpers the tests import (``from helpers import run_cli``); the fixtures are in conftest.py."""

import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    """Run `cascadev ARGV` in-process; return (exit code, stdout, stderr). The warnings the run raises are in stderr
    as a user's Python prints them (pytest would otherwise keep them to its summary)."""
    from cascadev.cli import main

    code = 0
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")                            # Python's own filters: what a user sees
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                                            for w in shown)


def subprocess_env(tmp_path, **variables) -> dict:
    """``os.environ`` with ``variables`` for a subprocess (torchrun, ...), its TMPDIR a folder in ``tmp_path``: what it
    leaves there (torchelastic_* folders of torchrun's agent) goes with the test's files."""
    import os

    tmp = Path(tmp_path) / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), **variables}


def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded noise, so zero-initialised layers cannot hide a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def config_fields(model) -> dict:
    """A model's config as its ``__init__`` keywords (diffusers' ``_name_or_path``, ``_use_default_values`` ...
    aside)."""
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


def as_written(video: torch.Tensor, path) -> torch.Tensor:
    """``video`` (1, 3, T, H, W) through the commands' writer (lossless H.264, ``--crf 0``) and reader: what a command
    that made these frames writes, to compare with its output within the mean 2e-5 of a few flipped 8-bit levels."""
    from cascadev.video_io import read_video, write_video

    write_video(path, video, crf=0)
    return read_video(path)


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


# The shipped tiny cascade (trained): its output follows its input (two clips' reconstructions differ by 0.17 mean),
# where the random ``tiny_cascade``'s hardly does (8e-7): tests of what reaches the model use the shipped one.
SHIPPED_CASCADE = ROOT / "cascadev" / "assets" / "tiny_cascade"


def tiny_cascade(**settings):
    """A tiny ``CascadeVPipeline`` with random weights (the DiT's nonzero) and the release's sampler. Its output
    hardly follows its input (two clips' reconstructions differ by 2e-6 mean): tests of what reaches the model
    compare exactly, or use ``SHIPPED_CASCADE``."""
    from cascadev.pipelines.cascade import CascadeVPipeline
    from cascadev.pipelines.sampling import make_scheduler
    from dit import build_dit
    from vae import build_previewer, build_semantic_encoder, build_stage_a
    from vae.stage_a import PRESETS as STAGE_A_PRESETS
    from vae.stage_a import stage_a_settings

    return CascadeVPipeline(dit=randomize_(build_dit("tiny"), std=0.02),
                            semantic_encoder=build_semantic_encoder("tiny"),
                            vae=build_stage_a("tiny").model, scheduler=make_scheduler("euler_a"),
                            previewer=build_previewer("tiny"), stage_a=stage_a_settings(STAGE_A_PRESETS["tiny"]),
                            **settings)


def write_legacy_cascade(pipe, folder):
    """``pipe`` in the layout of cascadev < 0.2: pipeline.json, config.json + model.safetensors with the released
    key names per part, stage_a/ a diffusers folder."""
    from safetensors.torch import save_file

    from cascadev.config import to_dict
    from vae.stage_a import PRESETS

    released = {"adaln_single.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
                "adaln_single.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
                "adaln_single.linear.": "t_block.1."}
    for name in ("dit", "semantic_encoder", "previewer"):
        model = getattr(pipe, name)
        state = {}
        for key, value in model.state_dict().items():
            for new, old in released.items():
                key = key.replace(new, old) if key.startswith(new) else key
            state[key] = value.contiguous()
        (folder / name).mkdir(parents=True)
        save_file(state, str(folder / name / "model.safetensors"))
        config = {**config_fields(model), **({"attn_backend": "auto"} if name == "dit" else {})}
        if name == "semantic_encoder":                 # the previous format's name of backbone_type
            config["backbone"] = config.pop("backbone_type")
        (folder / name / "config.json").write_text(__import__('json').dumps(config))
    pipe.vae.save_pretrained(str(folder / "stage_a"))
    stage_a = {**to_dict(PRESETS["tiny"]), "pretrained": None, "subfolder": None}
    demo = {"steps": 3, "scheduler": "flow", "colour_fix": 16, "kind": "shapes", "size": 64}
    (folder / "pipeline.json").write_text(__import__('json').dumps({"stage_a": stage_a, "demo": demo}))
