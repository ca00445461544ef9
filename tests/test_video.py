"""pipelines.video: Video-R1's frame rules against hand-computed values, the readers on synthetic clips, the cache,
and `videor1 data probe`."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from pipelines import video as V
from pipelines.config import ImageConfig, VideoConfig
from pipelines.errors import MediaError

R1 = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=100352, max_pixels=100352, total_pixels=90316800)


# ---------------------------------------------------------------------------------------------------------------------
# Pure rules
def test_smart_nframes_hand_cases():
    cfg = VideoConfig(**R1)
    assert V.smart_nframes(300, 30.0, cfg) == 16  # 10 s at 2 fps = 20 -> capped at 16
    assert V.smart_nframes(90, 30.0, cfg) == 6  # 3 s at 2 fps
    assert V.smart_nframes(5, 30.0, cfg) == 4  # min 4, max floor_even(min(16, 5)) = 4
    assert V.smart_nframes(105, 30.0, cfg) == 6  # 3.5 s -> 7 frames -> floored to even
    assert V.smart_nframes(3, 30.0, cfg) == 2  # floor_even(min(16, 3)) = 2
    assert V.smart_nframes(2, 30.0, cfg) == 2
    assert V.smart_nframes(48, 8.0, cfg) == 12  # 6 s at 2 fps
    assert V.smart_nframes(300, 30.0, cfg.model_copy(update={"fps": 1.0})) == 10
    assert V.smart_nframes(300, 30.0, cfg.model_copy(update={"max_frames": 9})) == 8  # max rounded down to even
    assert V.smart_nframes(300, 30.0, cfg.model_copy(update={"min_frames": 5, "fps": 0.1})) == 6  # min rounded up
    # an explicit nframes is rounded to even (Python round: half to even)
    assert V.smart_nframes(300, 30.0, cfg, nframes=7) == 8
    assert V.smart_nframes(300, 30.0, cfg, nframes=5) == 4
    assert V.smart_nframes(300, 30.0, cfg, nframes=6) == 6
    with pytest.raises(ValueError):
        V.smart_nframes(1, 30.0, cfg)
    with pytest.raises(ValueError):
        V.smart_nframes(10, 30.0, cfg, nframes=12)


def test_frame_indices_hand_case():
    assert V.frame_indices(300, 16) == [0, 20, 40, 60, 80, 100, 120, 140, 159, 179, 199, 219, 239, 259, 279, 299]
    assert V.frame_indices(5, 4) == [0, 1, 3, 4]  # 0, 1.33, 2.67, 4
    assert V.frame_indices(90, 6) == [0, 18, 36, 53, 71, 89]


def test_frame_indices_match_torch_linspace():
    """Video-R1 rounds torch's float32 linspace; float64 agrees for every protocol (<= 64 frames) of clips up to
    100k frames (float32 can be one frame off for longer clips or 128+ frames; we keep the exact value there)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for total in list(range(2, 200)) + rng.integers(200, 100_000, 300).tolist():
        for n in (2, 4, 8, 16, 32, 64):
            if n > total:
                continue
            ref = torch.linspace(0, total - 1, n).round().long().tolist()
            assert V.frame_indices(total, n) == ref, (total, n)


def test_smart_resize_hand_cases():
    assert V.smart_resize(100, 200, 28, 3136, 200704) == (112, 196)  # nearest multiples of 28
    assert V.smart_resize(41, 43, 28, 784, 10**6) == (28, 56)  # 1.46 -> 1, 1.54 -> 2
    assert V.smart_resize(14, 14, 28, 784, 10**6) == (28, 28)  # never below one factor
    assert V.smart_resize(720, 1280, 28, 100352, 105369) == (224, 420)  # too big: scale down, floor
    assert V.smart_resize(64, 96, 28, 100352, 105369) == (280, 392)  # too small: scale up, ceil
    assert V.smart_resize(480, 854, 28, 100352, 105369) == (224, 420)
    with pytest.raises(ValueError, match="aspect ratio"):
        V.smart_resize(10, 2100)


def test_frame_pixel_cap_and_tokens():
    cfg = VideoConfig(**R1)
    assert V.frame_pixel_cap(16, cfg) == 105369  # int(100352 * 1.05)
    # a small total budget lowers the cap but never below min * 1.05
    low = cfg.model_copy(update={"max_pixels": 200704, "total_pixels": 16 * 200704 / 2})
    assert V.frame_pixel_cap(16, low) == 200704
    assert V.frame_pixel_cap(32, low) == 105369
    assert V.visual_tokens(224, 420, 16) == 960  # 8 temporal patches * 16 * 30 / 4
    assert V.visual_tokens(224, 420, 15) == 960  # padded to an even count
    assert V.visual_tokens(28, 28) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic media
