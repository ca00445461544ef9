#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels that the lent GPU machines' image lacks, for its Python 3.12 on
# manylinux x86_64 (the device tool's README: no package index there, at most 64 MiB of working tree travels), then
# check them: one version of each project, tags that install on CPython 3.12 x86_64, every requirement of the project
# and of each wheel present in the image (scripts/device-image.txt) or carried, and .whl/ + the tracked tree together
# within the 64 MiB the tool carries.
#
# What is carried is scripts/device-wheels.txt. Pins relaxed on the device only (pyproject.toml keeps them):
#   torch>=2.14,<2.15         -> the image's 2.11.0 (CUDA 13): the CUDA build is GBs, it cannot travel
#   torchvision>=0.29,<0.30   -> the image's 0.26.0 (paired with its torch)
#   huggingface_hub>=2.4,<3   -> the image's 1.33.0: transformers 5.17 and datasets 5.2 accept >=1.31, and nothing
#                                on the checked paths calls the Hub (HF_HUB_OFFLINE=1)
# transformers (image 5.17.0), accelerate (1.15.0), tokenizers (0.23.2) satisfy the project's pins as they are.
# Not carried on purpose: trl (imported only under DeepSpeed and by `bench rl`'s TRL peer) and
# the extras vllm, deepspeed, decord (too large, or GPU builds).
#
# Usage: scripts/device-wheels.sh [--check-only]     (env: WHEEL_DIR=.whl  PYTHON=python3  LIMIT_MIB=64)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
LIST=scripts/device-wheels.txt
PY=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-64}
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

if ! git check-ignore -q "$DEST/x.whl"; then
  echo "device-wheels: $DEST/ is not ignored by git (add '/$DEST/' to .gitignore)" >&2
  exit 2
fi
mkdir -p "$DEST"
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')

if [[ "${1:-}" != "--check-only" ]]; then
  plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  for pin in "${PINS[@]}"; do
    name=${pin%%==*}; ver=${pin##*==}
    norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
    if ls "$DEST" 2>/dev/null | tr 'A-Z-.' 'a-z__' | grep -q "^${norm}_${ver//./_}_"; then continue; fi
    err=$(mktemp)
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${plat[@]}" -d "$DEST" "$pin" 2>"$err"; then
      # sdist only on PyPI (rouge-score): build the wheel here. The tag check below lets only a pure-Python
      # (py3-none-any) result through, which is what makes a wheel built on this Python valid on 3.12.
      echo "device-wheels: no 3.12 wheel of $pin on the index: building it from its sdist" >&2
      "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w "$DEST" "$pin" 2>>"$err" || { cat "$err" >&2; exit 1; }
    fi
    rm -f "$err"
  done
  # Drop wheels no longer listed (an old version left behind would make two of one project: the install fails).
  "$PY" - "$DEST" "${PINS[@]}" <<'PYEOF'
import re, sys, pathlib
dest, pins = pathlib.Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
want = {(norm(p.split("==")[0]), p.split("==")[1]) for p in pins}
for w in dest.glob("*.whl"):
    name, ver = w.name.split("-")[:2]
    if (norm(name), ver) not in want:
        print(f"device-wheels: removing {w.name} (not in scripts/device-wheels.txt)", file=sys.stderr)
        w.unlink()
PYEOF
fi

"$PY" - "$DEST" "$LIMIT_MIB" "${PINS[@]}" <<'PYEOF'
"""Checks of the wheel folder (exit 1 on any failure)."""
import re, subprocess, sys, zipfile, pathlib
try:
    import tomllib
except ImportError:  # Python 3.10: pip's vendored copy
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.tags import parse_tag
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import parse_tag

dest, limit_mib, pins = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system":
       "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
ok = True
def fail(msg):
    global ok
    ok = False
    print(f"device-wheels: FAIL {msg}")

image = {}
for line in pathlib.Path("scripts/device-image.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        parts = line.split()
        image[norm(parts[0])] = parts[1] if len(parts) > 1 else None

wheels, reqs = {}, {}
for w in sorted(dest.glob("*.whl")):
    name, ver = w.name[:-4].split("-")[:2]
    tags = w.name[:-4].split("-")[-3:]
    compatible = any(t.interpreter in ("py3", "py2.py3", "py312", "cp312", "cp311", "cp310", "cp39", "cp38")
                     and (t.abi in ("none", "abi3", "cp312"))
                     and (t.platform == "any" or ("x86_64" in t.platform and t.platform.startswith("manylinux")))
                     for t in parse_tag("-".join(tags)))
    if not compatible:
        fail(f"{w.name}: tags {'-'.join(tags)} do not install on CPython 3.12 manylinux x86_64")
    if norm(name) in wheels:
        fail(f"two versions of {name}: {wheels[norm(name)]} and {ver}")
    wheels[norm(name)] = ver
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs[norm(name)] = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                            if l.startswith("Requires-Dist:")]
for p in pins:
    n, v = p.split("==")
    if wheels.get(norm(n)) != v:
        fail(f"{p} is listed but .whl holds {wheels.get(norm(n))}")

# Requirements: the project's own and each carried wheel's, evaluated for the machine's Python.
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["dependencies"]
relaxed = {"torch", "torchvision", "huggingface-hub"}   # documented at the top of device-wheels.sh
absent_ok = {"trl"}                     # not imported on the checked paths (see there)
rows = []
for owner, lst in [("videor1", project)] + sorted(reqs.items()):
    for r in lst:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        n = norm(req.name)
        if n in wheels:
            have, where = wheels[n], "carried"
        elif n in image:
            have, where = image[n], "image"
        else:
            have, where = None, None
        if where is None:
            if owner == "videor1" and n in absent_ok:
                rows.append((owner, str(req), "absent (not on the checked paths)"))
                continue
            fail(f"{owner} requires {req}: neither in the image nor carried")
            continue
        if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
            if owner == "videor1" and n in relaxed:
                rows.append((owner, str(req), f"RELAXED: {where} has {have}"))
            else:
                fail(f"{owner} requires {req}, {where} has {have}")
        elif owner == "videor1":
            rows.append((owner, str(req), f"{where} {have or '(version not recorded)'}"))
print("device-wheels: the project's requirements on the GPU machine:")
for owner, r, status in rows:
    print(f"  {r:38s} {status}")

size = sum(w.stat().st_size for w in dest.glob("*.whl"))
tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
tree = sum(pathlib.Path(f.decode()).stat().st_size for f in tracked if f and pathlib.Path(f.decode()).is_file())
untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], capture_output=True,
                           check=True).stdout.split(b"\0")
tree += sum(pathlib.Path(f.decode()).stat().st_size for f in untracked if f and pathlib.Path(f.decode()).is_file())
total = size + tree
print(f"device-wheels: {len(wheels)} wheels, {size / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} MiB; "
      f"together {total / 2**20:.1f} MiB of the {limit_mib:g} MiB that travel")
for w in sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size):
    print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
if total > limit_mib * 2**20:
    fail(f"{total / 2**20:.1f} MiB exceeds {limit_mib:g} MiB")
print("device-wheels: " + ("OK" if ok else "FAILED"))
sys.exit(0 if ok else 1)
PYEOF
