"""The figures `ortbuild verify` reports and the verdict on them: per-precision acceptance, failures said by how much.

Kept apart from the measurement (builder/verify.py) so that `ortbuild batch` can read and judge a stored report
without importing onnxruntime, torch or transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from builder.errors import UsageError

# Default acceptance per precision. Float exports are judged by max-abs logit error against the fp32 reference: the
# tiny test models measure ~3e-6 for fp32 and ~5e-3 for fp16; real models, with logits of magnitude 10-30 and dozens
# of layers, need the headroom. Quantized exports legitimately move logits by O(1), so they are judged by top-1
# agreement instead, and the floors are a gate that a broken export (wrong weight mapping, layout or scales:
# agreement near 1/vocab, measured 0%) cannot pass, not a quality score: tiny random models, whose top logits are
# nearly tied, measure 55-61% for int4 and 94-97% for int8 (real checkpoints, with clearer winners, should
# score higher).
DEFAULT_STEPS = 8  # decode steps per prompt through the KV cache

DEFAULT_POLICY = {
    "fp32": {"tolerance": 1e-3, "min_top1": None},
    "fp16": {"tolerance": 1e-1, "min_top1": None},
    "bf16": {"tolerance": 5e-1, "min_top1": None},
    "int8": {"tolerance": None, "min_top1": 0.85},
    "int4": {"tolerance": None, "min_top1": 0.5},
}


@dataclass(frozen=True)
class Policy:
    precision: str
    tolerance: float | None  # max-abs logit error allowed (None: reported only)
    min_top1: float | None  # minimum top-1 agreement (None: reported only)

    @classmethod
    def for_precision(cls, precision: str, tolerance: float | None = None, min_top1: float | None = None) -> "Policy":
        """The precision's defaults, each overridden by an explicit value (a negative value turns a check off)."""
        if precision not in DEFAULT_POLICY:
            raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(DEFAULT_POLICY)}.")
        base = DEFAULT_POLICY[precision]
        tol = base["tolerance"] if tolerance is None else (None if tolerance < 0 else tolerance)
        top1 = base["min_top1"] if min_top1 is None else (None if min_top1 < 0 else min_top1)
        return cls(precision, tol, top1)


@dataclass
class PromptResult:
    ids: list[int]
    prompt_error: float
    decode_error: float
    worst_position: int  # index into prompt + decode positions of the largest error
    top1_matches: int
    positions: int
    reference_tokens: list[int]  # the reference's greedy continuation
    ort_greedy_prefix: int  # tokens of it that onnxruntime's greedy decoding reproduces
    genai_tokens: list[int] | None = None
    genai_greedy_prefix: int | None = None

    @property
    def max_abs(self) -> float:
        return max(self.prompt_error, self.decode_error)


