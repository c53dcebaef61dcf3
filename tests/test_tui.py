"""Pilot tests of the playground's flows, with tiny local models (no network)."""

import json
import math
import time

import pytest
from conftest import tiny_model

from nanoplay.checkpoint import save_checkpoint, step_dir_name
from nanoplay.tui.app import NanoplayApp
from nanoplay.tui.state import Settings, format_perplexity
from nanoplay.tui.widgets.inspector import prob
from nanoplay.tui.widgets.pane import ModelPane

SIZE = (130, 40)
pytestmark = pytest.mark.anyio  # async tests through anyio's pytest plugin


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def models(checkpoints, hf_home, tmp_path, monkeypatch):
    """checkpoints/alpha (steps 100 and 200) and checkpoints/beta; sessions in tmp; no Hub."""
    for name, seed in (("alpha", 1), ("beta", 2)):
        for step in (100, 200):
            save_checkpoint(tiny_model(seed * 10 + step), checkpoints / name / step_dir_name(step), step=step)
    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path / "sessions"))
    monkeypatch.chdir(tmp_path)
    return checkpoints


async def until(pilot, condition, timeout=60.0):
    """Wait for a condition of the app (not a fixed pause); the timeout only guards against hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.02)


def panes(app) -> list[ModelPane]:
    return app.main.panes


async def loaded(pilot):
    await until(pilot, lambda: panes(pilot.app) and all(p.lm or p.error for p in panes(pilot.app)))
    await pilot.app.workers.wait_for_complete()


def idle(app) -> bool:
    return all(not p.busy and (p.state.run is None or p.state.run.finish_reason) for p in panes(app))


async def send(pilot, text: str):
    pilot.app.main.query_one("#prompt").focus()
    pilot.app.main.query_one("#prompt").load_text(text)
    await pilot.press("enter")
    await until(pilot, lambda: all(p.state.run is not None for p in panes(pilot.app) if p.lm))
    await until(pilot, lambda: idle(pilot.app))


def reference(spec: str, prompt, settings: Settings, **extra):
    """The same generation straight through a fresh engine: what every pane must show."""
    from nanoplay.engine import Engine
    from nanoplay.sampling import SamplingParams

    engine = Engine()
    lm = engine.load(spec)
    return engine, lm, engine.generate(lm, prompt, SamplingParams(**settings.sampling_kwargs(), **extra))


async def test_compare_streams_every_pane_and_errors_stay_in_their_pane(models):
    app = NanoplayApp(models=["alpha", "beta@100", "no-such-model"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        alpha, beta, bad = panes(app)
        assert bad.error and "no-such-model" in bad.error and "\n" not in bad.error
        assert "no-such-model" in str(bad.status_text())
        app.settings.max_new_tokens = 12
        await send(pilot, "The meaning of life is")
        for pane, spec in ((alpha, "alpha"), (beta, "beta@100")):
            run = pane.state.run
            _, lm, ref = reference(spec, "The meaning of life is", app.settings)
            assert [t.id for t in run.toks] == [t.id for t in ref.tokens]
            assert run.finish_reason == ref.finish_reason
            assert run.perplexity == pytest.approx(ref.perplexity, rel=1e-4)
            header = str(pane.header_text())
            assert f"{len(ref.tokens)} tok" in header and f"ppl {format_perplexity(ref.perplexity)}" in header
            # the cache holds <|endoftext|> (the prompt follows it), the prompt and all but the last token
            assert f"ctx {1 + len(ref.prompt_ids) + len(ref.tokens) - 1}/64" in header
            # the prompt is scored by the pane's own model
            assert [t.id for t in run.prompt_toks] == ref.prompt_ids
            assert "tok/s" in header and "1.6M params" in header and "cpu/fp32" in header
        assert bad.state.run is None  # the broken pane did nothing, and crashed nothing
        # the seed is shown in the status bar
        assert f"seed {app.settings.seed}" in str(app.main.query_one("#statusbar").render())


@pytest.mark.parametrize("dtype, shown", [("int8", "cpu/int8"), ("bf16", "cpu/bf16"), ("auto", "cpu/bf16")])
async def test_the_playground_loads_its_panes_at_dtype(models, monkeypatch, dtype, shown):
    """--dtype reaches every pane, and auto is the machine's choice, as gen's is (the playground loaded
    float32 on CPUs with native bf16 products, where the README said auto)."""
    from nanoplay import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # a CPU where auto is bf16
    app = NanoplayApp(models=["alpha"], dtype=dtype)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        (pane,) = panes(app)
        assert pane.lm.precision == ("int8" if dtype == "int8" else "bf16") and shown in str(pane.header_text())


async def test_same_seed_regenerates_identically_and_new_seed_changes(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 8
        await send(pilot, "Once")
        (pane,) = panes(app)
        first = [t.id for t in pane.state.run.toks]
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(pane.state.runs) == 2 and idle(app))
        assert [t.id for t in pane.state.run.toks] == first
        seed = app.settings.seed
        await pilot.press("ctrl+n")
        await until(pilot, lambda: len(pane.state.runs) == 3 and idle(app))
        assert app.settings.seed != seed and pane.state.run.settings["seed"] == app.settings.seed
        assert [t.id for t in pane.state.run.toks] != first


async def test_escape_stops_all_generation(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 100_000
        app.main.query_one("#prompt").load_text("Stop me")
        await pilot.press("enter")
        await until(pilot, lambda: all(p.state.run and len(p.state.run.toks) >= 2 for p in panes(app)))
        await pilot.press("escape")
        await until(pilot, lambda: idle(app))
        for pane in panes(app):
            assert pane.state.run.finish_reason == "cancelled"
            assert len(pane.state.run.toks) < 100_000


async def test_colours_inspector_click_and_fork(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 10
        await send(pilot, "Hello world")
        (pane,) = panes(app)
        await pilot.press("ctrl+t")
        assert app.colour_mode == pane.colour_mode == "probability"
        body = pane.body_text()
        # every token span is coloured by its probability bin
        from nanoplay.tui.colors import token_color

        run = pane.state.run
        colours = {str(span.style.bgcolor.name) if span.style.bgcolor else None for span in body.spans}
        assert {token_color(t, "probability") for t in run.prompt_toks + run.toks} <= colours
        await pilot.press("ctrl+t")
        assert pane.colour_mode == "entropy"
        # keyboard cursor: first completion token is after the 2 prompt tokens
        pane.focus()
        await pilot.press("home", "right", "right")
        tok, is_prompt, index = pane.cursor_tok()
        assert (is_prompt, index) == (False, 0) and tok.id == run.toks[0].id
        inspector = app.main.query_one("#inspector")
        assert inspector.display
        shown = _plain(inspector.render_tok(pane, tok, False, 0))
        assert f"rank {tok.rank}" in shown and f"entropy {tok.entropy:.2f}" in shown
        for _, text, lp, slp in tok.top:  # every alternative with its raw and sampling probability
            assert f"{text!r}" in shown and prob(lp) in shown and prob(slp) in shown
        mass = sum(math.exp(lp) for _, _, lp, _ in tok.top)
        assert f"cover {mass:.1%} of the raw distribution" in shown
        # mouse: click the first token of the body
        await pilot.click("#tokens", offset=(0, 0))
        assert pane.cursor == 0 and pane.cursor_tok()[1] is True
        # fork at completion token 3 with alternative 2
        pane.cursor = 2 + 3
        alt = run.toks[3].top[1]
        await pilot.press("2")
        await until(pilot, lambda: len(pane.state.runs) == 2 and idle(app))
        fork = pane.state.run
        assert fork.parent == 0 and fork.fork_at == 3
        assert [t.id for t in fork.toks[:3]] == [t.id for t in run.toks[:3]]
        assert fork.toks[3].id == alt[0] and fork.toks[3].logprob == pytest.approx(alt[2])
        assert len(fork.toks) == 3 + 1 + 10
        # the continuation is exactly what the engine makes from prompt + kept prefix + choice
        ids = run.prompt_ids + [t.id for t in fork.toks[:4]]
        _, _, ref = reference("alpha", ids, Settings.from_dict(fork.settings))
        assert [t.id for t in fork.toks[4:]] == [t.id for t in ref.tokens]
        assert str(pane.status_text()).startswith("done: length  branch 2/2  ")
        pane.focus()
        await pilot.press("end")
        assert "completion token 13" in _plain(inspector.content)
        # the branch list reaches the first branch again, and the inspector lets go of the fork's token
        await pilot.press("enter", "b")  # the pane's action menu, then its key
        await pilot.press("up", "enter")
        assert pane.state.current == 0
        assert pane.cursor is None and not inspector.display


def _plain(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


async def test_settings_panel_and_pane_overrides(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+s")
        screen = app.screen
        screen.query_one("#set-temperature").value = "0"
        screen.query_one("#set-max_new_tokens").value = "5"
        screen.query_one("#set-top_k").value = "abc"
        await pilot.click("#apply")
        assert "not a whole number" in str(screen.query_one("#settings-error").render())
        screen.query_one("#set-top_k").value = "40"
        screen.query_one("#set-stop").value = "zzz, \\n"
        await pilot.press("ctrl+s")  # apply from the keyboard
        assert app.settings.temperature == 0 and app.settings.max_new_tokens == 5
        assert app.settings.top_k == 40 and app.settings.stop == ["zzz", "\n"]
        # beta gets its own max_new_tokens
        beta = panes(app)[1]
        beta.focus()
        await pilot.press("enter", "s")
        app.screen.query_one("#set-max_new_tokens").focus()
        app.screen.query_one("#set-max_new_tokens").value = "3"
        await pilot.press("enter")
        assert beta.state.overrides == {"max_new_tokens": 3}
        app.settings.stop = []
        await send(pilot, "A")
        alpha = panes(app)[0]
        assert len(alpha.state.run.toks) == 5 and len(beta.state.run.toks) == 3
        # greedy: every completion token is the model's most likely one
        assert all(t.rank == 1 for t in alpha.state.run.toks + beta.state.run.toks)


async def test_picker_adds_a_checkpoint_step_and_panes_move_and_go(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+o")
        picker = app.screen
        from textual.widgets import OptionList

        options = picker.query_one("#models", OptionList)
        await until(pilot, lambda: options.option_count > 1)
        ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
        assert ids[:4] == ["alpha", "alpha@100", "beta", "beta@100"]
        assert "gpt2" in ids and "gpt2-medium" in ids
        options.focus()
        options.highlighted = 1
        await pilot.press("enter")
        await loaded(pilot)
        assert [p.lm.name for p in panes(app)] == ["alpha@200", "alpha@100"]
        second = panes(app)[1]
        second.focus()
        await pilot.press("shift+left")
        assert [p.state.spec for p in panes(app)] == ["alpha@100", "alpha"]
        await pilot.press("delete", "enter")  # asks first
        await pilot.pause()
        assert [p.state.spec for p in panes(app)] == ["alpha"]


async def test_chat_mode_turns_reuse_the_conversation(models):
    app = NanoplayApp(models=["alpha"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        (pane,) = panes(app)
        assert "plain-text chat" in str(pane.header_text())
        await send(pilot, "Hi")
        assert [m.role for m in pane.state.chat] == ["user", "assistant"]
        first = pane.state.run
        assert first.prompt_ids == _encode("User: Hi\n\nAssistant:")
        answer = pane.state.chat[1].content
        assert answer == "".join(t.text for t in first.toks)
        await send(pilot, "More")
        second = pane.state.run
        # the second turn's prompt extends the first turn's prompt + answer (the KV cache prefix)
        assert second.prompt_ids[:len(first.prompt_ids)] == first.prompt_ids
        assert second.prompt_ids == _encode(f"User: Hi\n\nAssistant: {answer}\n\nUser: More\n\nAssistant:") or \
            second.prompt_ids == _encode(f"User: Hi\n\nAssistant: {answer.strip()}\n\nUser: More\n\nAssistant:")
        # each turn is a run, but only versions of one answer count as its branches
        assert str(pane.status_text()) == f"done: {second.finish_reason}  seed {app.settings.seed}"
        # regenerate the last answer with the same seed: the same answer
        last = pane.state.chat[-1].content
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(pane.state.runs) == 3 and idle(app))
        assert pane.state.chat[-1].content == last and len(pane.state.chat) == 4
        assert "  answer 2/2  " in str(pane.status_text()) and "branch" not in str(pane.status_text())
        # edit and resend the last user message: back in the editor, the cursor after it
        await pilot.press("ctrl+f")
        editor = app.main.query_one("#prompt")
        assert editor.text == "More" and len(pane.state.chat) == 2
        assert editor.cursor_location == (0, 4)
        await send(pilot, "Other")
        assert [m.content for m in pane.state.chat if m.role == "user"] == ["Hi", "Other"]



async def test_chat_inspector_reaches_every_answer(models):
    app = NanoplayApp(models=["alpha"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        app.settings.temperature = 0  # no end-of-text: every answer has its 4 tokens
        (pane,) = panes(app)
        await send(pilot, "Hi")
        await until(pilot, lambda: idle(app))
        await send(pilot, "More")
        await until(pilot, lambda: idle(app))
        first, second = [m.toks for m in pane.state.chat if m.role == "assistant"]
        assert len(first) == len(second) == 4
        pane.focus()
        await pilot.press("end")  # the newest answer's last token
        assert pane.cursor_tok() == (second[-1], False, 3)
        await pilot.press(*["left"] * 5)  # back across the turn boundary into the first answer
        assert pane.cursor_tok() == (first[-2], False, 2)
        assert "answer token 2" in _plain(app.main.query_one("#inspector").render_tok(pane, first[-2], False, 2))
        # the cursor is drawn on that token of the first answer, and a click there finds it too
        body = pane.body_text()
        (cursor_span,) = [sp for sp in body.spans
                          if not isinstance(sp.style, str) and sp.style.bgcolor and sp.style.bgcolor.name == "bright_white"]
        assert body.plain[cursor_span.start:cursor_span.end] == first[-2].text
        assert cursor_span.style.meta["tok"] == 2
        # forking is from the latest answer only
        await pilot.press("2")
        await pilot.pause()
        assert len(pane.state.runs) == 2
        await pilot.press("end", "left", "left")  # token 1 of the latest answer
        alt = second[1].top[1]
        await pilot.press("2")
        await until(pilot, lambda: len(pane.state.runs) == 3 and idle(app))
        fork, answer = pane.state.run, pane.state.chat[-1]
        assert fork.parent == 1 and fork.fork_at == 1 and len(pane.state.chat) == 4
        assert [t.id for t in answer.toks[:2]] == [second[0].id, alt[0]] and len(answer.toks) == 2 + 4
        assert answer.content == "".join(t.text for t in answer.toks)
        # the continuation is what the engine makes from the conversation + kept prefix + choice
        _, _, ref = reference("alpha", fork.prompt_ids + [t.id for t in answer.toks[:2]], Settings.from_dict(fork.settings))
        assert [t.id for t in answer.toks[2:]] == [t.id for t in ref.tokens]
        # the branch list brings the first version of the answer back into the conversation
        await pilot.press("enter", "b")
        await pilot.press("up", "enter")
        assert pane.state.current == 1 and [t.id for t in pane.state.chat[-1].toks] == [t.id for t in second]

async def test_chat_drops_oldest_turns_when_the_context_is_full(models):
    app = NanoplayApp(models=["alpha"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 16  # context 64: 48 tokens of conversation fit
        (pane,) = panes(app)
        for text in ("one two three four five six", "seven eight nine ten", "eleven twelve thirteen"):
            await send(pilot, text)
        assert pane.state.turns_outside_context >= 1
        assert len(pane.state.run.prompt_ids) <= 48
        assert "outside the context" in str(pane.body_text())


def _encode(text):
    from nanoplay.tokenizer import get_tokenizer

    return get_tokenizer().encode(text)


async def test_sessions_autosave_reopen_export_and_gen_command(models, capsys):
    from nanoplay.tui.sessions import list_sessions, load_session, session_path

    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 6
        app.settings.temperature = 0  # greedy: two random tiny models part ways (sampled, the shared noise rules)
        await send(pilot, "Saved prompt")
        name = app.session_name
        texts = [p.state.run.text for p in panes(app)]
        diverge = [p.diverge_at for p in panes(app)]
        await pilot.press("ctrl+b")
        markdown = (models.parent / f"nanoplay-{name}.md").read_text()
        panes(app)[0].focus()
        await pilot.press("enter", "g")
        command = app.clipboard
        assert "--model alpha@200 " in command  # the step that made the text, not whatever is newest later
    assert list_sessions() == [name]
    saved = json.loads(session_path(name).read_text())
    assert saved["prompt"] == "Saved prompt" and [p["spec"] for p in saved["panes"]] == ["alpha", "beta"]
    assert load_session(name)["panes"][1].run.text == texts[1]
    assert "## alpha" in markdown and texts[0] in markdown and "nanoplay gen --model alpha" in markdown
    # the gen command line reproduces the pane's text
    import shlex

    from nanoplay.cli import main

    assert main(shlex.split(command)[1:]) == 0
    assert texts[0] in capsys.readouterr().out

    reopened = NanoplayApp(session=name)
    async with reopened.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert [p.state.run.text for p in panes(reopened)] == texts
        assert [p.diverge_at for p in panes(reopened)] == diverge != [None, None]  # the markers come back too
        assert reopened.main.query_one("#prompt").text == "Saved prompt"
        assert reopened.settings.max_new_tokens == 6


async def test_cross_scoring_and_divergence(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 12
        app.settings.temperature = 0
        await send(pilot, "x")
        alpha, beta = panes(app)
        a = [t.id for t in alpha.state.run.toks]
        b = [t.id for t in beta.state.run.toks]
        first_diff = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        assert alpha.diverge_at == beta.diverge_at == first_diff
        assert f"diverges @{first_diff}" in str(beta.header_text())
        alpha.focus()
        await pilot.press("enter", "x")
        from nanoplay.tui.screens.dialogs import CrossScoreScreen

        await until(pilot, lambda: isinstance(app.screen, CrossScoreScreen))
        (result,) = app.screen.results
        engine, lm, _ = reference("beta", "x", app.settings)
        expected = engine.score(lm, alpha.state.run.prompt_ids + a)[len(alpha.state.run.prompt_ids):]
        assert [t.logprob for t in result.toks] == pytest.approx([t.logprob for t in expected], abs=1e-5)


async def test_corrupt_checkpoint_and_offline_hub_model_show_errors(models):
    weights = models / "alpha" / step_dir_name(200) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    app = NanoplayApp(models=["alpha", "gpt2", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        corrupt, hub, good = panes(app)
        assert "truncated or corrupt" in corrupt.error
        assert "nanoplay pull gpt2" in hub.error
        assert good.error is None
        app.settings.max_new_tokens = 3
        await send(pilot, "still works")
        assert len(good.state.run.toks) == 3


async def test_default_panes_are_local_checkpoints_plus_gpt2(models):
    app = NanoplayApp()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert [p.state.spec for p in panes(app)] == ["alpha", "beta", "gpt2"]


async def test_welcome_screen_when_nothing_is_available(checkpoints, hf_home, tmp_path, monkeypatch):
    from nanoplay.tui.screens.welcome import WelcomeScreen

    app = NanoplayApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, WelcomeScreen) and app.screen.is_mounted)
        await until(pilot, lambda: _plain_markdown(app.screen))  # a Markdown widget takes its text once mounted
        assert "no checkpoints" in _plain_markdown(app.screen)


def _plain_markdown(screen) -> str:
    from textual.widgets import Markdown

    return screen.query_one(Markdown).source.replace("\n", " ")


async def test_help_and_command_palette_list_every_action(models):
    from nanoplay.tui.app import COMMANDS
    from nanoplay.tui.screens.dialogs import HelpScreen

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.main)]
        assert {t for t, _, _ in COMMANDS} <= set(titles)
        # every screen binding has a palette entry or is a plain key of the help table
        actions = {a for _, _, a in COMMANDS}
        for binding in app.main.BINDINGS:
            assert binding.action in actions or binding.action == "app.help"
        await pilot.press("ctrl+c")
    assert app.return_code == 0


async def test_welcome_trains_the_demo_preset_and_opens_it(checkpoints, hf_home, tmp_path, monkeypatch):
    """The real trainer on the bundled corpus, shrunk to a couple of steps."""
    import trainer.config
    from nanoplay.tui.screens.welcome import WelcomeScreen

    real = trainer.config.load_preset
    monkeypatch.setattr(trainer.config, "load_preset", lambda name: real(
        name, max_iters=2, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=2, warmup_iters=1,
        eval_interval=2, eval_batches=1, checkpoint_interval=0, sample_tokens=0, compile=False))
    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path / "sessions"))
    monkeypatch.setenv("NANOPLAY_DATA_CACHE", str(tmp_path / "tokens"))
    shown = []  # (bar progress, status line) after each progress update

    def show_progress(screen, p):
        WelcomeScreen.show_progress.__wrapped__(screen, p)
        shown.append((screen.query_one("#train-progress").progress, str(screen.query_one("#train-status").render())))

    show_progress.__wrapped__ = WelcomeScreen.show_progress
    monkeypatch.setattr(WelcomeScreen, "show_progress", show_progress)
    app = NanoplayApp()
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, WelcomeScreen))
        await pilot.press("t")
        await until(pilot, lambda: app.screen is app.main and panes(app), timeout=120)
        assert [bar for bar, _ in shown] == [1, 2] and "step 2/2" in shown[-1][1]
        # the first step has no time estimate yet: said in words, never 'nan s left'
        assert "nan" not in shown[0][1] and "time left known after a step" in shown[0][1]
        assert "nan" not in shown[-1][1] and " left" in shown[-1][1]
        await loaded(pilot)
        (pane,) = panes(app)
        assert pane.lm is not None and pane.lm.name == "demo@2" and pane.lm.config.n_layer == 1


def test_hub_download_progress_goes_to_the_pane_status():
    """huggingface_hub drives the tqdm class it is given: bytes and speed land in the pane's status line."""
    from nanoplay.tui.screens.main import progress_class
    from nanoplay.tui.state import PaneState

    pane = ModelPane(PaneState("gpt2"))
    bar = progress_class(pane)(total=2_000_000, unit="B", unit_scale=True, desc="model.safetensors",
                               name="huggingface_hub.http_get")
    bar.update(500_000)
    bar.refresh()
    assert pane.dirty and pane.status.startswith("downloading model.safetensors")
    assert "500k/2.00M" in pane.status and "B/s" in pane.status
    bar.close()


