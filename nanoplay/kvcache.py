"""
A static (preallocated) key/value cache for one model, divided into slots: one sequence per slot.

Each layer's keys and values live in tensors of shape (slots, n_head, block_size + 1, head_dim), allocated
once; the extra position is a scratch column that idle slots write into during a fixed-shape decode
step (see static_decode.py). A forward pass is bound to a set of slots and positions first (`bind_prefill` for one sequence,
`bind_decode` for one new token in each of several sequences); the attention layers then call
`update`, which writes the new keys/values in place and returns what each query may attend to.

Sequences in one decode batch may have different lengths: keys beyond a row's own length are masked.
Each slot remembers which token ids its cache holds, so a later sequence that starts with the same
tokens (the next chat turn, a fork, n samples of one prompt) can reuse them instead of recomputing.
"""

from __future__ import annotations

import torch

from .model import GPTConfig


class KVCache:
    def __init__(self, config: GPTConfig, slots: int, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (slots, config.n_head, config.block_size + 1, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots = slots
        self.block_size = config.block_size
        self.device = torch.device(device)
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # ids whose K/V each slot holds
        self._bound = None

    @staticmethod
    def bytes_per_slot(config: GPTConfig, dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * (config.block_size + 1) * config.n_embd * itemsize

    # -- binding a forward pass ------------------------------------------------------------------

    def bind_prefill(self, slot: int, start: int, length: int) -> None:
        """The next forward feeds `length` tokens of one sequence at positions start..start+length-1."""
        end = start + length
        if start == 0:
            mask, is_causal = None, length > 1
        else:  # query i (at position start+i) sees keys 0..start+i
            q_pos = torch.arange(start, end, device=self.device).unsqueeze(1)  # (T, 1)
            mask, is_causal = torch.arange(end, device=self.device).unsqueeze(0) <= q_pos, False  # (T, end)
        self._bound = ("prefill", slot, start, end, mask, is_causal)

    def bind_decode(self, slots: list[int], positions: list[int]) -> None:
        """The next forward feeds one token per slot, each at its own position."""
        length = max(positions) + 1  # keys to read: the longest row's
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            rows = slice(first, first + len(slots))  # contiguous slots: a view, no copy
        else:
            rows = torch.tensor(slots, device=self.device)
        if min(positions) == max(positions) and isinstance(rows, slice):
            # the common case (one sequence, or equal lengths): plain slices, no index tensors
            self._bound = ("decode", rows, rows, positions[0], length, None)
            return
        pos = torch.tensor(positions, device=self.device)
        mask = (torch.arange(length, device=self.device) <= pos.unsqueeze(1)).view(len(slots), 1, 1, length)
        self._bound = ("decode", rows, torch.tensor(slots, device=self.device), pos, length, mask)

    def bind_static_decode(self, positions: torch.Tensor, write_positions: torch.Tensor, length: int) -> None:
        """
        The next forward feeds one token for every slot: positions (slots,) is where each row's token
        sits and the last key it may see; write_positions (slots,) is where its key/value are stored
        (block_size, the scratch column, for idle slots). Keys are read from positions 0..length-1.
        Only tensor operations, so a CUDA graph can capture the whole step.
        """
        visible = torch.arange(length, device=self.device) <= positions.unsqueeze(1)  # (slots, length)
        rows = torch.arange(self.slots, device=self.device)
        self._bound = ("static", rows, write_positions, length, visible.view(self.slots, 1, 1, length))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new k, v (B, nh, T, hs); return (keys, values, mask, is_causal) to attend to."""
        kc, vc = self.k[layer], self.v[layer]
        if self._bound[0] == "static":
            _, rows, write_positions, length, mask = self._bound
            kc[rows, :, write_positions] = k[:, :, 0]
            vc[rows, :, write_positions] = v[:, :, 0]
            return kc[:, :, :length], vc[:, :, :length], mask, False
        if self._bound[0] == "prefill":
            _, slot, start, end, mask, is_causal = self._bound
            kc[slot, :, start:end] = k[0]
            vc[slot, :, start:end] = v[0]
            return kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end], mask, is_causal
        _, rows, slot_index, pos, length, mask = self._bound
        kc[slot_index, :, pos] = k[:, :, 0]
        vc[slot_index, :, pos] = v[:, :, 0]
        return kc[rows, :, :length], vc[rows, :, :length], mask, False

    # -- slot contents -----------------------------------------------------------------------------

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Make slot dst start with the first `length` cached positions of slot src."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
        self.tokens[dst] = self.tokens[src][:length]
