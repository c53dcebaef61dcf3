"""
Sessions: the whole playground (prompt, settings, seed, models, outputs, branches, chats) as one JSON
file, saved atomically after every change that matters; plus the Markdown export and the equivalent
`nanoplay gen` command line of a pane.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_file_atomically
from ..errors import NanoplayError
from .state import PaneState, Settings

VERSION = 1
NAME = re.compile(r"^[\w.-]+$")


def sessions_dir() -> Path:
    """$NANOPLAY_SESSIONS, else $XDG_DATA_HOME/nanoplay/sessions (~/.local/share/nanoplay/sessions)."""
    if os.environ.get("NANOPLAY_SESSIONS"):
        return Path(os.environ["NANOPLAY_SESSIONS"])
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "nanoplay" / "sessions"


def new_session_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def session_path(name: str) -> Path:
    if not NAME.match(name):
        raise NanoplayError(f"session name {name!r} may only hold letters, digits, '.', '_' and '-'")
    return sessions_dir() / f"{name}.json"


def save_session(name: str, data: dict) -> Path:
    """Write to a temporary file beside the target and rename it: a crash never leaves half a session."""
    return write_file_atomically(session_path(name), json.dumps({"version": VERSION, "name": name, **data}, indent=1))


def load_session(name: str) -> dict:
    path = session_path(name)
    if not path.is_file():
        have = ", ".join(list_sessions()[:8]) or "none yet"
        raise NanoplayError(f"no session {name!r} in {sessions_dir()}/ (saved sessions: {have})")
    try:
        data = json.loads(path.read_text())
        data["settings"] = Settings.from_dict(data.get("settings", {}))
        data["panes"] = [PaneState.from_dict(p) for p in data.get("panes", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise NanoplayError(f"session file {path} is corrupt ({type(e).__name__}: {e}); delete or fix it") from e
    return data


def list_sessions() -> list[str]:
    """Saved session names, most recently saved first (only files named as a session can be: others
    in the folder, `run[x].json` say, could not be opened)."""
    folder = sessions_dir()
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p.stem for p in files if NAME.match(p.stem)]


@dataclass
class SessionSummary:
    """What the sessions dialog shows of a saved session: enough to recognise it without opening it."""

    name: str
    saved: float  # when it was last saved, seconds since the epoch
    mode: str = ""
    models: list[str] = field(default_factory=list)
    first_prompt: str = ""  # the first thing sent: the compare prompt or the first chat message
    error: str | None = None  # why the file could not be read

    def label(self, now: float | None = None, width: int = 40) -> str:
        """One line of plain text: age · mode · models · first prompt (cut to `width` characters)."""
        parts = [age(time.time() if now is None else now, self.saved)]
        if self.error is not None:
            return " · ".join([*parts, self.name, f"unreadable: {self.error}"])
        models = self.models[:3] + ([f"+{len(self.models) - 3}"] if len(self.models) > 3 else [])
        parts += [self.mode, ", ".join(models) or "no models"]
        prompt = " ".join(self.first_prompt.split())  # one line, whatever it held
        parts.append(repr(prompt if len(prompt) <= width else prompt[:width - 1] + "…") if prompt else "nothing sent")
        if not re.fullmatch(r"\d{8}-\d{6}", self.name):  # a name the user chose says something too
            parts.append(self.name)
        return " · ".join(parts)


def session_summaries() -> list[SessionSummary]:
    """Every saved session, most recently saved first."""
    return [summarize_session(name) for name in list_sessions()]


def summarize_session(name: str) -> SessionSummary:
    path = session_path(name)
    stat = path.stat()
    return _summarize(path, stat.st_mtime, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _summarize(path: Path, saved: float, mtime_ns: int, size: int) -> SessionSummary:
    """Read once per version of the file (a session holds every token: reading it is not free)."""
    try:
        data = json.loads(path.read_text())
        panes = data.get("panes", [])
        mode = data.get("mode", "compare")
        firsts = [m["content"] for p in panes for m in p.get("chat", []) if m["role"] == "user"][:1] \
            if mode == "chat" else [r["prompt"] for p in panes for r in p.get("runs", [])][:1]
        return SessionSummary(path.stem, saved, mode, [p["spec"] for p in panes],
                              (firsts or [data.get("prompt", "")])[0])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return SessionSummary(path.stem, saved, error=f"{type(e).__name__}: {e}"[:80])


def age(now: float, then: float) -> str:
    """How long ago, in the largest unit that fits: 'just now', '5 min ago', '3 h ago', '2 days ago', a date."""
    seconds = max(0.0, now - then)
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            count = int(seconds // size)
            if unit == "days" and count > 30:
                return time.strftime("%Y-%m-%d", time.localtime(then))
            return f"{count} {'day' if unit == 'days' and count == 1 else unit} ago"
    return "just now"


def gen_command(spec: str, prompt: str, settings: Settings, precision: str, chat: bool = False) -> str:
    """The `nanoplay gen` command line that reproduces a pane's generation (same seed, same settings, the
    same precision as --dtype names it: auto would pick the machine's, which may not be the pane's)."""
    argv = ["nanoplay", "gen", "--model", spec, "--dtype", precision, "--temperature", f"{settings.temperature:g}",
            "--max-new-tokens", str(settings.max_new_tokens)]
    for name in ("top_k", "top_p", "min_p"):
        if getattr(settings, name) is not None:
            argv += ["--" + name.replace("_", "-"), f"{getattr(settings, name):g}"]
    if settings.repetition_penalty != 1.0:
        argv += ["--repetition-penalty", f"{settings.repetition_penalty:g}"]
    argv += ["--seed", str(settings.seed)]
    from ..sampling import format_stop_string

    for s in settings.stop:
        argv += ["--stop", format_stop_string(s)]  # gen reads escapes: a backslash must stay one
    if settings.draft:
        argv += ["--draft", settings.draft]
    if chat:
        argv.append("--chat")
    argv += ["--prompt", prompt]
    return shlex.join(argv)


def fenced(text: str, info: str = "text") -> list[str]:
    """A fenced code block `text` cannot end early: the fence is longer than any run of backticks in it."""
    longest = max((len(ticks) for ticks in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, text, fence]


def to_markdown(name: str, mode: str, prompt: str, settings: Settings,
                panes: list[tuple[PaneState, str, str, str | None]]) -> str:
    """
    A readable record of a session: settings, then every pane's output (or chat) with its stats.
    `panes` are (state, the spec that reloads its model, its precision as --dtype names it, its load
    error or None). Model and user text
    go in code blocks: a model's `|---`, `*` or `#` would otherwise render as tables, lists, headings.
    """
    lines = [f"# nanoplay session {name}", "", f"- mode: {mode}", f"- settings: {settings.summary()}",
             f"- seed: {settings.seed}", ""]
    if mode == "compare":
        lines += ["## Prompt", "", *fenced(prompt), ""]
    for pane, spec, precision, error in panes:
        eff = settings.merged(pane.overrides)
        lines += [f"## {pane.spec} ({precision})", ""]
        if error is not None:
            lines += ["Failed to load:", "", *fenced(error), ""]
        if pane.overrides:
            lines += [f"Overrides: {eff.summary()}", ""]
        if mode == "chat":
            if pane.context_start:
                lines += [f"_The first {pane.turns_outside_context} turn(s) are outside the model's context: "
                          "the conversation outgrew it, so the model no longer sees them._", ""]
            for j, m in enumerate(pane.chat):
                outside = " (outside the context)" if j < pane.context_start else ""
                lines += [f"**{m.role}:**{outside}", "", *fenced(m.content), ""]
            continue
        for i, run in enumerate(pane.runs):
            label = "main" if run.parent is None else f"branch {i} (fork of {run.parent} at token {run.fork_at})"
            stats = [f"{len(run.toks)} tokens"]
            if run.perplexity is not None:
                stats.append(f"perplexity {run.perplexity:.2f}")
            if run.prompt_perplexity is not None:
                stats.append(f"prompt perplexity {run.prompt_perplexity:.2f}")
            stats.append(f"finish: {run.finish_reason}")
            lines += [f"### {label}", "", *fenced(run.prompt + run.text), "", ", ".join(stats), ""]
            if run.parent is None:
                command = gen_command(spec, run.prompt, Settings.from_dict(run.settings or eff.to_dict()), precision)
                lines += [*fenced(command, "bash"), ""]
    return "\n".join(lines)
