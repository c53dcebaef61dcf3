"""
Keys on a pane: text typed there goes to the prompt; a pane's actions are a deliberate second key
(Enter opens its menu), and removing a pane asks first.
"""

import pytest
from test_tui import SIZE, anyio_backend, loaded, models, panes, send, until  # noqa: F401 (fixtures)

from nanoplay.tui.app import NanoplayApp
from nanoplay.tui.screens.dialogs import ConfirmScreen, PaneMenu

pytestmark = pytest.mark.anyio


async def test_a_message_typed_on_a_pane_goes_to_the_prompt(models):
    """`s` used to open the pane's settings and `d` to remove it, mid-word."""
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        prompt = app.main.query_one("#prompt")
        prompt.load_text("")
        panes(app)[1].focus()
        await pilot.press(*"sad days 2 [x] by gf")
        assert prompt.text == "sad days 2 [x] by gf" and app.focused is prompt
        assert app.screen is app.main and [p.state.spec for p in panes(app)] == ["alpha", "beta"]
        # digits fork only while the pane's token cursor is shown; without it they are text too
        app.settings.max_new_tokens = 4
        await send(pilot, "Hi")
        pane = panes(app)[0]
        pane.focus()
        prompt.load_text("")
        await pilot.press("3")
        assert prompt.text == "3" and len(pane.state.runs) == 1
        pane.focus()
        await pilot.press("end", "3")
        await until(pilot, lambda: len(pane.state.runs) == 2)  # a fork with alternative 3


async def test_removing_a_pane_asks_first_from_every_path(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        first = panes(app)[0]
        first.focus()
        await pilot.press("delete")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("escape")
        assert [p.state.spec for p in panes(app)] == ["alpha", "beta"]
        await pilot.press("enter")  # the pane's menu ...
        assert isinstance(app.screen, PaneMenu)
        await pilot.press("d")  # ... whose `d` asks too
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert [p.state.spec for p in panes(app)] == ["alpha", "beta"]
        app.run_command("pane:remove")  # the palette's "Pane: remove"
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: [p.state.spec for p in panes(app)] == ["beta"])


async def test_pane_menu_and_move_keys(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        panes(app)[1].focus()
        await pilot.press("shift+left")
        assert [p.state.spec for p in panes(app)] == ["beta", "alpha"]
        await pilot.press("enter", "]")
        assert [p.state.spec for p in panes(app)] == ["alpha", "beta"]
        await pilot.press("enter", "s")  # the pane's overrides, from its menu
        assert app.screen.__class__.__name__ == "SettingsScreen" and "Overrides for beta" in \
            str(app.screen.query_one(".dialog-title").render())


async def test_switching_mode_gives_the_prompt_the_focus(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        panes(app)[0].focus()
        await pilot.press("ctrl+g")
        assert app.mode == "chat" and app.focused is app.main.query_one("#prompt")
        panes(app)[0].focus()
        await pilot.press("ctrl+g")
        assert app.mode == "compare" and app.focused is app.main.query_one("#prompt")