N_FRAMES, H, W, FPS = 48, 64, 96, 8


def _colour(i: int) -> tuple[int, int, int]:
    i %= N_FRAMES
    return (20 + 4 * i, 200 - 3 * i, 60 + (i % 4) * 40)


PALETTE = np.array([_colour(i) for i in range(N_FRAMES)], dtype=np.float32)


def make_video(path, n=N_FRAMES, h=H, w=W, fps=FPS, codec="libx264", gop=12):
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            s.options = {"preset": "ultrafast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(n):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = _colour(i)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("media") / "colours.mp4")


@pytest.fixture(autouse=True)
def _fresh_lru():
    V.clear_lru()
    yield
    V.clear_lru()


def _decoded_order(frames: np.ndarray) -> list[int]:
    means = frames.reshape(frames.shape[0], -1, 3).mean(axis=1)
    return [int(np.argmin(((PALETTE - m) ** 2).sum(axis=1))) for m in means]


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_sample_video_frames_are_the_sampled_indices(clip, backend):
    if backend == "decord":
        pytest.importorskip("decord")  # the optional [decord] extra
    cfg = VideoConfig(**R1, backend=backend)
    fr = V.sample_video(clip, cfg, use_cache=False)
    assert fr.total_frames == N_FRAMES and fr.video_fps == pytest.approx(FPS)
    assert fr.indices == V.frame_indices(48, 12) == [0, 4, 9, 13, 17, 21, 26, 30, 34, 38, 43, 47]
    assert fr.frames.dtype == np.uint8 and fr.frames.shape == (12, 280, 392, 3)
    assert fr.sample_fps == pytest.approx(12 / 48 * 8)
    assert _decoded_order(fr.frames) == fr.indices
    assert fr.meta["backend"] == ("pyav" if backend == "auto" else backend)  # PyAV is the default reader


def test_backends_agree(clip):
    pytest.importorskip("decord")
    a = V.sample_video(clip, VideoConfig(**R1, backend="decord"), use_cache=False)
    b = V.sample_video(clip, VideoConfig(**R1, backend="pyav"), use_cache=False)
    assert a.indices == b.indices and a.frames.shape == b.frames.shape
    assert np.abs(a.frames.astype(int) - b.frames.astype(int)).mean() < 2.0


def test_pyav_seeks_and_reads_sparse_long_gop(tmp_path):
    path = make_video(tmp_path / "long.mp4", n=120, h=32, w=32, fps=4, gop=30)  # 30 s -> 16 frames
    cfg = VideoConfig(**R1, backend="pyav")
    fr = V.sample_video(path, cfg, use_cache=False)
    assert fr.indices == V.frame_indices(120, 16)
    assert _decoded_order(fr.frames) == [i % N_FRAMES for i in fr.indices]
    try:
        import decord  # noqa: F401 - the optional [decord] extra, as a second reader to compare pixels with
    except ImportError:
        return
    ref = V.sample_video(path, cfg.model_copy(update={"backend": "decord"}), use_cache=False)
    assert np.abs(fr.frames.astype(int) - ref.frames.astype(int)).mean() < 2.0


def test_matches_qwen_vl_utils(clip):
    """Same indices, size and sampled fps as qwen_vl_utils.fetch_video configured as Video-R1's copy; pixels close."""
    from pipelines.bench.frames import peer_fetch

    cfg = VideoConfig(**R1)
    ours = V.sample_video(clip, cfg, use_cache=False)
    video, idx, sample_fps = peer_fetch(clip, cfg)
    peer = video.permute(0, 2, 3, 1).numpy()
    assert idx == ours.indices and peer.shape == ours.frames.shape and sample_fps == pytest.approx(ours.sample_fps)
    assert np.abs(peer - ours.frames.astype(np.float32)).mean() < 1.0


@pytest.mark.parametrize("src,dst", [((720, 1280), (224, 420)), ((360, 640), (224, 420)), ((56, 56), (112, 112)),
                                     ((100, 37), (56, 28))])
def test_resize_frame_is_the_peers_antialiased_bicubic(src, dst):
    """resize_frame (torch's uint8 kernel) against the peer's float resize, rounded: torchvision's
    resize(BICUBIC, antialias=True) = interpolate(float, bicubic, antialias) on a smooth image (a gradient plus a
    disc), within one grey level everywhere; a bilinear or non-antialiased resize differs by several."""
    import torch
    import torch.nn.functional as F

    h, w = src
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2) * 90.0
    img = np.stack([xx / w * 200 + disc * 0.3, yy / h * 160 + 40, 255 - xx / w * 120 - disc], -1)
    frame = np.clip(np.round(img), 0, 255).astype(np.uint8)
    out = V.resize_frame(frame, *dst)
    assert out.dtype == np.uint8 and out.shape == (*dst, 3) and out.flags["C_CONTIGUOUS"]
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    ref = F.interpolate(x, size=dst, mode="bicubic", antialias=True, align_corners=False)
    ref = ref.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
    diff = np.abs(out.astype(np.float32) - ref)
    assert diff.max() <= 1.0 and diff.mean() < 0.2
    if dst[0] < h:  # downscale: a plain (aliasing) resize is measurably different, so the test can tell them apart
        plain = F.interpolate(x, size=dst, mode="bilinear", antialias=False, align_corners=False)
        assert np.abs(plain.round()[0].permute(1, 2, 0).numpy() - ref).max() > 1.0


