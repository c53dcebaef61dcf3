"""The playground's layout at small and large windows: nothing covers the token under the cursor, nothing
is cut, the footer fits, panes make an even grid, a pane's status is one line and its errors readable whole."""

import pytest
from rich.console import Console
from test_tui import idle, loaded, models, panes, send, until  # noqa: F401 (models: a fixture)
from textual.widgets._footer import FooterKey

from nanoplay.tui.app import NanoplayApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def token_cells(pane, index: int) -> list[tuple[int, int]]:
    """Screen cells that show token `index` of the pane (the style of each token span carries its index)."""
    screen, view = pane.screen, pane.query_one("#tokens")
    region = pane.region
    cells = []
    for y in range(region.y, region.bottom):
        for x in range(region.x, region.right):
            widget, _ = screen.get_widget_at(x, y)
            if widget is view and screen.get_style_at(x, y).meta.get("tok") == index:
                cells.append((x, y))
    return cells


def lines_of(renderable, width: int) -> int:
    return len(Console(width=width, file=open("/dev/null", "w")).render_lines(renderable, pad=False))


async def test_at_80x24_the_token_under_the_cursor_and_the_whole_inspector_are_on_screen(models):
    app = NanoplayApp(models=["alpha", "beta", "no-such-model"])
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0
        app.settings.max_new_tokens = 40  # more text than a pane shows at once
        await send(pilot, "The cat sat on the")
        pane = panes(app)[0]
        pane.focus()
        for keys in (("end",), ("home",), ("end", "left", "left")):  # last token, first, one in between
            await pilot.press(*keys)
            # the scroll follows on a later refresh, and again when the inspector opening below shrinks the pane
            await until(pilot, lambda: token_cells(pane, pane.cursor), timeout=10)
        inspector = app.main.query_one("#inspector")
        assert inspector.display and inspector.region.y >= pane.region.bottom
        assert lines_of(inspector.content, inspector.content_size.width) <= inspector.content_size.height
        assert inspector.region.bottom <= app.main.query_one("#statusbar").region.y


async def test_the_footer_keys_never_run_under_the_palette_key(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=(200, 30)) as pilot:
        await loaded(pilot)
        for width in (200, 120, 80):
            await pilot.resize_terminal(width, 30)
            for focus in (app.main.query_one("#prompt"), panes(app)[0]):  # the pane adds keys of its own
                focus.focus()
                await pilot.pause()
                await pilot.pause()
                keys = list(app.main.query(FooterKey))
                (palette,) = [k for k in keys if k.has_class("-command-palette")]
                others = [k for k in keys if k is not palette]
                assert len(others) >= 3 and palette.region.right <= width
                assert all(k.region.width and k.region.right <= palette.region.x for k in others), \
                    (width, [(k.key_display, k.region) for k in others])


async def test_six_panes_make_two_rows_of_three(models):
    app = NanoplayApp(models=["alpha", "beta"] * 3)
    async with app.run_test(size=(200, 50)) as pilot:
        await loaded(pilot)
        await pilot.pause()
        rows = {}
        for pane in panes(app):
            rows.setdefault(pane.region.y, []).append(pane)
        assert sorted(len(r) for r in rows.values()) == [3, 3]


async def test_a_pane_status_is_one_line_and_a_long_error_is_shown_whole_in_the_body(models):
    app = NanoplayApp(models=["alpha", "beta", "no-such-model"])
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        await send(pilot, "Hi")
        await pilot.pause()
        for pane in panes(app):
            status = pane.query_one("#pane-status")
            shown = str(status.render())
            assert status.size.height == 1 and "\n" not in shown
            if pane.error is None:  # its items whole or not at all: never one cut in two
                assert status.content_size.width >= len(shown.rstrip())
                assert "seed" not in shown or f"seed {app.settings.seed}" in shown
        bad = panes(app)[2]
        assert len(bad.error) > 3 * bad.query_one("#tokens").content_size.width  # too long for one line
        body = bad.query_one("#tokens")
        assert str(body.render()) == "✗ " + bad.error  # every word, wrapped in the body (which scrolls)
        assert body.size.height >= lines_of(body.render(), body.content_size.width) - 1


async def test_the_token_under_the_cursor_stays_on_screen_when_the_pane_shrinks(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=(80, 60)) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0
        app.settings.max_new_tokens = 60
        await send(pilot, "The cat sat on the")
        pane = panes(app)[0]
        pane.focus()
        await pilot.press("end")
        await until(pilot, lambda: token_cells(pane, pane.cursor), timeout=10)
        await pilot.resize_terminal(60, 24)  # a shorter, narrower pane: the last token's line moves down
        await until(pilot, lambda: token_cells(pane, pane.cursor), timeout=10)
