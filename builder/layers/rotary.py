"""Rotary embedding caches (cos/sin [positions, rotary_dim/2]) for each Hugging Face rope type, in numpy.

The maths follows transformers' rope initialisation (float32 inverse frequencies, the attention factor folded into
cos/sin); tests compare against transformers' own ROPE_INIT_FUNCTIONS for every type handled here.

longrope (Phi-3) has two frequency sets: transformers uses the short factors for a forward pass whose sequence
(max position + 1) is at most original_max_position_embeddings and the long ones otherwise, for every position of
that pass; `length_switch` names that length and `cos_sin_cache(rope, long=True)` gives the long set (the graph picks
one per run, see builder/layers/rotary_graph.py). ntk_alpha (HunYuan: "dynamic" with a fixed alpha) stretches the
base once: theta * alpha^(dim / (dim - 2)).
"""

from __future__ import annotations

import math

import numpy as np

from builder.errors import UnsupportedModelError
from builder.spec import RopeSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "proportional", "longrope", "ntk_alpha")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, rope: RopeSpec) -> np.ndarray:
    factor = rope.param("factor")
    low, high = rope.param("low_freq_factor"), rope.param("high_freq_factor")
    old_context = rope.param("original_max_position_embeddings")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(rope: RopeSpec) -> tuple[np.ndarray, float]:
    dim, base = rope.rotary_dim, rope.theta
    factor = rope.param("factor")
    original = rope.param("original_max_position_embeddings") or rope.max_positions

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        m, m_all = rope.param("mscale"), rope.param("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rope.param("beta_fast") or 32, rope.param("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _proportional(rope: RopeSpec) -> np.ndarray:
    """Gemma 4 global layers: the first partial_rotary_factor share of the frequency pairs rotate, with exponents
    over the whole head (rotary_dim = head_dim); the rest get frequency 0 (cos 1, sin 0), so a full-width rotation
    leaves them unchanged. `factor` divides every frequency."""
    dim = rope.rotary_dim
    angles = int(rope.param("partial_rotary_factor", 1.0) * dim // 2)
    exponents = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.zeros(dim // 2, np.float32)
    inv_freq[:angles] = 1.0 / (np.float32(rope.theta) ** exponents)
    return (inv_freq / np.float32(rope.param("factor", 1.0))).astype(np.float32)


def _longrope(rope: RopeSpec, long: bool) -> tuple[np.ndarray, float]:
    """Phi-3 LongRoPE: the base frequencies divided per pair by short_factor or long_factor; the attention factor
    defaults to sqrt(1 + ln(factor) / ln(original)), factor defaulting to max_positions / original."""
    original = rope.param("original_max_position_embeddings")
    factor = rope.param("factor") or rope.max_positions / original
    attention_factor = rope.param("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = np.asarray(rope.param("long_factor" if long else "short_factor"), dtype=np.float32)
    exponents = np.arange(0, rope.rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rope.rotary_dim)
    return (1.0 / (ext * np.float32(rope.theta) ** exponents)).astype(np.float32), float(attention_factor)


def length_switch(rope: RopeSpec) -> int | None:
    """The sequence length above which the rope uses its second frequency set (longrope), else None."""
    return int(rope.param("original_max_position_embeddings")) if rope.rope_type == "longrope" else None


def inverse_frequencies(rope: RopeSpec, *, long: bool = False) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim/2] float32, attention factor); `long` picks longrope's set for long sequences."""
    kind = rope.rope_type
    if kind == "yarn":
        return _yarn(rope)
    if kind == "longrope":
        return _longrope(rope, long)
    if kind == "ntk_alpha":
        dim = rope.rotary_dim
        return _base_inv_freq(rope.theta * rope.param("alpha") ** (dim / (dim - 2)), dim), 1.0
    if kind == "proportional":
        return _proportional(rope), 1.0
    inv_freq = _base_inv_freq(rope.theta, rope.rotary_dim)
    if kind in ("default", "dynamic"):
        # dynamic NTK only changes frequencies past the trained length; the exported cache covers that length.
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(rope.param("factor"))).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    raise UnsupportedModelError(f"rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}).")


def cos_sin_cache(rope: RopeSpec, *, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches [max_positions, rotary_dim/2] in float32, attention factor applied."""
    inv_freq, factor = inverse_frequencies(rope, long=long)
    positions = np.arange(rope.max_positions, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    return (np.cos(freqs) * np.float32(factor)).astype(np.float32), (np.sin(freqs) * np.float32(factor)).astype(np.float32)