def test_broken_media_raise_media_error_naming_the_path(tmp_path):
    cfg = VideoConfig(**R1)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path, reason in ((junk, "cannot decode"), (empty, "empty"), (tmp_path / "missing.mp4", "not found")):
        for backend in ("auto", "pyav"):
            with pytest.raises(MediaError, match=reason) as e:
                V.sample_video(path, cfg.model_copy(update={"backend": backend}))
            assert str(path) in str(e.value) and e.value.path == str(path)
    one = make_video(tmp_path / "one.mp4", n=1)
    with pytest.raises(MediaError, match="too short"):
        V.sample_video(one, cfg)


def test_load_image_rgba_on_white(tmp_path):
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[:, 25:] = (255, 0, 0, 255)  # right half opaque red, left half fully transparent (black)
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    img = V.load_image(path, ImageConfig())
    assert img.dtype == np.uint8 and img.shape == (56, 84, 3)  # 40x50 -> too small -> scaled up, ceil to 28
    assert tuple(img[2, 2]) == (255, 255, 255) and tuple(img[-3, -3]) == (255, 0, 0)
    big = tmp_path / "b.jpg"
    Image.new("RGB", (1000, 800), (10, 20, 30)).save(big)
    assert V.load_image(big, ImageConfig()).shape == (392, 476, 3)  # 800x1000 over 200704 -> floor
    with pytest.raises(MediaError, match="cannot decode image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a png at all")
        V.load_image(bad, ImageConfig())


# ---------------------------------------------------------------------------------------------------------------------
# Cache
def _count_decodes(monkeypatch):
    calls = []
    real = V._decode

    def counting(path, cfg, backend, *rest):
        calls.append(path)
        return real(path, cfg, backend, *rest)

    monkeypatch.setattr(V, "_decode", counting)
    return calls


def _fail_decode(monkeypatch):
    def boom(path, cfg, backend):
        raise RuntimeError("decoder must not run")

    monkeypatch.setattr(V, "_decode", boom)


