"""flux2lora: LoRA training for FLUX.2 as an orchestrated, tracked, reproducible pipeline."""

import logging as _logging

# torchao (optional, for fp8 base weights) is imported by diffusers whenever it is installed. Built for other torch
# versions, its CUDA kernels fail to load, it re-registers enums with torch's pytree, and diffusers cannot find
# tensor classes newer torchao releases renamed. None of it concerns the weight-only float8 path we use, and the
# warnings would print at every stage start, so they are silenced here; torchao's real errors still show.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
