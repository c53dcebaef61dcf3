"""
Text the code did not write reaches the playground's screen as plain text, on every surface.

HOSTILE is Textual/Rich markup that raises when parsed (`[/]` closes nothing), would run an action
on a click (`@click=app.quit`) and would silently restyle the rest (`[bold]`). Each surface is shown
it and must display it verbatim while the app keeps running.
"""

import pytest
from test_tui import SIZE, anyio_backend, loaded, models, panes, send, until  # noqa: F401 (fixtures)

from nanoplay.tui.app import NanoplayApp
from nanoplay.tui.state import PaneState, Run, Settings, Tok

pytestmark = pytest.mark.anyio
HOSTILE = "[/] [@click=app.quit]x[/] [bold]"
WIDE = (220, 50)  # wide enough that no surface wraps the string


def screen_text(app) -> str:
    """What the terminal shows now, as plain text lines (toasts and dialogs included)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def toasts(app) -> list[str]:
    from textual.widgets._toast import Toast

    return [str(t.render()) for t in app.screen.query(Toast)]


async def shows(pilot, text: str, timeout: float = 30) -> None:
    await until(pilot, lambda: text in screen_text(pilot.app), timeout=timeout)


async def test_pane_header_status_border_and_notifications_show_hostile_text(models):
    app = NanoplayApp(models=["alpha", HOSTILE])
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await loaded(pilot)
        alpha, hostile = panes(app)
        assert HOSTILE in hostile.error  # the engine's one-line error quotes the spec
        await shows(pilot, HOSTILE)  # border title, header and error line
        assert str(hostile.query_one("#pane-header").render()).startswith(HOSTILE)
        assert HOSTILE in str(hostile.query_one("#pane-status").render())
        # a prompt holding the string: the pane body, then the gen command line in a notification (`g`)
        app.settings.max_new_tokens = 3
        await send(pilot, HOSTILE)
        assert str(alpha.query_one("#tokens").render()).startswith(HOSTILE)
        alpha.focus()
        await pilot.press("enter", "g")
        await until(pilot, lambda: any(HOSTILE in t for t in toasts(app)))
        # the inspector: a token whose text (and alternative) is the string
        run = alpha.state.run
        run.toks[0] = Tok(run.toks[0].id, HOSTILE, -0.5, -0.5, 1, 1.0, [(run.toks[0].id, HOSTILE, -0.5, -0.5)])
        alpha.focus()
        await pilot.press("home", *["right"] * len(run.prompt_toks))
        await until(pilot, lambda: app.main.query_one("#inspector").display)
        assert screen_text(app).count(repr(HOSTILE)) >= 2  # the token line and its alternatives table
        app.notify(HOSTILE, title=HOSTILE)  # any other message too
        await until(pilot, lambda: f"{HOSTILE}\n{HOSTILE}" in toasts(app))
        assert app.is_running


async def test_dialog_titles_tables_and_lists_show_hostile_text(models):
    from nanoplay.tui.screens.dialogs import BranchesScreen, CrossScore, CrossScoreScreen, PaneMenu
    from nanoplay.tui.screens.settings import SettingsScreen

    tok = Tok(11, HOSTILE, -1.0, -1.0, 1, 1.0, [])
    state = PaneState(HOSTILE, runs=[Run(prompt=HOSTILE, toks=[tok], finish_reason="length"),
                                     Run(prompt=HOSTILE, toks=[tok], parent=0, fork_at=0, finish_reason="length")],
                      current=1)
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await loaded(pilot)
        for screen in (BranchesScreen(state, [0, 1]), CrossScoreScreen(HOSTILE, [tok], [CrossScore(HOSTILE, [tok])]),
                       SettingsScreen(Settings(), state), PaneMenu(HOSTILE)):
            await app.push_screen(screen)
            await shows(pilot, HOSTILE)
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is app.main)
        assert app.is_running


async def test_a_settings_value_that_is_markup_is_a_one_line_error(models):
    """The issue's example: temperature `[/]` applied in the settings panel used to kill the app."""
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+s")
        app.screen.query_one("#set-temperature").value = "[/]"
        await pilot.press("ctrl+s")
        error = str(app.screen.query_one("#settings-error").render())
        assert error == "temperature (0 = greedy): '[/]' is not a number"
        assert app.settings.temperature == Settings().temperature and app.is_running


async def test_a_session_name_that_is_markup_is_an_error_notification(models):
    """`nanoplay --session 'run[/]'`: the error names the session as typed, and the app opens."""
    app = NanoplayApp(models=["alpha"], session="run[/]")
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await loaded(pilot)
        await until(pilot, lambda: any("'run[/]'" in t for t in toasts(app)))
        assert app.is_running and panes(app)


async def test_session_list_picker_and_welcome_show_names_verbatim(models, tmp_path, monkeypatch):
    from nanoplay.checkpoint import save_checkpoint, step_dir_name
    from nanoplay.tui.screens.welcome import WelcomeScreen
    from conftest import tiny_model

    from nanoplay.tui.sessions import save_session

    save_session("hostile", {"mode": "compare", "prompt": HOSTILE, "settings": Settings().to_dict(),
                             "panes": [PaneState(HOSTILE, runs=[Run(prompt=HOSTILE)], current=0).to_dict()]})
    (tmp_path / "sessions" / "run[x].json").write_text("{}")  # not a session name: not listed, cannot crash
    name = "[red]x[@click=app.quit]y[bold]"  # a run folder's name (a file name cannot hold `/`)
    save_checkpoint(tiny_model(5), models / name / step_dir_name(10), step=10)
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=WIDE, notifications=True) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+l")
        await shows(pilot, HOSTILE)  # its model and first prompt
        assert "run[x]" not in screen_text(app)
        await pilot.press("enter")  # opens: the pane's spec is the string, shown as such
        await until(pilot, lambda: [p.state.spec for p in panes(app)] == [HOSTILE])
        await shows(pilot, HOSTILE)
        await pilot.press("ctrl+o")
        await shows(pilot, f"{name}  (newest step 10")
        await pilot.press("escape")
        welcome = WelcomeScreen()
        await app.push_screen(welcome)
        welcome.training_ended(f"training failed: {HOSTILE}")
        await shows(pilot, f"training failed: {HOSTILE}")
        assert app.is_running
