"""The synthetic world: the built-in default dataset, in exact Video-R1 format (records + mp4 + png).

`synthesize(out_dir, train, test, seed)` writes

    out_dir/videos/v0000001.mp4 ...   H.264 (libx264, yuv420p), `frames` frames of size x size at `fps`
    out_dir/images/i0000001.png ...
    out_dir/rl.json                   the RL pool: `train` records without `process` (like Video-R1-260k)
    out_dir/sft.json                  the cold-start set: `sft` records with a gold `process` (like Video-R1-COT-165k)
    out_dir/test.json                 held-out records
    out_dir/world.json                manifest: seed, parameters, counts, chance level per data_source
    out_dir/media.json                per-media ground truth (square positions, colours per frame, words), for tests
    out_dir/shortcut.json             shortcut world only (`shortcut=`): the order-blind shortcut's answer and score
                                      per order-dependent record, by split

The world is the one measured to be learnable by a 0.19 M-param model on a CPU (reference/environment.md): a 12 px
square of one of four well-separated colours on noisy grey, moving left or right by a constant step; some clips
switch colour mid-clip. Questions of all five Video-R1 problem types, on videos and images:

    multiple choice  color (4 options), order/direction (left/right), order/first-color and order/last-color
                     (which colour before / after the switch; 4 options, order-blind ceiling 50%), image/color
    numerical        count-frames (frames in which the square is a named colour), image/count (squares, 1-4)
    OCR              ocr, image/ocr (a three-letter word rendered large)
    free-form        order/describe ("the red square moves left"), image/describe ("three blue squares")
    regression       distance (pixels travelled), image/size (side of the squares in pixels)

Questions whose answer depends on frame order carry a data_source containing "order". Options are shuffled per
record (seeded), so the correct letter rotates. Several questions share one video (about `questions_per_video`),
as in Video-R1-260k, and splits never share media. Everything is a function of the seed: the same arguments give
byte-identical record files, PNGs and MP4s (x264 runs single-threaded without lookahead, which is what makes its
output reproducible at sizes that are not a multiple of 16).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.errors import VideoR1Error

FORMAT = "videor1-synth/1"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
}
COLOR_NAMES = tuple(COLORS)
WORDS = ("CAT", "SUN", "BOX", "DOG", "HAT", "PEN")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
# Close to Video-R1-260k (MC 64%, free-form 15%, numerical 13%, OCR 6%, regression 2%), with a little more
# regression so small worlds still hold some.
DEFAULT_MIX = {"multiple choice": 0.65, "numerical": 0.13, "free-form": 0.12, "OCR": 0.06, "regression": 0.04}
SPLITS = ("rl", "sft", "test")
_SPLIT_BASE = {"rl": 0, "sft": 1_000_000, "test": 2_000_000}  # problem ids and media names stay split-independent
_SPLIT_CODE = {"rl": 1, "sft": 2, "test": 3}
_X264 = {"crf": "10", "threads": "1", "bf": "0", "x264-params": "mbtree=0:rc-lookahead=0"}

# Scene families: "steady" (one colour), "switch" (colour changes mid-clip), "squares" (image), "word" (OCR).


@dataclass(frozen=True)
class Kind:
    name: str
    data_type: str
    problem_type: str
    data_source: str
    weight: float  # within its (data_type, problem_type) cell
    families: tuple[str, ...]


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("color", "video", "multiple choice", "synthetic/color", 0.29, ("steady",)),
        Kind("direction", "video", "multiple choice", "synthetic/order/direction", 0.43, ("steady", "switch")),
        Kind("first-color", "video", "multiple choice", "synthetic/order/first-color", 0.14, ("switch",)),
        Kind("last-color", "video", "multiple choice", "synthetic/order/last-color", 0.14, ("switch",)),
        Kind("count-frames", "video", "numerical", "synthetic/count-frames", 1.0, ("steady", "switch")),
        Kind("describe", "video", "free-form", "synthetic/order/describe", 1.0, ("steady", "switch")),
        Kind("distance", "video", "regression", "synthetic/distance", 1.0, ("steady", "switch")),
        Kind("ocr", "video", "OCR", "synthetic/ocr", 1.0, ("word",)),
        Kind("image-color", "image", "multiple choice", "synthetic/image/color", 1.0, ("squares",)),
        Kind("image-count", "image", "numerical", "synthetic/image/count", 1.0, ("squares",)),
        Kind("image-describe", "image", "free-form", "synthetic/image/describe", 1.0, ("squares",)),
        Kind("image-size", "image", "regression", "synthetic/image/size", 1.0, ("squares",)),
        Kind("image-ocr", "image", "OCR", "synthetic/image/ocr", 1.0, ("word",)),
    ]
}


class SynthError(VideoR1Error):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# Pure planning: how many records of which kind, and which questions share a scene.
def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` into integers proportional to `weights` (Hamilton's method; ties broken by key order)."""
    keys = [k for k, w in weights.items() if w > 0]
    out = {k: 0 for k in weights}
    s = sum(weights[k] for k in keys)
    if total <= 0 or not keys:
        return out
    quotas = {k: total * weights[k] / s for k in keys}
    for k in keys:
        out[k] = int(math.floor(quotas[k]))
    left = total - sum(out.values())
    order = sorted(keys, key=lambda k: (-(quotas[k] - out[k]), keys.index(k)))
    for k in order[:left]:
        out[k] += 1
    return out