def test_perplexity_shows_four_significant_figures_at_most():
    assert [format_perplexity(v) for v in (3.14159, 42.123, 123.456, 28866.846)] == ["3.14", "42.12", "123.5", "28867"]


async def test_opening_a_session_replaces_a_full_set_of_panes(models):
    """Ctrl+L with six panes open: the saved six replace them (the old ones are gone before the new count)."""
    from nanoplay.tui.sessions import save_session
    from nanoplay.tui.state import PaneState, Run

    specs = ["beta", "beta@100", "alpha@100", "beta", "alpha@100", "beta@100"]
    saved = [PaneState(s, runs=[Run(prompt="Saved", finish_reason="length")], current=0) for s in specs]
    save_session("six", {"mode": "compare", "prompt": "Saved", "settings": Settings(max_new_tokens=5).to_dict(),
                         "panes": [p.to_dict() for p in saved]})
    app = NanoplayApp(models=["alpha"] * 6)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("ctrl+o")  # full: said before the picker opens, not after a pick
        assert app.screen is app.main
        assert app._notifications and list(app._notifications)[-1].message == \
            "at most 6 panes: remove one first (Delete on a pane)"
        await pilot.press("ctrl+l")
        await pilot.press("enter")  # the only saved session is highlighted
        await until(pilot, lambda: [p.state.spec for p in panes(app)] == specs)
        await loaded(pilot)
        assert all(p.lm is not None and p.state.run.prompt == "Saved" for p in panes(app))
        assert app.session_name == "six" and app.settings.max_new_tokens == 5
        assert app.main.query_one("#prompt").text == "Saved"
        assert [n.message for n in app._notifications].count("at most 6 panes: remove one first (Delete on a pane)") == 1


