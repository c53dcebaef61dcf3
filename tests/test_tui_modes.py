"""The playground's modes keep what belongs to them: chat turns outside the context stay in the
transcript, compare figures stay out of chat, a fork never copies an existing branch."""

import pytest
from conftest import tiny_model
from test_tui import SIZE, idle, loaded, panes, send, until

from nanoplay.checkpoint import save_checkpoint, step_dir_name
from nanoplay.tui.app import NanoplayApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def models(checkpoints, hf_home, tmp_path, monkeypatch):
    """checkpoints/alpha and checkpoints/beta (64-token context), checkpoints/long (128); sessions in tmp."""
    for name, seed, block_size in (("alpha", 1, 64), ("beta", 2, 64), ("long", 3, 128)):
        save_checkpoint(tiny_model(seed, block_size=block_size), checkpoints / name / step_dir_name(100), step=100)
    monkeypatch.setenv("NANOPLAY_SESSIONS", str(tmp_path / "sessions"))
    monkeypatch.chdir(tmp_path)
    return checkpoints


QUESTIONS = [f"Question {n}: what did the {animal} see in the garden this morning?"
             for n, animal in enumerate(("cat", "dog", "fox", "owl", "bee"), 1)]


async def test_chat_turns_outside_the_context_stay_in_the_pane_session_and_export(models):
    from nanoplay.tokenizer import get_tokenizer
    from nanoplay.tui.sessions import load_session

    app = NanoplayApp(models=["long"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0
        app.settings.max_new_tokens = 16  # 128 - 16: 112 tokens of conversation fit, about three turns
        (pane,) = panes(app)
        for question in QUESTIONS:
            await send(pilot, question)
        state = pane.state
        # the model's context lost the first questions...
        seen = get_tokenizer().decode(state.run.prompt_ids)
        assert len(state.run.prompt_ids) <= 112 and QUESTIONS[0] not in seen and QUESTIONS[-1] in seen
        outside = [q for q in QUESTIONS if q not in seen]
        # ...the transcript lost nothing: every question and every answer is still in the conversation
        assert [m.content for m in state.chat if m.role == "user"] == QUESTIONS
        answers = [m for m in state.chat if m.role == "assistant"]
        assert len(answers) == len(QUESTIONS) and all(m.toks and m.content for m in answers)
        assert outside and state.turns_outside_context == len(outside)
        # the pane shows them all; those outside the context dimmed, under an "outside the context" mark
        body = pane.body_text()
        assert all(q in body.plain for q in QUESTIONS)
        assert body.plain.index("outside the context") < body.plain.index(QUESTIONS[0])
        dimmed = [(sp.start, sp.end) for sp in body.spans if sp.style == "dim"]
        for q in QUESTIONS:
            at = body.plain.index(q)
            assert any(s <= at and at + len(q) <= e for s, e in dimmed) == (q in outside), q
        first_answer = body.plain.index(answers[0].content)
        assert any(s <= first_answer < e for s, e in dimmed)
        await pilot.press("ctrl+b")
        markdown = (models.parent / f"nanoplay-{app.session_name}.md").read_text()
        name = app.session_name
    for q in QUESTIONS:
        label = "**user:** (outside the context)" if q in outside else "**user:**"
        assert f"{label}\n\n```text\n{q}\n```" in markdown
    assert f"```text\n{answers[0].content}\n```" in markdown
    saved = load_session(name)["panes"][0]
    assert [m.content for m in saved.chat] == [m.content for m in state.chat]
    assert saved.context_start == state.context_start > 0


async def test_chat_shows_no_compare_figures_and_each_mode_gets_its_state_back(models):
    app = NanoplayApp(models=["alpha", "beta"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0  # greedy: the two random models part ways early
        app.settings.max_new_tokens = 6
        await send(pilot, "Compare prompt")
        await pilot.press("ctrl+r")
        await until(pilot, lambda: all(len(p.state.runs) == 2 for p in panes(app)) and idle(app))
        alpha, beta = panes(app)
        compare_runs = [p.state.run for p in panes(app)]
        compare_headers = [str(p.header_text()) for p in panes(app)]
        assert "diverges @" in compare_headers[1] and "branch 2/2" in str(alpha.status_text())
        editor = app.main.query_one("#prompt")
        editor.load_text("a compare draft")
        await pilot.press("ctrl+g")
        assert app.mode == "chat" and editor.text == ""
        for pane in panes(app):
            header, status = str(pane.header_text()), str(pane.status_text())
            assert " tok" not in header and "ppl" not in header and "diverges" not in header, header
            assert "answer" not in status and "branch" not in status and "seed" not in status, status
            assert pane.display_toks() == []
        await send(pilot, "Hi")
        chat_headers = [str(p.header_text()) for p in panes(app)]
        assert all(p.state.run.chat and "diverges" not in h for p, h in zip(panes(app), chat_headers))
        assert "answer" not in str(alpha.status_text())  # one version of this answer
        editor.load_text("a chat draft")
        await pilot.press("ctrl+g")  # back: the compare branches, figures and draft
        assert app.mode == "compare" and editor.text == "a compare draft"
        assert [p.state.run for p in panes(app)] == compare_runs
        assert [str(p.header_text()) for p in panes(app)] == compare_headers
        assert "branch 2/2" in str(alpha.status_text())
        await pilot.press("ctrl+g")  # and chat again: its answers and its draft
        assert editor.text == "a chat draft"
        assert [str(p.header_text()) for p in panes(app)] == chat_headers
        name = app.session_name
    reopened = NanoplayApp(session=name)  # the session keeps each mode's branch
    async with reopened.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert reopened.mode == "chat" and all(p.state.run.chat for p in panes(reopened))
        await pilot.press("ctrl+g")
        assert [p.state.run.text for p in panes(reopened)] == [r.text for r in compare_runs]
        assert reopened.main.query_one("#prompt").text == "Compare prompt"


async def test_forking_with_the_token_already_there_or_an_existing_branch_makes_no_copy(models):
    app = NanoplayApp(models=["alpha"])
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0  # greedy: the sampled token is alternative 1
        app.settings.max_new_tokens = 6
        await send(pilot, "Hello world")
        (pane,) = panes(app)
        main = pane.state.run
        n_prompt = len(main.prompt_toks)
        pane.focus()
        pane.cursor = n_prompt + 2
        assert main.toks[2].top[0][0] == main.toks[2].id
        await pilot.press("1")  # the token already sampled: its continuation is the one on screen
        await pilot.pause()
        assert len(pane.state.runs) == 1 and pane.state.current == 0 and idle(app)
        assert "already in branch 1" in list(app._notifications)[-1].message
        await pilot.press("2")  # a real fork
        await until(pilot, lambda: len(pane.state.runs) == 2 and idle(app))
        fork = pane.state.run
        pane.cursor = n_prompt + 2
        await pilot.press("1")  # on the fork, the first branch's token there: back to the first branch
        await pilot.pause()
        assert len(pane.state.runs) == 2 and pane.state.run is main
        pane.cursor = n_prompt + 2
        await pilot.press("2")  # the same fork again: shown, not made twice
        await pilot.pause()
        assert len(pane.state.runs) == 2 and pane.state.run is fork and idle(app)
        app.settings.temperature = 1.5  # other settings make another continuation: a new branch
        pane.cursor = n_prompt + 2
        await pilot.press("1")
        await until(pilot, lambda: len(pane.state.runs) == 3 and idle(app))
        assert pane.state.run.parent == 1 and pane.state.run.toks[2].id == main.toks[2].id


async def test_rewriting_a_chat_answer_with_the_token_already_there_makes_no_version(models):
    app = NanoplayApp(models=["alpha"], chat=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        app.settings.temperature = 0
        app.settings.max_new_tokens = 6
        await send(pilot, "Hi")
        (pane,) = panes(app)
        answer = pane.state.chat[-1]
        pane.focus()
        pane.cursor = 1
        await pilot.press("1")
        await pilot.pause()
        assert len(pane.state.runs) == 1 and pane.state.chat[-1] is answer and idle(app)
        await pilot.press("2")
        await until(pilot, lambda: len(pane.state.runs) == 2 and idle(app))
        rewritten = pane.state.chat[-1]
        assert rewritten.toks[1].id == answer.toks[1].top[1][0]
        pane.cursor = 1
        await pilot.press("1")  # the first version's token: the first version comes back
        await pilot.pause()
        assert len(pane.state.runs) == 2 and pane.state.current == 0
        assert [t.id for t in pane.state.chat[-1].toks] == [t.id for t in answer.toks]
        assert "answer 1/2" in str(pane.status_text())
