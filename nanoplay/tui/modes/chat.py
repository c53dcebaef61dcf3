"""
Chat mode: every pane holds its own conversation with the same user messages. Each turn renders the
conversation with the model's template (the KV cache reuses the shared prefix); a rewrite (1-9 on the
latest answer) or a regenerate makes another version of the latest answer, kept as a branch.
"""

from __future__ import annotations

from ..state import Message, Run, Tok
from ..widgets.pane import ModelPane
from .base import Mode


class ChatMode(Mode):
    name = "chat"
    fork_target = "a token of the latest answer"

    def send(self, text: str) -> None:
        if not text.strip():
            return
        editor = self.screen.query_one("#prompt")
        editor.remember(text)
        editor.load_text("")
        self.screen.action_stop()
        for pane in self.screen.panes:
            if pane.error is not None:  # a model that failed to load takes no part in the conversation
                continue
            pane.state.chat.append(Message("user", text))
            if pane.lm is not None:
                self.start_turn(pane)
            else:
                pane.waiting_prompt = text
            pane.refresh_view(scroll=True)

    def resume(self, pane: ModelPane, waiting: str) -> None:
        self.start_turn(pane)  # the message is already in its conversation

    def start_turn(self, pane: ModelPane) -> None:
        """
        Render the conversation with the model's template. The oldest turns that no longer fit leave the
        model's context (`context_start` moves past them), never the conversation: the pane, the session and
        the export keep them, marked as outside the context.
        """
        from ...chat import render_prompt
        from ...tokenizer import get_tokenizer

        settings = self.settings_for(pane)
        template = pane.lm.chat_template
        budget = pane.lm.config.block_size - min(settings.max_new_tokens, pane.lm.config.block_size // 2)
        tokenizer = get_tokenizer()
        chat, state = pane.state.chat, pane.state
        while True:
            messages = [{"role": m.role, "content": m.content} for m in chat[state.context_start:]]
            rendered = render_prompt(messages, template)  # ids with a chat template, text without
            ids = tokenizer.encode(rendered) if isinstance(rendered, str) else rendered
            users = [i for i in range(state.context_start, len(chat)) if chat[i].role == "user"]
            if len(ids) <= budget or len(users) < 2:
                break
            state.context_start = users[1]  # the oldest turn in the context leaves it
        run = Run(prompt=chat[-1].content, settings=settings.to_dict())
        run.chat, run.chat_ids, run.prompt_ids = True, ids, ids
        pane.state.chat.append(Message("assistant", "", toks=run.toks))
        self.start_answer(pane, run, settings)

    def start_answer(self, pane: ModelPane, run: Run, settings) -> None:
        """Generate `run`, whose message is the conversation's last, with the template's stops."""
        from ...chat import stop_strings, stop_token_ids

        template = pane.lm.chat_template
        self.start(pane, run, settings, stop_token_ids(template), stop_strings(template))

    def regenerate(self) -> None:
        self.screen.action_stop()
        for pane in self.screen.panes:
            if pane.state.chat and pane.state.chat[-1].role == "assistant":
                pane.state.chat.pop()
            if pane.state.chat and pane.state.chat[-1].role == "user" and pane.lm is not None:
                self.start_turn(pane)

    def edit_last(self) -> None:
        """Take the last user message back into the editor and remove that turn everywhere."""
        last = None
        self.screen.action_stop()
        for pane in self.screen.panes:
            users = [i for i, m in enumerate(pane.state.chat) if m.role == "user"]
            if users:
                last = pane.state.chat[users[-1]].content
                del pane.state.chat[users[-1]:]
                pane.state.context_start = min(pane.state.context_start, len(pane.state.chat))
                pane.refresh_view()
        if last is not None:
            editor = self.screen.query_one("#prompt")
            editor.show_text(last)
            editor.focus()

    def branch_from(self, pane: ModelPane, at: int, chosen: Tok) -> None:
        """The latest answer is rewritten from token `at` on; the old one stays a branch."""
        parent = pane.state.run
        settings = self.settings_for(pane)
        run = Run(prompt=parent.prompt, settings=settings.to_dict(), chat=True, chat_ids=parent.chat_ids,
                  prompt_ids=parent.prompt_ids, toks=parent.toks[:at] + [chosen], parent=pane.state.current,
                  fork_at=at, prefix_len=at + 1)
        pane.state.chat[-1] = Message("assistant", "", toks=run.toks)
        self.start_answer(pane, run, settings)

    def branches(self, pane: ModelPane) -> list[int]:
        """The versions of the latest answer: only one of them can take its place in the conversation."""
        state = pane.state
        if state.run is None or not state.chat or state.chat[-1].role != "assistant":
            return []
        return [i for i, r in enumerate(state.runs) if r.chat and r.prompt_ids == state.run.prompt_ids]

    def select_branch(self, pane: ModelPane, index: int) -> None:
        run = pane.state.runs[index]
        pane.state.chat[-1] = Message("assistant", run.text, toks=run.toks)
        super().select_branch(pane, index)

    def transcript(self, pane: ModelPane) -> str:
        return "\n\n".join(f"{m.role}: {m.content}" for m in pane.state.chat)