async def test_a_pane_shows_what_happened_before_it_was_mounted(models):
    """A load that fails before the pane is mounted (fast errors do) still shows in the pane."""
    from nanoplay.tui.state import PaneState

    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        pane = ModelPane(PaneState("broken"))
        mounting = app.main.query_one("#panes").mount(pane)
        pane.error = "broken: the checkpoint is truncated"
        pane.dirty = True
        app.main.tick()  # the UI timer ran while the pane was still mounting
        await mounting
        app.main.tick()
        assert str(pane.query_one("#pane-status").render()) == "✗ broken: the checkpoint is truncated"
        assert str(pane.query_one("#pane-header").render()).startswith("broken")


async def test_sending_with_no_loadable_model_says_so(models):
    app = NanoplayApp(models=["no-such-model"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.main.query_one("#prompt").load_text("Hello")
        await pilot.press("enter")
        assert [n.message for n in app._notifications] == ["no model is loaded: add one with Ctrl+O"]
        assert app.main.query_one("#prompt").text == "Hello"  # kept for when a model is added


async def test_markdown_export_fences_model_text_and_lists_failed_panes(models):
    app = NanoplayApp(models=["alpha", "no-such-model"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 4
        await send(pilot, "Saved prompt")
        alpha, bad = panes(app)
        await pilot.press("ctrl+b")
        markdown = (models.parent / f"nanoplay-{app.session_name}.md").read_text()
    body = markdown.split("## alpha (fp32)\n\n", 1)[1]
    assert body.startswith("### main\n\n```text\nSaved prompt" + alpha.state.run.text + "\n```\n")
    assert "```bash\nnanoplay gen --model alpha@200 --dtype fp32 " in body
    assert f"## no-such-model (float32)\n\nFailed to load:\n\n```text\n{bad.error}\n```\n" in markdown


def test_markdown_fences_are_longer_than_any_backtick_run_in_the_text():
    from nanoplay.tui.sessions import fenced, to_markdown
    from nanoplay.tui.state import Message, PaneState, Run, Tok

    assert fenced("plain") == ["```text", "plain", "```"]
    assert fenced("a ```` b ` c") == ["`````text", "a ```` b ` c", "`````"]
    table = "|---|---|\n* item\n# heading"
    run = Run(prompt="P", toks=[Tok(1, "```" + table)], finish_reason="length")
    compare = to_markdown("s", "compare", "P", Settings(), [(PaneState("m", runs=[run], current=0), "m@5", "fp32", None)])
    assert "### main\n\n````text\nP```" + table + "\n````\n" in compare
    assert "```bash\nnanoplay gen --model m@5 " in compare
    chat = PaneState("m", chat=[Message("user", "hi"), Message("assistant", table)])
    assert "**user:**\n\n```text\nhi\n```\n\n**assistant:**\n\n```text\n" + table + "\n```\n" in \
        to_markdown("s", "chat", "", Settings(), [(chat, "m", "bf16", None)])


async def test_pane_headers_break_between_items_and_lose_nothing_at_six_panes(models):
    app = NanoplayApp(models=["alpha", "beta", "alpha@100", "beta@100", "alpha", "beta"])
    async with app.run_test(size=(160, 45)) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0
        app.settings.max_new_tokens = 70  # past the 64-token context: the window slides
        await send(pilot, "x")
        await pilot.pause()
        for pane in panes(app):
            run, header = pane.state.run, pane.query_one("#pane-header")
            shown = str(header.render()).split("\n")
            assert header.size.height == len(shown) >= 3  # every line is on screen
            assert all(len(line) <= header.content_size.width for line in shown)
            items = [f"{pane.lm.name}", "1.6M params", "cpu/fp32", "70 tok",
                     f"ppl {format_perplexity(run.perplexity)}", f"(prompt {format_perplexity(run.prompt_perplexity)})",
                     f"ctx {run.context_used}/64", "⟲slid"]
            if pane.diverge_at is not None:
                items.append(f"diverges @{pane.diverge_at}")
            for item in items:  # each whole on one line, never cut in two
                assert any(item in line for line in shown), (item, shown)
        assert any(p.diverge_at is not None for p in panes(app))


async def test_a_removed_pane_ignores_late_news_from_its_load(models):
    """Delete while the model is still loading: the load ends later, on a pane that has no parts any more."""
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        first = panes(app)[0]
        first.focus()
        await pilot.press("delete", "enter")
        await until(pilot, lambda: [p.state.spec for p in panes(app)] == ["beta"])
        app.main.pane_loaded(first)  # what the load worker calls when it finishes
        first.dirty = True
        app.main.tick()
        assert [p.state.spec for p in panes(app)] == ["beta"]


async def test_a_pane_that_failed_to_load_takes_no_part_in_a_chat(models):
    app = NanoplayApp(models=["alpha", "no-such-model"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.max_new_tokens = 3
        await send(pilot, "Hi")
        alpha, bad = panes(app)
        assert [m.role for m in alpha.state.chat] == ["user", "assistant"]
        assert bad.state.chat == [] and "you:" not in str(bad.body_text())


async def test_tab_visits_each_pane_once_and_returns_to_the_prompt(models):
    app = NanoplayApp(models=["alpha", "beta", "alpha@100"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        prompt = app.main.query_one("#prompt")
        prompt.focus()
        visited = []
        for _ in range(4):
            await pilot.press("tab")
            visited.append(app.focused)
        assert visited == [*panes(app), prompt]
