"""Fuzzing the contents of every kind of file a command reads (the options' values: test_fuzz_cli.py).

Each kind has a good file, made here, and its broken variants: the bytes damaged (empty, cut at several points, random
bytes of its length) and a valid container with the wrong content (wrong keys, shapes, dtypes, JSON/YAML types, NaN,
missing entries). Each variant goes through the command that reads it, in-process. Properties, as the option fuzz:
exit code 0 or 2 (never an internal error), no traceback, an error is one line that names the file, and a failed run
leaves its folder as it was (no temp file, no partial output).

Kinds (command): latents, .safetensors and .pt (decode, upscale); YAML training configs (train, cache-latents); clip
lists with captions, .txt .csv .jsonl .json (train, eval); videos, mp4 mkv webm and impostors (reconstruct, eval);
cascade folders: model_index.json, each part's config.json and weights, the scheduler's config (decode); the shipped
upscale and text-to-video folders (upscale, generate); I3D detectors, state dict or TorchScript (eval --metrics fvd); a
training run's checkpoints (train, resuming); a latent cache (train --set data.latents).
A few cases of each kind, those that once failed first, run in the quick part; the rest are marked slow.
"""

import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from helpers import ROOT, run_cli
from cascadev.pipelines.cascade import TINY_CASCADE
from cascadev.pipelines.upscale import TINY_FPS4X

DIT_TINY = ROOT / "configs" / "dit_tiny.yaml"


# -- the breakages --------------------------------------------------------------------------------

def damaged(good: bytes, seed: int = 0) -> dict[str, bytes]:
    """The byte-level breakages of a good file: empty, cut at several points (a partial copy, a full disk), random
    bytes of its length, its middle overwritten."""
    n, g = len(good), random.Random(seed)
    cuts = {"cut1": 1, "cut8": 8, "cut100": 100, "cut_half": n // 2, "cut_last": n - 1}     # names for any length
    middle = n // 2
    return {"empty": b"", **{name: good[:c] for name, c in cuts.items()}, "random": g.randbytes(max(n, 64)),
            "overwritten": good[:middle] + g.randbytes(min(256, n - middle)) + good[middle + 256:]}


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def cases(names, quick=()) -> list:
    """pytest params of ``names`` (strings, or tuples of arguments), all but those in ``quick`` marked slow: the quick
    part keeps a few of each kind, those that once failed first."""
    return [pytest.param(*([n] if isinstance(n, str) else n), id="-".join([n] if isinstance(n, str) else n),
                         marks=() if n in quick else pytest.mark.slow) for n in names]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden temp files included) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_dir()}


