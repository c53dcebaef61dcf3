"""
A seeded random-key fuzz of the playground: two tiny models loaded and streaming, every binding, the
dialogs, the palette, typed text full of markup, and bursts of keys delivered before the app has
handled the first (where the screen and worker races live). At the end the app must still run and
have raised nothing. A failure prints the seed and the last actions, to replay it.
"""

import random

import pytest
from test_tui import SIZE, anyio_backend, loaded, models, panes  # noqa: F401 (fixtures)
from test_tui_lifecycle import burst

from nanoplay.tui.app import NanoplayApp

pytestmark = pytest.mark.anyio

KEYS_PER_SEED = 500  # x 3 seeds: 1,500 keys
GLOBAL = ["escape", "ctrl+r", "ctrl+n", "ctrl+t", "ctrl+o", "ctrl+s", "ctrl+g", "ctrl+f", "ctrl+l", "ctrl+b",
          "f1", "ctrl+p", "tab", "shift+tab"]  # every binding but quitting
PANE = ["left", "right", "home", "end", "up", "down", "pageup", "pagedown", "enter", "shift+left", "shift+right",
        "delete", *"123456789"]
DIALOG = ["enter", "escape", "up", "down", "pageup", "pagedown", "tab", "backspace", "y", "n", *"fbxygs[]dq"]
OPENERS = ["ctrl+l", "ctrl+p", "ctrl+o", "ctrl+s", "f1", "enter", "delete", "ctrl+g", "ctrl+b", "ctrl+r"]
FOLLOW = ["enter", "enter", "escape", "pagedown", "pageup", "down", "g"]  # keys that act on what just opened
WORDS = ["[/]", "[/INST]", "[@click=app.quit]x[/]", "[bold]", "[red]x", "hello", "0.5", "gpt2", "theme", " ", "1"]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_keys_never_crash_the_playground(models, seed):
    rng = random.Random(seed)
    app = NanoplayApp(models=["alpha", "beta"])
    quits = []
    app.action_quit = lambda: quits.append(True)  # the palette's Quit is a way out, not a crash: count it
    history: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 8
        app.main.query_one("#prompt").load_text("Once upon a time")
        await pilot.press("enter")  # both models streaming from the start
        sent = 0
        while sent < KEYS_PER_SEED:
            roll = rng.random()
            pressed, at_once = [], []  # pressed one by one (the app settles between), then queued at once
            if roll < 0.25:
                pressed = [rng.choice(GLOBAL + PANE + DIALOG)]
            elif roll < 0.4:
                pressed = list(rng.choice(WORDS))
            elif roll < 0.48:
                pressed = ["enter"]
            elif roll < 0.75:  # a dialog, menu or palette opens, then keys reach it, typed or all at once
                pressed = [rng.choice(OPENERS)]
                if rng.random() < 0.5:
                    pressed += list(rng.choice(WORDS)) + [rng.choice(["enter", "escape", "pagedown"])]
                else:
                    at_once = [rng.choice(FOLLOW) for _ in range(rng.randint(2, 3))]
            else:  # an opener and what follows it before the opened screen exists
                at_once = [rng.choice(OPENERS)] + [rng.choice(FOLLOW + list("a[/]")) for _ in range(rng.randint(1, 3))]
            history.append(" ".join(pressed) + (" | at once: " + " ".join(at_once) if at_once else ""))
            if pressed:
                await pilot.press(*pressed)
            if at_once:
                burst(app, *at_once)
                await pilot.pause(rng.choice([0, 0.02, 0.1]))
            sent += len(pressed) + len(at_once)
            assert app.is_running and app._exception is None, f"seed {seed}, last actions: {history[-15:]}"
        await pilot.pause(0.2)
        assert app.is_running and app._exception is None and app.return_code is None, \
            f"seed {seed}, last actions: {history[-15:]}"
