"""`videor1 bench frames --quick`: runs end to end on a tiny clip and agrees with qwen_vl_utils (no timing asserted)."""

from __future__ import annotations

import json

from conftest import run_cli


def test_bench_frames_quick(tmp_path):
    out = tmp_path / "bench.json"
    res = run_cli("bench", "frames", "--quick", "--repeats", "1", "--no-pyav", "--clips-dir", tmp_path / "clips",
                  "--out", out, "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert "cold" in res.stdout and "stream" in res.stdout
    data = json.loads(out.read_text())
    # the peer at qwen-vl-utils' own default reader (torchcodec when it is installed, else decord), named
    import importlib.util

    peer = "decord" if importlib.util.find_spec("torchcodec") is None else data["settings"]["peer_backend"]
    assert data["settings"]["peer_backend"] == peer and data["settings"]["ours_backend"] == "pyav"
    assert f"peer: qwen_vl_utils.fetch_video at its default reader, {peer}; ours: pyav" in res.stdout
    assert data["ok"] and data["settings"]["max_frames"] == 16 and data["settings"]["min_pixels"] == 100352
    (clip,) = data["clips"]
    assert clip["indices_match"] and clip["size_match"] and clip["fps_match"] and clip["mad"] < 1.0
    assert clip["nframes"] == 4  # 16 frames at 8 fps = 2 s -> 4 frames
    s = data["stream"]
    assert s["records"] == 3 and s["hits_lru"] == {"miss": 1, "lru": 2} and s["hits_disk"] == {"miss": 1, "disk": 2}