def run_checked(capsys, argv: list, folder: Path, names: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``cascadev ARGV`` in-process and check the properties; ``names``: what the error line must name (one of
    them: the broken file's name or its folder's). Returns (exit code, stderr)."""
    before = snapshot(folder)
    code, _, err = run_cli(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip() and "%|" not in line]     # bars closed
    context = f"{argv[0]} {names}: {err.strip()[:800]}"
    assert code in (0, 2), context
    assert "Traceback" not in err and "internal error" not in err, context
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith(f"cascadev {argv[0]}: error: "), context
        assert not names or any(name in lines[0] for name in names), context
        assert snapshot(folder) == before, context                          # nothing written, no temp file left
    return code, err


# -- latents: decode (16 channels) and upscale (4, Stage A's) --------------------------------------

def latents_variants(channels: int) -> dict[str, bytes]:
    """name -> file contents; the name's suffix is the file's."""
    z = torch.randn(1, channels, 2, 2, 2)
    good_st, good_pt = save({"latents": z}, metadata={"fps": "8"}), torch_bytes({"latents": z, "metadata": {"fps": 8}})
    out = {f"{k}.safetensors": v for k, v in damaged(good_st).items()}
    out |= {f"{k}.pt": v for k, v in damaged(good_pt).items()}
    tensors = {"wrong_keys": {"a": z, "b": z.clone()}, "no_tensors": {},
               "3d": {"latents": z[0, 0]}, "6d": {"latents": z[None]}, "tchw": {"latents": z.transpose(1, 2)},
               "int": {"latents": z.long()}, "bool": {"latents": z > 0}, "uint8": {"latents": z.to(torch.uint8)},
               "fp16": {"latents": z.half()}, "float64": {"latents": z.double()},
               "nan": {"latents": torch.full_like(z, float("nan"))},
               "inf": {"latents": z.masked_fill(z > 0, float("inf"))},
               "huge": {"latents": z * 1e30}, "zero_frames": {"latents": z[:, :, :0]}}
    out |= {f"{k}.safetensors": save({n: t.contiguous() for n, t in v.items()}) for k, v in tensors.items()}
    for fps in ("abc", "nan", "inf", "-1", "0", "", "1e999", "1" * 400):
        out[f"fps_{fps[:8] or 'blank'}.safetensors"] = save({"latents": z}, metadata={"fps": fps})
    objects = {"list": [z], "string": "latents", "none": None, "int": 3, "dict_list": {"latents": z.tolist()},
               "nested": {"latents": {"latents": z}}, "meta_list": {"latents": z, "metadata": ["fps"]},
               "meta_fps": {"latents": z, "metadata": {"fps": "x"}},
               "meta_fps_list": {"latents": z, "metadata": {"fps": [8]}},
               "complex": z.to(torch.complex64), "int_keys": {1: z, 2: z}, "sparse": z.to_sparse()}
    out |= {f"obj_{k}.pt": torch_bytes(v) for k, v in objects.items()}
    out["pickle_code.pt"] = b"\x80\x04cos\nsystem\n(S'true'\ntR."                  # a pickle that runs code
    return out


# upscale reads latents with decode's reader: its own checks (4 channels, frames) and a sample of the rest
UPSCALE_LATENTS = ("empty.pt", "cut_half.safetensors", "random.safetensors", "wrong_keys.safetensors", "3d.safetensors",
                   "6d.safetensors", "tchw.safetensors", "int.safetensors", "nan.safetensors", "huge.safetensors",
                   "zero_frames.safetensors", "fps_-1.safetensors", "fps_abc.safetensors", "obj_list.pt",
                   "obj_sparse.pt", "obj_complex.pt")
LATENTS = {"decode": latents_variants(16),
           "upscale": {k: v for k, v in latents_variants(4).items() if k in UPSCALE_LATENTS}}


@pytest.mark.parametrize("command,name", cases([(c, n) for c in LATENTS for n in LATENTS[c]], quick=[
    ("decode", n) for n in ("empty.pt", "cut_half.safetensors", "random.pt", "obj_sparse.pt", "obj_complex.pt",
                            "fps_abc.safetensors", "fps_inf.safetensors", "huge.safetensors", "obj_meta_list.pt",
                            "nan.safetensors")] + [("upscale", "fps_-1.safetensors"), ("upscale", "int.safetensors")]))
def test_broken_latents(command, name, tmp_path, capsys, tiny_pipeline_dir):
    path = tmp_path / name
    path.write_bytes(LATENTS[command][name])
    weights = tiny_pipeline_dir if command == "decode" else TINY_FPS4X
    code, err = run_checked(capsys, [command, path, "-o", tmp_path / "o.mp4", "--weights", weights, "--steps", "1"],
                            tmp_path, (name,))
    if code == 0:
        assert (tmp_path / "o.mp4").is_file()


# -- training configs (YAML): train and cache-latents ----------------------------------------------

def with_section(text: str, section: str, body: str) -> str:
    """dit_tiny.yaml's ``text`` with its top-level ``section`` replaced by ``section: body`` (appended if absent)."""
    lines, out, skipping = text.splitlines(), [], False
    for line in lines:
        if line.startswith(f"{section}:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out + [f"{section}: {body}"]) + "\n"


def config_variants() -> dict[str, bytes]:
    good = DIT_TINY.read_text()
    sections = {"stage": ["7", "[dit]", "null", "vae_", "''"], "dit": ["5", "[1, 2]", "{preset: 5}", "{preset: huge}",
                                                                      "{overrides: {depth: x}}", "{overrides: 3}"],
                "optim": ["{lr: abc}", "{lr: .nan}", "{lr: -1}", "{lr: .inf}", "{betas: 5}", "{betas: [1]}"],
                "data": ["{height: 1e999}", "{num_frames: -3}", "{videos: [a, b]}", "{videos: 5}", "{crop: sideways}"],
                "run": ["{max_steps: 1.5}", "{max_steps: 99999999999999999999999}", "{dir: [x]}", "{seed: x}"],
                "condition": ["{route: none}", "{semantic_weights: 5}"], "unknown_section": ["1"]}
    out = {f"{k}.yaml": v for k, v in damaged(good.encode()).items()}
    for section, bodies in sections.items():
        out |= {f"{section}_{i}.yaml": with_section(good, section, body).encode() for i, body in enumerate(bodies)}
    texts = {"list": "- stage\n- dit\n", "string": "dit\n", "number": "3\n", "null": "null\n", "comment": "# x\n",
             "tabs": good.replace("  ", "\t"), "duplicate": good + "stage: vae\n", "crlf": good.replace("\n", "\r\n"),
             "python_tag": "!!python/object/apply:os.system ['true']\n",
             "bad_indent": good.replace("  preset", " preset"),
             "anchors": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}]\n"
                                                                      for p, c in zip("abcdefg", "bcdefgh")),
             "deep_map": "stage: " + "{a: " * 1500 + "1" + "}" * 1500}     # (PyYAML scans deep flow lists slowly)
    out |= {f"text_{k}.yaml": v.encode() for k, v in texts.items()}
    out |= {"utf16.yaml": good.encode("utf-16"), "bom.yaml": b"\xef\xbb\xbf" + good.encode(),
            "nul.yaml": good.encode().replace(b"dit", b"d\x00t", 1),
            "latin1.yaml": (good + "# caf\xe9\n").encode("latin-1")}
    return out


CONFIGS = config_variants()


# cache-latents reads a config as train does: the damaged bytes and the YAML oddities only
CACHE_CONFIGS = [n for n in sorted(CONFIGS) if n.startswith(("text_", *damaged(b"")))]


