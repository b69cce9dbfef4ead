"""Captioned procedural clips (``cascadev.captioned``): captions from the clip's own parameters, held-out pairs."""

import json

import pytest
import torch

from cascadev.captioned import (HELD_OUT, VOCABULARY, Attributes, attributes, caption, held_out_attributes,
                                is_held_out, parse_caption, render, unknown_words, write_dataset)


def test_captions_are_deterministic_and_name_the_parameters():
    for seed in range(50):
        a = attributes(seed)
        assert attributes(seed) == a
        text = caption(a)
        assert parse_caption(text) == a
        for name in VOCABULARY:
            assert getattr(a, name) in text.split()


def test_render_is_deterministic_and_follows_the_parameters():
    a = Attributes(shape="disc", colour="red", stripes="vertical", direction="right", speed="fast", background="dark")
    clip = render(a, 3, 6, 64, 64)
    assert clip.shape == (3, 6, 64, 64) and torch.equal(clip, render(a, 3, 6, 64, 64))
    red = (clip[0] > 0.3) & (clip[1] < -0.3)                        # the shape's pixels: red on a dark background
    cols = torch.arange(64).float()
    centre = [(red[t].float().sum(0) * cols).sum() / red[t].sum() for t in (0, 5)]
    assert red[0].sum() > 100 and centre[1] - centre[0] > 8          # it moved right
    left = render(Attributes(**{**a.__dict__, "direction": "left"}), 3, 6, 64, 64)
    rl = (left[0] > 0.3) & (left[1] < -0.3)
    assert (rl[5].float().sum(0) * cols).sum() / rl[5].sum() < (rl[0].float().sum(0) * cols).sum() / rl[0].sum()


def test_held_out_pairs_never_in_training(tmp_path):
    train = [attributes(seed) for seed in range(3000)]
    assert not any(is_held_out(a) for a in train)
    assert {a.colour for a in train} == set(VOCABULARY["colour"])
    assert {a.shape for a in train} == set(VOCABULARY["shape"])
    listing = write_dataset(tmp_path, 40, 2, 32)
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    assert len(rows) == 40 and all((tmp_path / r["path"]).is_file() for r in rows)
    assert not any((r["colour"], r["shape"]) in HELD_OUT for r in rows)
    assert all(parse_caption(r["caption"]) == attributes(int(r["path"][5:11])) for r in rows)
    evals = [held_out_attributes(i) for i in range(30)]
    assert all(is_held_out(a) for a in evals) and {(a.colour, a.shape) for a in evals} == set(HELD_OUT)


def test_bad_attributes_and_captions():
    with pytest.raises(ValueError, match="colour 'teal'"):
        Attributes(shape="disc", colour="teal", stripes="vertical", direction="left", speed="fast", background="dark")
    with pytest.raises(ValueError, match="not a caption"):
        parse_caption("a red disc")


def test_unknown_words_are_those_no_caption_uses():
    assert unknown_words(caption(attributes(3))) == []
    assert unknown_words("A Red disc, moving LEFT!") == []                      # case and punctuation aside
    assert unknown_words("a red dog and a red cat running, a dog") == ["dog", "and", "cat", "running"]
