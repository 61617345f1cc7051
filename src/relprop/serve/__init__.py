"""``relprop serve``: an interactive explorer in the browser (Starlette app, hand-written page)."""
