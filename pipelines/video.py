"""Frame sampling and image sizing with Video-R1's rules (its vendored qwen-vl-utils 0.0.10), decoded fast.

The rules (``smart_nframes``, ``frame_indices``, ``frame_pixel_cap``, ``smart_resize``) are pure functions of the
clip's frame count / fps / size and ``VideoConfig``; they reproduce Video-R1's ``vision_process.py`` exactly (see
``reference/video-r1.md`` section 7). The readers differ from qwen-vl-utils only in speed:

- PyAV (default; FFmpeg ships inside its wheel, so a pip-only install decodes) builds a packet table from a demux
  pass, seeks to the keyframe before each target, decodes forward and converts to RGB only the kept frames. Measured
  side by side on four clips at Video-R1's settings (environment.md "Decoders"; BENCHMARKS.md) it is 1.06-1.27x
  faster than decord with identical pixels. decord (``video.backend=decord``, the ``[decord]`` extra) is opt-in
  only: its last release is from 2021, ``get_batch`` can deadlock holding the GIL (decord#373) and it leaks;
- a decode runs under a watchdog (``video.decode_timeout_s``): a decoder that hangs is abandoned and the video fails
  with a MediaError naming it, instead of freezing the run (a decoder stuck while holding the GIL, as decord's
  deadlock, cannot be interrupted from Python at all: one more reason decord is not the default);
- decoder failures become one clean reason (no FFmpeg log lines, C++ source paths or errno numbers);
- each kept frame is resized on a worker thread while the next one decodes, with torch's uint8 antialiased bicubic
  (``interpolate(..., mode="bicubic", antialias=True)`` on the uint8 frame: the same a=-0.5 kernel as the peer's
  float resize, run by torch's fixed-point SIMD kernel, ~2 ms per 720p frame against ~8-11 ms for PIL's bicubic at
  the same difference to the peer; measured in BENCHMARKS.md, "Frame sampling");
- decoded, resized frames are kept in a small in-process LRU and, when ``video.cache_dir`` is set, on disk
  (keyed by file identity and every setting that changes the output; atomic writes; corrupt entries are rewritten).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from pipelines.config import ImageConfig, VideoConfig
from pipelines.errors import MediaError

IMAGE_FACTOR = 28
MAX_RATIO = 200
FRAME_FACTOR = 2
# 2: frames resized by torch's uint8 kernel instead of PIL (pixels differ by <= 1 level). 3: PyAV is the default
# reader instead of decord (identical pixels on the clips measured, but not proven for every pixel format).
CACHE_VERSION = 3
LRU_SIZE = 8
# Decoder threads per video (ffmpeg frame threading). Two: a clip decoded from its first frame (one long GOP) gains
# ~1.6x wall time at the same CPU time, measured on the 2-core machine; the resize of frame k also runs on a worker
# thread while frame k+1 decodes.
DECODE_THREADS = 2
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass
class Frames:
    """Sampled, resized frames of one video and what the processor needs to know about them."""

    frames: np.ndarray  # uint8 (T, H, W, 3), H and W multiples of 28
    indices: list[int]
    sample_fps: float  # nframes / total_frames * video_fps: the processor's scalar fps
    total_frames: int
    video_fps: float
    meta: dict[str, Any] = field(default_factory=dict)  # backend, cache ('miss' | 'lru' | 'disk')

    @property
    def nframes(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------------------------------------------------------------
# The rules (pure)
def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 256 * 28 * 28,
    max_ratio: float = MAX_RATIO,
) -> tuple[int, int]:
    """Sides that are multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.

    Video-R1 / qwen-vl-utils 0.0.10: round each side to the nearest multiple (>= factor); if the area is too big, scale
    by sqrt(h*w/max) and floor; if too small, scale by sqrt(min/(h*w)) and ceil. Only difference: a floored side is
    kept >= `factor` (the original returns 0 for extreme ratios and then crashes in the resize).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > max_ratio:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float, cfg: VideoConfig, nframes: int | None = None) -> int:
    """How many frames to sample: `nframes` rounded to even, else total/video_fps*fps clamped to
    [ceil_even(min_frames), floor_even(min(max_frames, total))], <= total, floored to even. Raises ValueError when the
    result is outside [2, total_frames]."""
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        min_frames = ceil_by_factor(cfg.min_frames, FRAME_FACTOR)
        max_frames = floor_by_factor(min(cfg.max_frames, total_frames), FRAME_FACTOR)
        x = total_frames / video_fps * cfg.fps if video_fps > 0 else float(min_frames)
        x = min(min(max(x, min_frames), max_frames), total_frames)
        n = floor_by_factor(x, FRAME_FACTOR)
    if not (FRAME_FACTOR <= n <= total_frames):
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {n}.")
    return int(n)


