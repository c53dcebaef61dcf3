"""
The main screen's two modes, each a controller the screen holds: compare (one prompt, every pane, forks
and divergence) and chat (a conversation per pane, its context budget, rewrites of the latest answer).
The screen routes keys and pane actions to the mode on screen; what both share is in `base`.
"""
