"""Bernoulli masks drawn from a torch CPU generator's own stream, at numpy's speed.

On the CPU, `torch.bernoulli(p)` with a probability tensor (mergekit's DARE and DELLA draw) is a
serial loop: element k, in row-major order, takes the generator's next 32-bit Mersenne Twister
output r and is kept when (r & 0xFFFFFF) * 2**-24 < p[k] in float32, that is when
r & 0xFFFFFF < ceil(p[k] * 2**24). numpy's MT19937 is the same twister: started from the torch
generator's state it yields the same outputs about five times faster, and its final state is
written back, so the torch generator ends where `torch.bernoulli` would have left it. The masks
are mergekit's bit for bit (tests/merge_core/test_draws.py checks both facts).
"""

from __future__ import annotations

import numpy as np
import torch

_STATE_WORDS = 624  # MT19937's state; torch keeps it as uint64 words after seed, left, seeded, next
_LEFT, _NEXT, _KEY = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _STATE_WORDS)
UNIFORM_BITS = 24  # float32's mantissa: the bits of r that torch's uniform draw uses


def drawable(rng: torch.Generator | None, tensor: torch.Tensor) -> bool:
    """Whether masks for this tensor can be drawn here (a CPU generator and a CPU tensor)."""
    return rng is not None and rng.device.type == "cpu" and tensor.device.type == "cpu"


def keep_thresholds(probabilities: torch.Tensor) -> np.ndarray:
    """uint32 t with `bits < t` exactly when torch's draw keeps an element of that probability."""
    scaled = probabilities.double() * 2.0**UNIFORM_BITS  # exact: p has at most 24 significant bits
    return scaled.ceil_().numpy().astype(np.uint32)


class GeneratorStream:
    """The outputs a torch CPU generator would give next, drawn by numpy; `close` hands them back.

    Use as a context manager around draws that must continue the torch generator's stream.
    """

    def __init__(self, rng: torch.Generator):
        self._rng = rng
        state = rng.get_state().numpy()
        left = int(state[_LEFT].view(np.int32)[0])
        key = state[_KEY].view(np.uint64).astype(np.uint32)
        twister = np.random.MT19937()
        # torch reads word `next` after counting `left` down; numpy reads word `pos`: pos = 625 - left
        twister.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _STATE_WORDS + 1 - left}}
        self._twister = twister
        self._numbers = np.random.Generator(twister)

    def draw_keep(self, thresholds, out: np.ndarray) -> None:
        """Draw len(out) elements: out[k] = whether element k is kept, for thresholds (uint32, one
        or one per element) from `keep_thresholds`.

        The integer work runs in numpy, on one thread: two-thread torch integer kernels were
        measured at 15-30 ns per element on a 2-core machine kept busy by other work.
        """
        # integers over all of [0, 2**32) is one raw 32-bit output per element, no rejection
        raw = self._numbers.integers(0, 2**32, size=len(out), dtype=np.uint32)
        np.bitwise_and(raw, (1 << UNIFORM_BITS) - 1, out=raw)
        np.less(raw, thresholds, out=out)

    def close(self) -> None:
        """Write the stream's position back into the torch generator."""
        state = self._rng.get_state().numpy().copy()
        twister = self._twister.state["state"]
        pos = int(twister["pos"])
        state[_LEFT] = np.array([_STATE_WORDS + 1 - pos], dtype=np.int32).view(np.uint8)
        state[_NEXT] = np.array([pos], dtype=np.uint64).view(np.uint8)
        state[_KEY] = twister["key"].astype(np.uint64).view(np.uint8)
        self._rng.set_state(torch.from_numpy(state))

    def __enter__(self) -> GeneratorStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
