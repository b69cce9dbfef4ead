import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # no network in tests: a hub id fails at once instead of retrying

import pytest
import torch

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):      # pytest-xdist: the cores shared out
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from helpers import tiny_cascade  # noqa: E402  (the fixtures' helper; tests import theirs from helpers too)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_temp_files(tmp_path_factory):
    """The suite's own temp dir, which must be empty at the end. Everything made through ``tempfile`` or $TMPDIR, in
    this process and in the subprocesses it starts (mkdtemp, TemporaryDirectory, torchelastic_* folders, ...), goes to a
    folder under pytest's basetemp instead of /tmp, which other runs share: anything left in it fails the run, so a
    leak cannot come back. Tests keep their files in ``tmp_path``, which pytest manages (pyproject's retention
    policy removes it when every test passed)."""
    import tempfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()     # torch's compile cache (importing torchvision makes it): kept where torch reuses it across runs
    tmp = tmp_path_factory.mktemp("TMPDIR", numbered=False)
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    yield tmp
    if saved[0] is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved[0]
    tempfile.tempdir = saved[1]
    # torch's inductor keeps some caches in gettempdir()/torchinductor_USER whatever TORCHINDUCTOR_CACHE_DIR says
    left = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_"))
    if left:
        pytest.fail(f"the tests left {len(left)} entr(ies) in their temp dir {tmp} (use tmp_path, or remove what a "
                    f"test makes): {', '.join(left[:20])}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: one thread is several times faster than two on a shared 2-core box
    yield


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny cascade (random weights, every part nonzero) saved with ``save_pretrained``; the release's sampler."""
    root = tmp_path_factory.mktemp("tiny_cascade")
    torch.manual_seed(0)            # the same weights whichever test asks first (its parts besides the DiT are random)
    tiny_cascade().save_pretrained(str(root))
    return root


@pytest.fixture(scope="session")
def clip_file(tmp_path_factory):
    """A generated 9-frame 160x96 clip as mp4."""
    from cascadev.synthetic import make_clip
    from cascadev.video_io import write_video

    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_video(path, make_clip(seed=3, frames=9, height=96, width=160), fps=8)
    return path
