"""
The playground's plain data: sampling settings, token records, runs (branches) and panes.

Everything here is JSON-serialisable (sessions are these dataclasses as dicts) and imports neither
torch nor Textual, so the app starts fast and sessions load without a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

DEFAULT_SEED = 1234


@dataclass
class Settings:
    """Sampling settings as the settings panel edits them; `overrides` of a pane replace some fields."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int = 48
    seed: int = DEFAULT_SEED
    stop: list[str] = field(default_factory=list)
    draft: str | None = None  # spec of a draft model for speculative decoding: the same tokens, faster

    def merged(self, overrides: dict) -> "Settings":
        return Settings(**{**asdict(self), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        """One line for the status bar: the settings that are on."""
        parts = ["greedy" if self.temperature == 0 else f"temp {self.temperature:g}"]
        for name, label in (("top_k", "top-k"), ("top_p", "top-p"), ("min_p", "min-p")):
            if getattr(self, name) is not None:
                parts.append(f"{label} {getattr(self, name):g}")
        if self.repetition_penalty != 1.0:
            parts.append(f"rep {self.repetition_penalty:g}")
        parts.append(f"max {self.max_new_tokens}")
        if self.stop:
            parts.append("stop " + " ".join(repr(s) for s in self.stop))
        if self.draft:
            parts.append(f"draft {self.draft}")
        return " · ".join(parts)

    def sampling_kwargs(self) -> dict:
        """The engine's SamplingParams fields these settings set."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                    seed=self.seed, stop=list(self.stop))


@dataclass
class Tok:
    """One token with the statistics the engine reported (a TokenInfo, as plain data)."""

    id: int
    text: str
    logprob: float | None = None  # under the model's raw distribution; None: not scored (first token)
    sampling_logprob: float | None = None
    rank: int | None = None
    entropy: float | None = None
    top: list = field(default_factory=list)  # [(id, text, logprob, sampling_logprob)] the most likely tokens

    @classmethod
    def from_info(cls, info) -> "Tok":
        return cls(id=info.id, text=info.text, logprob=info.logprob, sampling_logprob=info.sampling_logprob,
                   rank=info.rank, entropy=info.entropy,
                   top=[(a.id, a.text, a.logprob, a.sampling_logprob) for a in info.top])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top"] = [list(t) for t in self.top]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tok":
        return cls(**{**d, "top": [tuple(t) for t in d.get("top", [])]})


@dataclass
class Run:
    """One generation of a pane: its prompt and its completion. Forks are runs with a parent."""

    prompt: str  # the text the user wrote
    prompt_ids: list[int] = field(default_factory=list)  # what was fed (a fork: prompt + kept prefix + choice)
    prompt_toks: list[Tok] = field(default_factory=list)  # the user prompt scored by the pane's model
    toks: list[Tok] = field(default_factory=list)  # the completion (a fork's starts with the kept prefix)
    settings: dict = field(default_factory=dict)
    finish_reason: str | None = None  # None while running
    error: str | None = None
    tok_per_s: float | None = None  # decode speed
    context_used: int = 0  # tokens in the model's context window
    slides: int = 0  # times the context window slid (or the prompt was cut to fit)
    parent: int | None = None  # index of the run it forked from
    fork_at: int | None = None  # completion position replaced by the chosen alternative
    prefix_len: int = 0  # completion tokens that came from the parent (a fork's kept prefix + choice)
    chat: bool = False  # a chat turn: prompt_ids is the rendered conversation
    chat_ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.toks)

    @property
    def perplexity(self) -> float | None:
        return perplexity(self.toks)

    @property
    def prompt_perplexity(self) -> float | None:
        return perplexity(self.prompt_toks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_toks"] = [t.to_dict() for t in self.prompt_toks]
        d["toks"] = [t.to_dict() for t in self.toks]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Run":
        names = {f.name for f in fields(cls)}
        run = cls(**{k: v for k, v in d.items() if k in names})
        run.prompt_toks = [Tok.from_dict(t) for t in d.get("prompt_toks", [])]
        run.toks = [Tok.from_dict(t) for t in d.get("toks", [])]
        return run


def perplexity(toks: list[Tok]) -> float | None:
    """exp of the mean negative log-probability of the scored tokens."""
    lps = [t.logprob for t in toks if t.logprob is not None]
    if not lps:
        return None
    return math.exp(-sum(lps) / len(lps))


def format_perplexity(value: float) -> str:
    """Four significant figures at most: the digits beyond them are float noise, not information."""
    return f"{value:.2f}" if value < 100 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    toks: list[Tok] = field(default_factory=list)  # an assistant answer's tokens, for colouring

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content, "toks": [t.to_dict() for t in self.toks]}

    @classmethod
    def from_dict(cls, d: dict) -> "Message":
        return cls(role=d["role"], content=d["content"], toks=[Tok.from_dict(t) for t in d.get("toks", [])])


@dataclass
class PaneState:
    """What a pane shows and keeps: its model spec, overrides, runs (branches) and chat."""

    spec: str
    overrides: dict = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)  # compare runs and chat answers (`chat=True`), in order made
    current: int | None = None  # index into runs of the branch on screen; None: none yet in this mode
    chat: list[Message] = field(default_factory=list)  # the whole conversation, whatever the model still sees
    context_start: int = 0  # index into chat of the first message the model still sees (older: outside it)
    elsewhere: dict = field(default_factory=dict)  # mode -> its `current` while the other mode is on screen

    @property
    def run(self) -> Run | None:
        return self.runs[self.current] if self.current is not None else None

    @property
    def turns_outside_context(self) -> int:
        """User turns the conversation outgrew: kept in the chat, no longer in the model's context."""
        return sum(m.role == "user" for m in self.chat[:self.context_start])

    def switch_mode(self, leaving: str, entering: str) -> None:
        """Keep the leaving mode's branch aside; bring back the entering mode's (at first, its newest run)."""
        self.elsewhere[leaving] = self.current
        if entering in self.elsewhere:
            self.current = self.elsewhere.pop(entering)
        else:
            chat = entering == "chat"
            self.current = max((i for i, r in enumerate(self.runs) if r.chat == chat), default=None)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "overrides": self.overrides, "current": self.current,
                "runs": [r.to_dict() for r in self.runs], "chat": [m.to_dict() for m in self.chat],
                "context_start": self.context_start, "elsewhere": self.elsewhere}

    @classmethod
    def from_dict(cls, d: dict) -> "PaneState":
        runs = [Run.from_dict(r) for r in d.get("runs", [])]
        current = d.get("current")
        if current is not None and current < 0:  # older sessions said -1 for the last run
            current = len(runs) + current if runs else None
        return cls(spec=d["spec"], overrides=d.get("overrides", {}), current=current, runs=runs,
                   chat=[Message.from_dict(m) for m in d.get("chat", [])],
                   context_start=d.get("context_start", 0), elsewhere=d.get("elsewhere", {}))
