#!/usr/bin/env bash
# Run HERE (where pip reaches the package index) before a GPU session: downloads into .whl/ (git-ignored) the
# packages the device image lacks, for its Python 3.12. The device image already has torch, transformers,
# accelerate, safetensors, huggingface_hub, tokenizers, numpy, pillow, pyyaml, typer, rich, tqdm.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "$@"
}
download diffusers==0.42.1 peft==0.21.2 optimum-quanto==0.2.7 torchao==0.18.0 importlib_metadata \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
ls -la .whl
