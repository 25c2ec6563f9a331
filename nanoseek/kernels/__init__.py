"""nanoseek's fast paths, kept apart from the model's math (`nanoseek/model/` is the plain PyTorch reference):
CPU feature detection and per-ISA builds (`isa.py`, `build.py`, `simd.h`), the fused CPU decode kernels and the
whole-stack decode plan (`cpu_decode`, `decode_plan`), inference weight caches and oneDNN packing (`fused`), the
grouped expert GEMMs of training (`cpu_experts`) and the optimizer kernel (`cpu_adamw.c`)."""