def plan_kinds(n: int, mix: dict[str, float], image_fraction: float) -> dict[str, int]:
    """Records per question kind for a split of `n`: the mix over problem types, `image_fraction` images.

    Every problem type with a positive weight gets at least one record when n allows, and both data types appear
    when 0 < image_fraction < 1 and n >= 2.
    """
    types = largest_remainder(n, {pt: mix.get(pt, 0.0) for pt in PROBLEM_TYPES})
    positive = [pt for pt in PROBLEM_TYPES if mix.get(pt, 0.0) > 0]
    if n >= len(positive):
        for pt in positive:
            if types[pt] == 0:
                donor = max(positive, key=lambda p: (types[p], -positive.index(p)))
                types[donor] -= 1
                types[pt] += 1
    n_img = int(round(n * image_fraction))
    if 0 < image_fraction < 1 and n >= 2:
        n_img = min(max(n_img, 1), n - 1)
    images = largest_remainder(n_img, {pt: float(types[pt]) for pt in PROBLEM_TYPES}) if n else types
    kinds: dict[str, int] = {k: 0 for k in KINDS}
    for pt in PROBLEM_TYPES:
        for dt, c in (("video", types[pt] - images[pt]), ("image", images[pt])):
            members = {k.name: k.weight for k in KINDS.values() if k.data_type == dt and k.problem_type == pt}
            for name, m in largest_remainder(c, members).items():
                kinds[name] += m
    return kinds


