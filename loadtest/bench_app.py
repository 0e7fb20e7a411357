"""The app ``python -m loadtest bench actor`` deploys: one actor with a no-op method."""

import mnemos

app = mnemos.App("bench")


@app.actor(idle_timeout=600)
class Echo:
    def __init__(self) -> None:
        self.calls = 0

    def noop(self) -> None:
        self.calls += 1