def frame_indices(total_frames: int, nframes: int) -> list[int]:
    """round(linspace(0, total_frames - 1, nframes)), computed in float64. Video-R1 rounds torch's float32 linspace:
    identical for <= 64 frames on clips up to 100k frames (tested); beyond that float32 can be one frame off."""
    return [int(i) for i in np.round(np.linspace(0, total_frames - 1, nframes))]


def frame_pixel_cap(nframes: int, cfg: VideoConfig) -> int:
    """Per-frame pixel cap: max(min(max_pixels, total_pixels / nframes * 2), int(min_pixels * 1.05))."""
    return int(max(min(cfg.max_pixels, cfg.total_pixels / nframes * FRAME_FACTOR), int(cfg.min_pixels * 1.05)))


def video_size(height: int, width: int, nframes: int, cfg: VideoConfig, factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    """Resized (height, width) of the sampled frames; `factor` is the model family's patch x merge (28 or 32)."""
    return smart_resize(height, width, factor, cfg.min_pixels, frame_pixel_cap(nframes, cfg))


def visual_tokens(height: int, width: int, nframes: int = 1, temporal_patch: int = 2, patch: int = 14,
                  merge: int = 2) -> int:
    """LLM tokens of an image (nframes=1) or a video: ceil(T/temporal_patch) * (H/patch) * (W/patch) / merge^2."""
    grid_t = max(1, math.ceil(nframes / temporal_patch))
    return grid_t * (height // patch) * (width // patch) // (merge * merge)


# ---------------------------------------------------------------------------------------------------------------------
# Resizing uint8 frames
def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3), antialiased bicubic (a=-0.5), as the peer's
    ``torchvision.transforms.functional.resize(..., BICUBIC, antialias=True)`` but on uint8: torch has a fixed-point
    kernel for uint8 channels-last input that is 4-5x faster than PIL's bicubic and than the peer's float resize."""
    if frame.shape[0] == height and frame.shape[1] == width:
        return np.ascontiguousarray(frame)
    import torch
    import torch.nn.functional as F

    # HWC uint8 viewed as a channels-last NCHW tensor: no copy in, and the output comes back HWC-contiguous.
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).unsqueeze(0)
    y = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _resize_pool() -> ThreadPoolExecutor:
    """One resize worker per process (a forked DataLoader worker gets its own: the parent's thread is not copied)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="videor1-resize")
            _pool_pid = os.getpid()
        return _pool


# ---------------------------------------------------------------------------------------------------------------------
# Readers: open() -> (total_frames, fps, height, width); frames(indices) yields (index, uint8 HxWx3) in order.
class _DecordReader:
    name = "decord"

    def __init__(self, path: str, threads: int = 1):
        import decord

        self.vr = decord.VideoReader(path, num_threads=threads)
        self.total_frames = len(self.vr)
        self.video_fps = float(self.vr.get_avg_fps())
        self._first: np.ndarray | None = None

    def size(self) -> tuple[int, int]:
        if self._first is None:
            self._first = self.vr[0].asnumpy()
            self.vr.seek(0)
        return int(self._first.shape[0]), int(self._first.shape[1])

    def frames(self, indices: list[int]) -> Iterator[np.ndarray]:
        for i in indices:
            if i == 0 and self._first is not None:
                yield self._first
            else:
                yield self.vr[i].asnumpy()

    def close(self) -> None:
        del self.vr


class _PyAVReader:
    """Seek-aware PyAV reader: a demux pass gives the packet table (pts in presentation order, keyframes); each
    target is reached by seeking to its keyframe only when the decoder is not already in that GOP; only kept frames
    are converted to RGB."""

    name = "pyav"

    def __init__(self, path: str, threads: int = 0):
        import av

        self.av = av
        self.container = av.open(path)
        if not self.container.streams.video:
            raise ValueError("no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        if threads:
            self.stream.thread_count = threads
        pts, keys = [], []
        for packet in self.container.demux(self.stream):
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(packet.pts)
            keys.append(bool(packet.is_keyframe))
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        self.pts = [pts[i] for i in order]
        self.is_key = [keys[i] for i in order]
        self.total_frames = len(self.pts)
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        self.video_fps = float(rate) if rate else 0.0
        if self.total_frames == 0:
            raise ValueError("no decodable video frames")
        self.container.seek(self.pts[0], stream=self.stream, backward=True, any_frame=False)
        self._decoder: Iterator | None = None
        self._last_pts: int | None = None

    def size(self) -> tuple[int, int]:
        cc = self.stream.codec_context
        return int(cc.height), int(cc.width)

    def _keyframe_before(self, i: int) -> int:
        while i > 0 and not self.is_key[i]:
            i -= 1
        return i

    def _seek(self, i: int) -> None:
        self.container.seek(self.pts[i], stream=self.stream, backward=True, any_frame=False)
        self._decoder = self.container.decode(self.stream)
        self._last_pts = None

    def frames(self, indices: list[int]) -> Iterator[Any]:
        """Yields av.VideoFrame objects (convert with `to_rgb`)."""
        started = False
        for i in indices:
            target = self.pts[i]
            key = self._keyframe_before(i)
            if (not started or self._last_pts is None or target <= self._last_pts
                    or self.pts[key] > self._last_pts):
                self._seek(key)
                started = True
            frame = None
            for fr in self._decoder:  # type: ignore[union-attr]
                p = fr.pts if fr.pts is not None else fr.dts
                self._last_pts = p
                if p is not None and p >= target:
                    frame = fr
                    break
            if frame is None:
                raise ValueError(f"frame {i} (pts {target}) not found after decoding to the end")
            yield frame

    @staticmethod
    def to_rgb(frame: Any) -> np.ndarray:
        return frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self.container.close()


def _open_reader(path: str, backend: str):
    if backend == "decord":
        return _DecordReader(path, threads=DECODE_THREADS)
    return _PyAVReader(path, threads=DECODE_THREADS)


# Decoder messages carry log decoration that means nothing to a user: decord's "[14:08:33] /github/workspace/src/
# video/video_reader.cc:151: Check failed: st_nb >= 0 (-1381 vs. 0) ERROR ...", PyAV's "[Errno 1094995529] ...:
# 'avcodec_receive_frame()'", FFmpeg's "[mov,mp4,m4a @ 0x55d...] moov atom not found".
_NOISE = [
    re.compile(r"\[\d{1,2}:\d{2}:\d{2}\]\s*"),                      # decord's log timestamp
    re.compile(r"\S*/[\w.\-/]+\.(?:cc|cpp|cxx|h|hpp|c):\d+:\s*"),     # C/C++ source path:line
    re.compile(r"Check failed:.*?(?:ERROR\s*|$)"),                     # dmlc CHECK text before the message
    re.compile(r"\[Errno -?\d+\]\s*"),
    re.compile(r"\[[\w,]+ @ 0x[0-9a-f]+\]\s*"),                         # FFmpeg log context
    re.compile(r":\s*'[^']*\(\)'"),                                   # PyAV's failing libav call
]


def clean_reason(e: BaseException, path: str = "") -> str:
    """One line a user can read from a decoder exception: no log decoration, no repeated path."""
    text = " ".join(str(e).split())
    if path:
        for quoted in (f": '{path}'", f" '{path}'", f"[{path}] "):  # the MediaError names the path already
            text = text.replace(quoted, "")
        text = text.replace(path, "the file")
    for pat in _NOISE:
        text = pat.sub("", text)
    text = text.strip(" :;.") or type(e).__name__
    return text[:1].lower() + text[1:200]


def _decode_watched(path: str, cfg: VideoConfig, backend: str, factor: int = IMAGE_FACTOR) -> Frames:
    """`_decode` on a daemon thread, given up after video.decode_timeout_s: a hung decoder (a corrupt stream that
    never returns, a stalled network file system) fails this video, naming it, and the run goes on. The abandoned
    thread keeps running until its decoder returns; it holds no lock of ours."""
    timeout = cfg.decode_timeout_s
    if not timeout:
        return _decode(path, cfg, backend, factor)
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            box["frames"] = _decode(path, cfg, backend, factor)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=f"decode:{os.path.basename(path)}", daemon=True).start()
    if not done.wait(timeout):
        raise MediaError(path, f"decoding did not finish within video.decode_timeout_s = {timeout:g} s ({backend}); "
                         "the decoder hung", hint="`ffprobe` the file; raise video.decode_timeout_s for very long "
                         "videos on a slow machine")
    if "error" in box:
        raise box["error"]
    return box["frames"]


def _decode(path: str, cfg: VideoConfig, backend: str, factor: int = IMAGE_FACTOR) -> Frames:
    reader = _open_reader(path, backend)
    try:
        total, fps = reader.total_frames, reader.video_fps
        if total <= 0:
            raise ValueError("no video frames")
        try:
            n = smart_nframes(total, fps, cfg)
        except ValueError as e:
            raise MediaError(path, f"too short to sample ({total} frames at {fps:g} fps): {e}") from None
        idx = frame_indices(total, n)
        pool = _resize_pool()
        futures = []
        size: tuple[int, int] | None = None
        for raw in reader.frames(idx):
            if size is None:
                h, w = (raw.shape[0], raw.shape[1]) if isinstance(raw, np.ndarray) else (raw.height, raw.width)
                size = video_size(h, w, n, cfg, factor)
            futures.append(pool.submit(_convert_resize, raw, size, reader))
        out = np.stack([f.result() for f in futures])
    finally:
        try:
            reader.close()
        except Exception:  # noqa: BLE001
            pass
    return Frames(out, idx, n / max(total, 1e-6) * fps, total, fps, {"backend": reader.name, "cache": "miss"})


def _convert_resize(raw: Any, size: tuple[int, int], reader: Any) -> np.ndarray:
    arr = raw if isinstance(raw, np.ndarray) else reader.to_rgb(raw)
    return resize_frame(arr, size[0], size[1])


# ---------------------------------------------------------------------------------------------------------------------
# Caches
_lru: "OrderedDict[str, Frames]" = OrderedDict()
_lru_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _pool, _pool_lock, _lru_lock
    _pool, _pool_lock, _lru_lock = None, threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear_lru() -> None:
    with _lru_lock:
        _lru.clear()


def cache_key(path: str | os.PathLike, cfg: VideoConfig, factor: int = IMAGE_FACTOR) -> str:
    """sha256 of the file's identity (absolute path, size, mtime_ns) and every setting that changes the frames."""
    p = os.path.abspath(os.fspath(path))
    st = os.stat(p)
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "path": p,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "fps": cfg.fps,
            "min_frames": cfg.min_frames,
            "max_frames": cfg.max_frames,
            "min_pixels": cfg.min_pixels,
            "max_pixels": cfg.max_pixels,
            "total_pixels": cfg.total_pixels,
            **({"factor": factor} if factor != IMAGE_FACTOR else {}),  # 28: keys of existing caches unchanged
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _copy(fr: Frames, how: str) -> Frames:
    return Frames(fr.frames.copy(), list(fr.indices), fr.sample_fps, fr.total_frames, fr.video_fps,
                  {**fr.meta, "cache": how})


def _lru_get(key: str) -> Frames | None:
    with _lru_lock:
        fr = _lru.get(key)
        if fr is not None:
            _lru.move_to_end(key)
    return _copy(fr, "lru") if fr is not None else None


def _lru_put(key: str, fr: Frames) -> None:
    with _lru_lock:
        _lru[key] = _copy(fr, fr.meta.get("cache", "miss"))
        _lru.move_to_end(key)
        while len(_lru) > LRU_SIZE:
            _lru.popitem(last=False)


def _entry(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    d = Path(cache_dir) / key[:2]
    return d / f"{key}.npy", d / f"{key}.json"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)


def _disk_get(cache_dir: str, key: str) -> Frames | None:
    npy, meta_path = _entry(cache_dir, key)
    if not meta_path.exists() or not npy.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(npy, allow_pickle=False)
        if (arr.dtype != np.uint8 or list(arr.shape) != list(meta["shape"]) or arr.ndim != 4
                or len(meta["indices"]) != arr.shape[0]):
            return None
        return Frames(arr, [int(i) for i in meta["indices"]], float(meta["sample_fps"]), int(meta["total_frames"]),
                      float(meta["video_fps"]), {"backend": meta.get("backend"), "cache": "disk"})
    except Exception:  # noqa: BLE001 - a corrupt or half-written entry is a miss; it gets rewritten
        return None


def _disk_put(cache_dir: str, key: str, fr: Frames, path: str) -> None:
    npy, meta_path = _entry(cache_dir, key)
    meta = {
        "path": os.path.abspath(path),
        "shape": list(fr.frames.shape),
        "indices": fr.indices,
        "sample_fps": fr.sample_fps,
        "total_frames": fr.total_frames,
        "video_fps": fr.video_fps,
        "backend": fr.meta.get("backend"),
    }
    try:
        _atomic_write(npy, lambda f: np.save(f, fr.frames, allow_pickle=False))
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta)), mode="w")
    except OSError:
        pass  # a read-only or full cache dir never fails the sample


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points
def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file not found", hint="check data.root and the record's path")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "empty file")