@pytest.mark.parametrize("command,name", cases([("train", n) for n in sorted(CONFIGS)]
                                                + [("cache-latents", n) for n in CACHE_CONFIGS],
                                                quick=[("train", n) for n in ("text_deep_map.yaml", "cut_half.yaml",
                                                                              "text_duplicate.yaml", "random.yaml",
                                                                              "data_3.yaml", "optim_0.yaml")]
                                                + [("cache-latents", "text_deep_map.yaml")]))
def test_broken_config(command, name, tmp_path, capsys):
    """Every variant fails (the data it names is missing: a config that still parses stops there), in one line naming
    the config or the data."""
    path = tmp_path / name
    path.write_bytes(CONFIGS[name])
    where = ["--run-dir", tmp_path / "run"] if command == "train" else ["--out", tmp_path / "cache"]
    code, _ = run_checked(capsys, [command, "--config", path, *where, "--set", f"data.videos={tmp_path / 'nowhere'}"],
                          tmp_path, (name, "nowhere"))
    assert code == 2


# -- clip lists: a training run's data.videos (with captions), eval's --real ------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two good 5-frame 48x48 clips, a.mp4 and b.mp4, and the folder they are in."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video

    folder = tmp_path_factory.mktemp("fuzz_clips")
    for seed, name in enumerate("ab"):
        write_video(folder / f"{name}.mp4", make_clip(seed=seed, frames=5, height=48, width=48), fps=8)
    return folder


def list_variants() -> dict[str, str | bytes]:
    """name -> contents; the paths ``{a}`` and ``{b}`` are the good clips, relative ones are beside the list."""
    good = {"txt": "{a}\n{b}\n", "csv": "path,caption\n{a},red\n{b},blue\n",
            "jsonl": '{{"path": "{a}", "caption": "red"}}\n{{"path": "{b}"}}\n',
            "json": '[{{"path": "{a}", "caption": "red"}}, {{"path": "{b}"}}]'}
    out = {}
    for suffix, text in good.items():
        text = text.format(a="{a}", b="{b}")                      # JSON's braces undoubled, the paths left to fill
        filled = text.replace("{a}", "a.mp4").replace("{b}", "b.mp4")
        out |= {f"{k}.{suffix}": v for k, v in damaged(filled.encode()).items()}
        out |= {f"nul.{suffix}": text.replace("{a}", "a\x00.mp4"), f"long.{suffix}": text.replace("{a}", "x" * 5000),
                f"folder.{suffix}": text.replace("{a}", "."), f"missing.{suffix}": text.replace("{a}", "gone.mp4"),
                f"notvideo.{suffix}": text.replace("{a}", "{list}")}
    rows = {"dict": {"path": "{a}"}, "strings": ["{a}", "{b}"], "numbers": [1, 2], "path_number": [{"path": 5}],
            "path_list": [{"path": ["{a}"]}], "path_null": [{"path": None}], "path_dict": [{"path": {"a": 1}}],
            "path_true": [{"path": True}], "caption_number": [{"path": "{a}", "caption": 5}, {"path": "{b}"}],
            "caption_dict": [{"path": "{a}", "caption": {"x": [1]}}, {"path": "{b}"}], "empty_list": [],
            "deep": "[" * 100000 + "]" * 100000, "huge_number": '[{"path": "{a}", "caption": 1' + "0" * 5000 + "}]"}
    for name, value in rows.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[f"{name}.json"] = text
        if isinstance(value, list):
            out[f"{name}.jsonl"] = "".join(json.dumps(row) + "\n" for row in value) or "\n"
    out |= {"jsonl_list_line.jsonl": '["{a}"]\n', "csv_no_path.csv": "file\n{a}\n", "csv_empty_path.csv": "path\n\n,\n",
            "csv_unclosed.csv": 'path\n"{a}\n', "csv_extra.csv": "path\n{a},x,y\n{b}\n", "txt_blank.txt": " \n\t\n",
            "txt_comment.txt": "# {a}\n", "txt_utf16.txt": "{a}\n{b}\n".encode("utf-16")}
    return out


LISTS = list_variants()


def write_list(folder: Path, clips: Path, name: str) -> Path:
    """The variant ``name`` in ``folder`` beside copies of the good clips; its path."""
    for clip in clips.glob("*.mp4"):
        shutil.copy(clip, folder / clip.name)
    path, value = folder / name, LISTS[name]
    if isinstance(value, str):
        value = value.replace("{a}", "a.mp4").replace("{b}", "b.mp4").replace("{list}", name).encode()
    path.write_bytes(value)
    return path


@pytest.mark.parametrize("name", cases([n for n in sorted(LISTS) if n.endswith(".txt") or n.startswith(("random.",
                                                                                                    "cut_half."))],
                                       quick=("random.txt", "long.txt", "nul.txt")))    # eval reads lines of text
def test_broken_clip_list_eval(name, tmp_path, capsys, clips):
    path = write_list(tmp_path, clips, name)
    run_checked(capsys, ["eval", "--real", path, "--fake", clips, "--metrics", "psnr", "--frames", "2"], tmp_path,
                (name,))


@pytest.mark.parametrize("name", cases(sorted(LISTS), quick=("deep.json", "path_number.jsonl", "huge_number.json",
                                                               "cut8.txt", "caption_dict.json", "csv_no_path.csv")))
