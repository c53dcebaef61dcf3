"""
Lifecycle races and crashes: keys faster than the screens they open, callbacks that outlive their
target, a bug inside Textual itself, and the session saved before any exit.

`burst` posts keys the way a fast typist or a paste delivers them: all queued before the app handles
the first (Pilot's `press` waits for the app to settle after each key, which hides these races).
"""

import json

import pytest
from test_tui import SIZE, anyio_backend, idle, loaded, models, panes, send, until  # noqa: F401 (fixtures)
from textual import events

from nanoplay.tui.app import NanoplayApp
from nanoplay.tui.state import PaneState, Run, Settings

pytestmark = pytest.mark.anyio


def burst(app, *keys: str) -> None:
    """Queue `keys` (names, or characters) at once, as the terminal driver would deliver them."""
    from textual.keys import _character_to_key

    for key in keys:
        event = events.Key(_character_to_key(key), key) if len(key) == 1 else events.Key(key, None)
        event.set_sender(app)
        app._driver.send_message(event)


def save_one_session(name="one", prompt="Saved"):
    from nanoplay.tui.sessions import save_session

    pane = PaneState("beta", runs=[Run(prompt=prompt, finish_reason="length")], current=0)
    save_session(name, {"mode": "compare", "prompt": prompt, "settings": Settings().to_dict(),
                        "panes": [pane.to_dict()]})


async def test_two_enters_on_the_sessions_dialog_open_the_session_once(models):
    """Ctrl+L, Enter, Enter with no pause: the dialog used to be dismissed twice (ScreenStackError)."""
    save_one_session()
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+l")
        burst(app, "enter", "enter")  # the second before the first is handled
        await until(pilot, lambda: [p.state.spec for p in panes(app)] == ["beta"])
        await loaded(pilot)
        assert app.screen is app.main and app.session_name == "one"
        assert [s.__class__.__name__ for s in app.screen_stack] == ["Screen", "MainScreen"]


async def test_every_dialog_survives_keys_faster_than_it_opens(models):
    """Each dialog opener followed at once by Enter/Esc twice: one dismissal each, the main screen stays."""
    save_one_session()
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        await send(pilot, "Hello")
        for opener in (["ctrl+s"], ["ctrl+o"], ["f1"], ["ctrl+l"], ["ctrl+p"], ["tab", "enter"], ["tab", "delete"]):
            for closer in ("enter", "escape"):
                burst(app, *opener, closer, closer, "escape")
                await until(pilot, lambda: idle(app))
                await pilot.pause(0.05)
                while app.screen is not app.main:  # whatever is left open (a dialog may take Enter as input)
                    await pilot.press("escape")
                app.main.query_one("#prompt").focus()
        assert app.is_running and app.screen is app.main


async def test_a_late_dismiss_does_not_pop_another_screen(models):
    """A worker finishing after its dialog is gone (or under the palette) pops nothing else."""
    from nanoplay.tui.screens.dialogs import HelpScreen
    from nanoplay.tui.screens.welcome import WelcomeScreen

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        results = []
        welcome = WelcomeScreen()
        await app.push_screen(welcome, results.append)
        await app.push_screen(HelpScreen())  # another screen over it when the trainer reports
        welcome.dismiss("demo")
        await until(pilot, lambda: app.screen is app.main)
        welcome.dismiss("demo")  # and again, after it is gone
        welcome.training_ended("stopped")
        welcome.show_progress(None)
        await pilot.pause(0.1)
        assert results == ["demo"] and app.screen is app.main


async def test_a_pane_whose_screen_is_gone_ignores_its_load(models):
    """A pane loaded after its session was replaced (Ctrl+L) finds no parts: nothing happens, no NoMatches."""
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        (pane,) = panes(app)
        await app.main.remove_panes([pane])
        app.main.pane_loaded(pane)
        await pilot.pause()
        assert app.screen is app.main and app.is_running


async def test_palette_letter_and_page_keys_at_once(models):
    """Ctrl+P, a letter and PageDown/PageUp at once: KeyError inside Textual 8.2.8's OptionList paging."""
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        for keys in (("ctrl+p", "a", "pagedown"), ("ctrl+p", "pagedown"), ("ctrl+p", "s", "pageup"),
                     ("ctrl+l", "pagedown"), ("ctrl+o", "tab", "pagedown")):
            burst(app, *keys)
            await pilot.pause(0.2)
            while app.screen is not app.main:
                await pilot.press("escape")
        assert app.is_running


