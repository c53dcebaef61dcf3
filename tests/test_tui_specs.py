"""Model specs typed in the playground: the picker's, and the draft-model setting (a pane decodes
speculatively and shows the same tokens)."""

import pytest
from test_tui import SIZE, idle, loaded, models, panes, send, until  # noqa: F401 (fixtures)

from nanoplay.tui.app import NanoplayApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_a_pane_with_a_draft_model_gives_the_same_tokens(models):
    app = NanoplayApp(models=["alpha", "alpha@200"])  # the same model twice: one pane will use a draft
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 12
        app.settings.stop = []
        second = panes(app)[1]
        second.focus()
        await pilot.press("enter", "s")
        field = app.screen.query_one("#set-draft")
        field.value = "beta\x1b[2J"  # a control character never becomes part of a spec
        await pilot.press("ctrl+s")
        assert "control characters" in str(app.screen.query_one("#settings-error").render())
        field.value = "beta@100"
        await pilot.press("ctrl+s")
        assert second.state.overrides == {"draft": "beta@100"}
        await send(pilot, "Once upon")
        await until(pilot, lambda: idle(app))
        first_run, second_run = panes(app)[0].state.run, second.state.run
        assert [t.id for t in second_run.toks] == [t.id for t in first_run.toks]
        assert len(second_run.toks) == 12
        assert app.settings.merged(second.state.overrides).summary().endswith("draft beta@100")
        # a draft that cannot load is the pane's error, and the app goes on
        second.state.overrides = {"draft": "no-such-model"}
        await send(pilot, "Again")
        await until(pilot, lambda: idle(app))
        assert (second.state.run.error or "").startswith("draft model: unknown model 'no-such-model'")
        assert panes(app)[0].state.run.error is None


async def test_an_int8_pane_its_draft_and_its_gen_command_are_int8(models, capsys):
    """A draft loads at its pane's precision: int8 (whose embeddings stay float32), not float32; the
    copied gen command and the Markdown export say int8, and the command gives the pane's text."""
    import shlex

    from nanoplay.cli import main

    app = NanoplayApp(models=["alpha"], dtype="int8")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        app.settings.temperature = 0
        pane = panes(app)[0]
        pane.state.overrides = {"draft": "beta@100"}
        await send(pilot, "Once upon")
        await until(pilot, lambda: idle(app))
        assert pane.state.run.error is None and len(pane.state.run.toks) == 4
        precisions = {m.name: m.precision for m in app.engine._loaded.values()}
        assert precisions == {"alpha@200": "int8", "beta@100": "int8"}
        assert "cpu/int8" in str(pane.query_one("#pane-header").render())
        pane.focus()
        await pilot.press("enter", "g")
        command = app.clipboard
        await pilot.press("ctrl+b")
        markdown = (models.parent / f"nanoplay-{app.session_name}.md").read_text()
        text = pane.state.run.text
    assert "--model alpha@200 --dtype int8 " in command and "## alpha (int8)" in markdown
    assert command in markdown
    assert main(shlex.split(command)[1:]) == 0
    assert text in capsys.readouterr().out


async def test_the_picker_refuses_control_characters_in_a_spec(models):
    from nanoplay.tui.screens.picker import ModelPicker

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, ModelPicker))
        field = app.screen.query_one("#spec")
        field.value = "beta\tgpt2"  # a pasted tab would reach the session, the pane title and the gen command
        await pilot.press("enter")
        assert isinstance(app.screen, ModelPicker) and len(panes(app)) == 1
        assert "control characters ('\\t' at position 5)" in str(app.screen.query_one("#spec-error").render())
        field.value = "beta"
        await pilot.press("enter")
        await until(pilot, lambda: len(panes(app)) == 2)