def _backends(cfg: VideoConfig) -> list[str]:
    """auto = PyAV (in the wheel, the fastest of the readers a pip install brings). decord only when asked for."""
    if cfg.backend == "decord":
        try:
            import decord  # noqa: F401
        except Exception as e:  # noqa: BLE001 - not installed, or a wheel that does not load here
            from pipelines.errors import VideoR1Error

            raise VideoR1Error(f"video.backend = decord, but decord cannot be imported ({type(e).__name__}: {e})",
                               hint="pip install 'videor1[decord]', or use the default reader: "
                                    "--set video.backend=auto") from None
        return ["decord"]
    return ["pyav"]


def sample_video(path: str | os.PathLike, cfg: VideoConfig, use_cache: bool = True,
                 factor: int = IMAGE_FACTOR) -> Frames:
    """Sample and resize the frames of one video with Video-R1's rules, sides multiples of `factor` (the model
    family's patch x merge: `pipelines.models.families`). Raises MediaError naming the path."""
    path = os.fspath(path)
    _check_file(path)
    key = cache_key(path, cfg, factor) if use_cache else None
    if key is not None:
        hit = _lru_get(key)
        if hit is not None:
            return hit
        if cfg.cache_dir:
            hit = _disk_get(cfg.cache_dir, key)
            if hit is not None:
                _lru_put(key, hit)
                return hit
    errors = []
    result: Frames | None = None
    for backend in _backends(cfg):
        try:
            result = _decode_watched(path, cfg, backend, factor)
            break
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure: try the next reader, then report
            errors.append(f"{backend}: {clean_reason(e, path)}")
    if result is None:
        raise MediaError(path, "cannot decode video (" + "; ".join(errors) + ")",
                         hint="is it a whole video file? `ffprobe` it")
    if key is not None:
        _lru_put(key, result)
        if cfg.cache_dir:
            _disk_put(cfg.cache_dir, key, result, path)
    return result


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


