"""nanoplay: a playground for small GPT-2-class language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # the engine pulls in torch: import it only when asked, so the CLI and the TUI start fast
    if name in ("Engine", "Request", "TokenInfo"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name in ("load_model", "LoadedModel"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(name)


__all__ = ["Engine", "Request", "TokenInfo", "SamplingParams", "load_model", "LoadedModel"]
