"""
A fixed-shape decode step for every slot of a model's KV cache, replayed as CUDA graphs on a GPU.

Eager decoding launches a dozen small kernels per layer from Python for every token. On a GPU those
launches, not the arithmetic, set the speed of a small model. A CUDA graph replays the whole step as one
launch, but only if every shape and address stays the same from step to step. So this step:
  - feeds one token for every slot of the cache, busy or not: an idle slot feeds a dummy token at
    position 0, and its key/value land in the cache's scratch column, so no cached prefix is disturbed;
  - takes its inputs from tensors it owns, which each step overwrites in place;
  - reads the first `length` positions of the cache, with `length` rounded up to a power of two:
    one graph per length bucket, captured the first time it is needed. Capturing compiles nothing: it
    records one eager run.
On other devices the same step runs eagerly; the tests compare it with the ordinary decode path there.
"""

from __future__ import annotations

import torch

from .cpu_kernel import watched_or_wrapped
from .kvcache import KVCache
from .model import GPT

SHORTEST_BUCKET = 16  # keys read by the smallest graph


class StaticDecoder:
    def __init__(self, model: GPT, cache: KVCache):
        self.model = model
        self.cache = cache
        # a graph replays what it recorded: hooks would run once, at capture (ModelRunner drops the
        # graphs when hooks come later or the weights change)
        self.capture = cache.device.type == "cuda" and watched_or_wrapped(model) is None
        slots = cache.slots
        # inputs, rewritten before each step: the token, its position, and where its key/value are stored
        self.inputs = torch.zeros(3, slots, dtype=torch.long, device=cache.device)  # (3, slots)
        self.tokens = self.inputs[0].unsqueeze(1)  # (slots, 1)
        self.positions = self.inputs[1]  # (slots,)
        self.write_positions = self.inputs[2]  # (slots,)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # length -> graph, its logits

    def bucket(self, length: int) -> int:
        """The number of key positions the step for sequences of up to `length` tokens reads."""
        bucket = SHORTEST_BUCKET
        while bucket < length:
            bucket *= 2
        return min(bucket, self.cache.block_size)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (len(slots), vocab) of one new token in each of `slots`, at `positions`."""
        idle = self.cache.block_size  # the scratch column
        inputs = [[0] * self.cache.slots, [0] * self.cache.slots, [idle] * self.cache.slots]
        for slot, token, position in zip(slots, tokens, positions):
            inputs[0][slot], inputs[1][slot], inputs[2][slot] = token, position, position
        self.inputs.copy_(torch.tensor(inputs))
        length = self.bucket(max(positions) + 1)
        if self.capture:
            graph, logits = self.graphs.get(length) or self._capture(length)
            graph.replay()
        else:
            logits = self._step(length)
        return logits[torch.tensor(slots, device=logits.device)]

    def _step(self, length: int) -> torch.Tensor:
        self.cache.bind_static_decode(self.positions, self.write_positions, length)
        return self.model(self.tokens, positions=self.positions.unsqueeze(1), cache=self.cache)[:, -1]  # (slots, vocab)

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # one eager run on a side stream first, so cuBLAS and the allocator are set up outside the graph;
        # it writes the same keys/values the replay will, so it changes nothing
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            self._step(length)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: work other threads do on the GPU meanwhile (a model loading in the TUI) is allowed
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self._step(length)
        self.graphs[length] = (graph, logits)
        return graph, logits