@dataclass
class Report:
    output: str
    reference: str
    precision: str
    ep: str
    provider: str
    steps: int
    policy: Policy
    prompts: list[PromptResult] = field(default_factory=list)
    genai_error: str | None = None  # why onnxruntime-genai could not run (None: it ran, or is not installed)
    genai_installed: bool = False
    notes: list[str] = field(default_factory=list)
    runtime: str = ""  # the onnxruntime package that ran it, with its providers

    # -- figures -------------------------------------------------------------------------------------------------
    @property
    def max_abs_error(self) -> float:
        return max(p.max_abs for p in self.prompts)

    @property
    def top1_agreement(self) -> float:
        return sum(p.top1_matches for p in self.prompts) / sum(p.positions for p in self.prompts)

    def greedy(self, runtime: str) -> tuple[int, int] | None:
        """(tokens matched, tokens compared) for "onnxruntime" or "onnxruntime-genai" (None when it did not run)."""
        total = sum(len(p.reference_tokens) for p in self.prompts)
        if runtime == "onnxruntime":
            return sum(p.ort_greedy_prefix for p in self.prompts), total
        if any(p.genai_greedy_prefix is None for p in self.prompts):
            return None
        return sum(p.genai_greedy_prefix for p in self.prompts), total

    def failures(self) -> list[str]:
        """One sentence per failed check, saying by how much; empty when the export passes."""
        out = []
        tol, err = self.policy.tolerance, self.max_abs_error
        if tol is not None and not err <= tol:  # `not <=` so that NaN fails
            where = max(range(len(self.prompts)), key=lambda i: self.prompts[i].max_abs)
            p = self.prompts[where]
            pos = p.worst_position
            at = f"prompt position {pos}" if pos < len(p.ids) else f"decode step {pos - len(p.ids) + 1}"
            out.append(f"max-abs logit error {err:.3g} exceeds the {self.policy.precision} tolerance {tol:g} by "
                       f"{err - tol:.3g} ({err / tol:.3g}x) at prompt {where + 1}, {at}")
        if self.policy.min_top1 is not None and not self.top1_agreement >= self.policy.min_top1:
            matched = sum(p.top1_matches for p in self.prompts)
            total = sum(p.positions for p in self.prompts)
            out.append(f"top-1 agreement {self.top1_agreement:.1%} ({matched}/{total}) is below the "
                       f"{self.policy.precision} minimum {self.policy.min_top1:.1%} by "
                       f"{self.policy.min_top1 - self.top1_agreement:.1%}")
        if self.genai_error and self.ep == "cpu":
            out.append(f"onnxruntime-genai could not run the model: {self.genai_error}")
        genai = self.greedy("onnxruntime-genai")
        ort_greedy = self.greedy("onnxruntime")
        if self.precision == "fp32" and genai is not None and genai[0] < ort_greedy[0]:
            # Same graph, same fp32 kernels: a divergence here is the runtime's handling (genai_config, KV buffer).
            out.append(f"onnxruntime-genai's greedy tokens diverge from onnxruntime's on the same model "
                       f"({genai[0]}/{genai[1]} vs {ort_greedy[0]}/{ort_greedy[1]} matching the reference): check "
                       "genai_config.json")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_json(self) -> dict:
        genai = self.greedy("onnxruntime-genai")
        ort_greedy = self.greedy("onnxruntime")
        return {
            "output": self.output, "reference": self.reference, "precision": self.precision, "ep": self.ep,
            "provider": self.provider, "runtime": self.runtime, "steps": self.steps, "passed": self.passed,
            "failures": self.failures(),
            "max_abs_error": self.max_abs_error,
            "prompt_max_abs_error": max(p.prompt_error for p in self.prompts),
            "decode_max_abs_error": max(p.decode_error for p in self.prompts),
            "top1_agreement": self.top1_agreement,
            "greedy_onnxruntime": {"matched": ort_greedy[0], "total": ort_greedy[1]},
            "greedy_onnxruntime_genai": None if genai is None else {"matched": genai[0], "total": genai[1]},
            "genai_error": self.genai_error, "tolerance": self.policy.tolerance, "min_top1": self.policy.min_top1,
            "notes": self.notes, "prompts": [asdict(p) for p in self.prompts],
        }

    def summary_lines(self) -> list[str]:
        runtime = f" with {self.runtime}" if self.runtime else ""
        lines = [f"ortbuild verify {self.output} ({self.precision}, {self.ep}; run on {self.provider}{runtime}) "
                 f"against {self.reference}: {len(self.prompts)} prompts, {self.steps} decode steps"]
        for i, p in enumerate(self.prompts, 1):
            genai = ("" if p.genai_greedy_prefix is None else
                     f", genai {p.genai_greedy_prefix}/{len(p.reference_tokens)}")
            lines.append(f"  prompt {i} ({len(p.ids)} tokens): max-abs {p.max_abs:.3g} (prompt {p.prompt_error:.3g}, "
                         f"decode {p.decode_error:.3g}), top-1 {p.top1_matches}/{p.positions}, greedy onnxruntime "
                         f"{p.ort_greedy_prefix}/{len(p.reference_tokens)}{genai}")
        matched = sum(p.top1_matches for p in self.prompts)
        total = sum(p.positions for p in self.prompts)
        ort_greedy, genai = self.greedy("onnxruntime"), self.greedy("onnxruntime-genai")
        if genai is not None:
            genai_text = f"{genai[0]}/{genai[1]}"
        elif self.genai_error:
            genai_text = f"error ({self.genai_error})"
        else:
            genai_text = "not installed" if not self.genai_installed else "skipped"
        lines += [f"max-abs logit error: {self.max_abs_error:.3g}",
                  f"top-1 agreement:     {self.top1_agreement:.1%} ({matched}/{total})",
                  f"greedy agreement:    onnxruntime {ort_greedy[0]}/{ort_greedy[1]}, onnxruntime-genai {genai_text}"]
        lines += [f"note: {note}" for note in self.notes]
        checks = []
        if self.policy.tolerance is not None:
            checks.append(f"max-abs <= {self.policy.tolerance:g}")
        if self.policy.min_top1 is not None:
            checks.append(f"top-1 >= {self.policy.min_top1:.0%}")
        lines.append(("PASS" if self.passed else "FAIL") + f" ({self.precision}: {', '.join(checks) or 'no checks'})")
        return lines
