"""The sessions dialog tells saved sessions apart: mode, models, first prompt and age, never a bare timestamp."""

import os
import time

import pytest
from test_tui import SIZE, loaded

from nanoplay.tui.app import NanoplayApp
from nanoplay.tui.sessions import age, save_session, session_summaries
from nanoplay.tui.state import Message, PaneState, Run, Settings

pytestmark = pytest.mark.anyio
LONG = "First line of a prompt\nthat goes on for much longer than the dialog has room for"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """Three sessions saved 5 minutes, 2 days and 40 days ago (one of them unreadable)."""
    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path))
    now = time.time()
    compare = [PaneState("alpha", runs=[Run(prompt=LONG), Run(prompt="a later prompt")], current=1), PaneState("beta")]
    save_session("20260101-120000", {"mode": "compare", "prompt": "a later prompt", "settings": Settings().to_dict(),
                                     "panes": [p.to_dict() for p in compare]})
    chat = PaneState("gpt2", chat=[Message("user", "[bold]hi[/] there"), Message("assistant", "hello"),
                                   Message("user", "second")])
    save_session("my-chat", {"mode": "chat", "prompt": "", "settings": Settings().to_dict(), "panes": [chat.to_dict()]})
    (tmp_path / "broken.json").write_text("{not json")
    for name, ago in (("20260101-120000", 300), ("my-chat", 2 * 86400 + 60), ("broken", 40 * 86400)):
        os.utime(tmp_path / f"{name}.json", (now - ago, now - ago))
    return now


def test_each_session_is_summed_up_in_one_plain_line(saved):
    now = saved
    summaries = session_summaries()
    assert [s.name for s in summaries] == ["20260101-120000", "my-chat", "broken"]  # newest first
    labels = [s.label(now=now) for s in summaries]
    assert labels[0] == "5 min ago · compare · alpha, beta · 'First line of a prompt that goes on for…'"
    assert labels[1] == "2 days ago · chat · gpt2 · '[bold]hi[/] there' · my-chat"  # a chosen name is shown
    assert labels[2].startswith(time.strftime("%Y-%m-%d", time.localtime(now - 40 * 86400)) + " · broken · unreadable: ")
    assert all("\n" not in label for label in labels)


def test_ages_read_in_the_largest_unit():
    assert [age(1000.0, 1000.0 - s) for s in (5, 61, 3 * 3600 + 5, 86400, 3 * 86400)] == \
        ["just now", "1 min ago", "3 h ago", "1 day ago", "3 days ago"]


async def test_the_sessions_dialog_lists_the_summaries(saved, hf_home, checkpoints):
    app = NanoplayApp(models=["no-such-model"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+l")
        options = app.screen.query_one("#session-list")
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert prompts == [s.label() for s in session_summaries()]
        assert prompts[1] == "2 days ago · chat · gpt2 · '[bold]hi[/] there' · my-chat"
        await pilot.press("escape")
