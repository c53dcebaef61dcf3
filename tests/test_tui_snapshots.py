"""SVG snapshots of the playground's main screens (pytest-textual-snapshot), made deterministic:
tiny local models, greedy decoding, fixed seed, fixed terminal size, timings hidden."""

import pytest
from conftest import tiny_model

from nanoplay.checkpoint import save_checkpoint, step_dir_name
from nanoplay.tui.app import NanoplayApp

SIZE = (120, 34)


@pytest.fixture
def snap_models(tmp_path, hf_home, monkeypatch):
    """Relative paths, so nothing machine-specific reaches the screen."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOPLAY_CHECKPOINTS", "checkpoints")
    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path / "sessions"))
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_checkpoint(tiny_model(seed), tmp_path / "checkpoints" / name / step_dir_name(100), step=100)


async def settle(pilot, prompt=None, keys=(), max_new_tokens=12):
    """Load, generate greedily, then freeze what varies between runs (timings, session name)."""
    from test_tui import idle, loaded, send, until

    app = pilot.app
    await loaded(pilot)
    app.settings.temperature = 0
    app.settings.max_new_tokens = max_new_tokens
    app.main.query_one("#prompt").cursor_blink = False  # before any key: a blink timer must not race them
    if prompt is not None:
        await send(pilot, prompt)
    await pilot.press(*keys)
    await until(pilot, lambda: idle(app))
    app.session_name = "snapshot"
    for pane in app.main.panes:
        for run in pane.state.runs:
            run.tok_per_s = None
        pane.refresh_view()
    app.main.update_status()
    await pilot.pause()


def test_compare_screen_with_colours_and_inspector(snap_models, snap_compare):
    async def run_before(pilot):
        await settle(pilot, "The cat sat on the", keys=("ctrl+t",))
        pane = pilot.app.main.panes[0]
        pane.focus()
        await pilot.press("home", "right", "right", "right", "right", "right", "right")

    assert snap_compare(NanoplayApp(models=["alpha", "beta", "missing-model"]), terminal_size=SIZE,
                        run_before=run_before)


def test_chat_screen(snap_models, snap_compare):
    async def run_before(pilot):
        await settle(pilot, "Hello there")
        pilot.app.main.panes[0].focus()
        await pilot.press("end")

    assert snap_compare(NanoplayApp(models=["beta"], chat=True), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_models, snap_compare):
    async def run_before(pilot):
        from textual.widgets import Input

        await settle(pilot)
        pilot.app.set_focus(None)  # no prompt cursor behind the dialog, however fast the models loaded
        await pilot.press("ctrl+s")
        for field in pilot.app.screen.query(Input):  # a blinking cursor is on or off by the clock: keep it on
            field.cursor_blink = False
        await pilot.pause()

    assert snap_compare(NanoplayApp(models=["alpha"]), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_models, snap_compare):
    async def run_before(pilot):
        await settle(pilot)
        pilot.app.set_focus(None)  # no prompt cursor under the help, however fast the models loaded
        await pilot.press("f1")
        # Markdown renders its tables in the background: wait until the help's height stops changing
        help_text = pilot.app.screen.query_one("#help")
        heights = [-1]
        while len(heights) < 6 or len(set(heights[-5:])) > 1:  # the same height five times running
            heights.append(help_text.virtual_size.height)
            await pilot.pause(0.1)

    assert snap_compare(NanoplayApp(models=["alpha"]), terminal_size=SIZE, run_before=run_before)


def test_welcome_screen(tmp_path, hf_home, monkeypatch, snap_compare):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOPLAY_CHECKPOINTS", "checkpoints")

    async def run_before(pilot):
        from nanoplay.tui.screens.welcome import WelcomeScreen
        from test_tui import until

        await until(pilot, lambda: isinstance(pilot.app.screen, WelcomeScreen))
        await pilot.app.workers.wait_for_complete()
        pilot.app.session_name = "snapshot"
        await pilot.pause()

    assert snap_compare(NanoplayApp(), terminal_size=SIZE, run_before=run_before)


async def cursor_far_into_the_first_pane(pilot):
    """Many tokens, the cursor on a late one: it must be on screen, with the inspector whole below it."""
    await settle(pilot, "The cat sat on the", max_new_tokens=40)
    pilot.app.main.panes[0].focus()
    await pilot.press("end", "left", "left")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_compare_screen_at_small_and_medium_sizes(snap_models, snap_compare, size):
    assert snap_compare(NanoplayApp(models=["alpha", "beta", "missing-model"]), terminal_size=size,
                        run_before=cursor_far_into_the_first_pane)


def test_six_panes_at_250x70(snap_models, snap_compare):
    assert snap_compare(NanoplayApp(models=["alpha", "beta", "alpha", "beta", "alpha", "missing-model"]),
                        terminal_size=(250, 70), run_before=cursor_far_into_the_first_pane)
