"""nanoseek's fast paths, kept apart from the model's math (`nanoseek/model/` is the plain PyTorch reference).

`install(model)` puts them onto a model from outside (`modules.py`); the engine and the trainer call it. Inside:
CPU feature detection and per-ISA builds of the C kernels (`isa.py`, `build.py`, `simd.h`), the fused CPU decode
kernels and the whole-stack decode plan (`cpu_decode`, `decode_plan`), inference weight caches and oneDNN packing
(`fused`), the grouped expert GEMMs of training (`cpu_experts`), the head's cross-entropy without logits
(`linear_ce`), the optimizer kernel (`cpu_adamw.c`, used by `nanoseek/optim.py`) and the placement of inference
weights in huge pages (`hugepages`, used by the engine).
"""
from nanoseek.kernels.modules import install, installed, pack_weights_, uninstall

__all__ = ["install", "installed", "pack_weights_", "uninstall"]
