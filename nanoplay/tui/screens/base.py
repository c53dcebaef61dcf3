"""What every dialog of the playground shares: it is dismissed once, and never pops another screen."""

from __future__ import annotations

from textual.await_complete import AwaitComplete
from textual.screen import ModalScreen, Screen, ScreenResultType


class DismissOnce:
    """
    A screen mixin: `dismiss` acts once, on this screen only.

    Textual's `dismiss` pops whatever screen is on top and calls the result callback each time it is
    called, so a second Enter before the first is handled (Ctrl+L, Enter, Enter), or a worker finishing
    after the user closed the screen, would pop the main screen (ScreenStackError) and run the callback
    twice. Here a repeated or late dismiss does nothing; one arriving while another screen (the palette,
    help) is over this one closes that screen first.
    """

    _dismissed = False

    @property
    def gone(self) -> bool:
        """
        True once this screen is dismissed or being removed: a worker's late callback must leave it alone.

        `is_attached` alone is not enough: Textual removes a screen's widgets before the screen itself, so
        for a moment the screen is attached with its widgets gone (a query raises NoMatches). Textual's
        own `Widget.recompose` checks the same `_pruning` flag.
        """
        return self._dismissed or not self.is_attached or self._pruning

    def dismiss(self, result: ScreenResultType | None = None) -> AwaitComplete:
        app = self.app
        if self._dismissed or self not in app.screen_stack:
            return AwaitComplete()
        self._dismissed = True
        if app.screen is self:
            return super().dismiss(result)
        app.call_later(self._dismiss_from_below, result)
        return AwaitComplete()

    async def _dismiss_from_below(self, result) -> None:
        app = self.app
        while self in app.screen_stack and app.screen is not self:
            await app.pop_screen()
        if app.screen is self:
            super().dismiss(result)


class Dialog(DismissOnce, ModalScreen[ScreenResultType]):
    """A modal dialog of the playground (Esc closes it with None)."""


class FullScreen(DismissOnce, Screen[ScreenResultType]):
    """A full screen of the playground that returns a result (the welcome screen)."""
