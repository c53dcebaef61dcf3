"""What the playground can open: default panes and the picker's list (imports torch when called)."""

from __future__ import annotations

from ..commands.models import human_size

DEFAULT_HUB_MODEL = "gpt2"


def default_specs(local) -> list[str]:
    """Every local checkpoint run (its newest step) plus gpt2."""
    specs = [m.spec for m in local if m.kind == "checkpoint"]
    return specs + [DEFAULT_HUB_MODEL]


def model_options(local, family) -> list[tuple[str, str]]:
    """(spec, label) for the picker: runs and each of their steps, cached Hub models, then downloads."""
    options = []
    for m in local:
        if m.kind == "checkpoint":
            newest = f"newest step {m.steps[-1]} · " if m.steps else ""
            options.append((m.spec, f"{m.spec}  ({newest}{m.detail} · {human_size(m.size_bytes)})"))
            options += [(f"{m.spec}@{s}", f"   {m.spec}@{s}") for s in reversed(m.steps[:-1])]
        else:
            options.append((m.spec, f"{m.spec}  (cached Hub model · {m.detail})"))
    cached = {m.spec for m in local}
    options += [(name, f"{name}  (download from the Hub)") for name in family if name not in cached]
    return options
