"""
The `nanoplay` playground app: owns the engine, the settings, the session; the main screen owns the panes.

Nothing heavy is imported here: torch, the engine and the models load in thread workers, so the
window is up and usable before any model is.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding

from .colors import MODES
from .state import PaneState, Settings

# (title, help, action on the main screen) for the command palette: every action is there
COMMANDS = [
    ("Send prompt", "Generate in every pane from the prompt editor", "send"),
    ("Stop all generation", "Cancel every request in flight (Esc)", "stop"),
    ("Regenerate", "Run the last prompt again with the same seed (Ctrl+R)", "regenerate"),
    ("New seed", "Pick a new random seed and regenerate (Ctrl+N)", "new_seed"),
    ("Token colours", "Cycle colours: off, probability, entropy (Ctrl+T)", "colours"),
    ("Add model pane", "Pick a model for a new pane (Ctrl+O)", "add_pane"),
    ("Sampling settings", "Temperature, top-k/p, min-p, penalties, max tokens, seed, stops (Ctrl+S)", "settings"),
    ("Chat / compare mode", "Switch between compare and chat mode (Ctrl+G)", "toggle_chat"),
    ("Edit last message", "Chat: put the last user message back into the editor (Ctrl+F)", "edit_last"),
    ("Open session", "Reopen a saved session (Ctrl+L)", "sessions"),
    ("Export to Markdown", "Write this session as a Markdown file (Ctrl+B)", "export"),
    ("Pane: fork", "Continue the focused pane from the cursor with the next alternative (Enter, f)", "pane:fork"),
    ("Pane: branches", "Show the focused pane's branches (Enter, b)", "pane:branches"),
    ("Pane: cross-score", "Score the focused pane's completion under every other model (Enter, x)", "pane:cross_score"),
    ("Pane: copy text", "Copy the focused pane's text to the clipboard (Enter, y)", "pane:copy"),
    ("Pane: gen command", "Copy the equivalent `nanoplay gen` command line (Enter, g)", "pane:gen_command"),
    ("Pane: settings overrides", "Sampling overrides for the focused pane (Enter, s)", "pane:pane_settings"),
    ("Pane: move left", "Move the focused pane left (Enter, [)", "pane:move:-1"),
    ("Pane: move right", "Move the focused pane right (Enter, ])", "pane:move:1"),
    ("Pane: remove", "Remove the focused pane, after asking (Delete)", "pane:remove"),
]


class NanoplayApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "nanoplay"
    BINDINGS = [Binding("ctrl+c", "quit", "Quit", priority=True, show=False)]

    def __init__(self, models: list[str] | None = None, chat: bool = False, session: str | None = None,
                 device: str | None = None, dtype: str = "float32"):
        super().__init__()
        self.requested_models = models
        self.requested_session = session
        self.device = device  # None: the GPU when there is one, else the CPU
        self.dtype = dtype  # every pane's weights, as --dtype names them ("auto": the machine's choice)
        self.mode = "chat" if chat else "compare"
        self.settings = Settings()
        self.colour_mode = "off"
        self.prompt = ""
        self.history: list[str] = []
        self.session_name = None
        self.engine = None
        self.engine_lock = threading.Lock()
        self.saved_at_exit: str | None = None  # the session saved as the app closed, for the exit message

    # ---- startup

    def on_mount(self) -> None:
        from .sessions import load_session, new_session_name

        self.session_name = new_session_name()
        from .screens.main import MainScreen

        data = None
        if self.requested_session:
            try:
                data = load_session(self.requested_session)
            except Exception as e:
                self.notify(str(e), severity="error", timeout=10)
            else:
                self.session_name = self.requested_session
                self.restore(data)
        if data is not None:
            initial = data["panes"]
        elif self.requested_models:
            initial = [PaneState(spec) for spec in self.requested_models]
        else:
            initial = None  # found by discover() once the screen is up
        self.main = MainScreen(initial)
        self.push_screen(self.main)

    def restore(self, data: dict) -> None:
        self.settings = data["settings"]
        self.mode = data.get("mode", self.mode)
        self.prompt = data.get("prompt", "")
        self.history[:] = data.get("history", [])
        self.colour_mode = data.get("colour_mode", "off") if data.get("colour_mode") in MODES else "off"

    def open_panes(self, states: list[PaneState]) -> None:
        for state in states:
            self.main.add_pane(state)

    def discover(self) -> None:
        self.run_worker(self._discover, thread=True, name="discover")

    def _discover(self) -> None:
        """Default panes: every local checkpoint plus gpt2; nothing at all: the welcome screen."""
        from ..loading import list_local_models
        from .discovery import default_specs

        local = list_local_models()
        if not local:
            self.call_from_thread(self.show_welcome)
            return
        self.call_from_thread(self.open_panes, [PaneState(s) for s in default_specs(local)])

    def show_welcome(self) -> None:
        from .screens.welcome import WelcomeScreen

        def chosen(spec: str | None) -> None:
            if spec:
                self.open_panes([PaneState(spec)])

        self.push_screen(WelcomeScreen(), chosen)

    def get_engine(self):
        """The one engine of the app, created (and torch imported) on first use, in a worker thread."""
        with self.engine_lock:
            if self.engine is None:
                from ..engine import Engine

                self.engine = Engine()
                self.engine.start()
            return self.engine

    # ---- sessions

    def session_data(self) -> dict:
        return {"mode": self.mode, "prompt": self.prompt, "history": self.history[-50:],
                "settings": self.settings.to_dict(), "colour_mode": self.colour_mode,
                "panes": [p.state.to_dict() for p in self.main.panes]}

    def save_session(self) -> None:
        from .sessions import save_session

        if not self.main.panes:
            return
        try:
            save_session(self.session_name, self.session_data())
        except OSError as e:
            self.notify(f"could not save the session: {e}", severity="warning")

    def save_before_exit(self) -> None:
        """Save the session if it holds any work (a run or a chat): called on every way out, crashes too."""
        main = getattr(self, "main", None)
        try:
            if main is not None and any(p.state.runs or p.state.chat for p in main.panes):
                self.save_session()
                self.saved_at_exit = self.session_name
        except Exception:  # noqa: BLE001 -- the app is already on its way out: the error that closes it is the one to show
            pass

    async def open_session(self, name: str) -> None:
        from .sessions import load_session

        try:
            data = load_session(name)
        except Exception as e:
            self.notify(str(e), severity="error")
            return
        await self.main.remove_panes(self.main.panes)
        self.session_name = name
        self.restore(data)
        self.main.query_one("#prompt").load_text(self.prompt)
        self.open_panes(data["panes"])
        self.main.update_status()

    def export_markdown(self) -> Path:
        from ..atomic import write_file_atomically
        from .sessions import to_markdown

        text = to_markdown(self.session_name, self.mode, self.prompt, self.settings,
                           [(p.state, p.exact_spec, p.precision, p.error) for p in self.main.panes])
        return write_file_atomically(Path(f"nanoplay-{self.session_name}.md").resolve(), text)

    # ---- palette, help, quitting

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Every notification is plain text: messages quote specs, paths, prompts and error texts, which
        must never be read as markup (a `[/]` would raise, a `[@click=...]` would run an action)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def action_command_palette(self) -> None:
        from .widgets.options import Palette

        if self.use_command_palette and not Palette.is_open(self):
            self.push_screen(Palette(id="--command-palette"))

    def get_system_commands(self, screen):
        for command in super().get_system_commands(screen):
            if command.title != "Screenshot":  # Textual's saves into ~/Downloads and fails where there is none
                yield command
        yield SystemCommand("Screenshot", "Save an SVG of the screen into the sessions folder",
                            lambda: self.set_timer(0.1, self.save_screenshot_here))
        yield SystemCommand("Help", "Key bindings and what the pane shows (F1)", self.action_help)
        if screen is getattr(self, "main", None):
            for title, help_text, action in COMMANDS:
                yield SystemCommand(title, help_text, lambda a=action: self.run_command(a))

    def run_command(self, action: str) -> None:
        from .widgets.pane import ModelPane

        main = self.main
        if action == "send":
            main.send(main.query_one("#prompt").text)
        elif action.startswith("pane:"):
            _, name, *arg = action.split(":")
            pane = main.focused if isinstance(main.focused, ModelPane) else (main.panes or [None])[0]
            if pane is not None:
                main.call_next(getattr(main, f"pane_{name}"), pane, int(arg[0]) if arg else None)
        else:
            getattr(main, f"action_{action}")()

    def save_screenshot_here(self) -> None:
        """An SVG of the screen in the sessions folder, or the working directory if that cannot be written."""
        from ..atomic import write_file_atomically
        from .sessions import sessions_dir

        name = f"nanoplay-screenshot-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        svg = self.export_screenshot()
        for folder in (sessions_dir(), Path.cwd()):
            try:
                path = write_file_atomically((folder / name).resolve(), svg)
            except OSError as e:
                error = e
                continue
            self.notify(str(path), title="screenshot saved")
            return
        self.notify(f"could not save the screenshot: {error}", severity="error")

    def action_help(self) -> None:
        from .screens.dialogs import HelpScreen

        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        if self.engine is not None:
            for pane in self.main.panes:
                with pane.lock:
                    for _, req in pane.active:
                        req.cancel()
        self.save_before_exit()
        self.exit()

    def _handle_exception(self, error: Exception) -> None:
        """An unhandled error closes the app (Textual's rule, from any widget, Textual's own too): the
        session is saved first, so no work is lost, and the exit message says how to reopen it."""
        self.save_before_exit()
        super()._handle_exception(error)

    def on_unmount(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def run_app(args) -> int:
    app = NanoplayApp(models=args.model, chat=args.chat, session=args.session, device=args.device, dtype=args.dtype)
    app.run()
    if app.return_code and app.saved_at_exit:
        print(f"nanoplay: the playground stopped on an error; the session was saved first: "
              f"nanoplay --session {app.saved_at_exit}", file=sys.stderr)
    elif app.saved_at_exit:  # the README's promise: whatever closes the app, the exit line names the session
        print(f"nanoplay: session saved: nanoplay --session {app.saved_at_exit} reopens it", file=sys.stderr)
    return app.return_code or 0