async def test_an_unhandled_error_saves_the_session_before_the_app_exits(models, capsys):
    """Whatever kills the app (here a widget's own bug), the work is saved first and the exit says where."""
    from nanoplay.tui.sessions import load_session

    app = NanoplayApp(models=["alpha"])
    with pytest.raises(ZeroDivisionError):
        async with app.run_test(size=SIZE) as pilot:
            await loaded(pilot)
            app.settings.max_new_tokens = 3
            await send(pilot, "Keep me")
            text = panes(app)[0].state.run.text

            def broken():
                raise ZeroDivisionError("a bug in some widget")

            app.call_later(broken)
            await pilot.pause(0.2)
    assert app.saved_at_exit == app.session_name
    saved = load_session(app.session_name)
    assert saved["prompt"] == "Keep me" and saved["panes"][0].run.text == text


async def test_quitting_saves_the_session(models):
    from nanoplay.tui.sessions import list_sessions, session_path

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 100_000
        app.main.query_one("#prompt").load_text("Unfinished")
        await pilot.press("enter")
        await until(pilot, lambda: len(panes(app)[0].state.run.toks) >= 2)
        assert list_sessions() == []  # nothing finished, so nothing was saved yet
        await pilot.press("ctrl+q")
    assert list_sessions() == [app.session_name]
    saved = json.loads(session_path(app.session_name).read_text())
    assert saved["panes"][0]["runs"][0]["prompt"] == "Unfinished"


async def test_screenshot_goes_to_the_sessions_folder_without_downloads(models, tmp_path, monkeypatch):
    """The palette's Screenshot used to fail without ~/Downloads: it saves beside the sessions and says where."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a home with no Downloads folder
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+p", *"screenshot")
        await pilot.pause(0.3)  # the palette searches in the background
        await pilot.press("enter")
        shots = tmp_path / "sessions"
        await until(pilot, lambda: list(shots.glob("*.svg")), timeout=10)
        (svg,) = shots.glob("*.svg")
        assert svg.read_text().startswith("<svg")
        await until(pilot, lambda: any(str(svg) in n.message for n in app._notifications), timeout=5)


async def test_a_worker_result_for_a_closing_screen_is_dropped(models):
    """A worker's result (the picker's model list, the trainer's end) arriving while its screen is torn
    down: Textual prunes a screen's widgets before the screen, so for a moment it is attached with its
    widgets gone (NoMatches, seen in CI)."""
    import asyncio

    from nanoplay.tui.screens.picker import ModelPicker
    from nanoplay.tui.screens.welcome import WelcomeScreen

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        for screen_class, late in ((ModelPicker, lambda s: s.show_models([("alpha", "alpha")])),
                                   (WelcomeScreen, lambda s: s.training_ended("stopped"))):
            for close in ("pop", "dismiss"):
                screen = screen_class()
                await app.push_screen(screen)
                await pilot.pause()
                calls = 0
                app.pop_screen() if close == "pop" else screen.dismiss(None)
                while screen.is_attached and calls < 1000:  # every turn of the loop while it goes
                    late(screen)
                    calls += 1
                    await asyncio.sleep(0)
                assert calls > 1 and app.screen is app.main and app.is_running


@pytest.mark.parametrize("return_code, line", [
    (0, "nanoplay: session saved: nanoplay --session s1 reopens it\n"),  # a plain quit said nothing
    (1, "nanoplay: the playground stopped on an error; the session was saved first: nanoplay --session s1\n"),
])
def test_the_exit_line_names_the_saved_session(monkeypatch, capsys, return_code, line):
    import argparse

    import nanoplay.tui.app as tui_app

    class Closed:  # an app that ran and closed, its session saved on the way out
        def __init__(self, **kwargs):
            self.return_code, self.saved_at_exit = return_code, "s1"

        def run(self):
            pass

    monkeypatch.setattr(tui_app, "NanoplayApp", Closed)
    args = argparse.Namespace(model=None, chat=False, session=None, device=None, dtype="auto")
    assert tui_app.run_app(args) == return_code
    assert capsys.readouterr().err == line