def test_broken_clip_list_train(name, tmp_path, capsys, clips):
    path = write_list(tmp_path, clips, name)
    run_checked(capsys, ["train", "--config", DIT_TINY, "--run-dir", tmp_path / "run", "--max-steps", "0", "--set",
                         f"data.videos={path}", "data.height=32", "data.width=32", "run.tensorboard=false"], tmp_path,
                (name, "data.videos"))


# -- videos: reconstruct, eval, a training set -----------------------------------------------------

def video_variants(clips: Path, folder: Path) -> dict[str, bytes]:
    """name -> contents of the broken videos (the name's suffix is the file's): the good clip in three containers,
    damaged, and containers with the wrong content."""
    import av
    import numpy as np

    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video

    out = {}
    for suffix in (".mp4", ".mkv", ".webm"):
        write_video(folder / f"good{suffix}", make_clip(seed=1, frames=5, height=48, width=48), fps=8)
        out |= {f"{k}{suffix}": v for k, v in damaged((folder / f"good{suffix}").read_bytes()).items()}
    write_video(folder / "tiny.mp4", make_clip(seed=1, frames=1, height=2, width=2), fps=8)
    with av.open(str(folder / "audio.mp4"), "w") as container:             # a sound track, no video stream
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        container.mux([*stream.encode(frame), *stream.encode()])
    out |= {"one_2x2_frame.mp4": (folder / "tiny.mp4").read_bytes(),
            "audio_only.mp4": (folder / "audio.mp4").read_bytes(), "text.mp4": b"not a video\n", "png.mp4": _png(),
            "latents.mp4": save({"latents": torch.zeros(1, 16, 1, 1, 1)}),
            "mp4_named.mkv": (clips / "a.mp4").read_bytes(),
            "yaml.mp4": DIT_TINY.read_bytes()}
    return out


def _png() -> bytes:
    from torchvision.io import encode_png

    return encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes()


@pytest.fixture(scope="module")
def videos(tmp_path_factory, clips):
    return video_variants(clips, tmp_path_factory.mktemp("fuzz_videos"))


VIDEO_NAMES = [f"{k}{s}" for s in (".mp4", ".mkv", ".webm") for k in damaged(bytes(200))] + [
    "one_2x2_frame.mp4", "audio_only.mp4", "text.mp4", "png.mp4", "latents.mp4", "mp4_named.mkv", "yaml.mp4"]


@pytest.mark.slow       # a video that still decodes is reconstructed (tiny, one step: 1-2 s each)
@pytest.mark.parametrize("name", VIDEO_NAMES)
def test_broken_video_reconstruct(name, tmp_path, capsys, videos, tiny_pipeline_dir):
    path = tmp_path / name
    path.write_bytes(videos[name])
    code, _ = run_checked(capsys, ["reconstruct", path, "-o", tmp_path / "o.mp4", "--weights", tiny_pipeline_dir,
                                   "--frames", "2", "--steps", "1", "--size", "64", "--latents-out",
                                   tmp_path / "z.safetensors"], tmp_path, (name,))
    if code == 0:
        from cascadev.pipelines.latents import read_latents
        from cascadev.video_io import read_video

        assert read_video(tmp_path / "o.mp4").shape[2] >= 1 and read_latents(tmp_path / "z.safetensors")[0].ndim == 5


@pytest.mark.parametrize("name", cases(VIDEO_NAMES, quick=("cut_half.mp4", "audio_only.mp4", "text.mp4")))
def test_broken_video_eval(name, tmp_path, capsys, videos, clips):
    """A broken video among good ones is skipped, saying why; alone, it is one line naming it."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / name).write_bytes(videos[name])
    argv = ["eval", "--fake", clips, "--metrics", "psnr", "--frames", "2"]
    code, _ = run_checked(capsys, [*argv, "--real", tmp_path / "real"], tmp_path, ("no readable videos", "no pairs"))
    shutil.copy(clips / "b.mp4", tmp_path / "real")
    code, err = run_checked(capsys, [*argv, "--real", tmp_path / "real"], tmp_path)
    assert code == 0, err


# -- cascade folders: model_index.json, each part's config.json and weights, the scheduler's config ----------

def json_edit(path: Path, **changes) -> bytes:
    """The JSON file ``path`` with keys changed (a value of ``...`` removes the key)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        data.pop(key) if value is ... else data.__setitem__(key, value)
    return json.dumps(data).encode()


def tensors_edit(path: Path, change) -> bytes:
    from safetensors.torch import load_file

    return save(change(load_file(str(path))))


