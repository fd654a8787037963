"""IF caption cleaning (clean_caption=True) against Diffusers' `_clean_caption` / `_text_preprocessing`."""

from __future__ import annotations

import logging

import pytest
from diffusers import IFPipeline as DIFPipeline

from rapiddiff.pipelines import caption

CAPTIONS = [
    "A <person> riding a horse, see https://example.com/horse.jpg &amp; www.site.org/page",
    "Photo 1234567 of a cat \u2014 \u201ccute\u201d ... #12 @user_1 <b>bold</b> &quot;x&quot;",
    "this-is-my-cute-cat_on_a_mat",
    "FREE SHIPPING! Click for details. Page 3 jc6640 1920x1080 image.png worldwide free shipping",
    "caf\u00c3\u00a9 au lait 192.168.0.1 \\n \u6f22\u5b57 \u30c6\u30b9\u30c8 ***sale*** a2b3c4",
    "'Quoted caption'",
    "  An astronaut riding a horse on Mars  ",
]


@pytest.mark.parametrize("text", CAPTIONS)
def test_clean_caption_matches_diffusers(text):
    ref = object.__new__(DIFPipeline)  # the methods read only class attributes
    assert caption.clean_caption(text) == ref._clean_caption(text)
    assert caption.preprocess_text(text, True) == ref._text_preprocessing(text, True)


def test_without_the_extra_it_warns_and_lower_cases(monkeypatch, caplog):
    monkeypatch.setattr(caption, "caption_cleaning_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert caption.preprocess_text(["  A Cat  ", "DOG"], True) == ["a cat", "dog"]
    assert "rapiddiff[if]" in caplog.text