def test_cache_hits_lru_then_disk(clip, tmp_path, monkeypatch):
    cfg = VideoConfig(**R1, cache_dir=str(tmp_path / "cache"))
    first = V.sample_video(clip, cfg)
    assert first.meta["cache"] == "miss"
    _fail_decode(monkeypatch)
    hit = V.sample_video(clip, cfg)
    assert hit.meta["cache"] == "lru" and np.array_equal(hit.frames, first.frames) and hit.indices == first.indices
    hit.frames[:] = 0  # callers get their own copy
    V.clear_lru()
    disk = V.sample_video(clip, cfg)
    assert disk.meta["cache"] == "disk" and np.array_equal(disk.frames, first.frames)
    assert disk.sample_fps == first.sample_fps and disk.total_frames == first.total_frames
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_misses_on_settings_and_mtime(clip, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "clip.mp4"
    shutil.copy(clip, path)
    cfg = VideoConfig(**R1, cache_dir=str(tmp_path / "cache"))
    calls = _count_decodes(monkeypatch)
    V.sample_video(path, cfg)
    V.sample_video(path, cfg)
    assert len(calls) == 1
    for change in ({"max_frames": 8}, {"fps": 1.0}, {"min_pixels": 3136, "max_pixels": 3136}, {"total_pixels": 1e6}):
        V.clear_lru()
        V.sample_video(path, cfg.model_copy(update=change))
    assert len(calls) == 5
    V.clear_lru()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fr = V.sample_video(path, cfg)
    assert len(calls) == 6 and fr.meta["cache"] == "miss"
    V.sample_video(path, cfg, use_cache=False)
    assert len(calls) == 7


def test_corrupt_cache_entry_is_rewritten(clip, tmp_path, monkeypatch):
    cfg = VideoConfig(**R1, cache_dir=str(tmp_path / "cache"))
    first = V.sample_video(clip, cfg)
    npy, meta = V._entry(cfg.cache_dir, V.cache_key(clip, cfg))
    npy.write_bytes(b"garbage")
    V.clear_lru()
    calls = _count_decodes(monkeypatch)
    again = V.sample_video(clip, cfg)
    assert len(calls) == 1 and np.array_equal(again.frames, first.frames)
    meta.write_text("{not json")
    V.clear_lru()
    V.sample_video(clip, cfg)
    assert len(calls) == 2
    V.clear_lru()
    assert V.sample_video(clip, cfg).meta["cache"] == "disk"  # rewritten entries read back


def _writer(path, cache_dir, rounds):
    cfg = VideoConfig(**R1, cache_dir=cache_dir)
    for _ in range(rounds):
        V.clear_lru()
        fr = V._decode(str(path), cfg, "pyav")
        V._disk_put(cache_dir, V.cache_key(path, cfg), fr, str(path))
        V._disk_get(cache_dir, V.cache_key(path, cfg))


def test_concurrent_writers_leave_a_readable_entry(clip, tmp_path):
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(clip, cache, 4)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    cfg = VideoConfig(**R1, cache_dir=cache)
    hit = V._disk_get(cache, V.cache_key(clip, cfg))
    assert hit is not None and hit.indices == V.frame_indices(48, 12)
    assert np.array_equal(hit.frames, V.sample_video(clip, cfg, use_cache=False).frames)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------------
# probe + CLI
def test_probe_video_and_image(clip, tmp_path):
    info = V.probe(clip, VideoConfig(**R1), ImageConfig())
    assert info["kind"] == "video" and info["total_frames"] == 48 and info["nframes"] == 12
    assert (info["height"], info["width"]) == (64, 96)
    assert (info["resized_height"], info["resized_width"]) == (280, 392)
    assert info["indices"] == V.frame_indices(48, 12) and info["sample_fps"] == pytest.approx(2.0)
    assert info["visual_tokens"] == 6 * 20 * 28 // 4
    img = tmp_path / "x.png"
    Image.new("RGB", (50, 40)).save(img)
    assert V.probe(img, VideoConfig(), ImageConfig()) == {
        "path": str(img), "kind": "image", "height": 40, "width": 50, "resized_height": 56, "resized_width": 84,
        "visual_tokens": 6}


def test_cli_probe_json_and_set(clip, tmp_path):
    res = run_cli("data", "probe", clip, "--json", "--preset", "video-r1-7b")
    info = json.loads(res.stdout)
    assert info["nframes"] == 12 and info["resized_height"] == 280 and info["visual_tokens"] == 840
    res = run_cli("data", "probe", clip, "--json", "--preset", "video-r1-7b", "--set", "video.max_frames=8",
                  "--set", "video.backend=pyav")
    info = json.loads(res.stdout)
    assert info["nframes"] == 8 and info["indices"] == V.frame_indices(48, 8) and info["backend"] == "pyav"
    table = run_cli("data", "probe", clip)
    assert "nframes" in table.stdout and "visual_tokens" in table.stdout
    missing = run_cli("data", "probe", tmp_path / "nope.mp4", check=False)
    assert missing.exit_code == 1 and "nope.mp4" in missing.output and "not found" in missing.output


def _sample_in_child(path, q):
    fr = V.sample_video(path, VideoConfig(**R1), use_cache=False)
    q.put(fr.indices)


def test_forked_worker_decodes_after_parent_did(clip):
    """A DataLoader worker forked after the parent decoded (resize thread started) must not hang."""
    V.sample_video(clip, VideoConfig(**R1), use_cache=False)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_sample_in_child, args=(str(clip), q))
    p.start()
    p.join(60)
    if p.is_alive():
        p.kill()
        pytest.fail("forked worker hung")
    assert p.exitcode == 0 and q.get(timeout=5) == V.frame_indices(48, 12)