def cascade_variants() -> dict[str, tuple[str, bytes]]:
    """name -> (the file of the shipped tiny cascade it replaces, its contents)."""
    folder, out = TINY_CASCADE, {}
    weights = "diffusion_pytorch_model.safetensors"
    for file in ["model_index.json", "scheduler/scheduler_config.json",
                 *[f"{part}/{name}" for part in ("dit", "vae", "semantic_encoder", "previewer")
                   for name in ("config.json", weights)]]:
        kinds = ("empty", "cut_half", "random", "overwritten") if file.endswith(weights) else ("empty", "cut_half")
        broken = damaged((folder / file).read_bytes())
        out |= {f"{file}:{kind}": (file, broken[kind]) for kind in kinds}
    index = folder / "model_index.json"
    for name, changes in {"list": None, "class_number": {"_class_name": 5}, "class_other": {"_class_name": "Foo"},
                          "dit_string": {"dit": "dit"}, "dit_short": {"dit": ["dit.video_dit"]},
                          "dit_nulls": {"dit": [None, None]}, "dit_elsewhere": {"dit": ["os", "system"]},
                          "dit_missing": {"dit": ...}, "vae_missing": {"vae": ...}, "stage_a_number": {"stage_a": 5},
                          "stage_a_word": {"stage_a": {"scale_factor": "x"}},
                          "stage_a_negative": {"stage_a": {"tile_size": -1}}, "steps_negative":
                          {"num_inference_steps": -1}, "steps_word": {"num_inference_steps": "x"},
                          "colour_fix_negative": {"colour_fix": -1}, "colour_fix_word": {"colour_fix": "x"},
                          "demo_number": {"demo": 5}}.items():
        out[f"model_index.json:{name}"] = ("model_index.json",
                                           b"[1, 2]" if changes is None else json_edit(index, **changes))
    dit = folder / "dit" / "config.json"
    for name, changes in {"depth_word": {"depth": "x"}, "depth_negative": {"depth": -1}, "depth_zero": {"depth": 0},
                          "heads_zero": {"num_heads": 0}, "hidden_odd": {"hidden_size": 145},
                          "patch_zero": {"patch_size": 0}, "strides_number": {"attn_strides": 5},
                          "strides_zero": {"attn_strides": [[0, 0]]}, "window_zero": {"window_size": 0},
                          "latent_channels": {"latent_channels": 8}, "cond_channels": {"cond_channels": 3},
                          "unknown_key": {"foo": 1}, "depth_missing": {"depth": ...}, "pe_nan": {"pe_interpolation":
                                                                                             float("nan")},
                          "mlp_huge": {"mlp_ratio": 1e9}}.items():
        out[f"dit/config.json:{name}"] = ("dit/config.json", json_edit(dit, **changes))
    dit_weights = folder / "dit" / weights
    for name, change in {"key_missing": lambda s: dict(list(s.items())[1:]),
                         "key_renamed": lambda s: {k.replace("blocks.0.", "blocks.9."): v for k, v in s.items()},
                         "key_extra": lambda s: {**s, "extra": torch.zeros(1)},
                         "shape": lambda s: {k: v[..., :1].contiguous() if k.endswith("weight") else v
                                             for k, v in s.items()},
                         "int": lambda s: {k: v.long() for k, v in s.items()},
                         "nan": lambda s: {k: torch.full_like(v, float("nan")) for k, v in s.items()},
                         "fp16": lambda s: {k: v.half() for k, v in s.items()}}.items():
        out[f"dit/weights:{name}"] = (f"dit/{weights}", tensors_edit(dit_weights, change))
    scheduler = folder / "scheduler" / "scheduler_config.json"
    for name, changes in {"timesteps_zero": {"num_train_timesteps": 0}, "shift_negative": {"shift": -1},
                          "class_other": {"_class_name": "Foo"}, "shift_word": {"shift": "x"}}.items():
        out[f"scheduler_config.json:{name}"] = ("scheduler/scheduler_config.json", json_edit(scheduler, **changes))
    return out


CASCADES = cascade_variants()


