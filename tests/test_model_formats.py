"""The networks as diffusers models: save_pretrained / from_pretrained (fp32 and bf16), strict loading, the
previous on-disk format (the shipped tiny cascade), and the config = the __init__ keywords, one source."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import config_fields, randomize_
from dit import PRESETS as DIT_PRESETS
from dit import TEXT_PRESETS, TextDiT, VideoDiT
from vae import Previewer, SemanticEncoder, build_previewer, build_semantic_encoder

TINY_CASCADE = Path(__file__).resolve().parents[1] / "cascadev/assets/tiny_cascade"


def dit_run(model):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 20, 4, 16, 16, generator=g), torch.tensor([500.0])
    return model(x.to(model.dtype), t).float()


def text_dit_run(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 8, 8, generator=g)
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    return model(x.to(model.dtype), torch.tensor([3.0, 700.0]), ctx, pooled, mask).float()


def encoder_run(model):
    video = torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model.encode(video)


def previewer_run(model):
    return model(torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1)))


CASES = {  # model, its run, the bf16 bound (relative L2 error vs fp32; measured 1.4e-4 Previewer, 5.4e-3 encoder,
           # 7.8e-3 TextDiT, 8.4e-3 VideoDiT)
    "VideoDiT": (lambda: VideoDiT(**DIT_PRESETS["tiny"]), dit_run, 2e-2),
    "TextDiT": (lambda: TextDiT(**TEXT_PRESETS["tiny"]), text_dit_run, 2e-2),
    "SemanticEncoder": (lambda: build_semantic_encoder("tiny"), encoder_run, 2e-2),
    "Previewer": (lambda: build_previewer("tiny"), previewer_run, 2e-2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_diffusers_round_trip_fp32_exact_and_bf16_close(name, tmp_path):
    build, run, bound = CASES[name]
    model = randomize_(build(), std=0.05).eval()
    model.save_pretrained(tmp_path / name)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with torch.no_grad():
        ref = run(model)
        loaded = type(model).from_pretrained(tmp_path / name)
        assert config_fields(loaded) == config_fields(model) and not loaded.training
        assert torch.equal(run(loaded), ref)
        half = type(model).from_pretrained(tmp_path / name, torch_dtype=torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in half.parameters())
        rel = ((run(half) - ref).norm() / ref.norm()).item()
    assert rel < bound, rel


def test_from_pretrained_is_strict(tmp_path):
    model = build_previewer("tiny")
    model.save_pretrained(tmp_path / "prev")
    weights = tmp_path / "prev/diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["blocks.3.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.3\.weight"):
        Previewer.from_pretrained(tmp_path / "prev")


@pytest.mark.parametrize("cls,folder,run", [(VideoDiT, "dit", None), (SemanticEncoder, "semantic_encoder", encoder_run),
                                            (Previewer, "previewer", previewer_run)])
def test_legacy_tiny_cascade_loads_and_round_trips_bit_identically(cls, folder, run, tmp_path):
    from cascadev.pipelines.cascade import CascadeVPipeline
    from helpers import write_legacy_cascade

    shipped = CascadeVPipeline.from_pretrained(str(TINY_CASCADE))
    write_legacy_cascade(shipped, tmp_path / "legacy")        # the shipped cascade in the previous layout
    legacy = cls.from_legacy_folder(tmp_path / "legacy" / folder)
    assert not legacy.training

    @torch.no_grad()
    def assert_same_output(a, b):
        if cls is VideoDiT:
            g = torch.Generator().manual_seed(1)
            x, t = torch.randn(1, 20, 8, 16, 16, generator=g), torch.tensor([321.0])
            assert torch.equal(a(x, t), b(x, t))
        else:
            assert torch.equal(run(a), run(b))
    assert_same_output(getattr(shipped, folder), legacy)
    legacy.save_pretrained(tmp_path / folder)
    assert_same_output(cls.from_pretrained(tmp_path / folder), legacy)
    old = load_file(tmp_path / "legacy" / folder / "model.safetensors")
    assert cls.convert_state_dict(old).keys() == legacy.state_dict().keys()


def test_legacy_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        VideoDiT.from_legacy_folder(tmp_path)


ONE_SOURCE = {  # a small model of each class, and a value its __init__ refuses
    VideoDiT: (DIT_PRESETS["tiny"], {"num_heads": 5},
               "hidden_size 1152 is not divisible by num_heads 5 (e.g. num_heads=4)"),
    TextDiT: (TEXT_PRESETS["tiny"], {"cond_channels": 4},
              "TextDiT concatenates no condition: cond_channels must be 0, got 4"),
    SemanticEncoder: ({"backbone_type": "tiny"}, {"frame_batch": 0}, "frame_batch and latent_channels must be >= 1"),
    Previewer: ({"hidden_channels": 32}, {"hidden_channels": 30},
                "hidden_channels must be a positive multiple of 4, got 30"),
}


@pytest.mark.parametrize("cls", list(ONE_SOURCE), ids=lambda c: c.__name__)
def test_config_is_one_source_the_init_keywords(cls, tmp_path):
    """The config is the explicit ``__init__`` keywords: the signature lists them, config.json holds exactly them, a
    save / load round trip keeps config and weights, a bad value is a one-line ValueError; no dataclass beside it."""
    tiny, bad, message = ONE_SOURCE[cls]
    names = [p.name for p in list(inspect.signature(cls.__init__).parameters.values())[1:]]
    assert names and "fields" not in names and "kwargs" not in names
    model = randomize_(cls(**tiny), seed=3).eval()
    assert list(config_fields(model)) == names
    model.save_pretrained(tmp_path)
    assert [k for k in json.loads((tmp_path / "config.json").read_text()) if not k.startswith("_")] == sorted(names)
    loaded = cls.from_pretrained(tmp_path)
    assert config_fields(loaded) == config_fields(model)
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert not hasattr(model, "spec") and "__getattr__" not in vars(cls) and "__signature__" not in vars(cls.__init__)
    with pytest.raises(ValueError) as error:
        cls(**bad)
    assert str(error.value) == message
    with pytest.raises(TypeError):
        cls(not_a_field=1)


def test_semantic_encoder_configs_with_the_old_backbone_key_load():
    """``backbone`` (the submodule's name) became ``backbone_type``; configs saved before (the shipped one) still
    load."""
    folder = TINY_CASCADE / "semantic_encoder"
    assert json.loads((folder / "config.json").read_text())["backbone"] == "tiny"
    assert SemanticEncoder.from_pretrained(folder).config.backbone_type == "tiny"
    assert SemanticEncoder.from_config({"backbone": "tiny"}).config.backbone_type == "tiny"
    assert SemanticEncoder.from_config_dict({"backbone": "tiny"}).config.backbone_type == "tiny"
    assert isinstance(SemanticEncoder.from_config_dict({"backbone": "tiny"}).backbone, torch.nn.Sequential)
    from cascadev.training.config import SemanticSection         # and a training YAML's encoder_overrides
    assert SemanticSection(encoder_overrides={"backbone": "tiny"}).encoder_config()["backbone_type"] == "tiny"


def test_text_dit_legacy_keys_convert():
    model = TextDiT(**TEXT_PRESETS["tiny"])
    state = {k.replace("adaln_single.linear.", "t_block.1."): v for k, v in model.state_dict().items()}
    assert TextDiT.convert_state_dict(state).keys() == model.state_dict().keys()
