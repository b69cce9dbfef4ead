"""The real training script on generated clips: runs, resumes exactly, trains from a latent cache; the loss falls."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cascadev.config import ConfigError
from cascadev.synthetic import write_clips
from cascadev.training.cache_latents import cache_latents
from cascadev.training.cache_latents import main as cache_main
from cascadev.training.config import load_train_config
from cascadev.training.data import (LatentDataset, VideoDataset, clip_starts, load_clip, make_loader, mix_seed,
                                    split_validation)
from cascadev.training.tasks import DiTTask, StageATask
from cascadev.training.checkpoints import checkpoints, load_ema_weights
from cascadev.training.train import lr_scheduler_at, main, make_ema
from cascadev.video_io import read_video, video_info

ROOT = Path(__file__).resolve().parents[1]
DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"
VAE_TINY = ROOT / "configs" / "vae_tiny.yaml"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, 4, frames=5, height=64, width=80)      # non-square sources: resize, then crop
    return folder


SMALL = ["data.height=32", "data.width=32"]   # DiT: latents 4x4, semantic latents 1x1 (keeps CPU tests fast)


def train(config: Path, run_dir: Path, clips: Path, steps: int, *overrides: str) -> Path:
    return main(["--config", str(config), "--max-steps", str(steps),
                 "--set", f"data.videos={clips}", f"run.dir={run_dir}", "run.tensorboard=false", *overrides])


def assert_same_weights(a: Path, b: Path, name: str, atol: float = 1e-6):
    wa, wb = load_file(str(a / name)), load_file(str(b / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


@pytest.mark.slow
def test_dit_script_resumed_run_equals_uninterrupted(clips, tmp_path):
    # gradient accumulation, image batches (as_images) and EMA all take part
    common = ["optim.grad_accum=2", "data.image_prob=0.5", "run.save_every=2", "run.val_every=4", "run.log_every=2",
              *SMALL]
    data = tmp_path / "data"                                          # the clips plus an unreadable file
    data.mkdir()
    for clip in clips.glob("*.mp4"):
        (data / clip.name).symlink_to(clip)
    (data / "broken.mp4").write_bytes(b"not a video at all")          # sorts first: in the training split
    clips = data
    whole = train(DIT_TINY, tmp_path / "whole", clips, 4, *common)
    parts = train(DIT_TINY, tmp_path / "parts", clips, 2, *common)
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [2]
    train(DIT_TINY, tmp_path / "parts", clips, 4, *common)            # resumes from step 2 by itself
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [2, 4]
    assert json.loads((parts / "checkpoints/step_00000004/trainer.json").read_text())["step"] == 4
    for sub in ("final/model", "final/ema"):
        assert_same_weights(whole / sub, parts / sub, "diffusion_pytorch_model.safetensors")
    start = load_file(str(parts / "checkpoints/step_00000002/model.safetensors"))
    end = load_file(str(whole / "final/model/diffusion_pytorch_model.safetensors"))
    assert not torch.allclose(start["final_layer.linear.weight"], end["final_layer.linear.weight"])
    # a checkpoint loads with VideoDiT.from_legacy_folder, the export with from_pretrained; validation wrote a video
    from dit import VideoDiT
    VideoDiT.from_legacy_folder(whole / "checkpoints/step_00000004")
    VideoDiT.from_pretrained(whole / "final/ema")
    assert (whole / "samples/step_00000004.mp4").is_file()
    log = (whole / "train.log").read_text()
    assert "val/loss" in log and "broken.mp4" in log
    skipped = [int(n) for n in re.findall(r"data/skipped (\d+)", log)]
    assert skipped and skipped[-1] > 0                                # counted across the run, and logged


@pytest.mark.slow
def test_vae_script_resumed_run_equals_uninterrupted(clips, tmp_path):
    common = ["stage_a_training.disc_start=1", "run.save_every=2", "run.val_every=3", "run.keep_checkpoints=1"]
    whole = train(VAE_TINY, tmp_path / "whole", clips, 3, *common)
    parts = train(VAE_TINY, tmp_path / "parts", clips, 2, *common)
    first = load_file(str(parts / "checkpoints/step_00000002/model.safetensors"))
    train(VAE_TINY, tmp_path / "parts", clips, 3, *common)
    assert [s for s, _ in checkpoints(parts / "checkpoints")] == [3]          # older ones pruned
    for sub in ("final/model", "final/ema"):
        assert_same_weights(whole / sub, parts / sub, "diffusion_pytorch_model.safetensors")
    assert_same_weights(whole / "checkpoints/step_00000003", parts / "checkpoints/step_00000003", "model_1.safetensors")
    log = (whole / "train.log").read_text()
    assert "LPIPS loss off" in log or "LPIPS loss on" in log
    assert "val/psnr" in log and "d_loss" in log
    # only the decoder trained; the export is a diffusers folder that Stage A loads
    final = load_file(str(whole / "final/model/diffusion_pytorch_model.safetensors"))
    assert torch.equal(first["vae.encoder.conv_in.weight"], final["encoder.conv_in.weight"])
    assert not torch.equal(first["vae.decoder.conv_out.weight"], final["decoder.conv_out.weight"])
    from vae.stage_a import StageAConfig, StageAVAE, build_stage_a
    build_stage_a("tiny_temporal", pretrained=str(whole / "final/model"))
    # a plain StageAConfig takes either export as a diffusers folder (the architecture comes from its config.json)
    for sub in ("final/model", "final/ema"):
        vae = StageAVAE.from_config(StageAConfig(kind="svd_temporal", pretrained=str(whole / sub), subfolder=None))
        exported = load_file(str(whole / sub / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(v, exported[k]) for k, v in vae.model.state_dict().items())


@pytest.mark.slow
def test_diffusion_autoencoder_trains_the_encoder_with_the_dit_and_resumes_exactly(clips, tmp_path):
    # condition.train_encoder: Wuerstchen's Stage B, the semantic encoder learning with the DiT
    common = ["condition.train_encoder=true", "optim.ema_decay=0", "dit.decoded_loss_weight=1", "run.save_every=2",
              "run.val_every=4", *SMALL]
    whole = train(DIT_TINY, tmp_path / "whole", clips, 4, *common)
    parts = train(DIT_TINY, tmp_path / "parts", clips, 2, *common)
    train(DIT_TINY, tmp_path / "parts", clips, 4, *common)
    assert not (whole / "final/ema").exists()
    for sub in ("final/model", "final/model/semantic_encoder"):
        assert_same_weights(whole / sub, parts / sub, "diffusion_pytorch_model.safetensors")
    from dit import VideoDiT
    from vae.semantic_encoder import SemanticEncoder
    VideoDiT.from_pretrained(whole / "final/model")
    trained = SemanticEncoder.from_pretrained(whole / "final/model/semantic_encoder").state_dict()
    config = load_train_config(DIT_TINY, [f"data.videos={clips}"])
    initial = DiTTask(config, build_model=False).semantic.state_dict()       # the same seeded random init
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.endswith("weight"))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.endswith("running_var"))
    assert "val/loss" in (whole / "train.log").read_text()
    for extra, message in ((["optim.ema_decay=0.99"], "set optim.ema_decay=0"),
                           (["data.latents=cache"], "drop data.latents"),
                           (["condition.route=resize", "dit.overrides.cond_channels=4"],
                            "needs condition.route 'semantic'")):
        with pytest.raises(ConfigError, match=message):
            load_train_config(DIT_TINY, [*common, *extra])


def test_cached_latents_give_the_same_batches_as_encoding_on_the_fly(clips, tmp_path):
    fixed = ["data.crop=center", "data.flip_prob=0", "data.start_jitter=false", *SMALL]
    cache = cache_main(["--config", str(DIT_TINY), "--out", str(tmp_path / "cache"), "--set", f"data.videos={clips}",
                        *fixed])
    assert len(list(cache.glob("*.safetensors"))) == 3                # 4 clips, the last held out for validation
    config = load_train_config(DIT_TINY, [f"data.videos={clips}", *fixed])
    task = DiTTask(config)
    pixels = make_loader(VideoDataset(split_validation(config.data)[0], config.data), 2, seed=5)
    cached = make_loader(LatentDataset(cache), 2, seed=5)
    for step in range(3):                                             # crosses an epoch boundary
        a, b = next(pixels), next(cached)
        ga, gb = (torch.Generator().manual_seed(step) for _ in range(2))
        x0_a, cond_a = task.inputs(a)
        x0_b, cond_b = task.inputs(b)
        assert x0_a.shape == (2, 4, 4, 4, 4) and cond_a.shape == (2, 16, 4, 4, 4)
        assert torch.allclose(x0_a, x0_b, atol=1e-5) and torch.allclose(cond_a, cond_b, atol=1e-5)
        loss_a, _ = task.loss(task.model, a, ga, as_images=False)
        loss_b, _ = task.loss(task.model, b, gb, as_images=False)
        assert torch.allclose(loss_a, loss_b, atol=1e-5)
    # the script trains from the cache, and refuses a cache made with other settings
    run = train(DIT_TINY, tmp_path / "run", clips, 1, f"data.latents={cache}", *fixed, 'data.videos=""')
    # latents alone: no validation clips
    assert (run / "final/model/diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="data.height: cache 32 != config 64"):
        train(DIT_TINY, tmp_path / "run2", clips, 1, f"data.latents={cache}", *fixed, "data.height=64")
    assert not (tmp_path / "run2").exists()
    # nor does caching add clips of other settings to it
    files = sorted(cache.iterdir())
    with pytest.raises(ConfigError, match="data.height: cache 32 != config 64.*give another --out"):
        cache_main(["--config", str(DIT_TINY), "--out", str(cache), "--set", f"data.videos={clips}", *fixed,
                    "data.height=64"])
    assert sorted(cache.iterdir()) == files


def test_cache_random_crops_of_native_frames(clips, tmp_path):
    fixed = ["data.resize=false", "data.start_jitter=false", *SMALL]           # 32x32 tiles of 64x80 frames
    args = ["--config", str(DIT_TINY), "--set", f"data.videos={clips}", *fixed]
    random = cache_main([*args[:2], "--out", str(tmp_path / "random"), "--crop", "random", "--clips-per-video", "2",
                         *args[2:]])
    config = load_train_config(DIT_TINY, [f"data.videos={clips}", *fixed])
    centre = cache_latents(config, tmp_path / "centre", clips_per_video=2)     # from Python: a config, no namespace
    task, data = DiTTask(config, build_model=False), dataclasses.replace(config.data, crop="random", flip_prob=0.0)
    first = split_validation(config.data)[0][0].path
    g = torch.Generator().manual_seed(mix_seed(config.run.seed, 0, 1))
    start = clip_starts(video_info(first).frames, config.data, 2)[1]
    expected = task.encode(load_clip(first, data, g, start=start, train=True)[None], g)
    cached = load_file(str(random / "000000_01.safetensors"))
    assert cached["latent"].shape == (4, 4, 4, 4) and torch.allclose(cached["latent"], expected["latent"][0], atol=1e-5)
    differ = [not torch.allclose(load_file(str(p))["cond"], load_file(str(centre / p.name))["cond"])
              for p in sorted(random.glob("*.safetensors"))]
    assert len(differ) == 6 and any(differ)                          # 3 videos x 2 clips, not all at the centre


def test_cache_context_windows_are_cut_from_whole_frame_encodings(tmp_path):
    folder = tmp_path / "clips"
    write_clips(folder, 3, frames=5, height=64, width=96)                     # 2 x 3 semantic cells
    fixed = [f"data.videos={folder}", "data.start_jitter=false", *SMALL]       # windows of 1 x 1 cell
    cache = cache_main(["--config", str(DIT_TINY), "--out", str(tmp_path / "ctx"), "--crop", "context",
                        "--windows-per-clip", "3", "--set", *fixed])
    files = sorted(cache.glob("*.safetensors"))
    assert [f.name for f in files] == [f"{v:06d}_00_{k}.safetensors" for v in range(2) for k in range(3)]
    config = load_train_config(DIT_TINY, fixed)
    task = DiTTask(config, build_model=False)
    T = config.data.num_frames
    whole = task.encode(read_video(split_validation(config.data)[0][0].path, T, 0, config.data.frame_stride))
    for f in files[:3]:
        item = load_file(str(f))
        assert item["latent"].shape == (4, T, 4, 4) and item["cond"].shape == (16, T, 1, 1)
        hits = [(r, c) for r in range(2) for c in range(3)
                if torch.allclose(item["cond"], whole["cond"][0, :, :, r:r + 1, c:c + 1], atol=1e-5)]
        assert len(hits) == 1
        r, c = hits[0]                                                           # the latent window on the same cell
        assert torch.allclose(item["latent"], whole["latent"][0, :, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4], atol=1e-5)
    with pytest.raises(ConfigError, match="semantic route"):
        cache_main(["--config", str(ROOT / "configs" / "dit_resize_4x.yaml"), "--out", str(tmp_path / "x"),
                    "--crop", "context", "--set", f"data.videos={folder}"])


@pytest.mark.slow
def test_dit_loss_falls_on_a_tiny_set(clips):
    config = load_train_config(DIT_TINY, [f"data.videos={clips}"])
    task = DiTTask(config)
    data = VideoDataset(split_validation(config.data)[0], config.data, train=False)
    with torch.no_grad():
        encoded = task.encode(torch.stack([data[i]["video"] for i in range(2)]))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=2e-3)
    losses = []
    for step in range(100):
        loss, _ = task.loss(task.model, encoded, torch.Generator().manual_seed(step), as_images=step % 10 == 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_decoded_loss_adds_the_error_of_x0_decoded_by_stage_a(clips):
    config = load_train_config(DIT_TINY, [f"data.videos={clips}", "diffusion.objective=rf"])
    weighted = dataclasses.replace(config, dit=dataclasses.replace(config.dit, decoded_loss_weight=2.0,
                                                                   decoded_loss_frames=2))
    plain_task, task = DiTTask(config), DiTTask(weighted)
    data = VideoDataset(split_validation(config.data)[0], config.data, train=False)
    with torch.no_grad():
        batch = task.encode(torch.stack([data[i]["video"] for i in range(2)]))   # 2 videos of 4 latent frames
    plain, _ = plain_task.loss(task.model, batch, torch.Generator().manual_seed(0), as_images=False)
    loss, logs = task.loss(task.model, batch, torch.Generator().manual_seed(0), as_images=False)
    assert logs["decoded_mse"] > 0
    assert torch.allclose(loss, plain + 2.0 * logs["decoded_mse"], rtol=1e-5)
    loss.backward()                                    # through the frozen decoder into the DiT
    assert all(p.grad is not None for p in task.model.parameters()) and not any(
        p.requires_grad for p in task.stage_a.parameters())
    x0 = batch["latent"]
    assert torch.equal(task.decoded_mse(x0, x0), torch.zeros(2))
    assert torch.allclose(task.stage_a.decode_window(x0), task.stage_a.decode(x0), atol=1e-5)   # one window
    with pytest.raises(ValueError, match="decoded_loss_frames must be >= 1"):
        dataclasses.replace(config.dit, decoded_loss_frames=0)


@pytest.mark.parametrize("kind", ["svd_temporal", "taesd"])
@pytest.mark.slow
def test_vae_loss_falls_on_a_tiny_set(clips, kind):
    preset = ["stage_a.preset=tiny_taesd", "stage_a_training.trainable=['*']"] if kind == "taesd" else []
    config = load_train_config(VAE_TINY, [f"data.videos={clips}", "stage_a_training.lpips_weight=0",
                                          "data.num_frames=2", *preset])
    task = StageATask(config)
    assert task.config.stage_a.model_config().kind == kind
    video = VideoDataset(split_validation(config.data)[0], config.data, train=False)[0]["video"][None]
    optimizer = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(80):
        loss, _, logs = task.generator_loss(task.model, None, video, torch.Generator().manual_seed(step), False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["l1"].item())
        assert (logs["kl"] == 0) == (kind == "taesd")                   # AutoencoderTiny: no posterior, no KL
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_ema_decay_warms_up_to_the_configured_value():
    # diffusers' EMAModel as make_ema sets it up: update k has decay min(0.999, (1 + k) / (10 + k)), update 0 copies
    model = torch.nn.Linear(3, 2).bfloat16()
    model.bias.requires_grad_(False)                                  # frozen: not averaged
    ema, names = make_ema(model, 0.999)
    assert names == ["weight"] and len(ema.shadow_params) == 1 and ema.shadow_params[0].dtype == torch.float32
    expected, decays = model.weight.detach().float().clone(), []
    for k in range(100):
        with torch.no_grad():
            model.weight.add_(0.01)
        ema.step(p for p in model.parameters() if p.requires_grad)
        decays.append(ema.cur_decay_value)
        assert ema.cur_decay_value == (0.0 if k == 0 else min(0.999, (1 + k) / (10 + k)))
        expected = decays[-1] * expected + (1 - decays[-1]) * model.weight.float()   # the update rule, in float32
        assert torch.allclose(ema.shadow_params[0], expected, atol=1e-5)
    assert decays[90] == pytest.approx(0.91) and ema.optimization_step == 100
    assert ema.get_decay(100_001) == 0.999                            # update 100000: the configured decay


def test_ema_weights_load_by_parameter_name(tmp_path):
    from safetensors.torch import save_file
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    ema, names = make_ema(model, 0.99)
    saved = {n: torch.full_like(p, i, dtype=torch.float64) for i, (n, p) in enumerate(model.named_parameters())}
    save_file(saved, str(tmp_path / "ema.safetensors"))               # the format a checkpoint has always held
    load_ema_weights(ema, names, tmp_path / "ema.safetensors")
    assert all(s.dtype == torch.float32 and torch.equal(s, saved[n].float()) for n, s in zip(names, ema.shadow_params))
    save_file({"0.weight": saved["0.weight"]}, str(tmp_path / "part.safetensors"))
    with pytest.raises(ValueError, match="no EMA weights for 3 trained parameter"):
        load_ema_weights(ema, names, tmp_path / "part.safetensors")


def test_warmup_then_constant_or_cosine():
    # diffusers' schedules: warmup k / warmup_steps at optimizer step k (step 0 at LR 0), cosine to 0 at max_steps
    def lrs(overrides, steps):
        config = load_train_config(DIT_TINY, ["optim.lr=1.0", "optim.warmup_steps=4", "run.max_steps=14", *overrides])
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr)
        scheduler, out = lr_scheduler_at(optimizer, config, 0), []
        for step in range(15):
            out.append(scheduler.get_last_lr()[0])
            assert optimizer.param_groups[0]["lr"] == out[-1]
            optimizer.step()
            scheduler.step()
        for step in steps:                                            # built at a resumed step: the same LR
            assert lr_scheduler_at(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), config,
                                   step).get_last_lr()[0] == out[step]
        return [out[s] for s in steps]
    assert lrs([], (0, 1, 3, 4, 13)) == [0.0, 0.25, 0.75, 1.0, 1.0]
    first, middle, last, end = lrs(["optim.schedule=cosine"], (4, 9, 13, 14))
    assert first == 1.0 and abs(middle - 0.5) < 1e-9 and 0 < last < 0.03 and end < 1e-9


def test_config_mistakes_fail_with_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="cond_channels=4"):
        load_train_config(DIT_TINY, ["condition.route=resize"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_train_config(DIT_TINY, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="unknown dit preset"):
        load_train_config(DIT_TINY, ["dit.preset=huge"])
    with pytest.raises(ConfigError, match="set dit.overrides.latent_channels=8"):
        load_train_config(DIT_TINY, ["stage_a.overrides.latent_channels=8"])
    with pytest.raises(ConfigError, match="matches no parameter"):
        StageATask(load_train_config(VAE_TINY, ["stage_a_training.trainable=[nothing.*]"]))


def test_resize_route_conditions_on_a_small_stage_a_latent(clips):
    for source in ("pixels", "latent"):
        config = load_train_config(DIT_TINY, [f"data.videos={clips}", "condition.route=resize",
                                              "dit.overrides.cond_channels=4",
                                              "condition.spatial_factor=2", "condition.temporal_factor=2",
                                              f"condition.resize_from={source}"])
        task = DiTTask(config)
        assert task.semantic is None
        video = VideoDataset(split_validation(config.data)[0], config.data, train=False)[0]["video"][None]
        encoded = task.encode(video)
        assert encoded["latent"].shape == (1, 4, 4, 8, 8) and encoded["cond"].shape == (1, 4, 2, 4, 4)
        x0, cond = task.inputs({"video": video})
        assert cond.shape == x0.shape
        if source == "pixels":                                         # frame 0 is the latent of the small frame 0
            small = task.stage_a.encode(torch.nn.functional.interpolate(video[:, :, 0], scale_factor=0.5,
                                                                         mode="bilinear", antialias=True)[:, :, None])
            assert torch.allclose(encoded["cond"][:, :, :1], small, atol=1e-5)
        loss, _ = task.loss(task.model, {"video": video}, torch.Generator().manual_seed(0), as_images=False)
        assert torch.isfinite(loss)


def test_init_from_our_format_and_the_official_checkpoint(tmp_path):
    from dit import VideoDiT
    from cascadev.training.tasks import build_dit
    config = load_train_config(DIT_TINY)
    source = VideoDiT(**config.dit.model_config())
    torch.nn.init.normal_(source.final_layer.linear.weight)
    source.save_pretrained(tmp_path / "ours")
    torch.save({"state_dict": {**source.state_dict(), "pos_embed": torch.zeros(1)}}, tmp_path / "release.pth")
    for init in (str(tmp_path / "ours"), f"official:{tmp_path / 'release.pth'}"):
        model = build_dit(load_train_config(DIT_TINY, [f"dit.init_from={init}", "dit.gradient_checkpointing=true"]),
                          True)
        assert model.training and model.gradient_checkpointing
        assert torch.equal(model.final_layer.linear.weight, source.final_layer.linear.weight)
    with pytest.raises(FileNotFoundError, match="init_from"):
        build_dit(load_train_config(DIT_TINY, [f"dit.init_from={tmp_path / 'missing'}"]), True)


def test_vae_loss_terms_with_lpips_and_discriminator(clips):
    from cascadev.training.losses import PatchDiscriminator, hinge_d_loss
    config = load_train_config(VAE_TINY, [f"data.videos={clips}"])
    task = StageATask(config)
    task.lpips = lambda x, y: (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)   # stands in for LPIPS (no weights here)
    video = VideoDataset(split_validation(config.data)[0], config.data, train=False)[0]["video"][None]
    disc = task.discriminator
    assert isinstance(disc, PatchDiscriminator) and disc(video[:, :, 0]).shape[1] == 1
    loss, recon, logs = task.generator_loss(task.model, disc, video, torch.Generator().manual_seed(0), use_disc=True)
    assert set(logs) == {"l1", "mse", "kl", "lpips", "g_adv", "loss"} and recon.shape == video.shape
    c = config.stage_a_training
    assert torch.allclose(logs["loss"], c.l1_weight * logs["l1"] + c.kl_weight * logs["kl"]
                          + c.lpips_weight * logs["lpips"] + c.disc_weight * logs["g_adv"],
                          rtol=1e-5)          # mse_weight 0 by default
    weighted = StageATask(dataclasses.replace(config, stage_a_training=dataclasses.replace(c, mse_weight=2.0)))
    weighted.model.load_state_dict(task.model.state_dict())
    loss2, _, logs2 = weighted.generator_loss(weighted.model, None, video, torch.Generator().manual_seed(0),
                                              use_disc=False)
    assert torch.allclose(logs2["mse"], logs["mse"]) and logs["mse"] > 0
    assert torch.allclose(loss2, c.l1_weight * logs["l1"] + 2.0 * logs["mse"] + c.kl_weight * logs["kl"], rtol=1e-5)
    colour = StageATask(dataclasses.replace(config, stage_a_training=dataclasses.replace(c, lowpass_weight=3.0)))
    colour.model.load_state_dict(task.model.state_dict())
    loss3, recon3, logs3 = colour.generator_loss(colour.model, None, video, torch.Generator().manual_seed(0),
                                                 use_disc=False)

    def block_means(v):
        return F.avg_pool2d(v.transpose(1, 2).flatten(0, 1), 8)              # (b t) 3 h/8 w/8

    lowpass = (block_means(recon3) - block_means(video)).square().mean()
    assert torch.allclose(logs3["lowpass"], lowpass) and lowpass > 0
    assert torch.allclose(loss3, loss2 - 2.0 * logs["mse"] + 3.0 * lowpass, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())            # the generator step leaves D alone
    assert task.model.vae.decoder.conv_out.weight.grad is not None
    assert task.model.vae.encoder.conv_in.weight.grad is None
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0     # both margins met


@pytest.mark.slow
def test_resume_checks_the_config_and_can_start_over_or_go_back(clips, tmp_path):
    run = tmp_path / "run"
    common = ["run.save_every=1", "run.val_every=0", *SMALL]
    train(DIT_TINY, run, clips, 2, *common)
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [1, 2]
    with pytest.raises(ConfigError, match=r"optim.lr: .* -> 0.5.*--allow-config-change"):
        train(DIT_TINY, run, clips, 3, *common, "optim.lr=0.5")
    with pytest.raises(ConfigError, match=r"trained as another model \(dit.overrides.depth: None -> 3\)"):
        train(DIT_TINY, run, clips, 3, *common, "dit.overrides.depth=3", "--allow-config-change")
    train(DIT_TINY, run, clips, 3, *common, "optim.lr=0.5", "--allow-config-change")     # resumes at 2, runs to 3
    assert "resuming with a changed config: optim.lr" in (run / "train.log").read_text()
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [1, 2, 3]
    main(["--config", str(DIT_TINY), "--max-steps", "2", "--resume-from", "1", "--allow-config-change", "--set",
          f"data.videos={clips}", f"run.dir={run}", "run.tensorboard=false", "optim.lr=0.5", *common])
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [1, 2]                # 2 and 3 moved aside
    assert [s for s, _ in checkpoints(next((run / "checkpoints").glob("after-1-*")))] == [2, 3]
    train(DIT_TINY, run, clips, 1, *common, "dit.overrides.depth=3", "--fresh")    # another model, from step 0
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [1]
    assert json.loads((run / "checkpoints/step_00000001/trainer.json").read_text())["step"] == 1
    with pytest.raises(ConfigError, match="--resume-from 7: no complete checkpoint"):
        train(DIT_TINY, run, clips, 8, *common, "dit.overrides.depth=3", "--resume-from", "7")
    # a resume that fails on its input touches nothing of the run (its data is checked before anything is written)
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert "stage dit on 1 process(es)" in (run / "train.log").read_text()    # held until the run dir opened
    with pytest.raises(FileNotFoundError, match="data.videos: data source .*nope.txt not found"):
        train(DIT_TINY, run, tmp_path / "nope.txt", 2, *common, "dit.overrides.depth=3", "--allow-config-change")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept


def test_nothing_loads_a_full_disk_and_a_killed_export_are_one_line_and_leave_nothing(clips, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (broken / name).write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"none of the \d+ video\(s\) could be loaded, "
                                         r"e\.g\. .*\.mp4: not a readable video"):
        train(DIT_TINY, tmp_path / "nothing", broken, 1, *SMALL)
    run = tmp_path / "run"
    (run / "checkpoints/.tmp_step_00000009").mkdir(parents=True)          # left by a killed run
    (run / ".final.tmp").mkdir()
    import accelerate
    def full_disk(self, output_dir=None, **kwargs):
        import errno
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(accelerate.Accelerator, "save_state", full_disk)
    with pytest.raises(OSError, match="could not write checkpoint .*step_00000001: No space left on device"):
        train(DIT_TINY, run, clips, 1, *SMALL, "run.save_every=1", "run.val_every=0")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [] and not (run / ".final.tmp").exists()


def test_train_from_python_with_a_config_object_needs_no_namespace(clips, tmp_path, monkeypatch):
    import argparse

    import cascadev.training.train as train_module
    from cascadev.training.train import train as train_fn

    def no_namespace(*args, **kwargs):
        raise AssertionError("an argparse.Namespace was made on the way through train()")
    monkeypatch.setattr(argparse, "Namespace", no_namespace)
    monkeypatch.setattr(train_module, "main", no_namespace)             # the command line over train()
    config = load_train_config(DIT_TINY, [f"data.videos={clips}", "run.tensorboard=false", "run.val_every=0"])
    run = train_fn(config, overrides=SMALL, max_steps=2, run_dir=tmp_path / "run")
    assert run == tmp_path / "run"
    assert [s for s, _ in checkpoints(run / "checkpoints")] == [2]
    from dit import VideoDiT
    VideoDiT.from_pretrained(run / "final/ema")
    assert (run / "final/model/diffusion_pytorch_model.safetensors").is_file()
    assert load_train_config(run / "config.yaml").run.max_steps == 2
    with pytest.raises(ConfigError, match="exclude each other"):
        train_fn(DIT_TINY, fresh=True, resume_from=1, run_dir=tmp_path / "other")


@pytest.mark.parametrize("skipped", [False, True])
def test_an_fp16_overflow_step_leaves_the_ema_and_counts_its_warmup(skipped):
    """When the fp16 GradScaler skips a step (inf/NaN gradients), the optimizer did not move the weights, so neither
    does the EMA; its warmup counter still advances, as the LR schedule does (``train.optimizer_step``)."""
    from types import SimpleNamespace

    from cascadev.training.train import Session, optimizer_step

    model = torch.nn.Linear(3, 2)
    ema, names = make_ema(model, 0.9)
    ema.step(model.parameters())                                   # update 0: a copy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.weight.add_(1.0)                                     # what an optimizer step would have done
    before = [p.clone() for p in ema.shadow_params]
    accelerator = SimpleNamespace(clip_grad_norm_=lambda params, clip: torch.tensor(1.5), unwrap_model=lambda m: m,
                                  optimizer_step_was_skipped=skipped)
    session = Session(accelerator, None, {"model": model, "optimizer": optimizer}, list(model.parameters()),
                      optimizer, ema, names)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    assert optimizer_step(session, schedule, grad_clip=1.0) == 1.5
    assert ema.optimization_step == 2 and schedule.last_epoch == 1          # counted either way
    unchanged = all(torch.equal(a, b) for a, b in zip(before, ema.shadow_params))
    assert unchanged == skipped
