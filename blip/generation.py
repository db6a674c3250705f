"""Decoding options, declared once: `GenerationConfig` with the original BLIP's defaults and each option's valid range.

The defaults are those of the original `BLIP_Decoder.generate` call in its captioning configs (beam search, 3 beams,
lengths 20 / 5 counting the prompt) and of the transformers generation it relied on (top_k 50). CapFilt's nucleus
sampling overrides `sample`, `top_p` and `repetition_penalty` (the original's sampling path hard-codes 1.1), VQA's
generated answers the lengths (`nucleus()`, `vqa()`). `model.generate`, `model.answer`, CapFiltSettings and the CLI's
`caption`, `eval`, `vqa` and `run` options all take their defaults and checks from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class GenerationConfig:
    sample: bool = False  # nucleus sampling (True) or beam search (False; greedy with num_beams 1)
    num_beams: int = 3
    max_length: int = 20  # tokens, counting [DEC] and the prompt ("[DEC] a picture of" = 4 at base), as the original
    min_length: int = 5  # the same count
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already generated; 1.0: none

    # option -> (low, high, low_open): the valid range, from which validate() and the CLI's click types are made
    RANGES: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        "num_beams": (1, None, False),
        "max_length": (2, None, False),  # [DEC] and at least one generated token
        "min_length": (0, None, False),
        "top_p": (0.0, 1.0, True),
        "top_k": (0, None, False),  # 0: no top-k cut
        "repetition_penalty": (0.0, None, True),
    }

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def nucleus(cls, top_p: float = 0.9, **options: Any) -> GenerationConfig:
        """The original's sampling path (`sample=True` in BLIP_Decoder.generate, as CapFilt captions): nucleus
        sampling with its hard-coded repetition penalty 1.1."""
        return cls(**{"sample": True, "top_p": top_p, "repetition_penalty": 1.1, **options})

    @classmethod
    def vqa(cls, **options: Any) -> GenerationConfig:
        """The original VQA's generated answers (`inference="generate"` in BLIP_VQA): beam search from [DEC] on the
        question states, lengths 10 / 1 counting [DEC]."""
        return cls(**{"max_length": 10, "min_length": 1, **options})

    def validate(self) -> None:
        """Each option in its range. min_length > max_length is allowed here (the end token is then never allowed
        and every sequence runs to max_length, as in transformers); settings that must end a caption say so."""
        for name, (low, high, low_open) in self.RANGES.items():
            check_range(name, getattr(self, name), low, high, low_open)

    @classmethod
    def pick(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The decoding options among `options` (a settings object's fields, a caller's keyword arguments)."""
        return {f.name: options[f.name] for f in fields(cls) if f.name in options}


def check_range(name: str, value: float, low: float | None, high: float | None, low_open: bool = False) -> None:
    """ValueError naming `name` when `value` is outside [low, high] ((low, high] with `low_open`)."""
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        left = "(" if low_open else "["
        span = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {span}, got {value}")
