"""``cascadev decode --source-vae``: another model's latents through its own VAE, then the cascade.

For each diffusers VAE family a tiny random one is saved with ``save_pretrained``, encodes a generated clip, and the
latents file goes through the CLI as a user would; the normalisation is checked against the formula of the family's
diffusers pipeline, written out here independently.
"""

import pytest
import torch

from helpers import run_cli
from cascadev.pipelines.cascade import CascadeVPipeline
from cascadev.pipelines.latents import save_latents
from cascadev.pipelines.source_vae import SourceVAE
from cascadev.synthetic import make_clip
from cascadev.video_io import video_info


def _stats(seed: int, n: int, low: float, high: float) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * (high - low) + low).tolist()


def _tiny(name: str):
    """A tiny random ``name`` (a few hundred K parameters at most), with non-trivial normalisation statistics."""
    import diffusers

    cls = getattr(diffusers, name)
    small = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    if name == "AutoencoderKL":         # Flux-style: scale and shift
        return cls(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, **small)
    if name == "AutoencoderTiny":
        return cls(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                   num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), scaling_factor=0.5)
    if name == "AutoencoderKLTemporalDecoder":        # its GroupNorms take 32 groups
        return cls(down_block_types=("DownEncoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                   layers_per_block=1, scaling_factor=0.18215)
    if name == "AutoencoderKLWan":
        return cls(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, z_dim=16,
                   latents_mean=_stats(1, 16, -1, 1), latents_std=_stats(2, 16, 1, 3))
    if name == "AutoencoderKLHunyuanVideo":
        return cls(latent_channels=16, **small)
    if name == "AutoencoderKLCogVideoX":
        return cls(latent_channels=16, **small)
    if name == "AutoencoderKLLTXVideo":  # 0.9.1+: timestep-conditioned decoder; mean / std are buffers
        vae = cls(latent_channels=128, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                  layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                  timestep_conditioning=True, scaling_factor=0.8)
        vae.latents_mean.copy_(torch.tensor(_stats(3, 128, -0.5, 0.5)))
        vae.latents_std.copy_(torch.tensor(_stats(4, 128, 0.5, 2)))
        return vae
    if name == "AutoencoderKLMochi":     # the released latents_mean / latents_std are its config defaults; the released
        # scaling_factor is 1.0, which cannot tell * from /
        return cls(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                   layers_per_block=(1, 1, 1, 1, 1), add_attention_block=(False,) * 5, scaling_factor=1.5)
    if name == "AutoencoderKLCosmos":    # the released per-channel, per-frame statistics are its config defaults
        return cls(encoder_block_out_channels=(8, 8, 8, 8), decode_block_out_channels=(8, 8, 8, 8), num_layers=1,
                   attention_resolutions=())
    raise ValueError(name)


# class, clip frames, latent channels, (t, s) compression, latent frames; every clip is 64 x 96 px
FAMILIES = [
    ("AutoencoderKL", 3, 4, (1, 8), 3),
    ("AutoencoderTiny", 3, 4, (1, 8), 3),
    ("AutoencoderKLTemporalDecoder", 3, 4, (1, 8), 3),
    ("AutoencoderKLWan", 9, 16, (4, 8), 3),
    ("AutoencoderKLHunyuanVideo", 9, 16, (4, 8), 3),
    ("AutoencoderKLCogVideoX", 9, 16, (4, 8), 3),
    ("AutoencoderKLLTXVideo", 9, 128, (8, 32), 2),
    ("AutoencoderKLMochi", 7, 12, (6, 8), 2),
    ("AutoencoderKLCosmos", 9, 16, (8, 8), 2),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a folder holding the tiny VAE in ``vae/``, as a pipeline's folder has it."""
    root = tmp_path_factory.mktemp("source_vaes")
    folders = {}
    for name, *_ in FAMILIES:
        torch.manual_seed(0)
        _tiny(name).save_pretrained(str(root / name / "vae"))
        folders[name] = root / name
    return folders


def _pipeline_to_raw(vae, z: torch.Tensor) -> torch.Tensor:
    """What each family's diffusers pipeline does to its denoiser's latents before ``vae.decode`` (diffusers 0.42)."""
    name, cfg = type(vae).__name__, vae.config
    C, T = z.shape[1:3]

    def view(values):
        return torch.tensor(values).view(1, C, 1, 1, 1)
    if name == "AutoencoderKLWan":                       # pipeline_wan.py
        return z / (1.0 / view(cfg.latents_std)) + view(cfg.latents_mean)
    if name == "AutoencoderKLLTXVideo":                  # pipeline_ltx.py, _denormalize_latents
        return z * vae.latents_std.view(1, -1, 1, 1, 1) / cfg.scaling_factor + vae.latents_mean.view(1, -1, 1, 1, 1)
    if name == "AutoencoderKLMochi":                     # pipeline_mochi.py
        return z * view(cfg.latents_std) / cfg.scaling_factor + view(cfg.latents_mean)
    if name == "AutoencoderKLCosmos":                    # pipeline_cosmos_text2world.py, sigma_data 0.5
        mean = torch.tensor(cfg.latents_mean).view(1, C, -1, 1, 1)[:, :, :T]
        std = torch.tensor(cfg.latents_std).view(1, C, -1, 1, 1)[:, :, :T]
        return z * std / 0.5 + mean
    if name == "AutoencoderKL":                          # pipeline_flux.py / pipeline_stable_diffusion_3.py
        return z / cfg.scaling_factor + cfg.shift_factor
    return z / cfg.scaling_factor                        # SD (Tiny), SVD, HunyuanVideo, CogVideoX


@pytest.mark.parametrize("name, frames, channels, compression, latent_frames", [   # VAEs that compress time: slow
    pytest.param(*f, id=f[0], marks=pytest.mark.slow if f[1] > 3 else ()) for f in FAMILIES])
def test_source_vae_latents_decode_through_the_cli(name, frames, channels, compression, latent_frames, saved,
                                                   tiny_pipeline_dir, tmp_path, capsys):
    vae = SourceVAE.from_pretrained(saved[name], "vae")
    assert (type(vae.model).__name__, vae.channels, vae.compression) == (name, channels, compression)
    clip = make_clip(seed=1, frames=frames, height=64, width=96)[None]
    latents = vae.encode(clip)                             # normalised, as the model's denoiser makes them
    t, s = compression
    assert latents.shape == (1, channels, latent_frames, 64 // s, 96 // s)

    raw = vae.to_raw(latents)
    torch.testing.assert_close(raw, _pipeline_to_raw(vae.model, latents), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.from_raw(raw), latents, rtol=1e-5, atol=1e-5)
    head = slice(0, 1)                                     # one latent frame: the equivalence, cheaply
    torch.testing.assert_close(vae.decode(latents[:, :, head]), vae.decode(raw[:, :, head], normalised=False),
                               rtol=1e-4, atol=1e-4)

    save_latents(tmp_path / "z.safetensors", latents, fps=16)
    code, stdout, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "up.mp4",
                                "--source-vae", saved[name], "--source-vae-subfolder", "vae", "--scale", 2,
                                "--weights", tiny_pipeline_dir, "--steps", 1)
    assert code == 0, err
    assert "upscaling 96x64 -> 192x128" in stdout
    info = video_info(tmp_path / "up.mp4")
    assert (info.frames, info.width, info.height, info.fps) == (frames, 192, 128, 16)


def test_ltx_decode_timestep_is_the_pipelines_default():
    """Read from LTXPipeline's source (importing it needs transformers, which we do not install)."""
    import ast
    import importlib.util

    from cascadev.pipelines.source_vae import LTX_DECODE_TIMESTEP

    tree = ast.parse(open(importlib.util.find_spec("diffusers.pipelines.ltx.pipeline_ltx").origin).read())
    pipeline = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LTXPipeline")
    call = next(n for n in pipeline.body if isinstance(n, ast.FunctionDef) and n.name == "__call__")
    args = call.args.args[len(call.args.args) - len(call.args.defaults):] + call.args.kwonlyargs
    defaults = {a.arg: ast.literal_eval(d) for a, d in zip(args, [*call.args.defaults, *call.args.kw_defaults])
                if d is not None and isinstance(d, ast.Constant)}
    assert defaults["decode_timestep"] == LTX_DECODE_TIMESTEP
    assert defaults.get("decode_noise_scale") is None          # None: the noise scale is the timestep, as ours


@pytest.mark.slow
def test_cogvideox_15_padding_frame_is_skipped(saved, tiny_pipeline_dir, tmp_path, capsys):
    """CogVideoX 1.5's pipeline pads one leading latent frame to an even count and drops it before its VAE decodes:
    ``--skip-latent-frames 1`` does the same (9 frames, not 4 x 4 = 16), and an even count without it says so."""
    vae = SourceVAE.from_pretrained(saved["AutoencoderKLCogVideoX"], "vae")
    latents = vae.encode(make_clip(seed=1, frames=9, height=64, width=96)[None])           # (1, 16, 3, 8, 12)
    padded = torch.cat([torch.randn_like(latents[:, :, :1]), latents], dim=2)             # as the 1.5 pipeline
    save_latents(tmp_path / "z.safetensors", padded, fps=16)
    common = ["--source-vae", saved["AutoencoderKLCogVideoX"], "--source-vae-subfolder", "vae",
              "--weights", tiny_pipeline_dir, "--steps", 1, "--scale", 1]          # not the default 2048 px
    code, stdout, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "a.mp4", *common,
                                "--skip-latent-frames", 1)
    assert code == 0, err
    assert "note:" not in stdout and video_info(tmp_path / "a.mp4").frames == 9
    code, stdout, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "b.mp4", *common)
    assert code == 0, err
    assert "give --skip-latent-frames 1" in stdout and video_info(tmp_path / "b.mp4").frames == 16


@pytest.mark.slow
def test_raw_latents_and_size(saved, tmp_path, capsys):
    """``--raw-latents``: the file holds what the VAE's encoder gives; ``--size``: the output's long side. The CLI
    writes what ``decode_from`` gives (the shipped cascade, whose output follows its input); without the flag the
    same file is read as normalised latents and the frames change."""
    from helpers import SHIPPED_CASCADE, as_written, mean_abs
    from cascadev.video_io import read_video

    vae = SourceVAE.from_pretrained(saved["AutoencoderKLWan"])        # finds vae/ itself
    raw = vae.encode(make_clip(seed=2, frames=5, height=64, width=96)[None], normalised=False)
    save_latents(tmp_path / "raw.pt", raw)

    def decode(name, *flags):
        code, _, err = run_cli(capsys, "decode", tmp_path / "raw.pt", "-o", tmp_path / name, *flags, "--source-vae",
                               saved["AutoencoderKLWan"], "--size", 160, "--weights", SHIPPED_CASCADE, "--steps", 1,
                               "--colour-fix", 0, "--crf", 0)
        assert code == 0, err
        return read_video(tmp_path / name)

    out = decode("up.mp4", "--raw-latents")
    assert out.shape == (1, 3, 5, 96, 160)
    want = CascadeVPipeline.from_pretrained(str(SHIPPED_CASCADE)).decode_from(raw, vae, latents_normalised=False,
                                                                               size="160", steps=1, colour_fix=0)
    assert mean_abs(out, as_written(want, tmp_path / "want.mp4")) < 2e-5
    assert mean_abs(decode("as_normalised.mp4"), out) > 1e-3


@pytest.mark.slow
def test_decode_from_in_python(saved, tiny_pipeline_dir):
    pipe = CascadeVPipeline.from_pretrained(str(tiny_pipeline_dir))
    vae = SourceVAE.from_pretrained(saved["AutoencoderKLLTXVideo"], "vae")
    latents = vae.encode(make_clip(seed=3, frames=9, height=64, width=64)[None])
    video = pipe.decode_from(latents, vae, scale=1.5, steps=1)
    assert video.shape == (1, 3, 9, 96, 96)
    for source in (str(saved["AutoencoderKLLTXVideo"]), vae.model):     # a folder, a diffusers autoencoder
        torch.testing.assert_close(pipe.decode_from(latents, source, size="96", steps=1), video)


def test_per_channel_statistics_of_an_image_vae():
    """AutoencoderKL with latents_mean / latents_std (Playground v2.5 style): pipeline_stable_diffusion_xl's
    ``latents * std / scaling + mean``; they take precedence over a shift."""
    from diffusers import AutoencoderKL

    mean, std = _stats(5, 4, -1, 1), _stats(6, 4, 0.5, 2)
    with torch.device("meta"):
        model = AutoencoderKL(latents_mean=mean, latents_std=std, scaling_factor=0.5, shift_factor=0.3)
    vae, z = SourceVAE(model), torch.randn(2, 4, 3, 5, 6)
    expected = z * torch.tensor(std).view(1, 4, 1, 1, 1) / 0.5 + torch.tensor(mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(vae.to_raw(z), expected)
    torch.testing.assert_close(vae.from_raw(vae.to_raw(z)), z)


def test_mismatched_channels_is_one_line_naming_both(saved, tiny_pipeline_dir, tmp_path, capsys):
    save_latents(tmp_path / "z.safetensors", torch.randn(1, 4, 3, 8, 12))
    code, _, err = run_cli(capsys, "decode", tmp_path / "z.safetensors", "-o", tmp_path / "o.mp4",
                           "--source-vae", saved["AutoencoderKLWan"], "--source-vae-subfolder", "vae",
                           "--weights", tiny_pipeline_dir)
    assert code == 2 and err.count("\n") == 1, err
    assert "4 channels" in err and "AutoencoderKLWan" in err and "takes 16" in err
    assert not (tmp_path / "o.mp4").exists()
    save_latents(tmp_path / "tc.safetensors", torch.randn(1, 3, 16, 8, 12))   # (B, T, C, h, w), as CogVideoX's
    code, _, err = run_cli(capsys, "decode", tmp_path / "tc.safetensors", "-o", tmp_path / "o.mp4",
                           "--source-vae", saved["AutoencoderKLWan"], "--weights", tiny_pipeline_dir)
    assert code == 2 and "is T before C?" in err and "permute(0, 2, 1, 3, 4)" in err


def test_causal_vaes_encode_1_plus_tk_frames(saved):
    vae = SourceVAE.from_pretrained(saved["AutoencoderKLWan"], "vae")
    with pytest.raises(ValueError, match=r"1 \+ 4k frames.*10 frames do not fit; take 9 or 13"):
        vae.encode(torch.zeros(1, 3, 10, 64, 64))
    assert [vae.frames_out(t) for t in (1, 2, 21)] == [1, 5, 81]
    assert vae.model.use_tiling                            # its own tiling, for frames over its tile (256 px)


@pytest.mark.parametrize("name", ["AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo"])
def test_frames_out_is_what_the_vae_decodes(name, saved):
    """Even latent counts too: CogVideoX keeps a first frame only in odd batches of latent frames."""
    vae = SourceVAE.from_pretrained(saved[name], "vae")
    for T in (1, 2, 4):
        z = torch.randn(1, vae.channels, T, 1, 1) if name == "AutoencoderKLLTXVideo" else torch.randn(1, 16, T, 2, 2)
        assert vae.decode(z).shape[2] == vae.frames_out(T)


def test_cosmos_statistics_cover_16_latent_frames(saved):
    vae = SourceVAE.from_pretrained(saved["AutoencoderKLCosmos"], "vae", load_weights=False)
    with pytest.raises(ValueError, match="cover 16 .121 pixel frames"):
        vae.check_latents(torch.zeros(1, 16, 17, 2, 2))
