#!/bin/bash
# Run here (not on the GPU machine), from the repo root, before the first device call: downloads the diffusers and
# bitsandbytes wheels the GPU machine lacks into .whl/ (as ../shared/gpu/wheels.sh does) and slims bitsandbytes to the
# libraries a CUDA 13 torch loads, so the repo plus .whl stays under the device tool's 64 MiB for what travels.
#
# bitsandbytes 0.50.2's wheel is 43 MB, nearly all of it native libraries for CUDA 11/12, ROCm and XPU; the GPU
# machine's torch is built for CUDA 13, and bitsandbytes picks libbitsandbytes_cuda<torch's CUDA>.so (the cpu one
# too). With the repo's ~21 MB and diffusers' 6 MB, the unslimmed wheel takes the tree over 64 MiB.
set -eu
exclude=$(git rev-parse --git-path info/exclude)  # a worktree's .git is a file: ask git where its excludes live
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "bitsandbytes==${BNB_VERSION:-0.50.2}"
wheel=$(ls .whl/bitsandbytes-*.whl)
python3 - "$wheel" <<'PY'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
dropped = lambda name: name.endswith(".so") and not keep.search(name)
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if dropped(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):  # the dropped libraries leave the file list too
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
        dst.writestr(info, data)
slim.replace(wheel)
PY
unzip -l "$wheel" | grep -o 'libbitsandbytes_[a-z0-9]*\.so' | sort | tr '\n' ' '
echo
travel=$( (git ls-files -z --cached --others --exclude-standard; find .whl -type f -print0) | du -cb --files0-from=- | tail -1 | cut -f1)
echo "what travels to the GPU machine with carry [\".whl\"]: $((travel / 1048576)) MiB of 64"
if [ "$travel" -gt $((64 * 1048576)) ]; then
  echo "over the device tool's 64 MiB: ignore or remove untracked files first" >&2
  exit 1
fi