@pytest.fixture(scope="module")
def semantic_latents(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_latents") / "z.safetensors"
    save_file({"latents": torch.randn(1, 16, 2, 2, 2)}, str(path))
    return path


@pytest.mark.parametrize("name", cases(sorted(CASCADES), quick=("model_index.json:list", "dit/config.json:depth_word",
                                                                "scheduler_config.json:timesteps_zero")))
def test_broken_cascade_folder(name, tmp_path, capsys, semantic_latents):
    file, contents = CASCADES[name]
    weights = tmp_path / "cascade"
    shutil.copytree(TINY_CASCADE, weights, copy_function=os.symlink)       # links to the shipped files but one
    (weights / file).unlink()
    (weights / file).write_bytes(contents)
    code, err = run_checked(capsys, ["decode", semantic_latents, "-o", tmp_path / "o.mp4", "--weights", weights,
                                     "--steps", "1"], tmp_path, (Path(file).name, Path(file).parent.name))
    if code == 0:
        from cascadev.video_io import read_video

        assert read_video(tmp_path / "o.mp4").shape[2] == 2


# -- FVD detectors: eval --i3d --------------------------------------------------------------------

class WrongDetector(torch.nn.Module):
    """A TorchScript module that is no I3D (another signature, other outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean()


def i3d_variants() -> dict[str, bytes]:
    import zipfile

    from eval.i3d import I3D

    state = I3D().state_dict()
    good = torch_bytes(dict(list(state.items())[:30]))           # the archive of a state dict, 2.5 MB, not 50
    out = {f"{k}.pt": v for k, v in damaged(good).items()}
    first = next(iter(state))
    contents = {"list": [state[first]], "string": "i3d", "wrapped_list": {"state_dict": [1]},
                "int_keys": {i: v for i, v in enumerate(state.values())}, "values_lists": {k: [1.0] for k in state},
                "key_missing": {k: v for k, v in state.items() if k != first},
                "key_extra": {**state, "x": state[first]},
                "shape": {**state, first: state[first][:1]},
                "nan": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
                "int": {k: v.long() for k, v in state.items()}, "fp16": {k: v.half() if v.is_floating_point() else v
                                                                          for k, v in state.items()}}
    out |= {f"obj_{k}.pt": torch_bytes(v) for k, v in contents.items()}
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(WrongDetector()), buffer)
    script = buffer.getvalue()
    out |= {f"script_{k}.pt": v for k, v in damaged(script).items() if k in ("cut_half", "overwritten")}
    out["script_wrong_module.pt"] = script
    zips = {"zip_text.pt": {"a.txt": "x"}, "zip_constants.pt": {"x/constants.pkl": "not a pickle"}}
    for name, members in zips.items():
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            for member, text in members.items():
                z.writestr(member, text)
        out[name] = buffer.getvalue()
    return out


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """Two 10-frame 32x32 clips: enough frames for I3D."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video

    folder = tmp_path_factory.mktemp("fuzz_long_clips")
    for seed in range(2):
        write_video(folder / f"{seed}.mp4", make_clip(seed=seed, frames=10, height=32, width=32), fps=8)
    return folder


@pytest.fixture(scope="module")
def detectors():
    return i3d_variants()


I3D_NAMES = [f"{k}.pt" for k in damaged(bytes(200))] + [f"obj_{k}.pt" for k in (
    "list", "string", "wrapped_list", "int_keys", "values_lists", "key_missing", "key_extra", "shape", "nan", "int",
    "fp16")] + ["script_cut_half.pt", "script_overwritten.pt", "script_wrong_module.pt", "zip_text.pt",
                "zip_constants.pt"]


@pytest.mark.parametrize("name", cases(I3D_NAMES, quick=("obj_int_keys.pt", "script_overwritten.pt")))
def test_broken_i3d(name, tmp_path, capsys, detectors, long_clips):
    path = tmp_path / name
    path.write_bytes(detectors[name])
    run_checked(capsys, ["eval", "--real", long_clips, "--fake", long_clips, "--metrics", "fvd", "--frames", "9",
                         "--i3d", path, "--i3d-size", "32"], tmp_path, (name,))


# -- a training run's checkpoints: train resumes ------------------------------------------------------

def train_args(clips: Path, run: Path) -> list:
    return ["train", "--config", DIT_TINY, "--run-dir", run, "--set", f"data.videos={clips}", "data.height=32",
            "data.width=32", "data.val_count=0", "run.tensorboard=false", "run.save_every=1", "run.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, clips):
    """A dit_tiny run of 2 steps with a checkpoint after each (no validation: the clips all train)."""
    from cascadev.training.train import main

    run = tmp_path_factory.mktemp("fuzz_run") / "run"
    main([str(a) for a in train_args(clips, run)[1:]] + ["--max-steps", "2"])
    return run


NEWEST = "checkpoints/step_00000002"
RESUME = {"ema_cut_half": ("ema.safetensors", lambda b: b[:len(b) // 2]),          # the issue's bad disk
          "model_empty": ("model.safetensors", lambda b: b""),
          "model_nan": ("model.safetensors", lambda b: save({k: torch.full_like(v, float("nan")) for k, v in
                                                              safetensors_load(b).items()})),
          "optimizer_overwritten": ("optimizer.bin", lambda b: damaged(b)["overwritten"]),
          "random_states_cut_half": ("random_states_0.pkl", lambda b: b[:len(b) // 2]),
          "trainer_empty": ("trainer.json", lambda b: b""), "trainer_list": ("trainer.json", lambda b: b"[2]"),
          "config_random": ("config.yaml", lambda b: damaged(b)["random"])}


def safetensors_load(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


@pytest.mark.slow       # each resumes the run for a step
@pytest.mark.parametrize("name", sorted(RESUME))
def test_resume_from_a_damaged_checkpoint(name, tmp_path, capsys, trained_run, clips):
    """The newest checkpoint damaged: the run says so naming the file, sets it aside and goes on from the one before."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    file, damage = RESUME[name]
    path = run / NEWEST / file
    path.write_bytes(damage(path.read_bytes()))
    code, err = run_checked(capsys, [*train_args(clips, run), "--max-steps", "3"], tmp_path)
    assert code == 0, err
    assert f"{file}" in err and "resuming from step_00000001" in err, err
    assert [p.name for p in run.glob("checkpoints/damaged-*/*")] == ["step_00000002"]           # kept, set aside
    assert json.loads((run / "checkpoints/step_00000003/trainer.json").read_text())["step"] == 3
    assert all(p.stat().st_mode & 0o044 for p in (run / "checkpoints/step_00000003").iterdir())  # none 0600


@pytest.mark.slow
def test_resume_stops_when_no_checkpoint_is_intact_or_the_one_asked_for_is_damaged(tmp_path, capsys, trained_run,
                                                                                  clips):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / NEWEST / "ema.safetensors").write_bytes(b"")
    code, _ = run_checked(capsys, [*train_args(clips, run), "--max-steps", "3", "--resume-from", "2"], tmp_path,
                          ("--resume-from 2: ", "ema.safetensors"))
    assert code == 2
    (run / "checkpoints/step_00000001/model.safetensors").write_bytes(b"")
    code, err = run_checked(capsys, [*train_args(clips, run), "--max-steps", "3"], tmp_path, ("no intact checkpoint",))
    assert code == 2 and "--fresh" in err


# -- a latent cache: train --set data.latents=CACHE --------------------------------------------------

@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory, clips):
    """The cache of three good clips (dit_tiny, 32x32) as cache-latents writes it: a broken one is the odd one out."""
    from cascadev.training.cache_latents import main

    folder = tmp_path_factory.mktemp("fuzz_cache")
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copy(clips / "a.mp4", folder / name)
    main(["--config", str(DIT_TINY), "--out", str(folder / "cache"), "--set", f"data.videos={folder}",
          "data.height=32", "data.width=32", "data.val_count=0"])
    return folder / "cache"


def cache_variants() -> dict[str, tuple[str, object]]:
    """name -> (the cache's file it replaces, a function of the good file's bytes giving the broken ones)."""
    def tensors(change):
        return lambda b: save(change(safetensors_load(b)))

    clip = "000000_00.safetensors"
    out = {f"clip_{k}": (clip, lambda b, k=k: damaged(b)[k]) for k in ("cut_half", "random")}
    out |= {"clip_wrong_keys": (clip, tensors(lambda t: {"x" + k: v for k, v in t.items()})),
            "clip_no_cond": (clip, tensors(lambda t: {k: v for k, v in t.items() if k != "cond"})),
            "clip_shape": (clip, tensors(lambda t: {k: v[..., :1, :1].contiguous() for k, v in t.items()})),
            "clip_nan": (clip, tensors(lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}))}
    out |= {"yaml_random": ("cache.yaml", lambda b: damaged(b)["random"])}
    out |= {"yaml_list": ("cache.yaml", lambda b: b"- data\n"),
            "yaml_other_size": ("cache.yaml", lambda b: b.replace(b"height: 32", b"height: 64"))}
    return out


CACHE_CASES = cache_variants()


@pytest.mark.slow       # a cache that still loads trains a step
@pytest.mark.parametrize("name", sorted(CACHE_CASES))
def test_broken_latent_cache(name, tmp_path, capsys, latent_cache, clips):
    cache = tmp_path / "cache"
    shutil.copytree(latent_cache, cache)
    file, damage = CACHE_CASES[name]
    (cache / file).write_bytes(damage((cache / file).read_bytes()))
    code, err = run_checked(capsys, [*train_args(clips, tmp_path / "run"), f"data.latents={cache}", "--max-steps",
                                     "2"], tmp_path, (file, "data.latents", str(cache)))
    if code == 0:                       # the broken clip left out, saying so
        assert f"skipping latent file {cache / file}" in err, err


# -- the other shipped folders: upscale's resize-route model, generate's text-to-video model ----------------

TINY_TEXT2VIDEO = TINY_CASCADE.parent / "tiny_text2video"
FOLDERS = {"upscale": (TINY_FPS4X, ["upscale", "{clip}", "-o", "{dir}/o.mp4", "--frames", "2", "--steps", "1",
                                    "--weights", "{folder}"]),
           "generate": (TINY_TEXT2VIDEO, ["generate", "red", "-o", "{dir}/o.mp4", "--frames", "2", "--size", "64x64",
                                          "--steps", "1", "--decode-steps", "1", "--weights", "{folder}",
                                          "--cascade", str(TINY_CASCADE)])}
FOLDER_CASES = [(command, str(file.relative_to(folder)), kind) for command, (folder, _) in FOLDERS.items()
                for file in sorted(folder.rglob("*")) if file.is_file() for kind in ("empty", "cut_half", "random")]


@pytest.mark.slow       # a folder that still loads runs (tiny, one step)
@pytest.mark.parametrize("command,file,kind", FOLDER_CASES)
def test_broken_model_folder(command, file, kind, tmp_path, capsys, clips):
    source, argv = FOLDERS[command]
    folder = tmp_path / source.name
    shutil.copytree(source, folder, copy_function=os.symlink)
    (tmp_path / TINY_CASCADE.name).symlink_to(TINY_CASCADE)      # the parts they take from it (../tiny_cascade)
    (folder / file).unlink()
    (folder / file).write_bytes(damaged((source / file).read_bytes())[kind])
    argv = [a.format(dir=tmp_path, folder=folder, clip=clips / "a.mp4") for a in argv]
    run_checked(capsys, argv, tmp_path, (Path(file).name, Path(file).parent.name))


# -- a cascade in the previous layout: convert ----------------------------------------------------------

@pytest.fixture(scope="module")
def legacy_cascade(tmp_path_factory):
    from helpers import tiny_cascade, write_legacy_cascade

    folder = tmp_path_factory.mktemp("fuzz_legacy") / "old"
    write_legacy_cascade(tiny_cascade(), folder)
    return folder


LEGACY = {**{f"pipeline.json:{k}": ("pipeline.json", lambda b, k=k: damaged(b)[k])
             for k in ("empty", "cut_half", "random")},
          "pipeline.json:list": ("pipeline.json", lambda b: b"[1]"),
          "pipeline.json:no_stage_a": ("pipeline.json", lambda b: json.dumps({"demo": {}}).encode()),
          "pipeline.json:stage_a_number": ("pipeline.json", lambda b: json.dumps({"stage_a": 5}).encode()),
          "pipeline.json:demo_number": ("pipeline.json", lambda b: json.dumps({**json.loads(b), "demo": 5}).encode()),
          "pipeline.json:scheduler_other": ("pipeline.json", lambda b: json.dumps(
              {**json.loads(b), "demo": {"scheduler": "nope"}}).encode()),
          **{f"dit/config.json:{k}": ("dit/config.json", lambda b, k=k: damaged(b)[k])
             for k in ("empty", "cut_half", "random")},
          "dit/config.json:list": ("dit/config.json", lambda b: b"[]"),
          "dit/config.json:depth_word": ("dit/config.json", lambda b: json.dumps({**json.loads(b), "depth": "x"})
                                         .encode()),
          **{f"dit/model.safetensors:{k}": ("dit/model.safetensors", lambda b, k=k: damaged(b)[k])
             for k in ("empty", "cut_half", "random", "overwritten")},
          **{f"stage_a/config.json:{k}": ("stage_a/config.json", lambda b, k=k: damaged(b)[k])
             for k in ("empty", "cut_half")}}


@pytest.mark.parametrize("name", cases(sorted(LEGACY), quick=("pipeline.json:list", "dit/model.safetensors:cut_half")))
def test_broken_legacy_cascade(name, tmp_path, capsys, legacy_cascade):
    old = tmp_path / "old"
    shutil.copytree(legacy_cascade, old)
    file, damage = LEGACY[name]
    (old / file).write_bytes(damage((old / file).read_bytes()))
    code, _ = run_checked(capsys, ["convert", old, tmp_path / "new"], tmp_path,
                          (Path(file).name, Path(file).parent.name))
    if code == 0:
        from cascadev.pipelines.cascade import CascadeVPipeline

        assert CascadeVPipeline.from_pretrained(str(tmp_path / "new")).dit is not None


# -- eval's FVD feature cache (--cache-dir) ---------------------------------------------------------------

@pytest.mark.slow       # three FVD runs on two clips
def test_broken_fvd_cache_is_recomputed(tmp_path, capsys, detectors, long_clips):
    """A damaged cache file is a miss: the features are computed again and the file rewritten, with the same FVD."""
    import numpy as np

    (tmp_path / "i3d.pt").write_bytes(detectors["obj_fp16.pt"])
    argv = ["eval", "--real", long_clips, "--fake", long_clips, "--metrics", "fvd", "--frames", "9", "--i3d",
            tmp_path / "i3d.pt", "--i3d-size", "32", "--cache-dir", tmp_path / "cache", "--json", tmp_path / "r.json"]
    code, err = run_checked(capsys, argv, tmp_path)
    assert code == 0, err
    fvd = json.loads((tmp_path / "r.json").read_text())["results"]["fvd"]["mean"]
    (cached,) = (tmp_path / "cache").glob("fvd_*.npz")
    good = cached.read_bytes()
    for kind in ("empty", "cut_half", "random"):
        cached.write_bytes(damaged(good)[kind])
        code, err = run_checked(capsys, argv, tmp_path)
        assert code == 0 and json.loads((tmp_path / "r.json").read_text())["results"]["fvd"]["mean"] == fvd, err
        with np.load(cached) as rewritten, np.load(io.BytesIO(good)) as first:
            assert (rewritten["features"] == first["features"]).all(), kind


# -- the error path itself: messages of any shape ----------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError(""), OSError(), ValueError("first\n\n  second  "), RuntimeError(""),
                                   RuntimeError("\n")], ids=repr)
def test_an_error_of_any_message_is_one_line(error, capsys):
    """What a library raises may have no message, or several lines: still one line, naming at least its type."""
    from cascadev.errors import run_guarded

    def fail():
        raise error

    with pytest.raises(SystemExit) as exit:
        run_guarded("cascadev x", fail)
    err = capsys.readouterr().err
    assert exit.value.code == (1 if isinstance(error, RuntimeError) else 2)
    assert len(err.splitlines()) == 1 and err.startswith("cascadev x: "), err
    assert ("first second" if "first" in str(error) else type(error).__name__) in err, err


@pytest.mark.slow       # trains a step
@pytest.mark.parametrize("name", ["cut_half.mp4", "text.mp4", "overwritten.webm", "audio_only.mp4", "png.mp4"])
def test_broken_video_in_a_training_set(name, tmp_path, capsys, videos, clips):
    """A broken clip among good ones is skipped with a warning naming it; the run goes on."""
    folder = tmp_path / "clips"
    shutil.copytree(clips, folder)
    (folder / f"0{name}").write_bytes(videos[name])          # first: a training clip (validation takes the last)
    code, err = run_checked(capsys, [*train_args(folder, tmp_path / "run"), "data.val_count=1", "--max-steps", "1"],
                            tmp_path, (name, "data.videos"))
    assert code == 0 and f"0{name}" in err, err
