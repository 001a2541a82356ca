#!/bin/bash
# Run here (not on the GPU machine), from the repo root, before the first device call: fetches the diffusers and
# bitsandbytes wheels into .whl/ (../shared/gpu/wheels.sh) and slims bitsandbytes to the libraries a CUDA 13 torch
# loads, so the repo plus .whl stays under the device tool's 64 MiB for what travels.
#
# bitsandbytes 0.50.2's wheel is 43 MB, nearly all of it native libraries for CUDA 11/12, ROCm and XPU; the GPU
# machine's torch is built for CUDA 13, and bitsandbytes picks libbitsandbytes_cuda<torch's CUDA>.so (the cpu one
# too). With the repo's ~21 MB and diffusers' 6 MB, the unslimmed wheel takes the tree over 64 MiB.
set -eu
mkdir -p .git/info  # the shared script appends .whl to .git/info/exclude, and a fresh checkout may lack the folder
bash ../shared/gpu/wheels.sh >/dev/null
wheel=$(ls .whl/bitsandbytes-*.whl)
python3 - "$wheel" <<'EOF'
import re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not info.filename.endswith(".so") or keep.search(info.filename):
            dst.writestr(info, src.read(info))
slim.replace(wheel)  # RECORD still lists the dropped libraries: pip installs what is there and does not object
EOF
unzip -l "$wheel" | grep -o 'libbitsandbytes_[a-z0-9]*\.so' | sort | tr '\n' ' '
echo
travel=$( (git ls-files -z --cached --others --exclude-standard; find .whl -type f -print0) | du -cb --files0-from=- | tail -1 | cut -f1)
echo "what travels to the GPU machine with carry [\".whl\"]: $((travel / 1048576)) MiB of 64"
if [ "$travel" -gt $((64 * 1048576)) ]; then
  echo "over the device tool's 64 MiB: ignore or remove untracked files first" >&2
  exit 1
fi