def _open_image(path: str) -> Image.Image:
    _check_file(path)
    try:
        img = Image.open(path)
        img.load()
        return img
    except Exception as e:  # noqa: BLE001
        raise MediaError(path, f"cannot decode image ({clean_reason(e, path)})") from None


def load_image(path: str | os.PathLike, cfg: ImageConfig, factor: int = IMAGE_FACTOR) -> np.ndarray:
    """uint8 (H, W, 3): RGBA composited on white, resized (PIL bicubic) into [min_pixels, max_pixels] by
    smart_resize, as qwen-vl-utils' fetch_image."""
    path = os.fspath(path)
    img = _to_rgb(_open_image(path))
    try:
        h, w = smart_resize(img.height, img.width, factor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
        raise MediaError(path, str(e)) from None
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BICUBIC)
    return np.asarray(img)


def is_image(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def probe(path: str | os.PathLike, video_cfg: VideoConfig, image_cfg: ImageConfig, factor: int = IMAGE_FACTOR,
          tokens: Callable[..., int] | None = None) -> dict[str, Any]:
    """What sampling would do to one media file, without decoding the sampled frames; `factor` and `tokens`
    (visual tokens of (h, w, nframes)) are the model family's (`Adapter.factor`, `Adapter.visual_tokens`)."""
    tokens = tokens or visual_tokens
    path = os.fspath(path)
    _check_file(path)
    if is_image(path):
        img = _open_image(path)
        try:
            rh, rw = smart_resize(img.height, img.width, factor, image_cfg.min_pixels, image_cfg.max_pixels)
        except ValueError as e:
            raise MediaError(path, str(e)) from None
        return {"path": path, "kind": "image", "height": img.height, "width": img.width, "resized_height": rh,
                "resized_width": rw, "visual_tokens": tokens(rh, rw, 1)}
    errors = []
    for backend in _backends(video_cfg):
        try:
            reader = _open_reader(path, backend)
            try:
                total, fps = reader.total_frames, reader.video_fps
                h, w = reader.size()
            finally:
                reader.close()
            break
        except Exception as e:  # noqa: BLE001
            errors.append(f"{backend}: {clean_reason(e, path)}")
    else:
        raise MediaError(path, "cannot decode video (" + "; ".join(errors) + ")")
    try:
        n = smart_nframes(total, fps, video_cfg)
    except ValueError as e:
        raise MediaError(path, f"too short to sample ({total} frames at {fps:g} fps): {e}") from None
    rh, rw = video_size(h, w, n, video_cfg, factor)
    return {
        "path": path,
        "kind": "video",
        "backend": backend,
        "height": h,
        "width": w,
        "total_frames": total,
        "video_fps": fps,
        "duration_s": total / fps if fps else None,
        "nframes": n,
        "indices": frame_indices(total, n),
        "resized_height": rh,
        "resized_width": rw,
        "frame_pixel_cap": frame_pixel_cap(n, video_cfg),
        "sample_fps": n / total * fps,
        "visual_tokens": tokens(rh, rw, n),
    }