def pack_scenes(kind_counts: dict[str, int], families: tuple[str, ...], per_scene: float,
                rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """Group questions into scenes (one medium each): [(family, [kind, ...])], each kind at most once per scene.

    Uses the fewest scenes that fit the constraints and about `per_scene` questions per scene; no scene is empty.
    """
    kinds = {k: c for k, c in kind_counts.items() if c > 0 and set(KINDS[k].families) & set(families)}
    total = sum(kinds.values())
    if total == 0:
        return []
    exclusive = {f: max([c for k, c in kinds.items() if KINDS[k].families == (f,)], default=0) for f in families}
    shared = [k for k in kinds if len(KINDS[k].families) > 1]
    n_scenes = max(sum(exclusive.values()), max([kinds[k] for k in shared], default=0),
                   math.ceil(total / max(per_scene, 1.0)))
    fam_counts = dict(exclusive)
    extra = n_scenes - sum(exclusive.values())
    if extra:
        picks = rng.integers(0, len(families), size=extra)
        for i in picks:
            fam_counts[families[int(i)]] += 1
    fams = [f for f in families for _ in range(fam_counts[f])]
    fams = [fams[i] for i in rng.permutation(len(fams))]
    scenes: list[list[str]] = [[] for _ in fams]
    # exclusive kinds first (they have fewer places to go), larger counts first; then shared kinds
    order = sorted(kinds, key=lambda k: (len(KINDS[k].families) > 1, -kinds[k], k))
    for k in order:
        eligible = [i for i, f in enumerate(fams) if f in KINDS[k].families]
        tiebreak = rng.permutation(len(eligible))
        eligible = [eligible[j] for j in sorted(range(len(eligible)), key=lambda j: (len(scenes[eligible[j]]),
                                                                                       tiebreak[j]))]
        for i in eligible[: kinds[k]]:
            scenes[i].append(k)
    return [(f, sorted(s, key=list(KINDS).index)) for f, s in zip(fams, scenes) if s]


# ---------------------------------------------------------------------------------------------------------------------
# Scenes: parameters (pure) and pixels.
@dataclass
class Scene:
    family: str
    kinds: list[str]
    params: dict[str, Any] = field(default_factory=dict)


def _step_range(frames: int, size: int, square: int, margin: int) -> tuple[int, int]:
    travel = size - square - 2 * margin
    smax = max(1, travel // max(1, frames - 1))
    smin = max(1, min(2, smax))
    return smin, smax


def _long_clip(frames: int, size: int, square: int, margin: int = 2) -> bool:
    """More frame steps than pixels to travel (e.g. 128 or 256 frames at 56 px): one pixel per frame would carry the
    square out of the picture, so it moves a whole number of pixels over the clip, one pixel every few frames."""
    return frames - 1 > size - square - 2 * margin


def _distance_range(size: int, square: int, margin: int = 2) -> tuple[int, int]:
    """Pixels a long clip's square travels (first to last frame): half the free width up to all of it."""
    travel = size - square - 2 * margin
    return max(1, travel // 2), travel


def _image_side_range(size: int) -> tuple[int, int]:
    cell = size // 2
    hi = max(4, min(16, cell - 4))
    lo = max(3, min(8, hi))
    return lo, hi


def sample_scene(family: str, kinds: list[str], rng: np.random.Generator, *, frames: int, size: int,
                 square: int, shortcut: float | None = None) -> dict[str, Any]:
    margin = 2
    if shortcut is not None and family in ("steady", "switch"):
        return _sample_shortcut_clip(family, rng, frames=frames, size=size, square=square, strength=shortcut)
    if family in ("steady", "switch"):
        long_clip = _long_clip(frames, size, square, margin)
        smin, smax = _distance_range(size, square, margin) if long_clip else _step_range(frames, size, square, margin)
        step = int(rng.integers(smin, smax + 1))  # long clips: the whole distance (the same single draw)
        direction = "right" if rng.integers(0, 2) else "left"
        span = step if long_clip else step * (frames - 1)
        lo, hi = margin, size - square - margin - span
        x0 = int(rng.integers(lo, max(lo, hi) + 1))
        if direction == "left":
            x0 += span
        y = int(rng.integers(margin, size - square - margin + 1))
        if family == "steady":
            c = COLOR_NAMES[int(rng.integers(0, 4))]
            seq = [c] * frames
            switch_at = None
        else:
            i, j = rng.choice(4, size=2, replace=False)
            c1, c2 = COLOR_NAMES[int(i)], COLOR_NAMES[int(j)]
            klo, khi = (2, frames - 2) if frames >= 4 else (1, frames - 1)
            switch_at = int(rng.integers(klo, khi + 1))
            seq = [c1] * switch_at + [c2] * (frames - switch_at)
        sgn = 1 if direction == "right" else -1
        xs = [x0 + sgn * (span * t // (frames - 1) if long_clip else step * t) for t in range(frames)]
        present = list(dict.fromkeys(seq))
        if family == "switch" or rng.integers(0, 2):
            asked = present[int(rng.integers(0, len(present)))]
        else:  # steady: half the time ask about a colour that never appears (answer 0)
            others = [c for c in COLOR_NAMES if c not in present]
            asked = others[int(rng.integers(0, len(others)))]
        if long_clip:  # the default short worlds keep their exact parameters (and bytes)
            return {"colors": seq, "switch_at": switch_at, "direction": direction, "distance": span, "xs": xs,
                    "y": y, "square": square, "count_color": asked, "count": seq.count(asked)}
        return {"colors": seq, "switch_at": switch_at, "direction": direction, "step": step, "xs": xs, "y": y,
                "square": square, "count_color": asked, "count": seq.count(asked)}
    if family == "squares":
        n = int(rng.integers(1, 5))
        lo, hi = _image_side_range(size)
        side = int(rng.integers(lo, hi + 1))
        c = COLOR_NAMES[int(rng.integers(0, 4))]
        cell = size // 2
        quads = rng.permutation(4)[:n]
        boxes = []
        for q in sorted(int(q) for q in quads):
            qy, qx = divmod(q, 2)
            room = max(0, cell - side - 2)
            ox = int(rng.integers(1, room + 2)) if room else 0
            oy = int(rng.integers(1, room + 2)) if room else 0
            boxes.append([qx * cell + ox, qy * cell + oy])
        return {"n": n, "side": side, "color": c, "boxes": boxes}
    if family == "word":
        word = WORDS[int(rng.integers(0, len(WORDS)))]
        return {"word": word, "jitter": [int(rng.integers(-3, 4)), int(rng.integers(-3, 4))]}
    raise ValueError(family)


# ---------------------------------------------------------------------------------------------------------------------
# The shortcut world (`synthesize(..., shortcut=s)`, `data synth --shortcut S`): order-dependent answers follow an
# order-blind cue with probability s, so they can be partly answered without the frame order, as real video QA can
# from a single frame or a scene prior; the full answer still needs the order. The cue is the clip's majority colour
# (the colour in most frames: any multiset of the frames shows it, shuffled or not):
#   direction      each colour has a preferred direction (PREFERRED_DIRECTION); the square moves that way with
#                  probability s (for the majority colour of a colour-switching clip)
#   first / last   with probability s the switch comes late, so the first colour is the majority colour and the last
#                  one the minority colour; otherwise early (never at the middle frame: no ties)
#   describe       both of the above ("the square turns from <majority> to <minority> and moves <preferred>")
# The default world (shortcut=None) draws exactly what it always drew; these rules exist only in the shortcut world.
PREFERRED_DIRECTION = {"red": "right", "green": "left", "blue": "right", "yellow": "left"}
SHORTCUT_RULES = {
    "synthetic/order/direction": "the preferred direction of the majority colour (red, blue: right; green, yellow: "
                                 "left)",
    "synthetic/order/first-color": "the majority colour (the colour in most frames)",
    "synthetic/order/last-color": "the minority colour (the colour in fewest frames)",
    "synthetic/order/describe": "the description built from the majority colour first, the minority colour second "
                                "and the majority colour's preferred direction",
}


def _switch_ranges(frames: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(late, early) ranges of switch_at (frames of the first colour): late gives the first colour the majority,
    early the minority; the middle (a tie) is never drawn."""
    half = frames // 2
    late = (half + 1, max(half + 1, frames - 2))
    early = (min(2, (frames - 1) // 2), (frames - 1) // 2)
    return late, early


def _sample_shortcut_clip(family: str, rng: np.random.Generator, *, frames: int, size: int, square: int,
                          strength: float) -> dict[str, Any]:
    margin = 2
    smin, smax = _step_range(frames, size, square, margin)
    step = int(rng.integers(smin, smax + 1))
    if family == "steady":
        c = COLOR_NAMES[int(rng.integers(0, 4))]
        seq, switch_at, majority = [c] * frames, None, c
    else:
        i, j = rng.choice(4, size=2, replace=False)
        c1, c2 = COLOR_NAMES[int(i)], COLOR_NAMES[int(j)]
        late_range, early_range = _switch_ranges(frames)
        late = bool(rng.random() < strength)
        lo, hi = late_range if late else early_range
        switch_at = int(rng.integers(lo, hi + 1))
        seq = [c1] * switch_at + [c2] * (frames - switch_at)
        majority = c1 if late else c2
    preferred = PREFERRED_DIRECTION[majority]
    direction = preferred if rng.random() < strength else ("left" if preferred == "right" else "right")
    span = step * (frames - 1)
    lo, hi = margin, size - square - margin - span
    x0 = int(rng.integers(lo, max(lo, hi) + 1))
    if direction == "left":
        x0 += span
    y = int(rng.integers(margin, size - square - margin + 1))
    sgn = 1 if direction == "right" else -1
    xs = [x0 + sgn * step * t for t in range(frames)]
    present = list(dict.fromkeys(seq))
    if family == "switch" or rng.integers(0, 2):
        asked = present[int(rng.integers(0, len(present)))]
    else:
        others = [c for c in COLOR_NAMES if c not in present]
        asked = others[int(rng.integers(0, len(others)))]
    return {"colors": seq, "switch_at": switch_at, "direction": direction, "step": step, "xs": xs, "y": y,
            "square": square, "count_color": asked, "count": seq.count(asked)}


def shortcut_answer(kind: str, p: dict[str, Any]) -> str | None:
    """What the order-blind shortcut answers to a question of `kind` about a clip (colour names and directions, not
    option letters); None for questions the shortcut does not address (order-free kinds)."""
    if kind not in ("direction", "first-color", "last-color", "describe"):
        return None
    counts = {c: p["colors"].count(c) for c in dict.fromkeys(p["colors"])}
    ranked = sorted(counts, key=lambda c: -counts[c])  # stable: a tie keeps the order of appearance
    majority, minority = ranked[0], ranked[-1]
    preferred = PREFERRED_DIRECTION[majority]
    if kind == "direction":
        return preferred
    if kind == "first-color":
        return majority
    if kind == "last-color":
        return minority
    if len(counts) == 1:
        return f"the {majority} square moves {preferred}"
    return f"the square turns from {majority} to {minority} and moves {preferred}"


def shortcut_score(kind: str, p: dict[str, Any], gold: str) -> float | None:
    """The shortcut's score on one question, in the world's own scoring (exact for multiple choice, ROUGE for the
    description, as chance_levels); `gold` is the answer text (a colour, a direction or the description)."""
    ans = shortcut_answer(kind, p)
    if ans is None:
        return None
    return rouge_mean(ans, gold) if kind == "describe" else float(ans == gold)


_FONTS: dict[int, Any] = {}


def _font(px: int):
    from PIL import ImageFont

    if px not in _FONTS:
        try:
            _FONTS[px] = ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1 or no FreeType: the bitmap font
            _FONTS[px] = ImageFont.load_default()
    return _FONTS[px]


def _background(rng: np.random.Generator, size: int, noise: int) -> np.ndarray:
    g = 128 + rng.integers(-noise, noise + 1, size=(size, size, 1), dtype=np.int16)
    return np.repeat(g, 3, axis=2).astype(np.uint8)


def _word_mask(word: str, size: int, jitter: list[int]) -> np.ndarray:
    from PIL import Image, ImageDraw

    font = _font(max(10, int(round(size * 0.4))))
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    l, t, r, b = draw.textbbox((0, 0), word, font=font)
    x = (size - (r - l)) // 2 - l + jitter[0]
    y = (size - (b - t)) // 2 - t + jitter[1]
    draw.text((x, y), word, fill=255, font=font)
    return np.asarray(img) > 127


def render(family: str, p: dict[str, Any], rng: np.random.Generator, *, frames: int, size: int,
           noise: int = 20) -> np.ndarray:
    """Pixels of one scene: (T, H, W, 3) uint8 for videos, (H, W, 3) for images."""
    if family in ("steady", "switch"):
        out = np.empty((frames, size, size, 3), np.uint8)
        s, y = p["square"], p["y"]
        for t in range(frames):
            f = _background(rng, size, noise)
            x = p["xs"][t]
            f[y:y + s, x:x + s] = COLORS[p["colors"][t]]
            out[t] = f
        return out
    if family == "squares":
        f = _background(rng, size, noise)
        s = p["side"]
        for x, y in p["boxes"]:
            f[y:y + s, x:x + s] = COLORS[p["color"]]
        return f
    if family in ("word-video", "word-image"):
        mask = _word_mask(p["word"], size, p["jitter"])
        if family == "word-image":
            f = _background(rng, size, noise)
            f[mask] = 20
            return f
        out = np.empty((frames, size, size, 3), np.uint8)
        for t in range(frames):
            f = _background(rng, size, noise)
            f[mask] = 20
            out[t] = f
        return out
    raise ValueError(family)


def encode_mp4(frames: np.ndarray, path: str | os.PathLike, fps: float) -> int:
    """H.264 (libx264, yuv420p) in MP4, in-process with PyAV; deterministic bytes. Returns the file size."""
    import av

    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        st = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.options = dict(_X264)
        for i in range(t):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            vf.pts = i
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    data = buf.getvalue()
    Path(path).write_bytes(data)
    return len(data)


def write_png(img: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG", optimize=False)


# ---------------------------------------------------------------------------------------------------------------------
# Questions (pure): record fields and gold CoT from the scene parameters.
def _mc(rng: np.random.Generator, choices: list[str], correct: str, shuffle: bool = True) -> tuple[list[str], str]:
    order = rng.permutation(len(choices))  # drawn either way, so both settings give the same scenes and answers
    perm = [choices[i] for i in order] if shuffle else list(choices)
    letters = "ABCDEFGH"
    return [f"{letters[i]}. {c}" for i, c in enumerate(perm)], letters[perm.index(correct)]


def _option_text(opts: list[str], letter: str) -> str:
    """The text of option `letter` ("C. red" -> "red"): in the CoT as the same word as in the prompt's option list,
    so the tiny model can find it there and copy the letter in front of it."""
    return next(o.split(". ", 1)[1] for o in opts if o.startswith(f"{letter}. "))


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def make_question(kind: str, p: dict[str, Any], rng: np.random.Generator, frames: int,
                  shuffle_options: bool = True) -> dict[str, Any]:
    """problem, options, answer and gold `process` of one question about a scene."""
    opts: list[str] = []
    if kind == "color":
        c = p["colors"][0]
        q = "What color is the square in the video?"
        opts, ans = _mc(rng, list(COLOR_NAMES), c, shuffle_options)
        cot = f"The square is {c} in every frame."
    elif kind == "direction":
        d = p["direction"]
        q = "In which direction does the square move?"
        opts, ans = _mc(rng, ["left", "right"], d, shuffle_options)
        a, b = ("left", "right") if d == "right" else ("right", "left")
        cot = f"The square starts on the {a} and ends on the {b}."
    elif kind in ("first-color", "last-color"):
        c1, c2 = p["colors"][0], p["colors"][-1]
        if kind == "first-color":
            q = "The square changes color during the video. What color is it first?"
            opts, ans = _mc(rng, list(COLOR_NAMES), c1, shuffle_options)
            cot = f"The square is {c1} in the early frames and {c2} later."
        else:
            q = "The square changes color during the video. What color is it at the end?"
            opts, ans = _mc(rng, list(COLOR_NAMES), c2, shuffle_options)
            cot = f"The square is {c1} at first and {c2} at the end."
    elif kind == "count-frames":
        c, n = p["count_color"], p["count"]
        q = f"In how many frames of the video is the square {c}?"
        ans = str(n)
        k = p["switch_at"]
        if k is None:
            cot = (f"The square is {c} in all {frames} frames." if n == frames
                   else f"The square is {p['colors'][0]} throughout, never {c}.")
        elif c == p["colors"][0]:
            cot = f"The square is {c} in frames 1 to {k}, then {p['colors'][-1]}: {n} frames."
        else:
            cot = f"The square is {p['colors'][0]} in frames 1 to {k}, then {c} in the last {n}."
    elif kind == "describe":
        d = p["direction"]
        q = "Describe what the square does in the video in a few words."
        frm = "left to right" if d == "right" else "right to left"
        if p["switch_at"] is None:
            c = p["colors"][0]
            ans = f"the {c} square moves {d}"
            cot = f"The square is {c} and moves from {frm}."
        else:
            c1, c2 = p["colors"][0], p["colors"][-1]
            ans = f"the square turns from {c1} to {c2} and moves {d}"
            cot = f"It is {c1} then {c2}, moving from {frm}."
    elif kind == "distance":
        q = "How many pixels does the square move horizontally from the first frame to the last frame?"
        if "distance" in p:  # long clip
            ans = str(p["distance"])
            cot = (f"It starts at x = {p['xs'][0]} and ends at x = {p['xs'][-1]} after {frames - 1} frames, about one "
                   f"pixel every {(frames - 1) / p['distance']:.1f} frames.")
        else:
            ans = str(p["step"] * (frames - 1))
            cot = f"It moves {p['step']} pixels per frame for {frames - 1} steps."
    elif kind in ("ocr", "image-ocr"):
        w = p["word"]
        q = f"What word is written in the {'video' if kind == 'ocr' else 'image'}?"
        ans = w
        cot = f"The letters are {', '.join(w)}."
    elif kind == "image-color":
        c, n = p["color"], p["n"]
        q = "What color is the square in the image?" if n == 1 else "What color are the squares in the image?"
        opts, ans = _mc(rng, list(COLOR_NAMES), c, shuffle_options)
        cot = f"The square is {c}." if n == 1 else f"All {n} squares are {c}."
    elif kind == "image-count":
        n = p["n"]
        q = "How many squares are in the image?"
        ans = str(n)
        cot = f"I count {n} {p['color']} {_plural(n, 'square')}."
    elif kind == "image-describe":
        n, c = p["n"], p["color"]
        q = "Describe the image in a few words."
        ans = f"{NUMBER_WORDS[n]} {c} {_plural(n, 'square')}"
        cot = f"There {'is' if n == 1 else 'are'} {n} {_plural(n, 'square')}, {'it is' if n == 1 else 'all'} {c}."
    elif kind == "image-size":
        n, s = p["n"], p["side"]
        q = ("What is the side length of the square in the image, in pixels?" if n == 1
             else "What is the side length of each square in the image, in pixels?")
        ans = str(s)
        cot = f"Each square spans {s} pixels edge to edge."
    else:
        raise ValueError(kind)
    if opts:  # multiple choice: the CoT ends by looking its answer up in the (shuffled) options
        cot += f" The answer is {_option_text(opts, ans)} ({ans})."
    return {"problem": q, "options": opts, "answer": ans, "process": f"<think>{cot}</think>"}


# ---------------------------------------------------------------------------------------------------------------------
# Chance levels (pure): the expected score of a uniform guess over the answers the generator can produce.
def _tokens(s: str) -> list[str]:
    return [t for t in "".join(ch.lower() if ch.isalnum() else " " for ch in s).split() if t]


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = dp[j]
            dp[j] = prev + 1 if x == y else max(dp[j], dp[j - 1])
            prev = cur
    return dp[-1]


def rouge_mean(pred: str, ref: str) -> float:
    """Mean of ROUGE-1/2/L F1 on lower-cased word tokens (no stemming): an estimate for chance levels only."""
    from collections import Counter

    a, b = _tokens(pred), _tokens(ref)
    s = []
    for n in (1, 2):
        ga = Counter(tuple(a[i:i + n]) for i in range(len(a) - n + 1))
        gb = Counter(tuple(b[i:i + n]) for i in range(len(b) - n + 1))
        s.append(_f1(sum((ga & gb).values()), sum(ga.values()), sum(gb.values())))
    s.append(_f1(_lcs(a, b), len(a), len(b)))
    return sum(s) / 3


def _regression_chance(values: list[int]) -> float:
    tot = 0.0
    for g in values:
        for p in values:
            rel = min(1.0, (abs(p - g) + 1e-9) / (abs(g) + 1e-9))
            tot += 1 - rel
    return tot / (len(values) ** 2)


def chance_levels(frames: int, size: int, square: int) -> dict[str, dict[str, Any]]:
    """Per data_source: problem type, order dependence, the uniform-guess chance and the order-blind ceiling."""
    smin, smax = _step_range(frames, size, square, 2)
    if _long_clip(frames, size, square):
        dmin, dmax = _distance_range(size, square)
        distances = list(range(dmin, dmax + 1))
    else:
        distances = [s * (frames - 1) for s in range(smin, smax + 1)]
    lo, hi = _image_side_range(size)
    steady_desc = [f"the {c} square moves {d}" for c in COLOR_NAMES for d in ("left", "right")]
    switch_desc = [f"the square turns from {a} to {b} and moves {d}" for a in COLOR_NAMES for b in COLOR_NAMES
                   if a != b for d in ("left", "right")]
    desc = steady_desc + switch_desc
    img_desc = [f"{NUMBER_WORDS[n]} {c} {_plural(n, 'square')}" for n in range(1, 5) for c in COLOR_NAMES]
    ff = lambda xs: sum(rouge_mean(p, g) for g in xs for p in xs) / len(xs) ** 2  # noqa: E731
    table = {
        "color": (0.25, None, "4 options"),
        "direction": (0.5, 0.5, "2 options"),
        "first-color": (0.25, 0.5, "4 options; without frame order only the two colours shown are known"),
        "last-color": (0.25, 0.5, "4 options; without frame order only the two colours shown are known"),
        "count-frames": (1 / (frames + 1), None, f"answers 0..{frames}"),
        "describe": (ff(desc), None, "mean ROUGE of a random description against a random gold"),
        "distance": (_regression_chance(distances), None,
                     "1 - relative error of a random distance"),
        "ocr": (1 / len(WORDS), None, f"{len(WORDS)} words"),
        "image-color": (0.25, None, "4 options"),
        "image-count": (0.25, None, "answers 1..4"),
        "image-describe": (ff(img_desc), None, "mean ROUGE of a random description against a random gold"),
        "image-size": (_regression_chance(list(range(lo, hi + 1))), None, "1 - relative error of a random side"),
        "image-ocr": (1 / len(WORDS), None, f"{len(WORDS)} words"),
    }
    out = {}
    for name, (ch, ceil, note) in table.items():
        k = KINDS[name]
        out[k.data_source] = {
            "problem_type": k.problem_type, "data_type": k.data_type, "order_dependent": "order" in k.data_source,
            "chance": round(ch, 4), "order_blind_ceiling": ceil, "note": note,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------------
def _normalise_mix(mix: dict[str, float] | None) -> dict[str, float]:
    m = dict(DEFAULT_MIX if mix is None else mix)
    bad = [k for k in m if k not in PROBLEM_TYPES]
    if bad:
        raise SynthError(f"unknown problem type(s) in mix: {bad}", hint=f"use keys from {list(PROBLEM_TYPES)}")
    if any(v < 0 for v in m.values()) or sum(m.values()) <= 0:
        raise SynthError("mix weights must be >= 0 and not all zero")
    return {pt: float(m.get(pt, 0.0)) for pt in PROBLEM_TYPES}


def _prepare_dir(root: Path) -> None:
    if root.exists() and any(root.iterdir()) and not (root / "world.json").exists():
        raise SynthError(f"{root} is not empty and holds no synthetic world (world.json)",
                         hint="pass an empty or new directory to --out")
    for sub, pattern in (("videos", "v*.mp4"), ("images", "i*.png")):
        d = root / sub
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob(pattern):  # files of a previous synthesis here
            f.unlink()
    (root / "shortcut.json").unlink(missing_ok=True)  # a previous shortcut world's; rewritten when asked for


def synthesize(
    out_dir: str | os.PathLike,
    train: int,
    test: int,
    seed: int,
    *,
    sft: int | None = None,
    frames: int = 8,
    size: int = 56,
    fps: float = 4.0,
    image_fraction: float = 0.25,
    shuffle_options: bool = True,
    mix: dict[str, float] | None = None,
    square: int = 12,
    questions_per_video: float = 3.35,
    questions_per_image: float = 1.0,
    noise: int = 20,
    shortcut: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write a synthetic world in Video-R1 format under `out_dir`; returns paths, counts and the manifest.

    `shortcut` (a probability, e.g. 0.75): the shortcut world, where order-dependent answers follow the clip's
    majority colour with that probability (SHORTCUT_RULES); world.json then reports the shortcut's accuracy per
    data_source and split beside chance, and shortcut.json the shortcut's answer and score per order-dependent
    record. None (the default) writes exactly the default world.

    {"root", "train" (= "rl"), "rl", "sft", "test", "world" (world.json), "media" (media.json): str paths,
     "counts": {"rl", "sft", "test", "videos", "images", "records"}, "manifest": the world.json dict}
    `progress(done, total)` is called as records are written.
    """
    sft = max(1, train // 4) if sft is None else sft
    if min(train, test, sft) < 0:
        raise SynthError("record counts must be >= 0")
    if max(train, test, sft) >= 1_000_000:
        raise SynthError("at most 999,999 records per split")
    if frames < 2 or size < 16 or size % 2 or square < 2 or square > size // 2:
        raise SynthError(f"bad geometry: frames={frames} (>= 2), size={size} (even, >= 16), square={square} "
                         f"(2..size/2)")
    if not 0 <= image_fraction <= 1:
        raise SynthError(f"image_fraction must be in [0, 1], got {image_fraction}")
    if fps <= 0:
        raise SynthError(f"fps must be > 0, got {fps}")
    if shortcut is not None and not 0 <= shortcut <= 1:
        raise SynthError(f"shortcut must be a probability in [0, 1], got {shortcut}",
                         hint="0.5 makes the cue uninformative; 0.75 answers 3 in 4 order questions without order")
    if shortcut is not None and frames < 3:
        raise SynthError(f"the shortcut world needs >= 3 frames per video (a majority colour), got frames={frames}")
    mix_n = _normalise_mix(mix)
    root = Path(out_dir)
    _prepare_dir(root)

    sizes = {"rl": train, "sft": sft, "test": test}
    total = sum(sizes.values())
    done = 0
    files: dict[str, Path] = {}
    media: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    shortcut_rows: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        code = _SPLIT_CODE[split]
        rng = np.random.default_rng([seed, code])
        kinds = plan_kinds(sizes[split], mix_n, image_fraction)
        scenes: list[Scene] = []
        for fam, ks in pack_scenes(kinds, ("steady", "switch"), questions_per_video, rng):
            scenes.append(Scene(fam, ks))
        for fam, ks in pack_scenes(kinds, ("squares",), questions_per_image, rng):
            scenes.append(Scene(fam, ks))
        for _ in range(kinds["ocr"]):
            scenes.append(Scene("word-video", ["ocr"]))
        for _ in range(kinds["image-ocr"]):
            scenes.append(Scene("word-image", ["image-ocr"]))
        order = rng.permutation(len(scenes))
        scenes = [scenes[i] for i in order]

        records: list[dict[str, Any]] = []
        n_video = n_image = 0
        base = _SPLIT_BASE[split]
        for si, sc in enumerate(scenes):
            fam = "word" if sc.family.startswith("word") else sc.family
            sc.params = sample_scene(fam, sc.kinds, rng, frames=frames, size=size, square=square, shortcut=shortcut)
            pix_rng = np.random.default_rng([seed, code, 7, si])
            pixels = render(sc.family, sc.params, pix_rng, frames=frames, size=size, noise=noise)
            is_video = KINDS[sc.kinds[0]].data_type == "video"
            if is_video:
                n_video += 1
                rel = f"videos/v{base + n_video:07d}.mp4"
                encode_mp4(pixels, root / rel, fps)
            else:
                n_image += 1
                rel = f"images/i{base + n_image:07d}.png"
                write_png(pixels, root / rel)
            media[rel] = {"split": split, "family": sc.family, "frames": frames if is_video else 1, "size": size,
                          "fps": fps if is_video else None, **sc.params}
            for kind in sc.kinds:
                k = KINDS[kind]
                qa = make_question(kind, sc.params, rng, frames, shuffle_options)
                rec: dict[str, Any] = {
                    "problem_id": base + len(records) + 1,
                    "problem": qa["problem"],
                    "data_type": k.data_type,
                    "problem_type": k.problem_type,
                    "options": qa["options"],
                }
                if split == "sft":
                    rec["process"] = qa["process"]
                rec["solution"] = f"<answer>{qa['answer']}</answer>"
                rec["path"] = "./" + rel
                rec["data_source"] = k.data_source
                records.append(rec)
                if shortcut is not None:
                    gold = _option_text(qa["options"], qa["answer"]) if qa["options"] else qa["answer"]
                    score = shortcut_score(kind, sc.params, gold)
                    if score is not None:
                        shortcut_rows.setdefault(split, {})[str(rec["problem_id"])] = {
                            "data_source": k.data_source, "shortcut": shortcut_answer(kind, sc.params),
                            "gold": gold, "score": round(score, 4)}
            done += len(sc.kinds)
            if progress:
                progress(done, total)
        path = root / f"{split}.json"
        path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        files[split] = path
        counts[split] = _split_counts(records, n_video, n_image)

    chance = chance_levels(frames, size, square)
    for split in SPLITS:
        by_src = counts[split]["by_data_source"]
        n = sum(by_src.values())
        counts[split]["chance"] = round(sum(chance[s]["chance"] * c for s, c in by_src.items()) / n, 4) if n else None
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "params": {"train": train, "sft": sft, "test": test, "frames": frames, "size": size, "fps": fps,
                   "square": square, "image_fraction": image_fraction, "shuffle_options": shuffle_options, "mix": mix_n,
                   "questions_per_video": questions_per_video, "questions_per_image": questions_per_image,
                   "noise": noise, "colors": {k: list(v) for k, v in COLORS.items()}, "words": list(WORDS)},
        "files": {s: files[s].name for s in SPLITS} | {"media": "media.json"},
        "counts": counts,
        "chance": chance,
        "order_marker": "data_sources containing 'order' have answers that depend on frame order",
    }
    if shortcut is not None:
        manifest["params"]["shortcut"] = shortcut
        manifest["files"]["shortcut"] = "shortcut.json"
        manifest["shortcut"] = shortcut_table(shortcut, shortcut_rows, chance)
        (root / "shortcut.json").write_text(json.dumps(shortcut_rows, indent=1, sort_keys=True) + "\n")
    (root / "media.json").write_text(json.dumps(media, indent=1, sort_keys=True) + "\n")
    (root / "world.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {
        "root": str(root),
        "train": str(files["rl"]),
        "rl": str(files["rl"]),
        "sft": str(files["sft"]),
        "test": str(files["test"]),
        "world": str(root / "world.json"),
        "media": str(root / "media.json"),
        **({"shortcut": str(root / "shortcut.json")} if shortcut is not None else {}),
        "counts": {
            "rl": train, "sft": sft, "test": test, "records": total,
            "videos": sum(counts[s]["videos"] for s in SPLITS), "images": sum(counts[s]["images"] for s in SPLITS),
        },
        "manifest": manifest,
    }


def shortcut_table(strength: float, rows: dict[str, dict[str, Any]], chance: dict[str, Any]) -> dict[str, Any]:
    """world.json's "shortcut" block: per order-dependent data_source, the rule, chance and the shortcut's measured
    accuracy on each split (mean score of its answer over that split's records), with the share of questions on which
    it is right (counter-shortcut questions are the rest: only the frame order answers them)."""
    by_src: dict[str, Any] = {}
    for src, rule in SHORTCUT_RULES.items():
        acc, agree = {}, {}
        for split in SPLITS:
            scores = [r["score"] for r in rows.get(split, {}).values() if r["data_source"] == src]
            acc[split] = round(sum(scores) / len(scores), 4) if scores else None
            agree[split] = round(sum(s >= 1.0 for s in scores) / len(scores), 4) if scores else None
        by_src[src] = {"rule": rule, "chance": chance[src]["chance"], "accuracy": acc,
                       "fully_right": agree, "expected": strength if src != "synthetic/order/describe" else None}
    return {
        "strength": strength,
        "cue": "the clip's majority colour (order-blind: any shuffle of the frames shows it)",
        "note": "accuracy = the world's own scoring of the shortcut's answer (exact for multiple choice, ROUGE for "
                "the description); taking the shortcut on every order-dependent question scores this; the order "
                "answers all of them",
        "by_data_source": by_src,
    }


def _split_counts(records: list[dict[str, Any]], n_video: int, n_image: int) -> dict[str, Any]:
    def tally(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in records:
            out[r[key]] = out.get(r[key], 0) + 1
        return dict(sorted(out.items()))

    n_vrec = sum(1 for r in records if r["data_type"] == "video")
    return {
        "records": len(records), "videos": n_video, "images": n_image,
        "questions_per_video": round(n_vrec / n_video, 3) if n_video else None,
        "by_problem_type": tally("problem_type"), "by_data_type": tally("data_type"),
        "by_data_source": tally("data_source"),
        "order_dependent": sum(1 for r in records if "order" in r["data_source"]),
    }
