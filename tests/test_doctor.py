"""`videor1 doctor` reports versions, readers, registry path and disk."""

from __future__ import annotations

import json
import os

from conftest import run_cli


def test_doctor_json():
    info = json.loads(run_cli("doctor", "--json").output)
    for key in ("torch", "transformers", "decord import", "pyav import", "vllm import", "deepspeed import",
                "registry", "free disk", "cuda"):
        assert key in info, key
    assert info["pyav import"] == "ok"
    assert info["registry"] == os.path.join(os.environ["VIDEOR1_HOME"], "registry.db")
    assert "GiB free" in info["free disk"]
