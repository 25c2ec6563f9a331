"""Inference engine: paged latent KV cache, continuous batching, per-request sampling, MTP speculation.

    from nanoseek.engine import Engine, SamplingParams
    outs = Engine(model, tokenizer).generate([prompt_ids], SamplingParams(max_tokens=64, temperature=0))
"""
from nanoseek.engine.async_engine import AsyncEngine
from nanoseek.engine.cache import BlockPool, CacheView
from nanoseek.engine.engine import Engine, RequestOutput
from nanoseek.engine.sampling import SamplingParams, TokenLogprob
from nanoseek.engine.scheduler import EngineFull

__all__ = ["Engine", "AsyncEngine", "SamplingParams", "RequestOutput", "TokenLogprob", "EngineFull",
           "BlockPool", "CacheView"]
